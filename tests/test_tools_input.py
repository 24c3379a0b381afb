"""Bad input to the tools (ablate, bench, study files): one line naming the flag or field, the value and
what would work, exit status 1, no traceback, and nothing written. No training runs here."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.tools import ablate, bench

ROOT = Path(__file__).resolve().parents[1]

GOOD_STUDY = """\
name: s
base: base.yaml
variants: {baseline: [], nd: [v.yaml]}
learning_rates: [1e-3]
seeds: [0]
"""


@pytest.fixture
def place(tmp_path, monkeypatch) -> Path:
    """A working folder with a base config, a variant config and a good study file; the tools' default
    output folders (lightning_logs/, reports/) would land in it."""
    base = {"trainer": {"accelerator": "cpu", "max_steps": 4}, "model": {"n_layer": 1, "n_head": 2, "n_embd": 16}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "v.yaml").write_text("model:\n  dropout: 0.0\n")
    (tmp_path / "study.yaml").write_text(GOOD_STUDY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def refused(main, argv: list[str], capsys) -> str:
    """Run a tool's ``main``; it must exit 1 with one ``error:`` line on stderr. Returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --- through the real entry points (python -m ...) ---


def test_ablate_jobs_0_is_one_line(place):
    before = files(place)
    done = run_module("shakespeare_gpt.tools.ablate", "study.yaml", "--jobs", "0", cwd=place)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: --jobs 0: give the number of runs in parallel, a whole number >= 1 (e.g. --jobs 2)"
    ]
    assert done.stdout == ""
    assert files(place) == before  # no study folder, no report


def test_ablate_study_with_a_scalar_learning_rates_is_one_line(place):
    (place / "study.yaml").write_text(GOOD_STUDY.replace("learning_rates: [1e-3]", "learning_rates: 1e-3"))
    before = files(place)
    done = run_module("shakespeare_gpt.tools.ablate", "study.yaml", cwd=place)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: study file study.yaml: learning_rates 1e-3 is a single value: write a list, e.g. learning_rates: [1e-3]"
    ]
    assert files(place) == before


def test_bench_misspelt_section_is_one_line_with_a_suggestion(place):
    done = run_module("shakespeare_gpt.tools.bench", "--config=base.yaml", "--sections", "trian", cwd=place)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: --sections trian: unknown section trian (did you mean train?); give one or more of "
        "train, fit, generate, comma-separated (e.g. --sections train,generate)"
    ]
    assert not (place / "lightning_logs").exists()


# --- ablate's flags ---


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--jobs=-1"], "error: --jobs -1: give the number of runs in parallel, a whole number >= 1 (e.g. --jobs 2)"),
        (["--jobs", "two"], "--jobs two: give the number of runs in parallel, a whole number >= 1"),
        (["--jbos", "2"], "unrecognized arguments: --jbos 2 (did you mean --jobs?)"),
        (["--logs", "base.yaml"], "--logs base.yaml: base.yaml is a file, not a folder; choose another path"),
        (["--report", "base.yaml/r"], "--report base.yaml/r: base.yaml is a file, not a folder"),
        (["--report-only=yes"], "argument --report-only: ignored explicit argument 'yes'"),
    ],
)
def test_ablate_bad_flag_is_one_line(place, capsys, argv, expected):
    before = files(place)
    line = refused(ablate.main, ["study.yaml", *argv], capsys)
    assert expected in line
    assert files(place) == before


def test_ablate_without_a_study_names_what_is_missing(place, capsys):
    line = refused(ablate.main, [], capsys)
    assert line == (
        "error: the following arguments are required: study; see python -m shakespeare_gpt.tools.ablate --help"
    )


@pytest.mark.parametrize(
    ("study", "expected"),
    [
        ("nope.yaml", "study file nope.yaml does not exist: give the path of a study YAML"),
        (".", "study file . is a folder: give the path of a study YAML"),
    ],
)
def test_ablate_study_path_that_is_not_a_file_is_one_line(place, capsys, study, expected):
    assert expected in refused(ablate.main, [study], capsys)


# --- study files: every field ---

