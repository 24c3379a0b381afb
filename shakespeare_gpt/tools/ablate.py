"""Run an ablation study on Ray: ``python -m shakespeare_gpt.tools.ablate configs/ablations/seed_study.yaml``.

A study file (``study.py``) names a base config, the variants (each a list of override configs),
the learning rates, the seeds and the claims the study tests. Every variant x learning rate x
seed is one ``fit`` built by the CLI's own entry point (``cli.build``), logged to TensorBoard
under one study folder with its hyperparameters and final metrics (the HParams tab compares
them). Runs are Ray tasks: by default on a Ray instance that this command starts on this
machine and stops at the end (nothing to set up), with ``--address`` on an existing Ray
cluster (for example one started with ``ray start`` in a SLURM allocation).

The study runs in rounds. The first runs the grid the file gives. Then a variant whose best
learning rate lies at an edge of its grid gets the next learning rate beyond that edge
(``extend_grid``), and the points behind a verdict whose interval straddles its threshold get
more seeds (``max_seeds``), until neither applies. A finished run leaves ``result.json`` and a
row in the report folder's ``results.csv`` (rewritten after every run), and is never run again:
the runner starts from both, so a study whose CSV was committed resumes in a fresh clone or on
another machine. A run that was cut off is run again from its start. The report is written at the
end (see ``report.py``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from ..cli import DropLines, build, quiet_third_party
from ..errors import NonFiniteLossError, UserError
from .checks import ToolParser, cli_refusal, fail, whole, writable_place
from .report import finished_rows, keep_stale, plan, read_csv, write_csv, write_report
from .study import Run, Study

ENGINE_INSTALL = 'the study runs its fits on Ray: pip install -e ".[study]"'
LOCK = ".runner.lock"


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
    return json.loads(path.read_text()).get("settings") == study.settings(run)


def unigram_loss(datamodule) -> float:
    """Cross-entropy, in nats, of the val split under the training split's character frequencies."""
    import torch

    vocab = len(datamodule.tokenizer)
    counts = torch.bincount(datamodule.train_data.long(), minlength=vocab).double() + 1  # add-one: no -inf
    log_p = (counts / counts.sum()).log()
    return float(-log_p[datamodule.val_data.long()].mean())


def execute(study: Study, run: Run, study_dir: Path, commit: str) -> dict:
    """Fit one point and write its ``result.json``; runs in a Ray worker."""
    folder = run.folder(study_dir)
    if folder.exists():
        shutil.rmtree(folder)  # a run cut off earlier: start it over
    start = time.perf_counter()
    settings = study.settings(run)  # before the configs are read: what this run computes
    cli = build(study.run_args(run, study_dir))
    history = MetricHistory()
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
        history.val = history.train = [math.log(len(cli.datamodule.tokenizer))]
    result = {
        "variant": run.variant,
        "lr": run.lr,
        "seed": run.seed,
        "diverged": diverged,
        "steps": cli.trainer.global_step,
        "best_val_loss": min(history.val),
        "final_val_loss": history.val[-1],
        "best_train_loss": min(history.train),
        "final_train_loss": history.train[-1],
        "final_gap": history.val[-1] - history.train[-1],
        "unigram_val_loss": unigram_loss(cli.datamodule),
        "seconds": time.perf_counter() - start,
        "commit": commit,
        "machine": machine(),
        "settings": settings,
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


def machine() -> str:
    """The CPU (or GPU), threads and torch version a run used, in a few words."""
    import platform

    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        device = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor())
        device += f", {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) per run"
    return f"{device}, torch {torch.__version__}"


def quiet_runs() -> None:
    """Lightning's banner lines ("GPU available: ...") for each of hundreds of runs are left out."""
    quiet_third_party()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_in_worker(study: Study, run: Run, study_dir: Path, commit: str, threads: int) -> dict:
    """A Ray task: one run, with ``threads`` CPU threads and the runs' log lines kept out of the way."""
    import torch

    quiet_runs()
    torch.set_num_threads(threads)
    try:
        return execute(study, run, study_dir, commit)
    except SystemExit as e:  # the CLI refused the run; a task must not end its worker
        raise RuntimeError(f"the CLI refused the run (exit status {e.code})") from None


def refuse_if_running(study: Study, study_dir: Path) -> None:
    """The lock's refusal, asked before the (slow) checks of every variant, creating nothing."""
    if (study_dir / LOCK).exists():
        with study_lock(study, study_dir):
            pass


