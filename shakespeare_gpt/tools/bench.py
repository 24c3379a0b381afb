"""Benchmark: ``python -m shakespeare_gpt.tools.bench --config configs/cpu.yaml``.

Measures, for the model and data of a config:

- train: step time and tokens/s through the project's own Lightning ``fit`` path and through a
  bare PyTorch loop over the same model, optimiser, schedule and batches (the ratio is the
  framework's overhead), and the time spent fetching batches;
- fit: wall time of a whole ``fit`` of the config, validations and checkpoints included, run in
  this process through the CLI's entry point (Python's start-up and imports are not counted),
  and the best val loss it reached, as its checkpoint callback recorded it;
- generate: tokens/s of batch-1 sampling with and without the KV cache.

A step time is the wall time of ``--steps`` steps after ``--warmup`` untimed ones, divided by the
number of steps, with the GPU synchronised at both ends; the figures are medians over ``--repeats``.
Everything is printed as a table and written to JSON. Every other argument goes to the CLI, e.g.
``--trainer.accelerator cpu`` or ``--model.compile true``; every run is built by ``cli.build``.
"""

from __future__ import annotations

import difflib
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, get_args

import torch
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback

from ..cli import build, refusal
from ..hardware import machine
from ..lightning_module import ShakespeareGPT
from ..sampling import generate
from ..utils import UserError, atomic_open, check_writable, exit_with, quiet_third_party

PROG = "python -m shakespeare_gpt.tools.bench"
DESCRIPTION = (
    "Benchmark shakespeare-gpt, the char-level GPT, on one config: training step time through Lightning and "
    "through a bare PyTorch loop, a whole fit, and sampling with and without the KV cache."
)
Section = Literal["train", "fit", "generate"]
SECTIONS = get_args(Section)
FLAGS = {  # the benchmark's own flags: type, default, help; every other argument goes to the CLI
    "--config": (str, None, "fit config, e.g. configs/cpu.yaml"),
    "--sections": (list[Section], list(SECTIONS), "one or more of train, fit, generate, comma-separated"),
    "--steps": (PositiveInt, 100, "timed training steps per repeat"),
    "--warmup": (NonNegativeInt, 20, "untimed steps first (compilation, caches)"),
    "--repeats": (PositiveInt, 3, "repeats of the train and generate timings (medians reported)"),
    "--fit-repeats": (PositiveInt, 1, "whole fit runs, one after another"),
    "--gen-tokens": (PositiveInt, 1000, "tokens sampled per generate timing"),
    "--out": (str | None, None, "JSON file (default: lightning_logs/bench/<config>.json)"),
}


