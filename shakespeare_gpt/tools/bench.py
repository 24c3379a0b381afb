"""Benchmark: ``python -m shakespeare_gpt.tools.bench --config configs/cpu.yaml``.

Measures, for the model and data of a config:

- train: step time and tokens/s through the project's own Lightning ``fit`` path and through a
  bare PyTorch loop over the same model, optimiser, schedule and batches (the ratio is the
  framework's overhead), and the time spent fetching batches;
- fit: wall time of a whole ``shakespeare-gpt fit`` of the config as a user runs it (a new process:
  start-up, validations and checkpoints included), the best val loss it reached, and the
  precision it ran in, in the default precision (what this machine chooses) or those of
  ``--fit-precisions``; with ``--nanogpt``, the same recipe in nanoGPT's ``train.py``, the
  plain-PyTorch script it is compared with, in turn with them;
- generate: tokens/s of batch-1 sampling with and without the KV cache.

A step time is the wall time of ``--steps`` steps after ``--warmup`` untimed ones, divided by the
number of steps, with the GPU synchronised at both ends; the figures are medians over ``--repeats``.
Everything is printed as a table and written to JSON. Every other argument goes to the CLI, e.g.
``--trainer.accelerator cpu`` or ``--model.compile true``; every run is built by ``cli.build``.
"""

from __future__ import annotations

import difflib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback

from .. import checkpoints
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
    "--fit-repeats": (PositiveInt, 1, "whole fit runs of each kind, the kinds in turn"),
    "--fit-precisions": (list[str], ["default"], "fit in each: default (the machine's choice), 32-true, bf16-mixed"),
    "--nanogpt": (str | None, None, "a nanoGPT checkout with data/shakespeare_char prepared: fit its train.py too"),
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


def run_args(config: str, extra: list[str], max_steps: int | None) -> list[str]:
    """The arguments of ``fit --config``, minus validation, logs and checkpoints (and ``max_steps`` given)."""
    return [
        f"--config={config}",
        *extra,
        *([f"--trainer.max_steps={max_steps}"] if max_steps else []),
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
    ]


def build_run(config: str, extra: list[str], max_steps: int | None):
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


def time_fit(config: str, extra: list[str], precision: str, runs: Path) -> dict:
    """Wall time of ``shakespeare-gpt fit`` in a new process, its best val loss and the precision it ran in."""
    run = runs / f"{precision}-{time.time_ns()}"
    chosen = [] if precision == "default" else [f"--trainer.precision={precision}"]
    where = {"save_dir": runs, "name": "", "version": run.name}
    place = [f"--trainer.logger.init_args.{k}={v}" for k, v in where.items()]
    command = [sys.executable, "-m", "shakespeare_gpt", "fit", f"--config={config}", *extra, *chosen, *place]
    runs.mkdir(parents=True, exist_ok=True)
    wall = run_timed(command, runs / f"{run.name}.log")
    best = checkpoints.read_checkpoint(checkpoints.best_checkpoint(run))["callbacks"]
    score = next((v["best_model_score"] for k, v in best.items() if k.startswith("ModelCheckpoint")), None)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    return {
        "wall_s": wall,
        "best_val_loss": None if score is None else float(score),
        "log_dir": str(run),
        **{"precision": settings["trainer"]["precision"], "threads": settings["threads"]},
    }


def time_nanogpt(folder: Path, config: str, extra: list[str]) -> dict:
    """Wall time and last val loss of nanoGPT's ``train.py`` on the config's recipe: the command its README
    gives for a CPU, with the config's model, batch, steps and schedule. Its val loss is its own estimate
    (20 random batches), not a full pass."""
    cli = build_run(config, extra, None)
    m, steps = cli.model.hparams, cli.trainer.max_steps
    flags = {"device": "cpu", "compile": False, "eval_iters": 20, "log_interval": 1}
    flags |= {k: m[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "dropout", "learning_rate", "min_lr")}
    flags |= {"batch_size": cli.datamodule.batch_size, "max_iters": steps, "lr_decay_iters": steps, "beta2": m.beta2}
    flags |= {"warmup_iters": m.warmup_steps, "weight_decay": m.weight_decay, "decay_lr": m.lr_schedule == "cosine"}
    with tempfile.TemporaryDirectory(prefix="bench-nanogpt-") as out:
        args = [f"--{k}={v}" for k, v in {**flags, "out_dir": out}.items()]
        log = Path(out) / "log.txt"
        wall = run_timed([sys.executable, "train.py", "config/train_shakespeare_char.py", *args], log, cwd=folder)
        evals = re.findall(r"val loss (\d+\.\d+)", log.read_text())  # its lines: "step N: train loss X, val loss Y"
    return {"wall_s": wall, "val_loss": float(evals[-1]) if evals else None}