@contextmanager
def study_lock(study: Study, study_dir: Path):
    """Held while a runner works on ``study_dir``: a second runner on the same folder is refused.

    An advisory lock (``flock``) on ``study_dir/.runner.lock``: the system drops it when the
    runner's process ends, however it ends, so a stale lock file never blocks a new runner.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    handle = open(study_dir / LOCK, "a+")  # noqa: SIM115 (held open for the lock's life)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"study {study.name} in {study_dir} is being run by {holder}: wait for it to end, "
                "or stop it (Ctrl-C in its terminal, or kill its pid) and run this again to resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"runner pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


class RayEngine:
    """Runs as Ray tasks, on a Ray instance started here (``address=None``) or on an existing cluster.

    Used as a context manager: leaving it (normally, on an error, on Ctrl-C or on SIGTERM)
    cancels every task still queued or running, which kills their worker processes, and
    disconnects; a Ray instance started here is shut down with all of its processes.
    """

    def __init__(self, jobs: int, address: str | None, cpus_per_run: int, gpus_per_run: float) -> None:
        try:
            import ray
        except ImportError:
            raise UserError(ENGINE_INSTALL) from None
        self.ray = ray
        # Said at every start of a local instance; it concerns clusters reachable by others.
        setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
        setup.addFilter(DropLines("Token authentication is enabled"))
        self.jobs, self.address = jobs, address
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
        # ray.init sets its own SIGTERM handler; the runner's is set after it.
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 0}
        self.task = self.ray.remote(**options)(run_in_worker)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        # As KeyboardInterrupt, the one exception Ray's waits give back unchanged; the flag tells them apart.
        self.terminated = True
        raise KeyboardInterrupt

    def submit(self, study: Study, runs: list[Run], study_dir: Path, commit: str) -> None:
        threads = self.cpus if self.address else max(1, (os.cpu_count() or 1) // self.jobs)
        for run in runs:
            self.pending[self.task.remote(study, run, study_dir, commit, threads)] = run

    def outcomes(self):
        """Yield (run, result or exception) as runs finish."""
        ray = self.ray
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            run = self.pending.pop(ref)
            try:
                yield run, ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                yield run, e.cause if isinstance(e.cause, BaseException) else e
            except ray.exceptions.RayError as e:  # a worker that died, a node that left
                if self.address is None:  # this machine's own Ray instance stopped: nothing more can run
                    raise UserError(
                        f"the Ray instance running the study stopped ({type(e).__name__}): "
                        "run the same command to resume"
                    ) from None
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


def git_commit() -> str:
    """The commit of the code being run, with ``+changes`` when the working tree differs from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def earlier_runs(study: Study, csv_path: Path) -> list[dict]:
    """The finished runs of ``csv_path`` (a committed results.csv, say); its stale rows are moved aside."""
    finished, stale = finished_rows(csv_path, study)
    if stale:
        kept = keep_stale(stale, csv_path)
        write_csv(finished, csv_path)
        print(
            f"{study.name}: {len(stale)} rows of {csv_path} were computed with other settings or are of variants "
            f"no longer in the study: moved to {kept}; their runs run again",
            flush=True,
        )
    if finished:
        print(f"{study.name}: {len(finished)} finished runs read from {csv_path}", flush=True)
    return finished


def run_study(study: Study, study_dir: Path, engine: RayEngine, csv_path: Path, earlier: list[dict]) -> list[dict]:
    """Run every round of the study (see the module's docstring); return every result.

    The runs of ``earlier`` (from a committed results.csv) count as done; ``csv_path`` is
    rewritten after each run, so it always holds every finished run.
    """
    commit = git_commit()
    done: dict[Run, dict] = {Run(r["variant"], r["lr"], r["seed"]): r for r in earlier}
    start = time.perf_counter()
    planned: set[Run] = set()
    said: set[str] = set()
    rounds = 0
    while True:
        wanted, notes = plan(study, list(done.values()))
        for r in wanted:  # a resumed study: runs finished by an earlier command
            if r not in done and finished(study, r, study_dir):
                done[r] = json.loads((r.folder(study_dir) / "result.json").read_text())
        todo = [r for r in wanted if r not in done]
        write_csv(list(done.values()), csv_path)
        if not todo:
            if set(wanted) == planned:
                break
            planned = set(wanted)
            continue  # what is finished may extend the plan
        planned = set(wanted)
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
        failures = []
        round_start = time.perf_counter()
        for i, (run, outcome) in enumerate(engine.outcomes(), 1):
            label = f"{run.variant} lr={run.lr:g} seed={run.seed}"
            if isinstance(outcome, BaseException):  # one broken point must not stop the round
                failures.append(run)
                print(f"[{i}/{len(todo)}] {label}: FAILED: {type(outcome).__name__}: {outcome}", flush=True)
                continue
            done[run] = outcome
            write_csv(list(done.values()), csv_path)
            eta = (time.perf_counter() - round_start) / i * (len(todo) - i)
            print(
                f"[{i}/{len(todo)}] {label}: best val {outcome['best_val_loss']:.4f}, "
                f"gap {outcome['final_gap']:+.4f} ({outcome['seconds']:.0f} s; round ends in about {eta / 60:.0f} min)",
                flush=True,
            )
        if failures:
            raise UserError(f"{len(failures)} run(s) failed; run the same command again to retry only those")
    minutes = (time.perf_counter() - start) / 60
    print(f"{study.name}: all {len(done)} runs finished; this command ran for {minutes:.1f} min", flush=True)
    return list(done.values())  # plan() keeps every finished run, so this is every run of the study


