"""Running a study: the rounds (``plan``), one run (``execute``), the engine that runs them (``RayEngine``)
and the store of finished runs (``result.json`` per run, and the report folder's ``results.csv``).

The first round runs the grid the file gives. Then a variant whose best learning rate lies at an end of
its grid gets the next rate beyond it (``extend_grid``), and the points behind a verdict whose interval
straddles its threshold get more seeds (``max_seeds``), until neither applies. A finished run is never
run again: the runner starts from its ``result.json`` and from the CSV's rows, so a study whose CSV was
committed resumes in a fresh clone. A run that was cut off is run again from its start.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol

import torch
from lightning.pytorch.callbacks import Callback

from ...cli import build
from ...hardware import CPUS, machine
from ...utils import NonFiniteLossError, UserError, atomic_open, git_commit, quiet_third_party
from .study import Run, Study
from .verdicts import aggregate, best_lr, evaluate, fails_to_train

COLUMNS = (
    *("variant", "lr", "seed", "diverged", "steps", "best_val_loss", "final_val_loss", "best_train_loss"),
    *("final_train_loss", "final_gap", "unigram_val_loss", "seconds", "commit", "machine", "settings"),
    *("best_step", "parameters"),  # later columns: empty in rows of runs made before them
)
FLOATS = ("lr", "best_val_loss", "final_val_loss", "best_train_loss", "final_train_loss", "final_gap")
FLOATS += ("unigram_val_loss", "seconds")
CURVE_COLUMNS = ("variant", "lr", "seed", "step", "val_loss", "train_loss")  # curves.csv: every validation of a run


class Engine(Protocol):
    """What ``run_study`` drives: ``RayEngine``, or any object with these two methods."""

    def submit(self, study: Study, runs: list[Run], study_dir: Path, commit: str) -> None: ...

    def outcomes(self) -> Iterator[tuple[Run, dict | BaseException]]:
        """Yields (run, its result or the exception it raised) as runs finish."""


# --- one run ---


class MetricHistory(Callback):
    """Keeps the step and losses of every complete validation pass of a run, read from the trainer."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.val: list[float] = []
        self.train: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)
            self.val.append(float(trainer.callback_metrics["val/loss"]))
            self.train.append(float(trainer.callback_metrics["train_eval/loss"]))


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy, in nats, of the ``val`` token ids under the ``train`` ids' frequencies."""
    counts = torch.bincount(train.long().cpu(), minlength=vocab_size).double() + 1  # add-one: no -inf
    return float(-(counts / counts.sum()).log()[val.long().cpu()].mean())


def execute(study: Study, run: Run, study_dir: Path, commit: str) -> dict:
    """Fit one point through ``cli.build`` and write its ``result.json``; returns the result."""
    folder = run.folder(study_dir)
    if folder.exists():
        shutil.rmtree(folder)  # a run cut off earlier: start it over
    start = time.perf_counter()
    settings = study.settings(run)  # before the configs are read: what this run computes
    cli = build(study.run_args(run, study_dir))
    history, data = MetricHistory(), cli.datamodule
    cli.trainer.callbacks.append(history)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        diverged = False
    except NonFiniteLossError:  # the run is reported from its validations before the loss broke
        diverged = True
    if not history.val:
        if not diverged:
            raise RuntimeError(f"run {folder} stopped before its first validation")
        # It diverged before its first validation: scored as an untrained model (uniform over the vocabulary).
        history.steps, history.val = [0], [math.log(len(cli.model.tokenizer))]
        history.train = history.val
    best = min(range(len(history.val)), key=history.val.__getitem__)
    result = {
        **{"variant": run.variant, "lr": run.lr, "seed": run.seed, "diverged": diverged},
        "steps": cli.trainer.global_step,
        "best_val_loss": min(history.val),
        "final_val_loss": history.val[-1],
        "best_train_loss": min(history.train),
        "final_train_loss": history.train[-1],
        "final_gap": history.val[-1] - history.train[-1],
        "unigram_val_loss": unigram_loss(data.train_data, data.val_data, len(cli.model.tokenizer)),
        "seconds": time.perf_counter() - start,
        **{"commit": commit, "machine": machine(), "settings": settings},
        "best_step": history.steps[best],
        "parameters": cli.model.model.num_parameters(),
        "curve": [list(point) for point in zip(history.steps, history.val, history.train, strict=True)],
    }
    if not diverged:  # TensorBoard's HParams tab: every run with its switches and final losses
        switches = {k: v for k, v in cli.model.hparams.items() if k not in ("vocab", "learning_rate")}
        names = ("best_val_loss", "final_val_loss", "final_train_loss", "final_gap")
        hparams = {"variant": run.variant, "lr": run.lr, "seed": run.seed, **switches}
        cli.trainer.logger.log_hyperparams(hparams, {f"hp/{k}": result[k] for k in names})
        cli.trainer.logger.finalize("success")
    with atomic_open(folder / "result.json") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return result