STUDY_CASES = [
    # (replace this, with this) in GOOD_STUDY, or ("", whole text); what the line must hold
    (("", ""), "study file study.yaml is empty: a study needs name, base, variants, learning_rates and seeds"),
    (("", "# just a comment\n"), "study file study.yaml is empty"),
    (("", "name: s\nbase: [unclosed\n"), "study file study.yaml is not valid YAML at line 3, column 1: expected ','"),
    (("", "- a\n- b\n"), "study file study.yaml holds [a, b], not a mapping of fields"),
    (("seeds: [0]\n", "seeds: [0]\nsedes: [1]\n"), "unknown field sedes (did you mean seeds?)"),
    (("seeds: [0]\n", "seeds: [0]\ncolour: blue\n"), "unknown field colour; the fields are name, base, variants"),
    (("learning_rates", "learning_rate"), "unknown field learning_rate (did you mean learning_rates?)"),
    (("seeds: [0]\n", ""), "study file study.yaml lacks seeds"),
    (("name: s", "name: ''"), 'name "" is not usable as a folder name'),
    (("name: s", "name: a/b"), "name a/b is not usable as a folder name: use letters, digits"),
    (("name: s", "name: .."), "name .. is not usable as a folder name"),
    (("name: s", "name: 2024"), 'name 2024: write it as text in quotes, e.g. name: "2024"'),
    (("base: base.yaml", "base: nope.yaml"), "base nope.yaml: nope.yaml does not exist; give a config file's path"),
    (("base: base.yaml", "base: [base.yaml]"), "base [base.yaml]: give a config file's path"),
    (("base: base.yaml", "base: ."), "base .: . is a folder"),
    (("{baseline: [], nd: [v.yaml]}", "{}"), "variants {} is empty: give at least one variant"),
    (("{baseline: [], nd: [v.yaml]}", "[v.yaml]"), "variants [v.yaml]: give a mapping of variant names to lists"),
    (("{baseline: [], nd: [v.yaml]}", "{nd: v.yaml}"), "variants.nd v.yaml is a single value: write a list"),
    (("{baseline: [], nd: [v.yaml]}", "{nd: [w.yaml]}"), "variants.nd w.yaml: w.yaml does not exist"),
    (("{baseline: [], nd: [v.yaml]}", "{nd: 3}"), "variants.nd 3: give a list of override configs"),
    (("{baseline: [], nd: [v.yaml]}", "{baseline: null, ../x: []}"), "variant name ../x is not usable as a folder"),
    (("[1e-3]", "1e-3"), "learning_rates 1e-3 is a single value: write a list, e.g. learning_rates: [1e-3]"),
    (("[1e-3]", "0.01"), "learning_rates 0.01 is a single value: write a list, e.g. learning_rates: [0.01]"),
    (("[1e-3]", "[]"), "learning_rates []: give a list of positive numbers"),
    (("[1e-3]", "[1e-3, -1]"), "learning_rates item -1: give a positive finite number"),
    (("[1e-3]", "[0]"), "learning_rates item 0: give a positive finite number"),
    (("[1e-3]", "[.nan]"), "learning_rates item nan: give a positive finite number"),
    (("[1e-3]", "[.inf]"), "learning_rates item inf: give a positive finite number"),
    (("[1e-3]", "[fast]"), "learning_rates item fast: give a positive finite number"),
    (("[1e-3]", "[true]"), "learning_rates item true: give a positive finite number"),
    (("[1e-3]", "[1e-3, 0.001]"), "lists 1e-3 and 0.001, which are the same run (lr0.001)"),
    (("seeds: [0]", "seeds: 0"), "seeds 0 is a single value: write a list, e.g. seeds: [0]"),
    (("seeds: [0]", "seeds: []"), "seeds []: give a list of whole numbers"),
    (("seeds: [0]", "seeds: [0, 1.5]"), "seeds item 1.5: give a whole number from 0 to 4294967295"),
    (("seeds: [0]", "seeds: [-1]"), "seeds item -1: give a whole number from 0 to 4294967295"),
    (("seeds: [0]", "seeds: ['1']"), "seeds item 1: give a whole number"),
    (("seeds: [0]", "seeds: [1, 1]"), "seeds [1, 1] lists 1 twice"),
    (("seeds: [0]\n", "seeds: [0]\nargs: --trainer.max_steps=5\n"), "args --trainer.max_steps=5 is a single value"),
    (("seeds: [0]\n", "seeds: [0]\nargs: [5]\n"), "args item 5: write each argument as text in quotes"),
    (("seeds: [0]\n", "seeds: [0]\nargs: {a: 1}\n"), "args {a: 1}: give a list of command-line arguments"),
    (
        ("seeds: [0]\n", "seeds: [0]\nargs: ['--seed_everything=3']\n"),
        "args item --seed_everything=3 sets --seed_everything, which the study sets (each run's comes from seeds)",
    ),
    (
        ("seeds: [0]\n", "seeds: [0]\nargs: ['--model.learning_rate', '0.1']\n"),
        "args item --model.learning_rate sets --model.learning_rate",
    ),
]


