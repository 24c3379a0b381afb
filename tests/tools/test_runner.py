"""The runner: its rounds (``plan``), the results store, and ``run_study`` driven by an in-process serial
engine (real fits of a tiny model, a few steps each); Ray itself is tested in tests/e2e."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.tools.ablate.runner import (
    earlier_runs,
    execute,
    finished_rows,
    nothing_to_run,
    plan,
    read_csv,
    run_study,
    write_csv,
)
from shakespeare_gpt.tools.ablate.study import Run, Study
from shakespeare_gpt.utils import UserError

from .test_verdicts import FLAT, MIDDLE, grid, results, shifted, study

# --- the rounds ---


def test_plan_extends_a_grid_at_the_end_where_the_variant_is_best(tmp_path):
    s = study(tmp_path, [], extend_grid=2)
    base = set(s.runs())
    assert set(plan(s, [])[0]) == base
    falling = {1e-3: [2.3] * 3, 3e-3: [2.2] * 3, 1e-2: [2.1] * 3}  # best at the top end
    runs, notes = plan(s, results(grid(falling, MIDDLE)))
    assert set(runs) - base == {Run("a", 0.033, seed) for seed in (0, 1, 2)}  # 1e-2 * (1e-2 / 3e-3)
    assert notes == ["a is best at lr 0.01, an end of its grid: lr 0.033 added"]
    falling[0.033] = [2.0] * 3  # still best at the new end: one more, then no further (extend_grid: 2)
    assert {r.lr for r in plan(s, results(grid(falling, MIDDLE)))[0] if r.variant == "a"} == {
        *(1e-3, 3e-3, 1e-2, 0.033, 0.11)
    }
    falling[0.11] = [1.9] * 3
    assert {r.lr for r in plan(s, results(grid(falling, MIDDLE)))[0] if r.variant == "a"} == {
        *(1e-3, 3e-3, 1e-2, 0.033, 0.11)
    }


def test_plan_extends_at_the_low_end_too_and_leaves_a_variant_that_fails_to_train_alone(tmp_path):
    s = study(tmp_path, [], extend_grid=1)
    rising = {1e-3: [2.0] * 3, 3e-3: [2.1] * 3, 1e-2: [2.2] * 3}  # best at the bottom end
    runs, notes = plan(s, results(grid(rising, MIDDLE)))
    assert {r.lr for r in runs if r.variant == "a"} == {0.00033, 1e-3, 3e-3, 1e-2}
    assert notes == ["a is best at lr 0.001, an end of its grid: lr 0.00033 added"]
    stuck = {1e-3: [3.5] * 3, 3e-3: [3.4] * 3, 1e-2: [3.35] * 3}  # never below the unigram loss 3.3
    runs, notes = plan(s, results(grid(stuck, MIDDLE)))
    assert set(runs) == set(s.runs())
    assert notes == ["a fails to train (no lr beats the unigram loss): its grid is not extended"]


def test_plan_adds_seeds_where_an_interval_straddles_its_threshold(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], max_seeds=5)
    runs, notes = plan(s, results(grid(shifted(FLAT, -0.004), FLAT)))  # within noise
    extra = set(runs) - set(s.runs())
    assert {(r.variant, r.seed) for r in extra} == {(v, seed) for v in "ab" for seed in (3, 4)}
    assert len({r.lr for r in extra}) == 1  # at the best learning rates only
    assert "straddles its threshold" in notes[0]
    assert set(plan(s, results(grid(shifted(FLAT, -0.1), FLAT)))[0]) == set(s.runs())


def test_planning_to_the_end_never_drops_a_finished_run(tmp_path):
    """The runner's loop on a synthetic study: extra seeds that settle a verdict stay in it."""
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], extend_grid=2, max_seeds=8)

    def loss(r: Run) -> float:  # a slightly better than b at its best lr, noisy seeds; best inside the grids
        noise = [0.0, 0.012, -0.012, 0.006, -0.006, 0.003, -0.003, 0.0][r.seed]
        return 2.0 + abs(math.log10(r.lr / 3e-3)) * 0.1 + noise - (0.008 if r.variant == "a" else 0)

    done: dict[Run, dict] = {}
    for _ in range(10):
        todo = [r for r in plan(s, list(done.values()))[0] if r not in done]
        if not todo:
            break
        for r in todo:
            done[r] = {**results({(r.variant, r.lr): [loss(r)]})[0], "seed": r.seed}
    final, notes = plan(s, list(done.values()))
    assert set(final) == set(done) and max(r.seed for r in done) >= 3  # more seeds, and the plan came to rest
    assert not any("straddles" in n for n in notes)  # the report still says why those seeds were run
    assert notes[-1] == (
        "more seeds for a lr 0.003, b lr 0.003: an interval behind them straddled its threshold in an earlier "
        "round; with those seeds it no longer does"
    )


