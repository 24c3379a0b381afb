"""Run an ablation study: ``python -m shakespeare_gpt.tools.ablate configs/ablations/seed_study.yaml``.

A study file (``study.py``) names a base config, the variants (each a list of override configs),
the learning rates and the seeds. Every variant x learning rate x seed is one ``fit`` built by
the CLI's own entry point (``cli.build``),
logged to TensorBoard under one study folder with its hyperparameters and final metrics (the
HParams tab compares them). A finished run leaves ``result.json`` and is never run again, so an
interrupted study resumes where it stopped. The report is written at the end (see ``report.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..cli import build, quiet_third_party
from ..errors import NonFiniteLossError, UserError
from .checks import ToolParser, cli_refusal, fail, whole, writable_place
from .report import write_report
from .study import Run, Study


class MetricHistory(Callback):
    """Keeps the losses of every complete validation pass of a run, read from the trainer."""

    def __init__(self) -> None:
        self.val: list[float] = []
        self.train: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.val.append(float(metrics["val/loss"]))
        self.train.append(float(metrics["train_eval/loss"]))


def finished(study: Study, run: Run, study_dir: Path) -> bool:
    """Whether ``run`` has a result computed with the study's current settings."""
    path = run.folder(study_dir) / "result.json"
    if not path.exists():
        return False
    recorded = json.loads(path.read_text()).get("settings")
    # Results written before fingerprints were recorded (none in a fresh study) are trusted.
    return recorded is None or recorded == study.settings(run, study_dir)


def execute(study: Study, run: Run, study_dir: Path) -> dict:
    """Fit one point and write its ``result.json``; runs in a worker process."""
    folder = run.folder(study_dir)
    if folder.exists():
        shutil.rmtree(folder)  # a run interrupted earlier: start it over
    start = time.perf_counter()
    cli = build(study.run_args(run, study_dir))
    history = MetricHistory()
    cli.trainer.callbacks.append(history)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        diverged = False
    except NonFiniteLossError:  # the run is reported from its validations before the loss broke
        diverged = True
    if not history.val:
        raise RuntimeError(f"run {folder} stopped before its first validation")
    result = {
        "variant": run.variant,
        "lr": run.lr,
        "seed": run.seed,
        "settings": study.settings(run, study_dir),
        "diverged": diverged,
        "steps": cli.trainer.global_step,
        "best_val_loss": min(history.val),
        "final_val_loss": history.val[-1],
        "best_train_loss": min(history.train),
        "final_train_loss": history.train[-1],
        "final_gap": history.val[-1] - history.train[-1],
        "seconds": time.perf_counter() - start,
    }
    if not diverged:
        switches = {k: v for k, v in cli.model.hparams.items() if k not in ("vocab", "learning_rate")}
        hparams = {"variant": run.variant, "lr": run.lr, "seed": run.seed, **switches}
        names = ("best_val_loss", "final_val_loss", "final_train_loss", "final_gap")
        cli.trainer.logger.log_hyperparams(hparams, {f"hp/{k}": result[k] for k in names})
        cli.trainer.logger.finalize("success")
    tmp = folder / "result.json.part"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, folder / "result.json")
    return result


def _init_worker(threads: int) -> None:
    """Set up a worker process of the pool, which the study owns: its share of the cores (two
    trainings that each use all of them slow each other down), and Lightning's per-run banner off."""
    import logging

    import torch

    torch.set_num_threads(threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # keep the study's progress lines readable
        logging.getLogger(name).setLevel(logging.WARNING)


def _outcomes(study: Study, todo: list[Run], study_dir: Path, jobs: int):
    """Yield (run, result or exception) as runs finish: in this process for one job, else a pool."""
    if jobs == 1:
        for run in todo:
            try:
                yield run, execute(study, run, study_dir)
            except SIGTERMException:  # Ctrl-C or SIGTERM: the study stops (the run saves nothing)
                raise
            except (Exception, SystemExit) as e:  # a broken point (a bad config exits 2) is recorded
                yield run, e
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(execute, study, run, study_dir): run for run in todo}
        try:
            for future in as_completed(futures):
                error = future.exception()
                yield futures[future], error if error is not None else future.result()
        except KeyboardInterrupt:
            pool.shutdown(cancel_futures=True)  # runs not started yet are dropped; a rerun resumes
            raise


