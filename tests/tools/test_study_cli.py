"""The study runner's command line: every bad flag, study or results file is one ``error:`` line and exit
status 1 with nothing written; ``--report-only`` writes the report from the CSV alone. No Ray here."""

from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.tools.ablate.__main__ import DESCRIPTION, main
from shakespeare_gpt.tools.ablate.runner import write_csv
from shakespeare_gpt.tools.ablate.study import Run, Study
from shakespeare_gpt.utils import lock

from .test_study import GOOD_STUDY
from .test_verdicts import FLAT, results


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    """A working folder with a tiny base config, a variant and a good study file; the default output
    folders (lightning_logs/, reports/) would land in it."""
    base = {"trainer": {"accelerator": "cpu", "max_steps": 4}, "model": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "v.yaml").write_text("model:\n  dropout: 0.0\n")
    (tmp_path / "study.yaml").write_text(GOOD_STUDY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv: list[str], capsys) -> str:
    """``main(argv)`` must exit 1 with one ``error:`` line on stderr and nothing on stdout; returns the line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["study.yaml", "--jobs=0"],
            'Parser key "jobs": Not of type PositiveInt: 0 does not conform to restriction v>0',
        ),
        (["study.yaml", "--jobs", "two"], "Not of type PositiveInt: invalid literal for int() with base 10: 'two'"),
        (["study.yaml", "--cpus-per-run=0"], 'Parser key "cpus_per_run": Not of type PositiveInt'),
        (["study.yaml", "--gpus-per-run=-1"], 'Parser key "gpus_per_run": Not of type NonNegativeFloat'),
        (["study.yaml", "--jbos", "2"], "unrecognized arguments: --jbos 2"),
        (["study.yaml", "--report-only=yes"], "argument --report-only: ignored explicit argument 'yes'"),
        ([], "the following arguments are required: study"),
        (["nope.yaml"], "study file nope.yaml does not exist or is not a file"),
        (["study.yaml", "--logs", "base.yaml"], "--logs base.yaml: base.yaml is a file, not a folder"),
        (["study.yaml", "--report", "base.yaml/r"], "--report base.yaml/r: base.yaml is a file, not a folder"),
        (["study.yaml", "--address=127.0.0.1:1", "--jobs=2"], "--jobs is for this machine; with --address the"),
        (["study.yaml", "--report-only"], "error: no results.csv in reports/s: run the study first, or give --report"),
    ],
)
def test_a_bad_flag_is_one_line_and_writes_nothing(place, capsys, argv, expected):
    before = files(place)
    assert expected in refused(argv, capsys)
    assert files(place) == before


def test_a_bad_study_file_is_one_line_naming_it(place, capsys):
    (place / "study.yaml").write_text(GOOD_STUDY.replace("[1e-3]", "1e-3"))
    line = refused(["study.yaml"], capsys)
    assert line.startswith('error: study file study.yaml: Parser key "learning_rates": Expected a')


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("model:\n  n_layr: 2\n", "n_layr"),  # a key the parser does not know
        ("data:\n  batch_size: 0\n", 'Parser key "data.batch_size"'),  # a value the data refuses
        ("model:\n  n_head: 5\n", "n_head"),  # a shape the model refuses
    ],
    ids=["unknown key", "data value", "model shape"],
)
def test_a_variant_the_cli_refuses_is_one_line_before_any_run(variant, why, place, capsys):
    (place / "bad.yaml").write_text(variant)
    (place / "study.yaml").write_text(GOOD_STUDY.replace("{baseline: [], nd: [v.yaml]}", "{nd: [bad.yaml]}"))
    before = files(place)
    line = refused(["study.yaml"], capsys)
    assert line.startswith(f"error: study file study.yaml: variant nd ({place / 'base.yaml'}, {place / 'bad.yaml'}):")
    assert "the CLI refuses it: " in line and why in line
    assert files(place) == before


def test_a_second_runner_on_the_same_study_or_report_is_refused(place, capsys):
    for folder in (place / "lightning_logs" / "ablations" / "s", place / "reports" / "s"):
        held = lock(folder / ".runner.lock", "held by the test")
        try:
            line = refused(["study.yaml"], capsys)
        finally:
            held.close()
        assert (
            line.startswith("error: study s is being run: wait for it to end")
            and f"{folder.relative_to(place)}/.runner.lock)" in line
        )


def test_a_broken_csv_at_start_is_one_line_and_is_left_as_it_was(place, capsys):
    csv_path = place / "reports" / "s" / "results.csv"
    csv_path.parent.mkdir(parents=True)
    content = b"variant,lr,seed,diverged,steps\nbaseline,0.001,zero,False,4\n"
    csv_path.write_bytes(content)
    assert refused(["study.yaml"], capsys).startswith(f"error: {csv_path.relative_to(place)}, line 2: not a row")
    assert csv_path.read_bytes() == content and not (place / "lightning_logs" / "ablations" / "s" / "nd").exists()


def write_finished(csv_path: Path, lrs=(1e-3,)) -> None:
    """A results.csv of the study file's runs at ``lrs``, 3 seeds each, as it would compute them now."""
    study = Study.load("study.yaml")
    rows = results({(v, lr): FLAT[lr] for v in study.variants for lr in lrs})
    for r in rows:
        r["settings"] = study.settings(Run(r["variant"], r["lr"], r["seed"]))
    write_csv(rows, csv_path)


def test_report_only_writes_the_report_from_the_csv_alone(place, capsys):
    write_finished(place / "report" / "results.csv", lrs=(1e-3, 1e-2))
    main(["study.yaml", "--report-only", "--report=report"])
    assert capsys.readouterr().out == "report: report/README.md\n"
    assert "12 runs of 2 variants at learning rates 0.001, 0.01" in (place / "report" / "README.md").read_text()
    assert not (place / "lightning_logs").exists()


def test_a_study_with_nothing_to_run_says_so_and_writes_nothing(place, capsys):
    (place / "study.yaml").write_text(GOOD_STUDY.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    write_finished(place / "reports" / "s" / "results.csv")
    (place / "reports" / "s" / "results.csv").chmod(0o604)
    (place / "reports" / "s" / "README.md").write_text("the committed report\n")

    def state() -> dict:
        return {p: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for p in files(place) if p.is_file()}

    before, paths = state(), files(place)
    main(["study.yaml"])
    assert capsys.readouterr().out == (
        "s: every run is done already, so nothing is run or written; "
        "the report: reports/s/README.md (--report-only writes it again)\n"
    )
    assert state() == before and files(place) == paths  # no file changed, none added


def test_help_names_the_project_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert DESCRIPTION in text and "shakespeare-gpt" in DESCRIPTION
    for default in ("lightning_logs/ablations", "(type: PositiveInt, default: 1)", "default: 0.0"):
        assert default in text
