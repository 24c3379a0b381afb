"""Checkpoints on disk: one written before the refactor of issue 20 still loads, samples, scores and resumes.

``tests/data/tiny-8956ed5.ckpt`` was written by the code at commit 8956ed5 (``fit`` of the tiny model
of conftest.py on ``TINY_TEXT``, 4 steps, dropout 0.1); the sample and the val loss below are what
that code printed for it.
"""

from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from shakespeare_gpt.checkpoints import check_matches, read_checkpoint
from shakespeare_gpt.cli import cli_main
from shakespeare_gpt.utils import UserError

OLD = Path(__file__).resolve().parents[1] / "data" / "tiny-8956ed5.ckpt"


def test_an_old_checkpoint_samples_what_the_code_that_wrote_it_sampled(tmp_path, capsys):
    args = ["--sample.prompt=All:", "--sample.max_new_tokens=30", "--sample.seed=7", "--sample.top_k=5"]
    cli_main(["predict", f"--ckpt_path={OLD}", *args, f"--writer.path={tmp_path / 's.txt'}"])
    assert (tmp_path / "s.txt").read_text() == "----- sample 1 -----\nAll:e\nec?vekolaec. eco ekveeRoeukA\n"


def test_an_old_checkpoint_scores_and_resumes(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = f"--data.corpus={corpus_dir / 'input.txt'}"
    cli = cli_main(["validate", f"--ckpt_path={OLD}", corpus, "--trainer.enable_progress_bar=false"])
    assert cli.trainer.callback_metrics["val/loss"].item() == pytest.approx(3.523364414984576, abs=1e-5)
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4"]
    cli = cli_main(["fit", f"--ckpt_path={OLD}", corpus, "--trainer.max_steps=6", *quiet])
    assert cli.trainer.global_step == 6 and cli.model.hparams.n_embd == 16


def test_settings_that_contradict_a_checkpoint_are_refused_and_runtime_ones_are_not():
    ckpt = read_checkpoint(OLD)
    model = Namespace(class_path="shakespeare_gpt.lightning_module.ShakespeareGPT", init_args=Namespace(n_layer=3))
    with pytest.raises(UserError, match=r"was trained with n_layer=1 \(asked: 3\)"):
        check_matches(model, ckpt, OLD)
    runtime = Namespace(class_path=model.class_path, init_args=Namespace(compile=True, sample_tokens=5))
    check_matches(runtime, ckpt, OLD)  # how a run executes is the command line's


def test_a_checkpoint_holds_only_built_in_values(corpus_dir, tmp_path, monkeypatch):
    from ..conftest import tiny_fit_args

    monkeypatch.chdir(tmp_path)
    cli_main([*tiny_fit_args(corpus_dir, 2), "--model.learning_rate=1e-3", "--data.batch_size=3"])
    # weights_only refuses any class it does not know, jsonargparse's PositiveFloat(1e-3) included.
    torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