def finished(study: Study, run: Run, study_dir: Path) -> dict | None:
    """The result of ``run`` if it was computed with the study's current settings."""
    path = run.folder(study_dir) / "result.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    return result if result.get("settings") == study.settings(run) else None


def quiet_runs() -> None:
    """Process-wide, for the runner's entry point and its workers: Lightning's banner lines ("GPU available:
    ...") for each of hundreds of runs, and the third-party noise ``utils.quiet_third_party`` drops."""
    quiet_third_party()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_in_worker(study: Study, run: Run, study_dir: Path, commit: str, threads: int) -> dict:
    """A Ray task: one run, with ``threads`` CPU threads."""
    quiet_runs()
    torch.set_num_threads(threads)
    try:
        return execute(study, run, study_dir, commit)
    except SystemExit as e:  # the CLI refused the run; a task must not end its worker
        raise RuntimeError(f"the CLI refused the run (exit status {e.code})") from None


class RayEngine:
    """Runs as Ray tasks, on a Ray instance started here (``address=None``) or on an existing cluster.

    A context manager: leaving it (normally, on an error, on Ctrl-C or SIGTERM) cancels every task still
    queued or running, which kills its worker, and disconnects; an instance started here is shut down.
    """

    def __init__(self, jobs: int, address: str | None, cpus_per_run: int, gpus_per_run: float) -> None:
        try:
            import ray
        except ImportError:
            raise UserError('the study runs its fits on Ray: pip install -e ".[study]"') from None
        self.ray, self.jobs, self.address = ray, jobs, address
        self.cpus, self.gpus = cpus_per_run, gpus_per_run
        self.pending: dict = {}
        self.terminated = False  # SIGTERM (not Ctrl-C) stopped the study

    def __enter__(self) -> RayEngine:
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if self.address is None:  # a new instance of this machine's own, even beside a `ray start` one
                self.ray.init(address="local", num_cpus=self.jobs * self.cpus, **quiet)
            else:
                self.ray.init(address=self.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--address {self.address}" if self.address else "a Ray instance on this machine"
            raise UserError(f"cannot start or reach {where}: {' '.join(str(e).split())[:300]}") from None
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)  # after ray.init, which sets its own
        self.task = self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(run_in_worker)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        # As KeyboardInterrupt, the one exception Ray's waits give back unchanged; the flag tells them apart.
        self.terminated = True
        raise KeyboardInterrupt

    def submit(self, study: Study, runs: list[Run], study_dir: Path, commit: str) -> None:
        threads = self.cpus if self.address else max(1, CPUS // self.jobs)
        for run in runs:
            self.pending[self.task.remote(study, run, study_dir, commit, threads)] = run

    def outcomes(self) -> Iterator[tuple[Run, dict | BaseException]]:
        ray = self.ray
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            run = self.pending.pop(ref)
            try:
                yield run, ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                yield run, e.cause if isinstance(e.cause, BaseException) else e
            except ray.exceptions.RayError as e:  # a worker that died, a node that left
                if self.address is None:  # this machine's own instance stopped: nothing more can run
                    raise UserError(
                        f"the study's Ray instance stopped ({type(e).__name__}): run again to resume"
                    ) from e
                yield run, e

    def __exit__(self, *exc) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short: they wait until it is done.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for ref in self.pending:
                self.ray.cancel(ref, force=True)
            self.pending.clear()
            self.ray.shutdown()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, self.previous)


