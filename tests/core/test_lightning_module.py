"""The LightningModules: the training recipe, and bits per character, one definition for every
tokenizer, checked against sums done by hand.

The definition (README, "Bits per character"): the val split's total negative log-likelihood in
bits, over the characters of every token but the split's first, each token scored once by
strided windows that give it at least half a window of context after the first window.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from shakespeare_gpt.cli import cli_main
from shakespeare_gpt.data import ShakespeareDataModule, ValWindows
from shakespeare_gpt.lightning_module import LanguageModel, Recipe, ShakespeareGPT
from shakespeare_gpt.utils import UserError

from ..conftest import TINY_MODEL_ARGS, TINY_TEXT, tiny_fit_args

TINY = dict(vocab="\n abcdefgh", block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n,T", [(101, 10), (100, 10), (11, 10), (57, 7), (300, 9), (40, 2)])
def test_windows_score_every_token_but_the_first_once_with_half_a_window_of_context(n, T):
    ds = ValWindows(torch.arange(n), T)
    x, y, chars = ds.__getitems__(list(range(len(ds))))
    assert torch.equal(y[y != -1].sort().values, torch.arange(1, n))  # every target once; token 0 never
    assert torch.equal(x + 1, torch.where(y == -1, x + 1, y))  # a target is the token after its input
    assert torch.equal(chars, (y != -1).long())  # characters: one per scored token
    for row in range(1, len(y)):  # after the first window: context of at least half a window
        positions = (y[row] != -1).nonzero().flatten()
        assert (positions + 1 >= T / 2).all(), (row, positions.tolist())


class Fixed(LanguageModel):
    """A model whose next-token distribution is known: ``q``, whatever the context."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__(Recipe())
        self.register_buffer("log_q", q.log())
        self.tokenizer = Chunks()  # uneven characters per token

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_q.expand(*x.shape, -1)