# --- results.csv ---


def test_csv_round_trip_keeps_every_number(tmp_path):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["best_val_loss"] += 1e-13  # full precision
    write_csv(rows, tmp_path / "results.csv")
    key = ("variant", "lr", "seed", "best_val_loss", "final_gap", "diverged", "steps")
    assert [{k: r[k] for k in key} for r in read_csv(tmp_path / "results.csv", s)] == [
        {k: r[k] for k in key} for r in rows
    ]
    assert not list(tmp_path.glob("*.part"))  # written beside it, then renamed into place


def test_read_csv_refuses_other_settings_repeated_runs_and_broken_files_in_one_line(tmp_path):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["settings"] = s.settings(Run(r["variant"], r["lr"], r["seed"]))
    path = tmp_path / "results.csv"
    write_csv(rows, path)
    assert len(read_csv(path, s)) == len(rows)
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 2\n")  # the base config changed since
    with pytest.raises(UserError, match=r"line 2: a at lr 0.001, seed 0 was computed with other settings"):
        read_csv(path, s)
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 1\n")
    write_csv(rows + rows[:1], path)
    with pytest.raises(UserError, match=r"line \d+: the run \('a', 0.001, 0\) is also on line 2: each run once"):
        read_csv(path, s)
    broken = {
        b"variant,lr,seed,diverged,steps\nbaseline,0.001,zero,False,4\n": "line 2: not a row of an ablate results.csv",
        b"variant,lr\n" + b"x" * 200_000 + b",0.001\n": "not an ablate results.csv (field larger than field limit",
        b"variant,lr\n\xff\xfe,0.001\n": "not an ablate results.csv ('utf-8' codec can't decode",
    }
    for content, expected in broken.items():
        path.write_bytes(content)
        with pytest.raises(UserError, match=re_escape(expected)):
            finished_rows(path, s)
    with pytest.raises(UserError, match=f"no results.csv in {tmp_path / 'none'}: run the study first"):
        read_csv(tmp_path / "none" / "results.csv", s)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_stale_rows_leave_the_csv_for_its_stale_file_and_a_moved_config_is_not_stale(tmp_path, capsys):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["settings"] = s.settings(Run(r["variant"], r["lr"], r["seed"]))
    path = tmp_path / "results.csv"
    write_csv(rows, path)
    assert finished_rows(tmp_path / "nowhere.csv", s) == ([], [])
    (tmp_path / "copy.yaml").write_text("# the same settings\nmodel: {n_layer: 1}\n")
    raw = yaml.safe_load((tmp_path / "study.yaml").read_text())
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**raw, "base": "copy.yaml"}))
    assert len(finished_rows(path, Study.load(tmp_path / "study.yaml"))[0]) == len(rows)
    raw["variants"]["b"] = ["v.yaml"]
    (tmp_path / "v.yaml").write_text("model: {dropout: 0.1}\n")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    changed = Study.load(tmp_path / "study.yaml")
    assert [r["variant"] for r in earlier_runs(changed, path)] == ["a"] * 9
    assert "synthetic: 9 rows of" in capsys.readouterr().out
    stale = (tmp_path / "results.csv.stale").read_text().splitlines()
    assert len(stale) == 10 and stale[1].startswith("b,0.001,0,")
    assert {r["variant"] for r in read_csv(path, changed)} == {"a"}


def test_nothing_to_run_only_when_the_csv_holds_every_run_and_no_other(tmp_path):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["settings"] = s.settings(Run(r["variant"], r["lr"], r["seed"]))
    path, logs = tmp_path / "results.csv", tmp_path / "logs"
    write_csv(rows, path)
    assert nothing_to_run(s, logs, path)
    write_csv(rows[1:], path)
    assert not nothing_to_run(s, logs, path)  # a run to do
    first = Run(rows[0]["variant"], rows[0]["lr"], rows[0]["seed"]).folder(logs) / "result.json"
    first.parent.mkdir(parents=True)
    first.write_text(json.dumps(rows[0]))
    assert not nothing_to_run(s, logs, path)  # none to do, but a finished run the CSV lacks
    write_csv(rows, path)
    assert nothing_to_run(s, logs, path)
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 2\n")
    assert not nothing_to_run(s, logs, path)  # stale rows


# --- run_study on an engine of the test's own ---


class SerialEngine:
    """Runs each submitted run in this process, one after another (``run_study``'s engine seam, without Ray).

    ``before`` is called with each run as it starts.
    """

    def __init__(self, before=lambda run: None) -> None:
        self.todo, self.before, self.ran = [], before, []

    def submit(self, study, runs, study_dir, commit) -> None:
        self.todo += [(study, run, study_dir, commit) for run in runs]

    def outcomes(self):
        while self.todo:
            study, run, study_dir, commit = self.todo.pop(0)
            self.before(run)
            self.ran.append(run)
            try:
                yield run, execute(study, run, study_dir, commit)
            except Exception as e:
                yield run, e