# --- the rounds ---


def _beyond(edge: float, inner: float) -> float:
    """The next learning rate past ``edge`` at the grid's ratio there, to 2 significant digits (more where
    2 would not take it past the edge)."""
    exact = edge * edge / inner
    for digits in range(2, 17):
        rounded = float(f"{exact:.{digits}g}")
        if (rounded - edge) * (exact - edge) > 0 and rounded != edge:
            return rounded
    return exact


def plan(study: Study, results: list[dict]) -> tuple[list[Run], list[str]]:
    """Every run the study wants given the results so far, and why it wants those beyond its grid.

    Each variant's grid grows past an end where its best learning rate lies (up to ``extend_grid``
    rates per end, unless it fails to train); once every run of the grids has finished, the points
    behind a test whose interval straddles its threshold get seeds up to ``max_seeds``.
    """
    table = aggregate(results)
    notes: list[str] = []
    grids: dict[str, list[float]] = {}
    for v in study.variants:
        grid, points, added = sorted(study.learning_rates), table.get(v, {}), {0: 0, -1: 0}
        while study.extend_grid and all(lr in points and points[lr].n >= len(study.seeds) for lr in grid):
            if fails_to_train({lr: points[lr] for lr in grid}):
                notes.append(f"{v} fails to train (no lr beats the unigram loss): its grid is not extended")
                break
            best = best_lr(points, grid)
            end = next((e for e in (0, -1) if best == grid[e] and added[e] < study.extend_grid), None)
            if end is None:
                break
            new = _beyond(grid[end], grid[1 if end == 0 else -2])
            grid.insert(0 if end == 0 else len(grid), new)
            added[end] += 1
            notes.append(f"{v} is best at lr {best:g}, an end of its grid: lr {new:g} added")
        grids[v] = grid
    runs = {Run(v, lr, s) for v, grid in grids.items() for lr in grid for s in study.seeds}
    done = {(r["variant"], float(r["lr"]), r["seed"]) for r in results}
    # A finished run stays in the study even when the plan no longer asks for it (extra seeds that settled
    # a verdict, a grid point past an optimum that more seeds moved): dropping it would change the verdicts.
    runs |= {Run(v, lr, seed) for v, lr, seed in done if v in study.variants}
    if study.max_seeds > len(study.seeds) and all((r.variant, r.lr, r.seed) in done for r in runs):
        more = list(study.seeds)
        while len(more) < study.max_seeds:
            more.append(max(more) + 1)
        straddling: set[tuple[str, float]] = set()
        for verdict in evaluate(study, table):
            for t in verdict.tests:
                if t.verdict == "inconclusive":
                    runs |= {Run(v, lr, s) for v, lr in t.points for s in more}
                    straddling |= set(t.points)
                    notes.append(
                        f"claim {verdict.claim.id}: the interval of {t.label} straddles its threshold: "
                        f"{len(more)} seeds for {', '.join(f'{v} lr {lr:g}' for v, lr in t.points)}"
                    )
        # Extra seeds a straddling interval asked for in an earlier round, which they then settled.
        if settled := {(v, lr) for v, lr, s in done if v in study.variants and s not in study.seeds} - straddling:
            notes.append(
                f"more seeds for {', '.join(f'{v} lr {lr:g}' for v, lr in sorted(settled))}: an interval behind "
                "them straddled its threshold in an earlier round; with those seeds it no longer does"
            )
    return sorted(runs, key=lambda r: (list(study.variants).index(r.variant), r.lr, r.seed)), notes


# --- results.csv ---


