"""Compare models on the same text: parameters, val bits per character, generation speed, and samples.

    python -m shakespeare_gpt.tools.compare lightning_logs/cpu gpt2 --out reports/compare.md

Each MODEL is one of
  - a checkpoint of this project, or a folder of runs (its lowest-val checkpoint): a character
    model, or a fine-tuned pretrained one;
  - a Hugging Face name (``gpt2``) or a folder saved with ``save_pretrained``: scored zero-shot.
``LABEL=MODEL`` names it in the report. Every model is validated and sampled through the same
commands a user would type (``shakespeare-gpt validate`` and ``predict``, shown in the report),
on the val split of the same corpus, with the same prompt and seed.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type

from ..checkpoints import PRETRAINED_MODEL, best_checkpoint, read_checkpoint
from ..cli import REFUSED, build
from ..hardware import machine
from ..pretrained import load_options
from ..sampling import Sampling
from ..utils import Text, UserError, atomic_open, check_writable, exit_with, git_commit, quiet_third_party
from . import WindowLength

PROG = "python -m shakespeare_gpt.tools.compare"
REPEATS = 3  # timed generations of each sample
COUNTS = ("num_samples", "batch_size")  # how many samples, and how many at once: not what a sample is
TopP = restricted_number_type("TopP", float, [(">", 0), ("<=", 1)])


@dataclass
class Row:
    label: str
    spec: str
    kind: str
    parameters: int
    block_size: int
    val_loss: float
    val_bpc: float
    tokens_per_s: float
    chars_per_s: float
    sample: str
    validate: str
    predict: str
    checkpoint: str | None


def is_run(spec: str) -> bool:
    """A checkpoint file, or a folder of this project's runs (rather than a Hugging Face model)."""
    path = Path(spec)
    return path.is_file() or (path.is_dir() and not (path / "config.json").is_file())


def is_path(spec: str) -> bool:
    """Whether ``spec`` can only name a file or folder here: a Hub name is ``name`` or ``owner/name``."""
    has_folder = "/" in spec and Path(spec).parent.is_dir()
    return spec.endswith(".ckpt") or spec.startswith((".", "~", "/")) or spec.count("/") > 1 or has_folder


def model_args(spec: str, block_size: int | None) -> list[str]:
    """The CLI arguments that choose the model ``spec``."""
    if is_run(spec):
        return ["--ckpt_path", spec]
    return ["--model", PRETRAINED_MODEL, "--model.pretrained", spec] + (
        ["--model.block_size", str(block_size)] if block_size else []
    )


def command(subcommand: str, args: list[str]) -> str:
    return shlex.join(["shakespeare-gpt", subcommand, *args])


def evaluate(label: str, spec: str, corpus: str, accelerator: str, block_size: int | None, sampling: Sampling) -> Row:
    """Validate ``spec`` through the CLI, then sample from the loaded model and time it."""
    trainer = ["--trainer.accelerator", accelerator]
    validate_args = model_args(spec, block_size) + ["--data.corpus", corpus] + trainer
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            cli = build(["validate", *validate_args, *quiet], run=True)
    except REFUSED as e:
        raise UserError(f"{label}: {e}") from None
    metrics = cli.trainer.callback_metrics
    # The draw predict_step makes, on the device and in the precision predict runs in (fp32; Lightning
    # moves the model back to the CPU after validate).
    model, device = cli.model, cli.trainer.strategy.root_device
    model.to(device)
    idx = sampling.encode(model.tokenizer).to(device)
    with torch.inference_mode():
        g = torch.Generator(device=device).manual_seed(sampling.seed)
        settings = (sampling.temperature, sampling.top_k, sampling.top_p)
        model.generate(idx, min(4, sampling.max_new_tokens), *settings, g)  # warm-up
        times = []
        for _ in range(REPEATS):  # the same sample each time; the fastest is the least disturbed
            g = torch.Generator(device=device).manual_seed(sampling.seed)
            start = time.perf_counter()
            ids = model.generate(idx, sampling.max_new_tokens, *settings, g)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = min(times)
    text = model.tokenizer.decode(ids[0].tolist())
    new_chars = len(text) - len(model.tokenizer.decode(idx[0].tolist()))
    sample_args = [f"--sample.{k}={v}" for k, v in vars(sampling).items() if k not in COUNTS and v is not None]
    predict_args = model_args(spec, block_size) + trainer + sample_args
    return Row(
        label=label,
        spec=spec,
        kind=type(model).__name__ + ("" if is_run(spec) else ", zero-shot"),
        parameters=sum(p.numel() for p in model.model.parameters()),
        block_size=model.hparams.block_size,
        val_loss=float(metrics["val/loss"]),
        val_bpc=float(metrics["val/bpc"]),
        tokens_per_s=sampling.max_new_tokens / seconds,
        chars_per_s=new_chars / seconds,
        sample=text,
        validate=command("validate", validate_args),
        predict=command("predict", predict_args),
        checkpoint=str(best_checkpoint(Path(spec)) if Path(spec).is_dir() else spec) if is_run(spec) else None,
    )


