"""Real signals sent to a real ``fit`` process, then ``fit --ckpt_path last``.

Ctrl-C (SIGINT) and SIGTERM at a random training step (in the middle of it) and during a
validation pass, and ``kill -9`` between checkpoints. In every case the resumed run must be the
run that was never interrupted: same final weights, same val losses, each step once in
TensorBoard, ``last.ckpt`` always the newest state. The refusals of ``--ckpt_path last`` (nothing
to resume, a run already being written, a checkpoint that contradicts the command) are tested here
too, each checking that the failed attempt changed no file of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shakespeare_gpt.cli import cli_main

from ..conftest import TINY_TEXT, tiny_fit_args

pytestmark = pytest.mark.slow  # real processes: the slow tier

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, VAL_EVERY = 24, 6
# Dropout on, so that the random state matters as well as the data order.
FIT = [*tiny_fit_args(Path("data"), MAX_STEPS, "--model.dropout=0.2", f"--trainer.val_check_interval={VAL_EVERY}")]
RUN = Path("lightning_logs") / "version_0"


class Pace(Callback):
    """Slows a run down so a signal can land where the test wants it, and tells the test where the run is.

    It sleeps *inside* each training step (after the backward pass, before the optimiser step)
    and inside each validation batch, writing ``<phase> <global_step>`` to ``progress`` first.
    """

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def _at(self, phase: str, step: int) -> None:
        Path("progress").write_text(f"{phase} {step}")
        time.sleep(self.seconds)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._at("train", trainer.global_step)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._at("val", trainer.global_step)


def start_fit(folder: Path, *extra: str, paced: bool = False, pace: float = 0.05) -> subprocess.Popen:
    args = [*FIT, *extra]
    if paced:
        pacer = {"class_path": "tests.e2e.test_interrupts.Pace", "init_args": {"seconds": pace}}
        args.append("--trainer.callbacks+=" + json.dumps(pacer))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "shakespeare_gpt", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def fit(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    process = start_fit(folder, *extra)
    _, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, "", err)


def wait_for(folder: Path, phase: str, step: int, process: subprocess.Popen) -> int:
    """Wait until the paced run in ``folder`` is in ``phase`` at ``step`` or later; return the step it is at."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"fit ended early: {process.stderr.read()}"
        try:
            now_phase, now_step = (folder / "progress").read_text().split()
        except (FileNotFoundError, ValueError):
            now_phase, now_step = "", "-1"
        if now_phase == phase and int(now_step) >= step:
            return int(now_step)
        time.sleep(0.005)
    raise TimeoutError(f"the run never reached {phase} {step}")


