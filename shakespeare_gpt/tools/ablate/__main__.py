"""The command line: parse the flags and the study file, lock the study's folders, run, write the report."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from ...cli import refusal
from ...utils import UserError, check_writable, exit_with, git_commit, lock
from .report import write_report
from .runner import RayEngine, earlier_runs, log_command, nothing_to_run, quiet_runs, read_csv, run_study
from .study import Run, Study

PROG = "python -m shakespeare_gpt.tools.ablate"
DESCRIPTION = (
    "Run an ablation study of shakespeare-gpt, the char-level GPT, on Ray: every variant x learning rate x seed "
    "of a study file is one fit, logged to TensorBoard; the report (Markdown, plots and a CSV of every run) "
    "tests the study's claims. A finished run is never run again: run the same command to resume."
)
LOCK = ".runner.lock"


def parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("study", help="study YAML, e.g. configs/ablations/seed_study.yaml")
    parser.add_argument("--jobs", type=PositiveInt, default=None, help="runs at a time on this machine (null: 2)")
    parser.add_argument("--address", type=str, default=None, help="an existing Ray cluster, e.g. auto or HOST:6379")
    parser.add_argument("--cpus-per-run", type=PositiveInt, default=1, help="with --address: CPUs each run takes")
    parser.add_argument("--gpus-per-run", type=NonNegativeFloat, default=0.0, help="GPUs each run asks Ray for")
    parser.add_argument("--logs", type=str, default="lightning_logs/ablations", help="folder of the studies' runs")
    parser.add_argument("--report", type=str, default=None, help="report folder (null: reports/<study name>)")
    parser.add_argument("--report-only", action="store_true", help="write the report from its results.csv only")
    return parser


def check_variants(study: Study, study_file: str, study_dir: Path) -> None:
    """Refuse the study when the CLI refuses a variant's configs and args (parsed and built, nothing run)."""
    for variant, configs in study.variants.items():
        if why := refusal(study.run_args(Run(variant, study.learning_rates[0], study.seeds[0]), study_dir)):
            given = ", ".join(str(c) for c in [study.base, *configs]) + "".join(f" {a}" for a in study.args)
            raise UserError(f"study file {study_file}: variant {variant} ({given}): the CLI refuses it: {why}")


def run(opts, study: Study, study_dir: Path, report_dir: Path) -> list[dict]:
    """Run the study with both folders locked: a second runner on either is refused while this one lives."""
    if opts.address and opts.jobs:
        raise UserError("--jobs is for this machine; with --address the cluster's size decides: drop --jobs")
    busy = f"study {study.name} is being run: wait for it to end, or stop it (Ctrl-C or kill) and run this again"
    for folder in (study_dir, report_dir):  # asked before the (slow) checks of every variant, creating nothing
        if held := lock(folder / LOCK, busy, create=False):
            held.close()
    check_variants(study, opts.study, study_dir)
    with ExitStack() as stack:
        for folder in (study_dir, report_dir):
            if held := lock(folder / LOCK, busy):
                stack.callback(held.close)
        earlier = earlier_runs(study, report_dir / "results.csv")
        engine = RayEngine(opts.jobs or 2, opts.address, opts.cpus_per_run, opts.gpus_per_run)
        started, clock, ended = datetime.now(UTC), time.perf_counter(), "failed"
        try:
            with engine:
                results = run_study(study, study_dir, engine, report_dir / "results.csv", earlier)
            ended = "finished"
            return results
        except KeyboardInterrupt:
            ended = "SIGTERM" if engine.terminated else "Ctrl-C"
            stopped = "the study stopped; every run it started was stopped. Run the same command to resume"
            print(f"{ended}: {stopped} (finished runs are kept).", file=sys.stderr, flush=True)
            raise SystemExit(143 if engine.terminated else 130) from None
        finally:
            minutes = (time.perf_counter() - clock) / 60
            try:
                log_command(report_dir / "commands.csv", started, minutes, ended)
            except OSError as e:  # the study's outcome, not this, is what the user needs to see
                print(f"warning: {report_dir / 'commands.csv'} not written ({e.strerror})", file=sys.stderr)
            print(f"{study.name}: this command ran for {minutes:.1f} min ({ended})", flush=True)


def main(argv: list[str] | None = None) -> None:
    try:  # every flag and field is checked before a run starts or a folder is made
        opts = parser().parse_args(argv)
        study = Study.load(opts.study)
        check_writable(Path(opts.logs), "--logs")
        study_dir = (Path(opts.logs) / study.name).resolve()
        report_dir = Path(opts.report or f"reports/{study.name}")
        check_writable(report_dir, "--report")
        if opts.report_only:
            results = read_csv(report_dir / "results.csv", study)
        elif nothing_to_run(study, study_dir, report_dir / "results.csv"):
            done = f"{study.name}: every run is done already, so nothing is run or written"
            print(f"{done}; the report: {report_dir / 'README.md'} (--report-only writes it again)")
            return
        else:
            results = run(opts, study, study_dir, report_dir)
        out = write_report(study, results, report_dir, study_file=opts.study, commit=git_commit())
    except (ArgumentError, UserError) as e:
        exit_with(e)
    print(f"report: {out}")


if __name__ == "__main__":
    quiet_runs()
    # The study's own arguments; its runs get theirs through cli.build, which warns when sys.argv has others.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