def write_tiny_study(folder: Path, corpus: Path, steps: int = 4, val: int = 4, **extra) -> Path:
    """Two variants of the same tiny model (their verdict always straddles), 1 lr, seeds 0 and 1, up to 3."""
    base = {
        "trainer": {"accelerator": "cpu", "max_steps": steps, "val_check_interval": val},
        "model": {"block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16, "sample_tokens": 0},
        "data": {"corpus": str(corpus), "batch_size": 4, "val_batch_size": 512, "eval_train": True},
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    claims = [{"id": 1, "claim": "a is lower", "compare": ["a", "b"]}]
    raw = {"name": "tiny", "base": "base.yaml", "learning_rates": [1e-3], "seeds": [0, 1], "max_seeds": 3}
    (folder / "study.yaml").write_text(yaml.safe_dump({**raw, "variants": {"a": [], "b": []}, "claims": claims}))
    return folder / "study.yaml"


def run_tiny(folder: Path, engine: SerialEngine | None = None) -> SerialEngine:
    """``run_study`` as the command line calls it: the report folder's CSV first, then the runs."""
    engine = engine or SerialEngine()
    study, csv_path = Study.load(folder / "study.yaml"), folder / "report" / "results.csv"
    run_study(study, folder / "logs", engine, csv_path, earlier_runs(study, csv_path))
    return engine


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> tuple[Path, str, list[int]]:
    """The tiny study run to its end once: (its folder, what it printed, the CSV's rows as each run started)."""
    folder = tmp_path_factory.mktemp("tiny")
    from tests.conftest import TINY_TEXT

    (folder / "input.txt").write_text(TINY_TEXT)
    write_tiny_study(folder, folder / "input.txt", val=2)  # two validations: a curve
    csv_path = folder / "report" / "results.csv"
    rows = []
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["pytest"])  # the CLI's arguments are the study's, not pytest's
        run_tiny(folder, SerialEngine(lambda run: rows.append(len(csv_path.read_text().splitlines()) - 1)))
    return folder, out.getvalue(), rows


@pytest.fixture
def copy_of(finished_study, tmp_path) -> Path:
    shutil.copytree(finished_study[0], tmp_path / "study")
    return tmp_path / "study"


def test_a_study_runs_its_rounds_and_rewrites_its_csv_after_every_run(finished_study):
    folder, out, rows = finished_study
    assert "tiny, round 1: 4 runs planned, 0 finished, 4 to go" in out
    assert "round 2: claim 1: the interval of at best lrs (0.001, 0.001) straddles its threshold: 3 seeds" in out
    assert "tiny, round 2: 6 runs planned, 4 finished, 2 to go" in out
    assert "tiny: all 6 runs finished" in out
    assert rows == [0, 1, 2, 3, 4, 5]  # the CSV held every finished run when the next one started
    csv_rows = (folder / "report" / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("variant,lr,seed,diverged,steps,best_val_loss") and len(csv_rows) == 7
    result = json.loads((folder / "logs" / "b" / "lr0.001_seed2" / "result.json").read_text())
    assert result["steps"] == 4 and result["best_val_loss"] < result["unigram_val_loss"] + 1
    assert result["settings"] == Study.load(folder / "study.yaml").settings(Run("b", 1e-3, 2))


def test_every_run_records_its_curve_and_a_report_draws_them_from_the_committed_files_alone(copy_of):
    result = json.loads((copy_of / "logs" / "a" / "lr0.001_seed0" / "result.json").read_text())
    steps, vals, trains = zip(*result["curve"], strict=True)
    assert steps == (2, 4) and all(math.isfinite(x) for x in vals + trains)  # both validations, in order
    assert (result["best_val_loss"], result["final_val_loss"]) == (min(vals), vals[-1])
    assert result["best_step"] == steps[vals.index(min(vals))] and result["parameters"] > 0
    rows = (copy_of / "report" / "curves.csv").read_text().splitlines()
    assert rows[0] == "variant,lr,seed,step,val_loss,train_loss" and len(rows) == 1 + 6 * 2  # 6 runs, 2 points each
    assert f"a,0.001,0,2,{vals[0]!r},{trains[0]!r}" in rows
    shutil.rmtree(copy_of / "logs")  # what a clone has: the report folder's CSVs
    study = Study.load(copy_of / "study.yaml")
    back = read_csv(copy_of / "report" / "results.csv", study)
    assert next(r for r in back if (r["variant"], r["seed"]) == ("a", 0))["curve"] == result["curve"]
    from shakespeare_gpt.tools.ablate.report import write_report

    text = write_report(study, back, copy_of / "report", str(copy_of / "study.yaml")).read_text()
    assert "![curves.png](curves.png)" in text and "![params.png](params.png)" in text
    assert (copy_of / "report" / "curves.png").stat().st_size > 0 and (copy_of / "report" / "params.png").is_file()
    assert "## What to expect from a bigger model or a longer run" in text
    assert "every validation of every run is a row of [curves.csv](curves.csv)" in text


def test_a_resumed_study_skips_finished_runs_and_redoes_a_cut_off_one(copy_of, capsys):
    logs = copy_of / "logs"
    cut = logs / "a" / "lr0.001_seed1"
    (cut / "result.json").unlink()  # as if cut off during this run: files left behind, no row in the CSV
    (cut / "half_written.ckpt").write_text("x")
    csv_path = copy_of / "report" / "results.csv"
    kept = [r for r in csv_path.read_text().splitlines(True) if not r.startswith(("a,0.001,1,", "b,0.001,0,"))]
    csv_path.write_text("".join(kept))  # b seed 0: finished, with its result.json, but not yet in the CSV
    stamps = {p: p.stat().st_mtime_ns for p in logs.glob("*/*/result.json")}
    assert run_tiny(copy_of).ran == [Run("a", 1e-3, 1)]
    assert "tiny, round 1: 6 runs planned, 5 finished, 1 to go" in capsys.readouterr().out
    assert (cut / "result.json").exists() and not (cut / "half_written.ckpt").exists()  # started over
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished runs were not run again
    assert len(csv_path.read_text().splitlines()) == 7
    assert run_tiny(copy_of).ran == [] and "runs planned" not in capsys.readouterr().out


def test_a_study_resumes_from_its_committed_csv_alone(copy_of, capsys):
    """A fresh clone has the committed results.csv and no logs: its finished runs are not run again."""
    shutil.rmtree(copy_of / "logs")
    csv_path = copy_of / "report" / "results.csv"
    rows = csv_path.read_text()
    assert run_tiny(copy_of).ran == []
    assert "tiny: 6 finished runs read from" in capsys.readouterr().out and csv_path.read_text() == rows
    assert not (copy_of / "logs").exists()


def test_a_failed_run_does_not_stop_the_round_and_the_study_ends_in_one_line(copy_of, monkeypatch, capsys):
    shutil.rmtree(copy_of / "logs" / "b")
    csv_path = copy_of / "report" / "results.csv"
    csv_path.write_text("".join(r for r in csv_path.read_text().splitlines(True) if not r.startswith("b,")))
    import shakespeare_gpt.tools.ablate.runner as runner

    def broken(study, run, study_dir, commit):
        if run.seed == 1:
            raise RuntimeError("broken point")
        return {**results({(run.variant, run.lr): [2.0]})[0], "seed": run.seed}

    monkeypatch.setattr(runner, "execute", broken)
    monkeypatch.setattr("tests.tools.test_runner.execute", broken)
    with pytest.raises(UserError, match=r"^1 run\(s\) failed; run the same command again to retry only those$"):
        run_tiny(copy_of)
    out = capsys.readouterr().out
    assert (
        "[1/2] b lr=0.001 seed=0: best val 2.0000" in out
        and "[2/2] b lr=0.001 seed=1: FAILED: RuntimeError: broken" in out
    )
    assert [r[:10] for r in csv_path.read_text().splitlines()[1:]] == [
        *("a,0.001,0,", "a,0.001,1,", "a,0.001,2,", "b,0.001,0,")
    ]


@pytest.mark.filterwarnings("ignore:Encountered `nan` values")
def test_a_run_that_diverges_before_its_first_validation_is_recorded_as_diverged(copy_of, monkeypatch):
    """Its loss turns NaN at step 2 of 6, before the one validation: a result, not a failed study."""
    import torch

    from shakespeare_gpt.lightning_module import ShakespeareGPT

    write_tiny_study(copy_of, copy_of / "input.txt", steps=6, val=6)
    loss = ShakespeareGPT.loss

    def breaking(self, batch):
        value = loss(self, batch)
        return value * torch.nan if self.trainer.global_step >= 2 else value

    monkeypatch.setattr(ShakespeareGPT, "loss", breaking)
    result = execute(Study.load(copy_of / "study.yaml"), Run("a", 1e-3, 0), copy_of / "new", "abc")
    vocab = len(set((copy_of / "input.txt").read_text()))
    assert result["diverged"] and result["best_val_loss"] == pytest.approx(math.log(vocab))  # uniform
    assert json.loads((copy_of / "new" / "a" / "lr0.001_seed0" / "result.json").read_text()) == result