def new_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    return folder


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def checkpoint(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run that is never interrupted."""
    folder = new_folder(tmp_path_factory.mktemp("reference"), "run")
    done = fit(folder)
    assert done.returncode == 0, done.stderr
    return folder / RUN


def assert_same_run(resumed: Path, reference: Path) -> None:
    """The resumed run ended where the reference did, with its weights and its curves, each step once."""
    files = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert files == sorted(p.name for p in (reference / "checkpoints").iterdir())  # no last-v1.ckpt
    ours, theirs = checkpoint(resumed), checkpoint(reference)
    assert ours["global_step"] == theirs["global_step"] == MAX_STEPS
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name
    got, want = scalars(resumed), scalars(reference)
    for tag in ("train/loss", "val/loss", "train/lr/decayed"):
        assert got[tag] == want[tag], tag  # same steps, each once, same values


def assert_validate_uses_newest_weights(run: Path, reference: Path, capsys) -> None:
    cli = cli_main(
        ["validate", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--trainer.logger=false"]
        + [f"--data.corpus={run.parents[1] / 'data' / 'input.txt'}", "--trainer.enable_progress_bar=false"]
    )
    # TensorBoard keeps float32; the metric is a float64 sum divided by a count.
    logged = cli.trainer.callback_metrics["val/loss"].float().item()
    assert logged == scalars(reference)["val/loss"][-1][1]
    capsys.readouterr()


@pytest.mark.parametrize("phase", ["train", "val"])
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_then_resume_is_the_run_that_never_stopped(how, phase, reference, tmp_path, monkeypatch, capsys):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    # Any step but the last; for a validation, any but the final one (after which nothing is left to stop).
    target = (
        rng.randrange(1, MAX_STEPS - 1) if phase == "train" else VAL_EVERY * rng.randrange(1, MAX_STEPS // VAL_EVERY)
    )
    folder = new_folder(tmp_path, "run")
    process = start_fit(folder, paced=True)
    target = wait_for(folder, phase, target, process)
    process.send_signal(how)
    _, err = process.communicate(timeout=120)
    where = f"(random seed {seed}: {phase} step {target})"
    assert process.returncode == 128 + how, f"{where}\n{err}"
    run = folder / RUN
    stopped = checkpoint(run)["global_step"]
    # The step under way is finished; a validation under way (or about to start) is cut short.
    assert stopped == target + 1 if phase == "train" else stopped == target, where
    cut = phase == "val" or stopped % VAL_EVERY == 0
    during = " (in its validation, which a resume runs again)" if cut else ""
    assert f"after step {stopped}{during}: saved {RUN / 'checkpoints' / 'last.ckpt'}; resume with" in err, err
    val = scalars(run).get("val/loss", [])
    assert val == scalars(reference)["val/loss"][: len(val)]  # only complete passes, the reference's values
    assert len(val) == stopped // VAL_EVERY - cut, where

    resumed = fit(folder, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, reference)
    monkeypatch.chdir(folder)
    assert_validate_uses_newest_weights(run, reference, capsys)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_during_a_long_validation_takes_a_batch_not_the_pass(how, reference, tmp_path):
    folder = new_folder(tmp_path, "run")
    process = start_fit(folder, paced=True, pace=0.5)  # a validation of 10+ batches: 5 s or more
    wait_for(folder, "val", VAL_EVERY, process)
    sent = time.monotonic()
    process.send_signal(how)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + how, err
    assert time.monotonic() - sent < 3, err  # a batch (0.5 s here) and the checkpoint, not the pass
    assert checkpoint(folder / RUN)["global_step"] == VAL_EVERY and "val/loss" not in scalars(folder / RUN)
    resumed = fit(folder, "--ckpt_path=last")  # it runs that validation again, from its first batch
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(folder / RUN, reference)


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_that_blocks_a_resume(reference, tmp_path):
    folder = new_folder(tmp_path, "run")
    shutil.copytree(reference, folder / RUN)  # an earlier run, finished
    process = start_fit(folder, paced=True, pace=1.0)  # a new run, version_1, a second a step
    wait_for(folder, "train", 1, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # again, before the step ends: stop now, saving nothing
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "removed lightning_logs/version_1: the run was stopped before its first checkpoint" in err, err
    assert sorted(p.name for p in (folder / "lightning_logs").iterdir()) == ["version_0"]
    resumed = fit(folder, "--ckpt_path=last")  # the run before it: finished, so nothing more to do
    assert resumed.returncode == 0, resumed.stderr


def test_kill_9_then_resume_drops_the_lost_steps_from_the_curves(reference, tmp_path, monkeypatch, capsys):
    seed = random.randrange(10**6)
    target = random.Random(seed).randrange(VAL_EVERY + 1, MAX_STEPS - 1)  # past the first checkpoint
    folder = new_folder(tmp_path, "run")
    process = start_fit(folder, paced=True)
    target = wait_for(folder, "train", target, process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    run = folder / RUN
    assert checkpoint(run)["global_step"] == target // VAL_EVERY * VAL_EVERY, f"random seed {seed}"
    resumed = fit(folder, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, reference)
    monkeypatch.chdir(folder)
    assert_validate_uses_newest_weights(run, reference, capsys)


def test_two_resumes_of_one_run_do_not_both_write_into_it(reference, tmp_path):
    folder = new_folder(tmp_path, "run")
    killed = start_fit(folder, paced=True)
    wait_for(folder, "train", VAL_EVERY + 1, killed)  # past the first checkpoint
    killed.kill()
    killed.communicate(timeout=60)
    (folder / "progress").unlink()
    # Slow enough to be still running while a second process starts and reads its arguments.
    first = start_fit(folder, "--ckpt_path=last", paced=True, pace=0.25)
    wait_for(folder, "train", VAL_EVERY + 1, first)
    second = fit(folder, "--ckpt_path=last")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {RUN} is being written by another fit right now: wait for it to finish, or stop it first "
        f"(pid {first.pid} on {socket.gethostname()} holds {RUN}/.lock)"
    )
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_same_run(folder / RUN, reference)


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


def test_nothing_to_resume_is_said_in_one_line_and_an_older_run_is_never_taken(
    reference, tmp_path, monkeypatch, capsys
):
    folder = new_folder(tmp_path, "run")
    monkeypatch.chdir(folder)
    code, err = run_cli([*FIT, "--ckpt_path=last"], capsys)
    assert code == 1 and err == [
        "error: nothing to resume: there is no run under lightning_logs; start one without --ckpt_path"
    ]
    shutil.copytree(reference, folder / RUN)
    newest = folder / "lightning_logs" / "version_1"  # killed before its first checkpoint
    newest.mkdir()
    before = snapshot(folder / "lightning_logs")
    code, err = run_cli([*FIT, "--ckpt_path=last"], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: nothing to resume: the newest run lightning_logs/version_1 has no checkpoint")
    assert snapshot(folder / "lightning_logs") == before


@pytest.mark.parametrize(
    "damage,message",
    [
        ("--model.n_embd=32", "was trained with n_embd=16 (asked: 32): a checkpoint decides its model's settings"),
        ("--model.norm=post", "was trained with norm='pre' (asked: 'post')"),
    ],
)
def test_a_resume_that_cannot_work_is_one_line_and_changes_no_file(
    damage, message, reference, tmp_path, monkeypatch, capsys
):
    folder = new_folder(tmp_path, "run")
    shutil.copytree(reference, folder / RUN)
    before = snapshot(folder / "lightning_logs")
    monkeypatch.chdir(folder)
    code, err = run_cli([*FIT, damage, "--ckpt_path=last"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {RUN / 'checkpoints' / 'last.ckpt'}")
    assert message in err[0]
    assert snapshot(folder / "lightning_logs") == before  # config.yaml included


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_checkpoint_is_passed_over_in_one_line(damage, reference, tmp_path, monkeypatch, capsys):
    folder = new_folder(tmp_path, "run")
    shutil.copytree(reference, folder / RUN)
    last = folder / RUN / "checkpoints" / "last.ckpt"
    (best,) = (folder / RUN / "checkpoints").glob("best-*.ckpt")

    def spoil(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"\0junk" * 99)

    monkeypatch.chdir(folder)
    spoil(best)  # the folder's best: validate takes the run's next checkpoint
    cli = cli_main(["validate", f"--ckpt_path={RUN}", "--data.corpus=data/input.txt", "--trainer.logger=false"])
    err = capsys.readouterr().err.splitlines()
    assert f"passed over {best.relative_to(folder)}: it cannot be read (truncated or corrupt)" in err
    assert f"checkpoint: {last.relative_to(folder)}" in err and cli.trainer.callback_metrics["val/loss"] > 0
    shutil.copy(reference / "checkpoints" / best.name, best)
    spoil(last)  # the run's last: a resume goes on from its newest readable checkpoint
    cli = cli_main([*FIT, "--ckpt_path=last"])
    assert f"passed over {last.relative_to(folder)}" in capsys.readouterr().err
    assert cli.trainer.global_step == MAX_STEPS


def test_model_flags_that_contradict_an_explicit_checkpoint_are_refused(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = reference / "checkpoints" / "last.ckpt"
    code, err = run_cli(["predict", f"--ckpt_path={ckpt}", "--model.n_layer=3", "--trainer.logger=false"], capsys)
    assert code == 1 and len(err) == 1
    assert "was trained with n_layer=1 (asked: 3)" in err[0]
    # How to run is not the checkpoint's to decide: sample_tokens (like compile) may differ from it.
    cli_main(
        ["predict", f"--ckpt_path={ckpt}", "--model.sample_tokens=5", "--trainer.logger=false", "--sample.prompt=a"]
    )
    assert "----- sample 1 -----\na" in capsys.readouterr().out
