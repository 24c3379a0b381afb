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
Everything is printed as a table and written to JSON. Extra arguments go to the CLI's parser,
e.g. ``--trainer.accelerator cpu`` or ``--model.compile true``. Every run is built by
``cli.build``, the entry point of ``python -m shakespeare_gpt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from ..cli import build, quiet_third_party
from ..errors import UserError
from ..lightning_module import ShakespeareGPT
from ..sampling import generate
from .checks import ToolParser, cli_refusal, did_you_mean, fail, show, whole, writable_place

SECTIONS = ("train", "fit", "generate")


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
    dm.setup("fit")
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
    """Wall time of a whole ``fit``, and the best and last val loss, as the trainer recorded them."""
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


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), None)
    info["cpu"] = cpu or platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _sections(value: str) -> set[str]:
    sections = {part.strip() for part in value.split(",")}
    for part in sorted(sections):
        if part not in SECTIONS:
            raise argparse.ArgumentTypeError(
                f"--sections {show(value)}: unknown section {show(part)}{did_you_mean(part, SECTIONS)}; "
                f"give one or more of {', '.join(SECTIONS)}, comma-separated (e.g. --sections train,generate)"
            )
    return sections


DESCRIPTION = (
    "Benchmark shakespeare-gpt, the char-level GPT, on one config: training step time through Lightning and "
    "through a bare PyTorch loop, a whole fit, and sampling with and without the KV cache."
)


def parser() -> ToolParser:
    parser = ToolParser(
        prog="python -m shakespeare_gpt.tools.bench",
        description=DESCRIPTION,
        epilog="Other arguments go to the CLI, e.g. --trainer.accelerator cpu or --model.compile true.",
    )
    parser.add_argument("--config", required=True, action="append", help="fit config, e.g. configs/cpu.yaml")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), type=_sections, help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    counts = [  # flag, smallest value, what it counts (for the error), default, help
        ("--steps", 1, "the timed steps", 100, "timed training steps per repeat"),
        ("--warmup", 0, "the untimed steps", 20, "untimed steps first (compilation, caches)"),
        ("--repeats", 1, "the number of repeats", 3, "repeats of the train and generate timings (medians reported)"),
        ("--fit-repeats", 1, "the number of whole fits", 1, "whole fit runs, one after another"),
        ("--gen-tokens", 1, "the number of tokens", 1000, "tokens sampled per generate timing"),
    ]
    for flag, least, what, default, text in counts:
        parser.add_argument(flag, type=whole(flag, least, what, default), default=default, help=text)
    parser.add_argument("--out", help="JSON file (default: lightning_logs/bench/<config>.json)")
    return parser


def check(opts: argparse.Namespace, extra: list[str]) -> Path:
    """Refuse bad input before anything runs; return the JSON file's path."""
    if len(opts.config) > 1:
        raise UserError(
            f"--config given {len(opts.config)} times ({', '.join(opts.config)}): the benchmark takes one config; "
            "give changes to it as CLI arguments, e.g. --model.n_layer=2"
        )
    opts.config = config = opts.config[0]
    if not Path(config).is_file():
        what = "is a folder" if Path(config).is_dir() else "does not exist"
        raise UserError(f"--config {config}: {what}; give a fit config file, e.g. --config configs/cpu.yaml")
    out = writable_place("--out", opts.out or f"lightning_logs/bench/{Path(config).stem}.json", "file")
    if why := cli_refusal(run_args(config, extra, 1)):
        ours = [a.option_strings[-1] for a in parser()._actions if a.option_strings]
        for arg in extra:  # a misspelt flag of ours went to the CLI
            name = arg.split("=", 1)[0]
            if name.startswith("--") and "." not in name and (hint := did_you_mean(name, ours)):
                raise UserError(f"{name}: not a benchmark flag{hint}, and the CLI refuses it: {why}")
        shown = f"--config {config}" + (f" with {' '.join(extra)}" if extra else "")
        raise UserError(f"{shown}: the CLI refuses it: {why}")
    return out


def main(argv: list[str] | None = None) -> dict:
    try:
        # Every flag is checked here, and the CLI's arguments parsed, before a step runs or a file is written.
        opts, extra = parser().parse_known_args(argv)
        out = check(opts, extra)
        return bench(opts, extra, out)
    except UserError as e:
        fail(e)


def bench(opts: argparse.Namespace, extra: list[str], out: Path) -> dict:
    sections = opts.sections
    result: dict = {"config": opts.config, "extra_args": extra, "machine": machine()}

    if "train" in sections:
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
    if "fit" in sections:
        fits = [time_fit(opts.config, extra) for _ in range(opts.fit_repeats)]
        result["fit"] = {
            "wall_s": statistics.median(f["wall_s"] for f in fits),
            "wall_s_each": [f["wall_s"] for f in fits],
            "best_val_loss": fits[0]["best_val_loss"],
            "best_val_loss_each": [f["best_val_loss"] for f in fits],
            "log_dirs": [f["log_dir"] for f in fits],
        }
    if "generate" in sections:
        result["generate"] = time_generate(opts.config, extra, opts.gen_tokens, opts.repeats)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {out}")
    return result


def table(result: dict) -> str:
    rows = [("config", f"{result['config']} {' '.join(result['extra_args'])}".strip())]
    rows += [(k, str(v)) for k, v in result["machine"].items()]
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
    # The benchmark's own arguments; the runs it builds get theirs through cli.build.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