@pytest.mark.parametrize(("change", "expected"), STUDY_CASES, ids=[c[1][:40] for c in STUDY_CASES])
def test_bad_study_file_is_one_line_naming_file_field_and_value(place, capsys, change, expected):
    old, new = change
    text = GOOD_STUDY.replace(old, new) if old else new
    assert text != GOOD_STUDY
    (place / "study.yaml").write_text(text)
    before = files(place)
    line = refused(ablate.main, ["study.yaml", f"--logs={place / 'logs'}", f"--report={place / 'report'}"], capsys)
    assert line.startswith("error: study file study.yaml")
    assert expected in line
    assert files(place) == before  # neither logs/ nor report/ nor the defaults


def test_the_good_study_file_loads(place):
    from shakespeare_gpt.tools.study import Study

    study = Study.load("study.yaml")
    assert study.learning_rates == [1e-3]  # PyYAML reads 1e-3 as text: it is taken as a number
    assert list(study.variants) == ["baseline", "nd"] and study.seeds == [0] and study.args == []


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("model:\n  n_layr: 2\n", "did you mean --model.n_layer?"),  # a key the parser does not know
        ("data:\n  batch_size: 0\n", "--data.batch_size 0: give a whole number >= 1"),  # a value the data refuses
        ("trainer:\n  max_steps: 0\n", "--trainer.max_steps 0: give a number of training steps >= 1"),
        ("model:\n  n_head: 5\n", "--model.n_head 5 does not divide --model.n_embd 16"),
    ],
    ids=["unknown key", "data value", "trainer value", "model shape"],
)
def test_variant_the_cli_refuses_is_one_line_before_any_run(variant, why, place, capsys):
    (place / "bad.yaml").write_text(variant)
    (place / "study.yaml").write_text(GOOD_STUDY.replace("{baseline: [], nd: [v.yaml]}", "{nd: [bad.yaml]}"))
    before = files(place)
    line = refused(ablate.main, ["study.yaml", f"--logs={place / 'logs'}", f"--report={place / 'report'}"], capsys)
    assert line.startswith("error: study file study.yaml: variant nd (")
    assert "bad.yaml): the CLI refuses it: " in line and why in line
    assert files(place) == before


# --- bench's flags ---


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--sections", "train,fitt"], '--sections "train,fitt": unknown section fitt (did you mean fit?)'),
        (["--sections", ""], '--sections "": unknown section ""; give one or more of train, fit, generate'),
        (["--steps", "0"], "--steps 0: give the timed steps, a whole number >= 1 (e.g. --steps 100)"),
        (["--warmup", "-1"], "--warmup -1: give the untimed steps, a whole number >= 0 (e.g. --warmup 20)"),
        (["--repeats", "0"], "--repeats 0: give the number of repeats, a whole number >= 1 (e.g. --repeats 3)"),
        (["--fit-repeats", "0"], "--fit-repeats 0: give the number of whole fits, a whole number >= 1"),
        (["--gen-tokens", "1.5"], "--gen-tokens 1.5: give the number of tokens, a whole number >= 1"),
        (["--config", "v.yaml"], "--config given 2 times (base.yaml, v.yaml): the benchmark takes one config"),
        (["--out", "."], "--out . is a folder: give the path of a file to write"),
        (["--stpes", "3"], "--stpes: not a benchmark flag (did you mean --steps?), and the CLI refuses it: "),
        (["--model.n_layer=abc"], "--config base.yaml with --model.n_layer=abc: the CLI refuses it: "),
    ],
)
def test_bench_bad_flag_is_one_line(place, capsys, argv, expected):
    before = files(place)
    line = refused(bench.main, ["--config", "base.yaml", *argv], capsys)
    assert expected in line
    assert files(place) == before  # no lightning_logs/bench/*.json, no logs


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "nope.yaml"], "error: --config nope.yaml: does not exist; give a fit config file"),
        (["--config", "."], "error: --config .: is a folder; give a fit config file"),
        ([], "error: the following arguments are required: --config; see python -m shakespeare_gpt.tools.bench"),
    ],
)
def test_bench_without_a_usable_config_is_one_line(place, capsys, argv, expected):
    assert refused(bench.main, argv, capsys).startswith(expected)


# --- --help ---


@pytest.mark.parametrize("tool", [ablate, bench], ids=["ablate", "bench"])
def test_help_names_the_project_and_shows_every_default(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line: help wraps anywhere
    assert tool.DESCRIPTION in text and "shakespeare-gpt" in tool.DESCRIPTION
    for action in tool.parser()._actions:
        if not action.option_strings or action.default == argparse.SUPPRESS:
            continue
        if action.required:
            assert f"{action.help} (required)" in text
        elif action.default is None:  # a computed default: the help says what it is
            assert "(default: " in action.help and action.help in text
        else:
            shown = action.default if not isinstance(action.default, bool) else str(action.default)
            assert f"{action.help} (default: {shown})" in text