def _write_rows(f, results: list[dict], header: bool = True) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    for r in sorted(results, key=lambda r: (r["variant"], r["lr"], r["seed"])):
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def write_csv(results: list[dict], path: Path) -> None:
    """Every run as a row, sorted, floats in full; the file is replaced whole or not at all. The runs' curves
    (their losses at every validation) go to ``curves.csv`` beside it, where any run has one."""
    with atomic_open(path, newline="") as f:
        _write_rows(f, results)
    if any(r.get("curve") for r in results):
        with atomic_open(path.with_name("curves.csv"), newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CURVE_COLUMNS)
            for r in sorted(results, key=lambda r: (r["variant"], r["lr"], r["seed"])):
                writer.writerows([r["variant"], repr(r["lr"]), r["seed"], *point] for point in r.get("curve") or [])


def log_command(path: Path, started: datetime, minutes: float, ended: str) -> None:
    """Add one runner command to ``commands.csv``: when it started (UTC), its wall time, how it ended."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["started_utc", "minutes", "ended"])
        writer.writerow([f"{started:%Y-%m-%d %H:%M}", f"{minutes:.1f}", ended])


def read_curves(path: Path) -> dict[tuple[str, float, int], list[list]]:
    """The curves of ``curves.csv`` (absent: none), by run: [[step, val loss, train loss], ...]."""
    curves: dict[tuple[str, float, int], list[list]] = {}
    if not path.is_file():
        return curves
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                key = (row["variant"], float(row["lr"]), int(row["seed"]))
                curves.setdefault(key, []).append([int(row["step"]), float(row["val_loss"]), float(row["train_loss"])])
    except (csv.Error, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not an ablate curves.csv ({e}): restore it (git checkout) or move it away") from None
    return curves


def _rows(path: Path) -> list[tuple[int, dict]]:
    """The rows of a results.csv with their line numbers, typed; one-line errors for a broken file."""
    rows, seen = [], {}
    try:
        curves = read_curves(path.with_name("curves.csv"))
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                try:
                    r = {**row, **{k: float(row[k]) for k in FLOATS}}
                    r.update(seed=int(row["seed"]), steps=int(row["steps"]), diverged=row["diverged"] == "True")
                    r.update({k: int(row[k]) if row.get(k) else None for k in ("best_step", "parameters")})
                except (KeyError, TypeError, ValueError) as e:
                    raise UserError(f"{path}, line {line}: not a row of an ablate results.csv ({e})") from None
                key = (r["variant"], r["lr"], r["seed"])
                r["curve"] = curves.get(key)
                if key in seen:
                    raise UserError(f"{path}, line {line}: the run {key} is also on line {seen[key]}: each run once")
                seen[key] = line
                rows.append((line, r))
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not an ablate results.csv ({e}): restore it (git checkout) or move it away") from None
    return rows


def _current(study: Study, r: dict) -> bool:
    return r["variant"] in study.variants and r.get("settings") == study.settings(Run(r["variant"], r["lr"], r["seed"]))


def read_csv(path: Path, study: Study) -> list[dict]:
    """The results a report is written from; a row of other settings or variants is refused in one line."""
    if not path.is_file():
        raise UserError(f"no {path.name} in {path.parent}: run the study first, or give --report of a folder with one")
    results = []
    for line, r in _rows(path):
        if r["variant"] not in study.variants:
            raise UserError(f"{path}, line {line}: variant {r['variant']} is not in study {study.name}")
        if r.get("settings") and not _current(study, r):
            raise UserError(
                f"{path}, line {line}: {r['variant']} at lr {r['lr']:g}, seed {r['seed']} was computed with "
                f"other settings than {study.name}'s configs now give: run the study again, or restore them"
            )
        results.append(r)
    if not results:
        raise UserError(f"{path} has no runs: run the study first")
    return results


def finished_rows(path: Path, study: Study) -> tuple[list[dict], list[dict]]:
    """The rows of a results.csv the study as it is now would compute again (finished), and the others
    (stale: other settings, or variants no longer in the study). No file: nothing finished."""
    finished, stale = [], []
    for _, r in _rows(path) if path.is_file() else []:
        (finished if _current(study, r) else stale).append(r)
    return finished, stale


def earlier_runs(study: Study, csv_path: Path) -> list[dict]:
    """The finished runs of ``csv_path`` (a committed results.csv, say); stale rows go to ``.stale`` beside it."""
    finished, stale = finished_rows(csv_path, study)
    if stale:
        kept = csv_path.with_name(csv_path.name + ".stale")
        new = not kept.exists()
        with open(kept, "a", newline="", encoding="utf-8") as f:
            _write_rows(f, stale, header=new)
        write_csv(finished, csv_path)
        print(
            f"{study.name}: {len(stale)} rows of {csv_path} were computed with other settings or are of variants "
            f"no longer in the study: moved to {kept}; their runs run again",
            flush=True,
        )
    if finished:
        print(f"{study.name}: {len(finished)} finished runs read from {csv_path}", flush=True)
    return finished


# --- the study ---


def pending(study: Study, study_dir: Path, done: dict[Run, dict]) -> tuple[list[Run], list[Run], list[str]]:
    """The runs the study wants given ``done``, those of them still to run, and why it wants those beyond its
    grid. ``done`` gains the runs an earlier command finished (their ``result.json``): what is finished may
    extend the plan."""
    while True:
        known = len(done)
        wanted, notes = plan(study, list(done.values()))
        for r in wanted:
            if r not in done and (result := finished(study, r, study_dir)):
                done[r] = result
        todo = [r for r in wanted if r not in done]
        if todo or len(done) == known:
            return wanted, todo, notes


def nothing_to_run(study: Study, study_dir: Path, csv_path: Path) -> bool:
    """Whether ``csv_path`` holds every run the study wants and no other: running it would change nothing."""
    finished, stale = finished_rows(csv_path, study)
    done = {Run(r["variant"], r["lr"], r["seed"]): r for r in finished}
    return not stale and not pending(study, study_dir, done)[1] and len(done) == len(finished)


def run_study(study: Study, study_dir: Path, engine: Engine, csv_path: Path, earlier: list[dict]) -> list[dict]:
    """Run every round of the study on ``engine``; return every result.

    The runs of ``earlier`` (from a committed results.csv) count as done; ``csv_path`` is rewritten
    after each run, so it always holds every finished run.
    """
    commit = git_commit()
    done: dict[Run, dict] = {Run(r["variant"], r["lr"], r["seed"]): r for r in earlier}
    said: set[str] = set()
    rounds = 0
    while True:
        wanted, todo, notes = pending(study, study_dir, done)
        write_csv(list(done.values()), csv_path)
        if not todo:
            break
        rounds += 1
        for note in notes:
            if note not in said:
                print(f"round {rounds}: {note}", flush=True)
                said.add(note)
        print(
            f"{study.name}, round {rounds}: {len(wanted)} runs planned, {len(wanted) - len(todo)} finished, "
            f"{len(todo)} to go",
            flush=True,
        )
        engine.submit(study, todo, study_dir, commit)
        failures = 0
        round_start = time.perf_counter()
        for i, (run, outcome) in enumerate(engine.outcomes(), 1):
            label = f"[{i}/{len(todo)}] {run.variant} lr={run.lr:g} seed={run.seed}"
            if isinstance(outcome, BaseException):  # one broken point must not stop the round
                failures += 1
                print(f"{label}: FAILED: {type(outcome).__name__}: {outcome}", flush=True)
                continue
            done[run] = outcome
            write_csv(list(done.values()), csv_path)
            eta = (time.perf_counter() - round_start) / i * (len(todo) - i)
            print(
                f"{label}: best val {outcome['best_val_loss']:.4f}, gap {outcome['final_gap']:+.4f} "
                f"({outcome['seconds']:.0f} s; round ends in about {eta / 60:.0f} min)",
                flush=True,
            )
        if failures:
            raise UserError(f"{failures} run(s) failed; run the same command again to retry only those")
    print(f"{study.name}: all {len(done)} runs finished", flush=True)
    return list(done.values())  # plan() keeps every finished run, so this is every run of the study
