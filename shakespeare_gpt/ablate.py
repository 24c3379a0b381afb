"""Run an ablation study: ``python -m shakespeare_gpt.ablate configs/ablations/seed_study.yaml``.

A study file names a base config, the variants (each a list of override configs), the learning
rates and the seeds. Every variant x learning rate x seed is one ``fit`` through the project's CLI,
logged to TensorBoard under one study folder with its hyperparameters and final metrics (the
HParams tab compares them). A finished run leaves ``result.json`` and is never run again, so an
interrupted study resumes where it stopped. The report is written at the end (see ``report.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError


@dataclass
class Study:
    """A parsed study file; paths of configs are resolved against the file's folder."""

    name: str
    base: Path
    variants: dict[str, list[Path]]
    learning_rates: list[float]
    seeds: list[int]
    args: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Study:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read study file {path}: {e.strerror}") from None
        missing = {"name", "base", "variants", "learning_rates", "seeds"} - set(raw or {})
        if missing:
            raise UserError(
                f"study file {path} lacks {', '.join(sorted(missing))}: see configs/ablations/seed_study.yaml"
            )
        here = path.parent
        variants = {name: [here / f for f in (files or [])] for name, files in raw["variants"].items()}
        study = cls(
            name=raw["name"],
            base=here / raw["base"],
            variants=variants,
            learning_rates=[float(lr) for lr in raw["learning_rates"]],
            seeds=[int(s) for s in raw["seeds"]],
            args=[str(a) for a in raw.get("args", [])],
        )
        for config in [study.base, *(f for files in variants.values() for f in files)]:
            if not config.is_file():
                raise UserError(f"study file {path} names {config}, which does not exist")
        return study

    def runs(self) -> list[Run]:
        return [Run(v, lr, s) for v in self.variants for lr in self.learning_rates for s in self.seeds]


@dataclass(frozen=True)
class Run:
    variant: str
    lr: float
    seed: int

    @property
    def version(self) -> str:
        return f"lr{self.lr:g}_seed{self.seed}"

    def folder(self, study_dir: Path) -> Path:
        return study_dir / self.variant / self.version


def fit_args(study: Study, run: Run, study_dir: Path) -> list[str]:
    """The command line of one run: exactly ``fit`` with the study's configs and this point's values."""
    configs = [f"--config={c}" for c in [study.base, *study.variants[run.variant]]]
    return [
        "fit",
        *configs,
        *study.args,
        f"--model.learning_rate={run.lr}",
        f"--seed_everything={run.seed}",
        f"--trainer.logger.init_args.save_dir={study_dir}",
        f"--trainer.logger.init_args.name={run.variant}",
        f"--trainer.logger.init_args.version={run.version}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",  # the study keeps numbers, not weights
        "--checkpoint.save_last=false",
    ]


def settings(study: Study, run: Run, study_dir: Path) -> str:
    """Fingerprint of what a run computes: its command line and the contents of its config files."""
    digest = hashlib.sha256("\0".join(fit_args(study, run, study_dir)).encode())
    for config in [study.base, *study.variants[run.variant]]:
        digest.update(config.read_bytes())
    return digest.hexdigest()


def finished(study: Study, run: Run, study_dir: Path) -> bool:
    """Whether ``run`` has a result computed with the study's current settings."""
    path = run.folder(study_dir) / "result.json"
    if not path.exists():
        return False
    recorded = json.loads(path.read_text()).get("settings")
    # Results written before fingerprints were recorded (none in a fresh study) are trusted.
    return recorded is None or recorded == settings(study, run, study_dir)


def execute(study: Study, run: Run, study_dir: Path) -> dict:
    """Fit one point and write its ``result.json``; runs in a worker process."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from .cli import cli_main

    folder = run.folder(study_dir)
    if folder.exists():
        shutil.rmtree(folder)  # a run interrupted earlier: start it over
    start = time.perf_counter()
    try:
        cli = cli_main(fit_args(study, run, study_dir))
        diverged = False
    except SystemExit:
        # The CLI has printed why (a NaN loss, say); the run is reported from its validations so far.
        cli, diverged = None, True
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    if "val/loss" not in events.Tags()["scalars"]:
        raise RuntimeError(f"run {folder} stopped before its first validation")
    val = [e.value for e in events.Scalars("val/loss")]
    train = [e.value for e in events.Scalars("train_eval/loss")]
    result = {
        "variant": run.variant,
        "lr": run.lr,
        "seed": run.seed,
        "settings": settings(study, run, study_dir),
        "diverged": diverged,
        "steps": cli.trainer.global_step if cli else events.Scalars("val/loss")[-1].step + 1,
        "best_val_loss": min(val),
        "final_val_loss": val[-1],
        "best_train_loss": min(train),
        "final_train_loss": train[-1],
        "final_gap": val[-1] - train[-1],
        "seconds": time.perf_counter() - start,
    }
    if cli is not None:
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
    import logging

    import torch

    torch.set_num_threads(threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # keep the progress lines readable
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _outcomes(study: Study, todo: list[Run], study_dir: Path, jobs: int):
    """Yield (run, result or exception) as runs finish: in this process for one job, else a pool."""
    if jobs == 1:
        for run in todo:
            try:
                yield run, execute(study, run, study_dir)
            except KeyboardInterrupt:
                raise
            except BaseException as e:
                yield run, e
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(execute, study, run, study_dir): run for run in todo}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if error is not None else future.result()


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study YAML, e.g. configs/ablations/seed_study.yaml")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cores / jobs threads)")
    parser.add_argument("--logs", default="lightning_logs/ablations", help="folder of the study's TensorBoard runs")
    parser.add_argument("--report", help="report folder (default: reports/<study name>)")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs")
    opts = parser.parse_args(argv)
    from .report import write_report

    try:
        study = Study.load(opts.study)
        study_dir = Path(opts.logs) / study.name
        if opts.report_only:
            runs = [r for r in study.runs() if finished(study, r, study_dir)]
            results = [json.loads((r.folder(study_dir) / "result.json").read_text()) for r in runs]
        else:
            results = run_study(study, study_dir, opts.jobs)
        out = write_report(study, results, Path(opts.report or f"reports/{study.name}"))
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
    print(f"report: {out}")


if __name__ == "__main__":
    main()