class StepTimer(Callback):
    """Times training steps ``warmup + 1 .. warmup + steps``, synchronising the GPU at both ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps:
            _sync(pl_module.device)
            self.end = time.perf_counter()

    @property
    def step_seconds(self) -> float:
        return (self.end - self.start) / self.steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_args(config: str, extra: list[str], max_steps: int) -> list[str]:
    """The arguments of ``fit --config``, minus validation, logs and checkpoints."""
    return [
        f"--config={config}",
        *extra,
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
    ]


def build_run(config: str, extra: list[str], max_steps: int):
    """Model, data and trainer exactly as ``fit --config`` builds them, minus validation and checkpoints."""
    return build(run_args(config, extra, max_steps), save_config=False)


def time_lightning(config: str, extra: list[str], steps: int, warmup: int) -> float:
    # With no logger the run's folder is the trainer's root (its lock file goes there): a temporary one.
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        cli = build_run(config, [*extra, f"--trainer.default_root_dir={root}"], warmup + steps)
        timer = StepTimer(warmup, steps)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    return timer.step_seconds


def time_bare(config: str, extra: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """The same step in a plain loop: returns (median step seconds, median batch-fetch seconds)."""
    cli = build_run(config, extra, warmup + steps)
    module: ShakespeareGPT = cli.model
    trainer, dm = cli.trainer, cli.datamodule
    device = trainer.strategy.root_device
    module.to(device)
    module.trainer = trainer  # the lr schedule reads max_steps from it
    module.configure_model()
    dm.trainer = trainer
    dm.setup("fit", module.tokenizer)
    opt_config = module.configure_optimizers()
    opt, sched = opt_config["optimizer"], opt_config["lr_scheduler"]["scheduler"]
    bf16 = "bf16" in str(trainer.precision)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    module.train()
    fetches = []
    batches = iter(dm.train_dataloader())
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        t = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        fetches.append(time.perf_counter() - t)
        with autocast:
            loss = module.loss((x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _sync(device)
    return (time.perf_counter() - start) / steps, statistics.median(fetches[warmup:])


def time_fit(config: str, extra: list[str]) -> dict:
    """Wall time of a whole ``fit``, and the best val loss, as the trainer recorded them."""
    name = f"bench_{Path(config).stem}"
    args = ["fit", f"--config={config}", *extra, f"--trainer.logger.init_args.name={name}"]
    t = time.perf_counter()
    cli = build(args, run=True)  # the progress bar stays as the config has it
    wall = time.perf_counter() - t
    best = cli.trainer.checkpoint_callback.best_model_score
    return {"wall_s": wall, "best_val_loss": None if best is None else float(best), "log_dir": cli.trainer.log_dir}


def time_generate(config: str, extra: list[str], tokens: int, repeats: int) -> dict:
    cli = build_run(config, extra, 1)
    model = cli.model.model.to(cli.trainer.strategy.root_device).eval()
    idx = torch.zeros(1, 1, dtype=torch.long, device=cli.trainer.strategy.root_device)
    rates: dict[bool, list[float]] = {True: [], False: []}
    for use_cache in rates:
        generate(model, idx, 20, use_cache=use_cache)  # warm-up
    for r in range(repeats):  # alternated, so that a drifting machine slows both alike
        for use_cache in rates:
            g = torch.Generator(idx.device).manual_seed(r)
            t = time.perf_counter()
            generate(model, idx, tokens, generator=g, use_cache=use_cache)
            _sync(idx.device)
            rates[use_cache].append(tokens / (time.perf_counter() - t))
    out = {"cached": statistics.median(rates[True]), "uncached": statistics.median(rates[False])}
    out["speedup"] = out["cached"] / out["uncached"]
    return out


def parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog="Every other argument goes to the CLI, e.g. --trainer.accelerator cpu or --model.compile true.",
        exit_on_error=False,
    )
    for flag, (kind, default, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=default, required=flag == "--config", help=text)
    return parser


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (the benchmark's own flags, the arguments for the CLI)."""
    own, extra, rest = [], [], list(argv)
    while rest:
        arg = rest.pop(0)
        flag, eq, value = arg.partition("=")
        if flag not in FLAGS:
            (own if arg in ("-h", "--help") else extra).append(arg)
            continue
        if not eq and rest:
            value = rest.pop(0)
        elif not eq:  # a flag without its value: the parser says so
            own.append(flag)
            continue
        if flag == "--config" and any(a.startswith("--config=") for a in own):
            raise UserError("--config given twice: the benchmark takes one config; give changes as CLI arguments")
        if flag == "--sections" and not value.startswith("["):
            value = f"[{value}]"  # train,generate: the list jsonargparse reads as [train,generate]
        own.append(f"{flag}={value}")
    return own, extra


def check(config: str, sections: list[str], extra: list[str], out: Path) -> None:
    """Refuse bad input before anything runs or is written."""
    if not sections:
        raise UserError(
            "--sections is empty: give one or more of train, fit, generate (e.g. --sections train,generate)"
        )
    check_writable(out, "--out", folder=False)
    if why := refusal(run_args(config, extra, 1)):
        for name in (a.split("=", 1)[0] for a in extra if a.startswith("--") and "." not in a):
            if close := difflib.get_close_matches(name, FLAGS, n=1):  # a misspelt flag of ours went to the CLI
                raise UserError(
                    f"{name}: not a benchmark flag (did you mean {close[0]}?), and the CLI refuses it: {why}"
                )
        shown = f"--config {config}" + (f" with {' '.join(extra)}" if extra else "")
        raise UserError(f"{shown}: the CLI refuses it: {why}")


