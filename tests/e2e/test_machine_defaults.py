"""The machine's defaults as a user meets them, in real ``fit`` processes: the precision said in one
line and recorded in the run's config.yaml, and fewer threads, with one line, beside processes that
keep every core busy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt import hardware

from ..conftest import tiny_fit_args

pytestmark = pytest.mark.slow
BUSY = "cores are busy with other processes"


def fit(corpus_dir: Path, cwd: Path, *extra: str) -> tuple[list[str], dict]:
    """A tiny ``fit`` in its own process: its output lines and its run's saved config."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-m", "shakespeare_gpt", *tiny_fit_args(corpus_dir, 2, *extra)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    newest = max(cwd.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    return (done.stdout + done.stderr).splitlines(), yaml.safe_load((newest / "config.yaml").read_text())


def test_the_chosen_precision_is_said_once_and_recorded(corpus_dir, tmp_path):
    lines, config = fit(corpus_dir, tmp_path)
    expected = "bf16-mixed" if hardware.cpu_bf16() else "32-true"
    said = [line for line in lines if line.startswith("precision ")]
    assert len(said) == 1 and said[0].startswith(f"precision {expected}: this CPU "), lines
    assert said[0].endswith("(--trainer.precision chooses)") and config["trainer"]["precision"] == expected
    lines, config = fit(corpus_dir, tmp_path, "--trainer.precision=64-true")  # chosen: nothing to say
    assert not [line for line in lines if line.startswith("precision ")] and config["trainer"]["precision"] == "64-true"
    # Scoring that run computes as it did: in its own precision, whatever this machine would choose.
    run = max(tmp_path.glob("lightning_logs/version_*"), key=lambda p: int(p.name.split("_")[1]))
    validate = ["validate", f"--ckpt_path={run}", f"--data.corpus={corpus_dir / 'input.txt'}"]
    done = subprocess.run(
        [sys.executable, "-m", "shakespeare_gpt", *validate, "--trainer.enable_progress_bar=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("precision ")]
    assert done.returncode == 0 and said == [
        f"precision 64-true: as {next(run.glob('checkpoints/best-*'))}'s run recorded (--trainer.precision chooses)"
    ], done.stderr


@pytest.mark.skipif(hardware.TORCH_THREADS == 1, reason="one core: no fewer threads to take")
def test_beside_busy_cores_a_run_takes_fewer_threads_and_says_so(corpus_dir, tmp_path):
    if hardware.busy_cores(min_window=1.0) < 0.5:  # an idle machine (as CI's is): every core
        lines, config = fit(corpus_dir, tmp_path)
        assert not [line for line in lines if BUSY in line] and config["threads"] == hardware.TORCH_THREADS
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        lines, config = fit(corpus_dir, tmp_path)
        said = [line for line in lines if BUSY in line]
        assert len(said) == 1 and "--threads chooses" in said[0] and config["threads"] == 1, lines
        lines, config = fit(corpus_dir, tmp_path, "--threads=2")  # chosen: nothing measured, nothing said
        assert not [line for line in lines if BUSY in line] and config["threads"] == 2
    finally:
        for p in spinners:
            p.kill()
            p.wait()
