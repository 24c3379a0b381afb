"""Checkpoints on disk: what a checkpoint holds, and the model flags it refuses. (One written by the code
before issue 20's refactor is read in tests/e2e/test_old_checkpoints.py.)"""

import pytest
import torch
from jsonargparse import Namespace

from shakespeare_gpt.checkpoints import PRETRAINED_MODEL, check_matches, read_checkpoint
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
        check_matches(model, ckpt, last_ckpt, {"n_layer": None})
    with pytest.raises(UserError, match=r"was trained with n_layer=1 \(asked: 3\), set by --config a.yaml: "):
        check_matches(model, ckpt, last_ckpt, {"n_layer": "a.yaml"})
    runtime = Namespace(class_path=model.class_path, init_args=Namespace(compile=True, sample_tokens=5))
    check_matches(runtime, ckpt, last_ckpt, {"compile": None, "sample_tokens": None})  # how a run executes: ours


@pytest.fixture
def gpt2_ckpt(tmp_path):
    """What a fine-tuned PretrainedLM's checkpoint tells the model flags: its class and settings (no weights)."""
    path = tmp_path / "gpt2.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": PRETRAINED_MODEL, "pretrained": "gpt2"}}, path)
    return path


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_refuses_the_model_settings_a_checkpoint_lacks_and_names_where_they_were_set(
    subcommand, gpt2_ckpt, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "char.yaml").write_text("model:\n  attention: explicit\n  n_layer: 2\n")
    for args, setting in [
        (["--config=char.yaml"], "--model.attention, set by --config char.yaml"),
        (["--config=char.yaml", "--model.attention=sdpa"], "--model.attention"),  # typed after it: the flag's
        (["--model.attention=explicit"], "--model.attention"),
        (["--model.attention=sdpa"], "--model.attention"),  # its default, typed: given all the same
        (["--model.init_args.n_layer", "6"], "--model.n_layer"),
    ]:
        with pytest.raises(SystemExit):
            cli_main([subcommand, f"--ckpt_path={gpt2_ckpt}", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {gpt2_ckpt} holds a PretrainedLM, which has no setting {setting}: drop it"], args
    with pytest.raises(SystemExit):
        cli_main([subcommand, f"--ckpt_path={gpt2_ckpt}", "--model=ShakespeareGPT"])
    err = capsys.readouterr().err.strip()
    assert err.endswith("not the ShakespeareGPT asked for by --model: a checkpoint decides its model; drop it")