def run_timed(command: list[str], log: Path, cwd: Path | None = None) -> float:
    """Wall time of ``command``, its output in ``log``. A failure ends the benchmark in one line."""
    t = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        why = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{' '.join(command[1:4])} ... failed (exit status {done.returncode}; {log}): {why}")
    return time.perf_counter() - t


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
        if get_origin(FLAGS[flag][0]) is list and not value.startswith("["):
            value = f"[{value}]"  # train,generate: the list jsonargparse reads as [train,generate]
        own.append(f"{flag}={value}")
    return own, extra


def check(opts, extra: list[str], out: Path) -> None:
    """Refuse bad input before anything runs or is written."""
    config, sections, nanogpt = opts.config, opts.sections, Path(opts.nanogpt or ".")
    fits = "fit" in sections
    if (
        fits
        and opts.nanogpt
        and not ((nanogpt / "train.py").is_file() and (nanogpt / "data/shakespeare_char/val.bin").is_file())
    ):
        raise UserError(
            f"--nanogpt {opts.nanogpt}: give a nanoGPT checkout whose data is prepared "
            "(python data/shakespeare_char/prepare.py, run in it, writes data/shakespeare_char/*.bin)"
        )
    for precision in set(opts.fit_precisions) - {"default"} if fits else ():
        if why := refusal(run_args(config, [*extra, f"--trainer.precision={precision}"], 1)):
            raise UserError(f"--fit-precisions {precision}: give default or a --trainer.precision value: {why}")
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
        check(opts, extra, out)
    except ArgumentError as e:
        exit_with(f"{e}; see {PROG} --help")
    except UserError as e:
        exit_with(e)
    return bench(opts, extra, out)


def bench(opts, extra: list[str], out: Path) -> dict:
    precision = build_run(opts.config, extra, 1).trainer.precision  # the train and generate sections'
    result: dict = {"config": opts.config, "extra_args": extra, "machine": machine(), "precision": precision}
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
        runs = Path("lightning_logs") / f"bench_{Path(opts.config).stem}"
        fits: dict[str, list[dict]] = {kind: [] for kind in [*opts.fit_precisions, *["nanogpt"] * bool(opts.nanogpt)]}
        for _ in range(opts.fit_repeats):  # the kinds in turn, so that a drifting machine slows each alike
            for kind, done in fits.items():
                if kind == "nanogpt":
                    done.append(time_nanogpt(Path(opts.nanogpt), opts.config, extra))
                else:
                    done.append(time_fit(opts.config, extra, kind, runs))
        result["fit"] = {
            kind: {
                "wall_s": statistics.median(f["wall_s"] for f in done),
                **{f"{key}_each": [f[key] for f in done] for key in done[0]},
            }
            for kind, done in fits.items()
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
    fits = result.get("fit", {})
    nanogpt = fits.get("nanogpt", {}).get("wall_s")
    for kind, f in fits.items():
        each = ", ".join(f"{w:.1f}" for w in f["wall_s_each"])
        loss = f.get("best_val_loss_each", f.get("val_loss_each"))[0]
        what = "val loss (its estimate)" if kind == "nanogpt" else "best val loss"
        versus = f", {f['wall_s'] / nanogpt:.2f}x nanoGPT's time" if nanogpt and kind != "nanogpt" else ""
        name = (
            "nanoGPT train.py"
            if kind == "nanogpt"
            else f"whole fit, {kind}"
            + (f" ({f['precision_each'][0]}, {f['threads_each'][0]} threads)" if kind == "default" else "")
        )
        shown = "none" if loss is None else f"{loss:.4f}"
        rows += [(name, f"{f['wall_s']:.1f} s (median of {each}), {what} {shown}{versus}")]
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
