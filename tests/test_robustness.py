"""Nothing is lost: a NaN loss stops before bad weights are saved; stopping and resuming is exact.

Interrupts by real signals are tested in test_interrupts.py.
"""

from pathlib import Path

import pytest
import torch

from shakespeare_gpt.cli import cli_main

from .conftest import tiny_fit_args


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