def check_variants(study: Study, study_path: str, study_dir: Path) -> None:
    """Refuse the study when the CLI refuses a variant's configs and args (parsed only, nothing run)."""
    for variant in study.variants:
        args = study.run_args(Run(variant, study.learning_rates[0], study.seeds[0]), study_dir)
        if why := cli_refusal(args):
            configs = ", ".join(str(c) for c in [study.base, *study.variants[variant]])
            extra = f" with args {' '.join(study.args)}" if study.args else ""
            raise UserError(f"study file {study_path}: variant {variant} ({configs}{extra}): the CLI refuses it: {why}")


DESCRIPTION = (
    "Run an ablation study of shakespeare-gpt, the char-level GPT, on Ray: every variant x learning rate x seed "
    "of a study file is one fit, logged to TensorBoard; the report (Markdown, plots and a CSV of every run) "
    "tests the study's claims."
)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"--gpus-per-run {text!r}: give a number >= 0, e.g. --gpus-per-run 1")
    return value


def parser() -> ToolParser:
    parser = ToolParser(
        prog="python -m shakespeare_gpt.tools.ablate",
        description=DESCRIPTION,
        epilog="A finished run is never run again: run the same command to resume an interrupted study.",
    )
    parser.add_argument("study", help="study YAML, e.g. configs/ablations/seed_study.yaml")
    jobs = whole("--jobs", 1, "the number of runs in parallel", example=2)
    parser.add_argument(
        "--jobs", type=jobs, help="runs at a time on this machine, each with cores/jobs threads (default: 2)"
    )
    parser.add_argument(
        "--address",
        help="an existing Ray cluster to run on, e.g. auto or HOST:6379; its size decides how many runs go at once "
        "(default: a Ray instance of this machine's own, started and stopped by this command)",
    )
    cpus = whole("--cpus-per-run", 1, "the CPUs each run asks of the cluster", example=4)
    parser.add_argument("--cpus-per-run", type=cpus, default=1, help="with --address: CPUs (threads) each run takes")
    parser.add_argument("--gpus-per-run", type=_fraction, default=0.0, help="GPUs each run asks Ray for")
    parser.add_argument(
        "--logs", default="lightning_logs/ablations", help="folder of the studies' TensorBoard runs, one subfolder each"
    )
    parser.add_argument("--report", help="report folder (default: reports/<study name>)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the report folder's results.csv (the committed results), running nothing",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        # Every flag and field is checked here, before a run starts or a folder is made.
        opts = parser().parse_args(argv)
        study = Study.load(opts.study)
        study_dir = writable_place("--logs", opts.logs, "folder", inside=study.name).resolve()
        report_dir = writable_place("--report", opts.report or f"reports/{study.name}", "folder")
        if opts.report_only:
            results = read_csv(report_dir / "results.csv", study)
        else:
            if opts.address and opts.jobs:
                raise UserError("--jobs is for this machine; with --address the cluster's size decides: drop --jobs")
            refuse_if_running(study, study_dir)
            refuse_if_running(study, report_dir)
            check_variants(study, opts.study, study_dir)
            # Both folders locked: a second runner with other --logs must not rewrite this report's CSV.
            with study_lock(study, study_dir), study_lock(study, report_dir):
                earlier = earlier_runs(study, report_dir / "results.csv")
                engine = RayEngine(opts.jobs or 2, opts.address, opts.cpus_per_run, opts.gpus_per_run)
                try:
                    with engine:
                        results = run_study(study, study_dir, engine, report_dir / "results.csv", earlier)
                except KeyboardInterrupt:
                    name = "SIGTERM" if engine.terminated else "Ctrl-C"
                    print(
                        f"{name}: the study stopped; every run it started was stopped. Run the same command to "
                        "resume (finished runs are kept).",
                        file=sys.stderr,
                        flush=True,
                    )
                    raise SystemExit(143 if engine.terminated else 130) from None
        out = write_report(study, results, report_dir, study_file=opts.study, commit=git_commit())
    except UserError as e:
        fail(e)
    print(f"report: {out}")


if __name__ == "__main__":
    quiet_runs()
    # The study's own arguments; its runs get theirs through cli.build, not from the command line.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
