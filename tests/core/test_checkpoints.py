"""Checkpoints on disk: what a checkpoint holds, and the model flags it refuses. (One written by the code
before issue 20's refactor is read in tests/e2e/test_old_checkpoints.py.)"""

import pytest
import torch
from jsonargparse import Namespace

from shakespeare_gpt.checkpoints import check_matches, read_checkpoint
from shakespeare_gpt.cli import cli_main
from shakespeare_gpt.utils import UserError

from ..conftest import tiny_fit_args


@pytest.fixture
def last_ckpt(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main([*tiny_fit_args(corpus_dir, 2), "--model.learning_rate=1e-3", "--data.batch_size=3"])
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_holds_only_built_in_values(last_ckpt):
    # weights_only refuses any class it does not know, jsonargparse's LearningRate(1e-3) included.
    torch.load(last_ckpt, weights_only=True)


def test_settings_that_contradict_a_checkpoint_are_refused_and_runtime_ones_are_not(last_ckpt):
    ckpt = read_checkpoint(last_ckpt)
    model = Namespace(class_path="shakespeare_gpt.lightning_module.ShakespeareGPT", init_args=Namespace(n_layer=3))
    with pytest.raises(UserError, match=r"was trained with n_layer=1 \(asked: 3\)"):
        check_matches(model, ckpt, last_ckpt)
    runtime = Namespace(class_path=model.class_path, init_args=Namespace(compile=True, sample_tokens=5))
    check_matches(runtime, ckpt, last_ckpt)  # how a run executes is the command line's