def check_model(label: str, spec: str) -> None:
    """A one-line ``UserError`` unless ``spec`` names a checkpoint, a run with one, or a model that can be loaded."""
    if not spec:
        raise UserError(
            f"{label}=: give a model after the '=' (a checkpoint, a run folder, a Hugging Face name or folder)"
        )
    try:
        if Path(spec).is_dir() and is_run(spec):
            best_checkpoint(Path(spec))
        elif Path(spec).is_file():
            read_checkpoint(spec)
        elif is_path(spec) and not Path(spec).expanduser().exists():
            raise UserError(
                f"there is no file or folder {spec}: give a checkpoint, a folder of runs, or a Hugging Face model "
                "name or folder"
            )
        else:
            load_options(spec)
    except UserError as e:
        raise UserError(f"{label}: {e}" if label != spec else str(e)) from None


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def report(rows: list[Row], argv: list[str], sampling: Sampling, corpus: str, notes: list[str]) -> str:
    lines = [
        "# Models compared on tiny Shakespeare's val split",
        "",
        f"Written at commit `{git_commit()}` on {machine()}, by the command at the end of this report.",
        "",
        *[line for note in notes for line in (note, "")],
        f"Corpus: `{corpus}`; val split: its last 10% of characters. **bpc**: the split's total negative "
        "log-likelihood in bits over the characters its tokens cover, every token but the first scored once, "
        "from at least half a window of context after the first window (windows of *block* tokens every "
        "*block*/2). **loss**: nats per token of the model's own tokenizer, so only the bpc compares across "
        "tokenizers. Generation: one sample of the same prompt and seed, timed after a 4-token warm-up, the "
        f"fastest of {REPEATS}; tokens/s counts the model's tokens, chars/s the characters they decode to.",
        "",
        "| model | what | parameters | block | val loss (nats/token) | val bpc | tokens/s | chars/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r.label.replace("|", "&#124;")  # a | would end the table's cell
        lines.append(
            f"| {label} | {r.kind} | {r.parameters:,} | {r.block_size} | {r.val_loss:.4f} | {r.val_bpc:.4f} | "
            f"{r.tokens_per_s:,.0f} | {r.chars_per_s:,.0f} |"
        )
    settings = ", ".join(f"{k}={v!r}" for k, v in vars(sampling).items() if k not in COUNTS)
    lines += ["", f"## Samples ({settings})", "", "<table><tr>"]
    lines += [f"<th>{escape(r.label)}</th>" for r in rows]
    lines += ["</tr><tr>"]
    lines += [f'<td valign="top"><pre>{escape(r.sample)}</pre></td>' for r in rows]
    lines += ["</tr></table>", "", "## Commands", ""]
    for r in rows:
        lines += [f"**{r.label}**"]
        if r.checkpoint:
            config = Path(r.checkpoint).parent.parent / "config.yaml"
            trained = f", trained with the settings in `{config}`" if config.is_file() else ""
            lines += ["", f"Checkpoint `{r.checkpoint}`{trained}."]
        lines += ["```bash", r.validate, r.predict, "```", ""]
    lines += ["This report:", "```bash", shlex.join(["python", "-m", "shakespeare_gpt.tools.compare", *argv]), "```"]
    return "\n".join(lines)


def parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="[LABEL=]checkpoint, run folder, Hub name or folder")
    parser.add_argument("--out", default="lightning_logs/compare.md", help="the Markdown report to write")
    parser.add_argument("--corpus", default="tinyshakespeare", help="as --data.corpus")
    parser.add_argument(
        "--block-size",
        type=WindowLength,
        default=256,
        help="window of a zero-shot pretrained model (a checkpoint keeps its own)",
    )
    parser.add_argument("--prompt", type=Text, default="ROMEO:", help="the prompt of every sample")
    parser.add_argument("--max-new-tokens", type=PositiveInt, default=200, help="tokens of each sample")
    parser.add_argument("--temperature", type=PositiveFloat, default=0.8, help="as --sample.temperature")
    parser.add_argument("--top-k", type=PositiveInt | None, default=None, help="as --sample.top_k")
    parser.add_argument("--top-p", type=TopP, default=1.0, help="as --sample.top_p")
    parser.add_argument("--seed", type=int, default=1337, help="the sampling seed")
    parser.add_argument("--accelerator", default="auto", help="as --trainer.accelerator")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the report's head (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Check every flag and find every model, then score them one by one and write the report."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
        check_writable(Path(args.out), "--out", folder=False)
        sampling = Sampling(args.prompt, 1, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        specs = [m.partition("=")[::2] if "=" in m else (m, m) for m in args.models]
        for label, spec in specs:  # every model found before the first is scored
            check_model(label, spec)
        rows = []
        for label, spec in specs:
            rows.append(evaluate(label, spec, args.corpus, args.accelerator, args.block_size, sampling))
            r = rows[-1]
            print(f"{label}: val bpc {r.val_bpc:.4f}, {r.parameters:,} parameters, {r.chars_per_s:,.0f} chars/s")
        with atomic_open(Path(args.out)) as f:
            f.write(report(rows, argv, sampling, args.corpus, args.note) + "\n")
    except ArgumentError as e:
        exit_with(f"{e}; see {PROG} --help")
    except UserError as e:
        exit_with(e)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    quiet_third_party()
    # The runs get their arguments through cli.build; LightningCLI warns when sys.argv holds others.
    argv, sys.argv[1:] = sys.argv[1:], []
    main(argv)