def check_variants(study: Study, study_path: str, study_dir: Path) -> None:
    """Refuse the study when the CLI refuses a variant's configs and args (parsed only, nothing run)."""
    for variant in study.variants:
        args = study.run_args(Run(variant, study.learning_rates[0], study.seeds[0]), study_dir)
        if why := cli_refusal(args):
            configs = ", ".join(str(c) for c in [study.base, *study.variants[variant]])
            extra = f" with args {' '.join(study.args)}" if study.args else ""
            raise UserError(f"study file {study_path}: variant {variant} ({configs}{extra}): the CLI refuses it: {why}")


def run_study(study: Study, study_dir: Path, jobs: int) -> list[dict]:
    """Run every point that has no ``result.json`` yet, ``jobs`` at a time; return all results."""
    todo = [r for r in study.runs() if not finished(study, r, study_dir)]
    total, done = len(study.runs()), len(study.runs()) - len(todo)
    print(f"{study.name}: {total} runs, {done} already finished, {len(todo)} to go, {jobs} at a time", flush=True)
    failures = []
    start = time.perf_counter()
    for i, (run, outcome) in enumerate(_outcomes(study, todo, study_dir, jobs), 1):
        label = f"{run.variant} lr={run.lr:g} seed={run.seed}"
        if isinstance(outcome, BaseException):  # one broken point must not stop the study
            failures.append(run)
            print(f"[{done + i}/{total}] {label}: FAILED: {type(outcome).__name__}: {outcome}", flush=True)
            continue
        eta = (time.perf_counter() - start) / i * (len(todo) - i)
        print(
            f"[{done + i}/{total}] {label}: best val {outcome['best_val_loss']:.4f}, "
            f"gap {outcome['final_gap']:+.4f} ({outcome['seconds']:.0f} s; about {eta / 60:.0f} min left)",
            flush=True,
        )
    if failures:
        raise UserError(f"{len(failures)} run(s) failed; run the same command again to retry only those")
    return [json.loads((r.folder(study_dir) / "result.json").read_text()) for r in study.runs()]


DESCRIPTION = (
    "Run an ablation study of shakespeare-gpt, the char-level GPT: every variant x learning rate x seed of a "
    "study file is one fit, logged to TensorBoard, and a report (Markdown and plots) compares them."
)


def parser() -> ToolParser:
    parser = ToolParser(
        prog="python -m shakespeare_gpt.tools.ablate",
        description=DESCRIPTION,
        epilog="A finished run is never run again: run the same command to resume an interrupted study.",
    )
    parser.add_argument("study", help="study YAML, e.g. configs/ablations/seed_study.yaml")
    jobs = whole("--jobs", 1, "the number of runs in parallel", example=2)
    parser.add_argument("--jobs", type=jobs, default=2, help="runs in parallel, each with cores/jobs threads")
    parser.add_argument(
        "--logs", default="lightning_logs/ablations", help="folder of the studies' TensorBoard runs, one subfolder each"
    )
    parser.add_argument("--report", help="report folder (default: reports/<study name>)")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs")
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        # Every flag and field is checked here, before a run starts or a folder is made.
        opts = parser().parse_args(argv)
        study = Study.load(opts.study)
        study_dir = writable_place("--logs", opts.logs, "folder", inside=study.name)
        report_dir = writable_place("--report", opts.report or f"reports/{study.name}", "folder")
        if opts.report_only:
            runs = [r for r in study.runs() if finished(study, r, study_dir)]
            results = [json.loads((r.folder(study_dir) / "result.json").read_text()) for r in runs]
            if not results:
                raise UserError(f"no finished runs of {study.name} under {study_dir}: run the study first")
        else:
            check_variants(study, opts.study, study_dir)
            results = run_study(study, study_dir, opts.jobs)
        out = write_report(study, results, report_dir)
    except UserError as e:
        fail(e)
    print(f"report: {out}")


if __name__ == "__main__":
    quiet_third_party()
    # The study's own arguments; its runs get theirs through cli.build, not from the command line.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
