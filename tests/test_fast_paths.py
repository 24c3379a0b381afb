"""The fast paths agree with the plain ones: compiled vs eager checkpoints, FLOP counting, data on device."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from shakespeare_gpt.cli import build, cli_main
from shakespeare_gpt.lightning_module import ShakespeareGPT
from shakespeare_gpt.model import GPT, GPTConfig

from .conftest import TINY_MODEL_ARGS, tiny_fit_args

TINY = dict(vocab="\n abcdefgh", block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_module_keeps_the_eager_parameter_names():
    eager = ShakespeareGPT(**TINY)
    compiled = ShakespeareGPT(**TINY, compile=True)
    compiled.configure_model()  # sets up torch.compile; nothing is compiled until the first call
    assert compiled.compiled_forward is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    eager.load_state_dict(compiled.state_dict())


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


@pytest.mark.parametrize("overrides", [{}, {"feed_forward": False}, {"tie_weights": True}, {"attn_proj": False}])
def test_flops_per_token_matches_a_flop_counter(overrides):
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, attention="explicit", **overrides)
    model = GPT(cfg)
    idx = torch.randint(0, 65, (1, cfg.block_size))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    counted = counter.get_total_flops() / cfg.block_size
    # The formula counts the causal attention as full T x T products, as the explicit path computes them.
    assert counted == model.flops_per_token()


def test_fit_logs_throughput_and_mfu(corpus_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    # Later flags win: log every 2 steps, one validation at the end.
    extra = ["--data.on_device=true", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=2"]
    args = tiny_fit_args(corpus_dir, 4, *extra, "--throughput.peak_flops=1e11")
    cli_main(args)
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("perf/tokens_per_s")] == [2, 4]
    assert all(0 < e.value < 1 for e in events.Scalars("perf/mfu"))
    # Per-step values are handed to Lightning only at the steps it writes, and all of those are written.
    for tag in ("train/loss", "train/lr/decayed", "train/lr/not_decayed"):
        assert [e.step for e in events.Scalars(tag)] == [1, 3]


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


def test_explicit_and_sdpa_attention_agree_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, attention="explicit")).eval()
    idx = torch.randint(0, 65, (2, 32))
    reference, _ = model(idx)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit, _ = model(idx)
        for block in model.blocks:
            block.attn.attention = "sdpa"
        fused, _ = model(idx)
    assert explicit.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: both paths land within its rounding of the fp32 logits.
    torch.testing.assert_close(explicit.float(), reference, atol=0.05, rtol=0.05)
    torch.testing.assert_close(explicit.float(), fused.float(), atol=0.05, rtol=0.05)


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


def test_bench_times_both_paths_through_its_command_and_writes_only_its_result(corpus_dir, tmp_path):
    """``python -m shakespeare_gpt.tools.bench`` as a user runs it: a table, the JSON at --out, no stray files."""
    import json
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    config = {
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4},
        "model": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
    }
    (work / "tiny.yaml").write_text(json.dumps(config))
    args = ["--config=tiny.yaml", "--sections=train,generate", "--steps=3", "--warmup=1", "--repeats=1"]
    done = subprocess.run(
        [sys.executable, "-m", "shakespeare_gpt.tools.bench", *args, "--gen-tokens=20", "--out=b.json"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "framework overhead" in done.stdout and "wrote b.json" in done.stdout
    train = json.loads((work / "b.json").read_text())["train"]
    assert train["lightning_step_ms"] > 0 and train["bare_step_ms"] > 0 and train["tokens_per_step"] == 4 * 16
    assert sorted(p.name for p in work.iterdir()) == ["b.json", "tiny.yaml"]  # no lock file, no logs