def main(argv: list[str] | None = None) -> dict:
    """Parse and check every flag (the CLI's too) before a step runs, then benchmark and write the JSON."""
    try:
        own, extra = split(sys.argv[1:] if argv is None else argv)
        opts = parser().parse_args(own)
        out = Path(opts.out or f"lightning_logs/bench/{Path(opts.config).stem}.json")
        check(opts.config, opts.sections, extra, out)
    except ArgumentError as e:
        exit_with(f"{e}; see {PROG} --help")
    except UserError as e:
        exit_with(e)
    return bench(opts, extra, out)


def bench(opts, extra: list[str], out: Path) -> dict:
    result: dict = {"config": opts.config, "extra_args": extra, "machine": machine()}
    if "train" in opts.sections:
        # Alternated, so that a machine whose speed drifts (a shared VM) slows both paths alike.
        lightning, bare = [], []
        for _ in range(opts.repeats):
            lightning.append(time_lightning(opts.config, extra, opts.steps, opts.warmup))
            bare.append(time_bare(opts.config, extra, opts.steps, opts.warmup))
        cli = build_run(opts.config, extra, 1)
        tokens = cli.datamodule.batch_size * cli.model.hparams.block_size
        flops = cli.model.model.flops_per_token() * tokens
        step_l, step_b = statistics.median(lightning), statistics.median(b[0] for b in bare)
        fetch = statistics.median(b[1] for b in bare)
        result["train"] = {
            "tokens_per_step": tokens,
            "gflop_per_step": flops / 1e9,
            "lightning_step_ms": 1000 * step_l,
            "bare_step_ms": 1000 * step_b,
            "framework_overhead": step_l / step_b - 1,
            "lightning_tokens_per_s": tokens / step_l,
            "bare_tokens_per_s": tokens / step_b,
            "lightning_gflops": flops / step_l / 1e9,
            "batch_fetch_ms": 1000 * fetch,
            "batch_fetch_share_of_step": fetch / step_b,
        }
    if "fit" in opts.sections:
        fits = [time_fit(opts.config, extra) for _ in range(opts.fit_repeats)]
        result["fit"] = {
            "wall_s": statistics.median(f["wall_s"] for f in fits),
            "wall_s_each": [f["wall_s"] for f in fits],
            "best_val_loss": fits[0]["best_val_loss"],
            "best_val_loss_each": [f["best_val_loss"] for f in fits],
            "log_dirs": [f["log_dir"] for f in fits],
        }
    if "generate" in opts.sections:
        result["generate"] = time_generate(opts.config, extra, opts.gen_tokens, opts.repeats)

    with atomic_open(out) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {out}")
    return result


def table(result: dict) -> str:
    rows = [("config", f"{result['config']} {' '.join(result['extra_args'])}".strip()), ("machine", result["machine"])]
    if t := result.get("train"):
        rows += [
            (
                "train step, Lightning fit path",
                f"{t['lightning_step_ms']:.2f} ms ({t['lightning_tokens_per_s']:,.0f} tok/s)",
            ),
            ("train step, bare PyTorch loop", f"{t['bare_step_ms']:.2f} ms ({t['bare_tokens_per_s']:,.0f} tok/s)"),
            ("framework overhead", f"{100 * t['framework_overhead']:+.1f}%"),
            (
                "model FLOP/s (Lightning path)",
                f"{t['lightning_gflops']:.1f} GFLOP/s ({t['gflop_per_step']:.2f} GFLOP/step)",
            ),
            ("batch fetch", f"{t['batch_fetch_ms']:.3f} ms ({100 * t['batch_fetch_share_of_step']:.2f}% of a step)"),
        ]
    if f := result.get("fit"):
        each = ", ".join(f"{w:.1f}" for w in f["wall_s_each"])
        best = "none (no validation)" if f["best_val_loss"] is None else f"{f['best_val_loss']:.4f}"
        rows += [("whole fit, wall", f"{f['wall_s']:.1f} s (median of {each}), best val loss {best}")]
    if g := result.get("generate"):
        rows += [
            ("generate, KV cache", f"{g['cached']:,.1f} tok/s"),
            ("generate, no cache", f"{g['uncached']:,.1f} tok/s"),
            ("cache speed-up", f"{g['speedup']:.2f}x"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    quiet_third_party()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # as python -m shakespeare_gpt does
    # The runs get their arguments through cli.build; LightningCLI warns when sys.argv holds others.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