class Chunks:
    """A tokenizer whose tokens cover 1, 2, 3, 4, 1, 2, ... characters: uneven on purpose.

    Its id for a chunk is the chunk's length minus one, so four ids in all.
    """

    fingerprint = "chunks of 1 to 4 characters"

    def __len__(self) -> int:
        return 4

    def encode_with_chars(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        lengths, i, k = [], 0, 0
        while i < len(text):
            step = min(k % 4 + 1, len(text) - i)
            lengths.append(step)
            i, k = i + step, k + 1
        chars = torch.tensor(lengths)
        return chars - 1, chars


def validate(model: LanguageModel, dm: ShakespeareDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    return metrics


@pytest.mark.parametrize("block_size", [5, 8, 16])
def test_bpc_of_a_known_distribution_equals_the_sum_done_by_hand(corpus_dir, block_size):
    dm = ShakespeareDataModule(str(corpus_dir / "input.txt"), block_size=block_size, batch_size=4, val_batch_size=3)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    metrics = validate(Fixed(q), dm)

    # By hand, from the val text alone: its tokens, each but the first scored once.
    val_text = TINY_TEXT[int(0.9 * len(TINY_TEXT)) :]
    ids, chars = Chunks().encode_with_chars(val_text)
    assert chars.sum() == len(val_text)
    bits = sum(-math.log2(q[i]) for i in ids[1:].tolist())
    assert metrics["val/bpc"] == pytest.approx(bits / chars[1:].sum().item(), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(bits * math.log(2) / (len(ids) - 1), rel=1e-5)


def test_a_character_model_bpc_is_its_loss_in_bits(corpus_dir):
    dm = ShakespeareDataModule(str(corpus_dir / "input.txt"), block_size=16, batch_size=4)
    torch.manual_seed(0)
    model = ShakespeareGPT(dm.vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    metrics = validate(model, dm)
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-6)

    # And the same number as scoring each token of the val split once, by hand, with the
    # context the windows give it (inputs from the window's start).
    val = dm.val_data
    ds = ValWindows(val, 16)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, _ in zip(*ds.__getitems__(list(range(len(ds)))), strict=True):
            for j in (y != -1).nonzero().flatten().tolist():
                logits = model.model(x[None, : j + 1])[0][0, -1]
                total -= torch.log_softmax(logits, -1)[y[j]].item()
                count += 1
    assert count == len(val) - 1
    assert metrics["val/bpc"] == pytest.approx(total / math.log(2) / count, rel=1e-4)


def test_the_recipe_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    recipe = Recipe(learning_rate=1e-3, lr_schedule="cosine", min_lr=1e-4, warmup_steps=10)
    factors = [recipe.lr_factor(step, max_steps=110) for step in range(120)]
    assert factors[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert factors[110:] == pytest.approx([0.1] * 10)  # min_lr / learning_rate, after the decay
    assert Recipe(warmup_steps=2).lr_factor(50, max_steps=10) == 1.0  # constant after the warmup


def test_a_floor_above_the_peak_is_refused_and_a_cosine_needs_an_end():
    with pytest.raises(UserError, match=r"--model.min_lr 0.1: give a number from 0 to --model.learning_rate"):
        Recipe(learning_rate=1e-3, lr_schedule="cosine", min_lr=0.1)
    with pytest.raises(UserError, match="a cosine schedule needs an end"):
        Recipe(lr_schedule="cosine").lr_factor(5, max_steps=-1)


def test_weight_decay_reaches_matrices_only():
    model = ShakespeareGPT("abc", block_size=8, n_layer=1, n_head=2, n_embd=8, weight_decay=0.1)
    model.trainer = L.Trainer(max_steps=10, logger=False)
    decayed, not_decayed = model.configure_optimizers()["optimizer"].param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert not_decayed["weight_decay"] == 0.0 and all(p.dim() < 2 for p in not_decayed["params"])


def test_a_checkpoint_describes_the_model_with_every_setting_defaults_included():
    model = ShakespeareGPT("abc", block_size=8, n_layer=1, n_head=2, n_embd=8)
    assert {"vocab", "n_layer", "dropout", "learning_rate", "beta2", "compile", "sample_tokens"} <= set(model.hparams)
    assert "vocab_size" not in model.hparams  # the vocabulary decides it
    again = ShakespeareGPT(**model.hparams)
    assert again.config == model.config and again.recipe == model.recipe


def test_compiled_module_keeps_the_eager_parameter_names():
    eager = ShakespeareGPT(**TINY)
    compiled = ShakespeareGPT(**TINY, compile=True)
    compiled.configure_model()  # sets up torch.compile; nothing is compiled until the first call
    assert compiled.compiled_forward is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    eager.load_state_dict(compiled.state_dict())


def test_the_model_summary_counts_the_flops_of_one_window():
    from lightning.pytorch.utilities.model_summary import summarize

    model = ShakespeareGPT(**TINY, attention="explicit")  # torch counts none for the fused kernel on a CPU
    matrices = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    # Each weight matrix once per token of the window (a multiply-add is 2 FLOPs), and attention besides.
    assert summarize(model).total_flops > 2 * TINY["block_size"] * matrices


def test_checkpoint_of_a_torch_compile_wrapped_network_loads_into_an_eager_model():
    source = ShakespeareGPT(**TINY)
    wrapped = torch.compile(source.model)  # what other scripts save: keys gain "_orig_mod."
    state = {f"model.{k}": v for k, v in wrapped.state_dict().items()}
    assert all("._orig_mod." in k for k in state if k.startswith("model."))
    checkpoint = {"state_dict": state}
    target = ShakespeareGPT(**TINY)
    target.on_load_checkpoint(checkpoint)
    target.load_state_dict(checkpoint["state_dict"])
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cpu_recipe_precision_and_attention_train_with_fp32_weights(corpus_dir, tmp_path, monkeypatch):
    """configs/cpu.yaml trains in bf16-mixed with explicit attention: the weights stay fp32."""
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 4, "--trainer.precision=bf16-mixed", "--model.attention=explicit"))
    ckpt = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    val = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]["best_model_score"]
    assert torch.isfinite(val)


@pytest.mark.slow
def test_compiled_fit_then_eager_predict(corpus_dir, tmp_path, monkeypatch, capsys):
    """torch.compile on CPU takes tens of seconds: run with `pytest -m slow`."""
    monkeypatch.chdir(tmp_path)
    common = [f"--data.corpus={corpus_dir / 'input.txt'}", *TINY_MODEL_ARGS]
    cli_main(["fit", *common, "--model.compile=true", "--trainer.max_steps=3", "--trainer.val_check_interval=3"])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cli_main(["predict", f"--ckpt_path={ckpt}", "--model.compile=false", "--trainer.logger=false", "--sample.prompt=a"])
    assert "----- sample 1 -----\na" in capsys.readouterr().out


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gpu_fit_with_compile_and_data_on_device(corpus_dir, tmp_path, monkeypatch, precision):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        f"--data.corpus={corpus_dir / 'input.txt'}",
        "--data.on_device=true",
        *TINY_MODEL_ARGS,
        "--model.compile=true",
        "--trainer.accelerator=gpu",
        f"--trainer.precision={precision}",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
    ]
    cli = cli_main(args)
    assert cli.trainer.global_step == 3
    assert cli.datamodule.train_data.device.type == "cuda"
