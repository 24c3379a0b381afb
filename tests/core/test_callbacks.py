"""Nothing is lost: a NaN loss stops before bad weights are saved; stopping and resuming is exact.

Interrupts by real signals are tested in test_interrupts.py.
"""

import errno
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import shakespeare_gpt.checkpoints
from shakespeare_gpt.callbacks import TensorBoard
from shakespeare_gpt.cli import build, cli_main
from shakespeare_gpt.utils import atomic_open

from ..conftest import tiny_fit_args


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.parametrize("log_every", [1, 50], ids=["caught-at-a-log-step", "caught-at-validation"])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    log_every, corpus_dir, tmp_path, monkeypatch, capsys
):
    from shakespeare_gpt.lightning_module import ShakespeareGPT

    real_loss = ShakespeareGPT.loss

    def loss_goes_nan_at_step_3(self, batch):
        loss = real_loss(self, batch)
        return loss * float("nan") if self.training and self.global_step >= 3 else loss

    monkeypatch.setattr(ShakespeareGPT, "loss", loss_goes_nan_at_step_3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main([*tiny_fit_args(corpus_dir, 8), f"--trainer.log_every_n_steps={log_every}"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the training loss became NaN or infinite at step 3:")
    run = tmp_path / "lightning_logs" / "version_0"
    assert last_step(run) == 2  # written by the step-2 validation, before the loss broke
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resumed_run_matches_an_uninterrupted_one_exactly(corpus_dir, tmp_path, monkeypatch):
    """Data order and dropout's random state are part of the checkpoint: N + N steps == 2N steps."""
    dropout = "--model.dropout=0.2"  # so the random state matters, not only the data order
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    straight = cli_main([*tiny_fit_args(corpus_dir, 8), dropout])
    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")
    cli_main([*tiny_fit_args(corpus_dir, 4), dropout])
    resumed = cli_main([*tiny_fit_args(corpus_dir, 8), dropout, "--ckpt_path=last"])
    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    a, b = straight.trainer.callback_metrics, resumed.trainer.callback_metrics
    assert a["val/loss"].item() == b["val/loss"].item()
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_ranks_draw_different_windows_and_resume_where_they_stopped():
    from shakespeare_gpt.data import RandomBatches

    step = [0]
    rank0 = RandomBatches(1000, 8, seed=1, rank=0, start=lambda: step[0])
    rank1 = RandomBatches(1000, 8, seed=1, rank=1, start=lambda: step[0])
    a, b = list(rank0), list(rank1)
    assert not any(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    step[0] = 40  # a run resumed at step 40 continues with the 41st batch
    assert torch.equal(next(iter(rank0)), a[40])


def test_a_finished_run_continued_with_more_steps_equals_one_longer_run(corpus_dir, tmp_path, monkeypatch):
    """Train 5 steps (ending between validations), then --ckpt_path last to 9: the same weights as 9 at once."""
    for folder, runs in {"extended": [(5, []), (9, ["--ckpt_path=last"])], "straight": [(9, [])]}.items():
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        for steps, extra in runs:
            cli_main(tiny_fit_args(corpus_dir, steps, *extra))
    extended, straight = (
        torch.load(tmp_path / f / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        for f in ("extended", "straight")
    )
    assert extended["global_step"] == straight["global_step"] == 9
    for key, value in straight["state_dict"].items():
        assert torch.equal(extended["state_dict"][key], value), key


def test_fit_logs_throughput_and_mfu(corpus_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    # Later flags win: log every 2 steps, one validation at the end.
    extra = ["--data.on_device=true", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=2"]
    args = tiny_fit_args(corpus_dir, 4, *extra, "--throughput.peak_flops=1e11", "--attention_maps.enabled=false")
    cli_main(args)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert events.Tags()["images"] == []  # no attention maps, as asked
    assert [e.step for e in events.Scalars("perf/tokens_per_s")] == [2, 4]
    assert all(0 < e.value < 1 for e in events.Scalars("perf/mfu"))
    # Per-step values are handed to Lightning only at the steps it writes, and all of those are written.
    for tag in ("train/loss", "train/lr/decayed", "train/lr/not_decayed"):
        assert [e.step for e in events.Scalars(tag)] == [1, 3]
    tags = events.Tags()["scalars"]
    for charts in TensorBoard.LAYOUT.values():  # every chart of the Custom Scalars tab draws a tag
        for chart, (_, patterns) in charts.items():
            assert any(re.search(p, tag) for p in patterns for tag in tags), chart


def test_lr_curve_holds_the_rate_each_step_ran_at_and_a_stopped_run_writes_its_last_loss(
    corpus_dir, tmp_path, monkeypatch
):
    """LearningRateMonitor logs at the steps Lightning writes; a run stopped between them still writes its loss."""
    from lightning.pytorch.callbacks import Callback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class StopAfterStep7(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step == 7

    monkeypatch.chdir(tmp_path)
    # A 10-step warmup: the learning rate differs at every step, so a stale value would show.
    extra = ["--trainer.log_every_n_steps=3", "--trainer.val_check_interval=100", "--model.warmup_steps=10"]
    cli = build(tiny_fit_args(corpus_dir, 12, *extra, "--model.learning_rate=1e-3")[1:])
    cli.trainer.callbacks.append(StopAfterStep7())
    cli.trainer.fit(cli.model, cli.datamodule)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0}).Reload()
    for group in ("decayed", "not_decayed"):
        lr = [(e.step, round(e.value, 8)) for e in events.Scalars(f"train/lr/{group}")]
        assert lr == [(2, 3e-4), (5, 6e-4)]  # steps 2 and 5 (0-based) ran at 3/10 and 6/10 of the peak
    assert [e.step for e in events.Scalars("train/loss")] == [2, 5, 6]


def test_a_run_shorter_than_its_validation_interval_is_validated_and_checkpointed_at_its_end(
    corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cli = cli_main([*tiny_fit_args(corpus_dir, 5), "--trainer.val_check_interval=500"])
    run = tmp_path / "lightning_logs" / "version_0"
    (best,) = (run / "checkpoints").glob("best-step5-*.ckpt")  # the last step, measured
    assert last_step(run) == 5 and "val/loss" in cli.trainer.callback_metrics
    loss = cli.trainer.callback_metrics["val/loss"].item()
    summary = capsys.readouterr().err.strip().splitlines()[-2:]  # the summary, at the end of fit
    assert summary == [
        f"best val loss {loss:.4f} ({loss / math.log(2):.3f} bits per character) at step 5: "
        f"{best.relative_to(tmp_path)}",
        "curves: tensorboard --logdir lightning_logs",
    ]


def test_the_progress_bar_counts_steps_out_of_the_run_s_total_from_where_a_resume_starts(
    corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    shown = ["--trainer.enable_progress_bar=true", "--trainer.val_check_interval=100"]
    cli_main([*tiny_fit_args(corpus_dir, 3), *shown])
    cli_main([*tiny_fit_args(corpus_dir, 6), *shown, "--ckpt_path=last"])
    out = capsys.readouterr().out  # where Lightning's bar writes
    assert "Training: 100%|██████████| 3/3" in out and "Training:  67%|██████▋   | 4/6" in out  # from step 3
    assert "Training: 100%|██████████| 6/6" in out and "Epoch" not in out


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_earlier_one_stays_whole(
    corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 2))
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}

    @contextmanager
    def disk_full_halfway(path, mode="w"):
        with atomic_open(path, mode) as f:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            yield f

    monkeypatch.setattr(shakespeare_gpt.checkpoints, "atomic_open", disk_full_halfway)
    with pytest.raises(SystemExit) as exc:
        cli_main([*tiny_fit_args(corpus_dir, 4), "--ckpt_path=last"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write a checkpoint in {checkpoints.relative_to(tmp_path)} (No space left on device): the "
        "checkpoints already there are intact; free some space, then resume with --ckpt_path last"
    )
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before  # no .part file left either


@pytest.mark.parametrize("logger", ["default", "none"])
def test_a_run_stopped_before_its_first_checkpoint_is_removed_and_nothing_else_is(
    logger, corpus_dir, tmp_path, monkeypatch, capsys
):
    from shakespeare_gpt.lightning_module import ShakespeareGPT

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt  # as a second Ctrl-C does, in the first step

    monkeypatch.setattr(ShakespeareGPT, "training_step", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("the user's")
    flags = ["--trainer.logger=false"] if logger == "none" else []
    with pytest.raises(SystemExit):
        cli_main([*tiny_fit_args(corpus_dir, 4), *flags])
    assert (tmp_path / "mine.txt").read_text() == "the user's" and corpus_dir.is_dir()
    if logger == "default":  # its own new version_0, which held nothing to resume
        assert not (tmp_path / "lightning_logs" / "version_0").exists()
        assert (
            "removed lightning_logs/version_0: the run was stopped before its first checkpoint"
            in capsys.readouterr().err
        )
    else:  # the run's folder is the current one: never removed
        assert "removed" not in capsys.readouterr().err
