"""Every value a user can get wrong ends in one line that names it, before anything is written.

Each case runs the command line in-process in an empty folder and checks: exit status 1, the last
line of stderr is the expected ``error: ...``, no traceback, and the folder is as it was. A value
a type refuses gets jsonargparse's own message (the key and the rule); a trainer setting,
Lightning's; the rest, ours. The real ``shakespeare-gpt`` script is run in tests/e2e.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from shakespeare_gpt.cli import cli_main

from ..conftest import TINY_MODEL_ARGS, TINY_TEXT

ROOT = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under ``folder``: a new empty folder counts too."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def refused(args: list[str], capsys) -> str:
    """Run the CLI with ``args``; assert it exits 1 with one error line and no traceback; return the line."""
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ")
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert "usage:" not in captured.err
    return lines[-1]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A working folder holding a small corpus ``mine.txt`` and a plain file ``a_file``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text(TINY_TEXT, encoding="utf-8")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


FIT = ["fit", "--data.corpus=mine.txt", *TINY_MODEL_ARGS, "--trainer.max_steps=2", "--trainer.accelerator=cpu"]


def typed(key: str, rule: str) -> str:
    """jsonargparse's refusal of a value its type does not allow: it names the key and the type."""
    return rf'Parser key "{key}".* Not of type {rule}'


CASES = {
    # name: (arguments, the error line it must end with, as a regular expression)
    "gpu config on a cpu machine": (
        ["fit", f"--config={ROOT / 'configs' / 'shakespeare_char.yaml'}"],
        r"No supported gpu backend found",
    ),
    "batch size 0": ([*FIT, "--data.batch_size=0"], typed("data.batch_size", r"PositiveInt: 0")),
    "val batch size -3": ([*FIT, "--data.val_batch_size=-3"], r'"data.val_batch_size".* Not of type PositiveInt'),
    "block size too big for memory": (  # its masks alone would take 400 TB: too big for any machine
        [*FIT, "--model.block_size=10000000"],
        r"--model.block_size 10000000 with --data.batch_size 64 needs at least \d+ GiB, more than the \d+ GiB this",
    ),
    "block size 0": ([*FIT, "--model.block_size=0"], typed("block_size", "PositiveInt: 0")),
    "negative learning rate": ([*FIT, "--model.learning_rate=-1"], typed("learning_rate", "LearningRate: -1")),
    "nan learning rate": ([*FIT, "--model.learning_rate=nan"], typed("learning_rate", "LearningRate: nan")),
    "infinite learning rate": ([*FIT, "--model.learning_rate=inf"], typed("learning_rate", "LearningRate: inf")),
    "log every 0 steps": ([*FIT, "--trainer.log_every_n_steps=0"], r"--trainer.log_every_n_steps 0: give a number"),
    "min_lr above the peak": (
        [*FIT, "--model.lr_schedule=cosine", "--model.min_lr=0.1"],
        r"--model.min_lr 0.1: give a number from 0 to --model.learning_rate \(0.0003\): the cosine schedule decays",
    ),
    "negative warmup": ([*FIT, "--model.warmup_steps=-5"], typed("warmup_steps", "NonNegativeInt: -5")),
    "decay steps 0": ([*FIT, "--model.decay_steps=0"], r'"decay_steps".* Not of type PositiveInt'),
    "beta2 of 1": ([*FIT, "--model.beta2=1.0"], typed("beta2", r"Fraction: 1.0 does not conform to restriction")),
    "negative weight decay": ([*FIT, "--model.weight_decay=-0.1"], typed("weight_decay", "NonNegativeFloat: -0.1")),
    "heads that do not divide the width": (
        [*FIT, "--model.n_head=3"],
        r"--model.n_head 3 does not divide --model.n_embd 16",
    ),
    "dropout of 1": ([*FIT, "--model.dropout=1.0"], typed("dropout", "Fraction: 1.0")),
    "cosine schedule without an end": (
        [*FIT, "--trainer.max_steps=-1", "--model.lr_schedule=cosine"],
        r"a cosine schedule needs an end: give --trainer.max_steps or --model.decay_steps",
    ),
    "validation interval 0": (
        [*FIT, "--trainer.val_check_interval=0"],
        r"--trainer.val_check_interval 0: give a number of training steps >= 1",
    ),
    "negative sample tokens": ([*FIT, "--model.sample_tokens=-1"], typed("sample_tokens", "NonNegativeInt: -1")),
    "log folder under a file": (
        [*FIT, "--trainer.logger.init_args.save_dir=a_file/logs"],
        r"--trainer.logger.init_args.save_dir a_file/logs: a_file is a file, not a folder",
    ),
    "checkpoint folder under a file": (
        [*FIT, "--checkpoint.dirpath=a_file/ckpts"],
        r"--checkpoint.dirpath a_file/ckpts: a_file is a file, not a folder",
    ),
    "empty corpus name": ([*FIT, "--data.corpus="], typed("data.corpus", "Text")),
    "corpus that does not exist": (
        [*FIT, "--data.corpus=missing.txt"],
        r"--data.corpus missing.txt does not exist: give a text file, an http\(s\) URL, or tinyshakespeare",
    ),
    "wrong checksum": (
        [*FIT, "--data.sha256=" + "0" * 64],
        r"the corpus mine.txt has sha256 [0-9a-f]{64}, not the --data.sha256 0{64} asked for",
    ),
    "malformed checksum": ([*FIT, "--data.sha256=abc"], r'"data.sha256".* does not match regular expression'),
    "mistyped flag": ([*FIT, "--model.lerning_rate=1e-3"], r"Option 'lerning_rate' is not accepted"),
    "sampling flag given to fit": ([*FIT, "--data.prompt=ROMEO:"], r"unrecognized arguments: --data.prompt=ROMEO:"),
    "mistyped subcommand": (["fti"], r"invalid choice: 'fti' \(choose from 'fit', 'validate', 'test', 'predict'\)"),
    "mistyped subcommand after a config": (
        [f"--config={ROOT / 'configs' / 'cpu.yaml'}", "fti"],
        r"invalid choice: 'fti'",
    ),
    "type error": ([*FIT, "--data.batch_size=twelve"], typed("data.batch_size", "PositiveInt: invalid literal")),
    "predict without a checkpoint": (
        ["predict", "--sample.prompt=ROMEO:"],
        r"the character model needs a vocabulary: give --ckpt_path",
    ),
    "predict from a folder with no run": (
        ["predict", "--ckpt_path=."],
        r"--ckpt_path \.: no run here \(no checkpoints/ or version_N/ folder\)",
    ),
    "validate with --ckpt_path last": (
        ["validate", "--ckpt_path=last"],
        r"--ckpt_path last names a checkpoint of a training run in progress; to validate, give a checkpoint or a",
    ),
    "predict with --ckpt_path best": (["predict", "--ckpt_path=best"], r"--ckpt_path best names a checkpoint of a"),
    "an abbreviated flag": ([*FIT, "--trainer.max_step=3"], r"unrecognized arguments: --trainer.max_step=3"),
    "a choice that is not one": (
        [*FIT, "--model.lr_schedule=linear"],
        r"\"lr_schedule\": Expected a typing.Literal\['constant', 'cosine'\]. Got value: linear",
    ),
    "optional whole number": ([*FIT, "--model.decay_steps=abc"], r'"decay_steps".* Not of type PositiveInt'),
    "fractional validation interval": (
        [*FIT, "--trainer.val_check_interval=0.5"],
        r"`val_check_interval` should be an integer .* when `check_val_every_n_epoch=None`",
    ),
    "a strategy Lightning does not know": (
        [*FIT, "--trainer.strategy=dpp"],
        r"--trainer settings refused by Lightning: You selected an invalid strategy name: `strategy='dpp'`",
    ),
    "devices that are not a number": (
        [*FIT, "--trainer.devices=abc"],
        r"--trainer settings refused by Lightning: `devices` selected with `CPUAccelerator` should be an int > 0",
    ),
    "resume with nothing to resume": (
        [*FIT, "--ckpt_path=last"],
        r"nothing to resume: there is no run under lightning_logs; start one without --ckpt_path",
    ),
    "an attention PNG in fit, which draws into TensorBoard": (
        [*FIT, "--attention_maps.png=maps.png"],
        r"^error: --attention_maps.png: predict writes it; fit draws the maps into TensorBoard$",
    ),
    "an attention prompt outside the vocabulary": (
        [*FIT, "--attention_maps.prompt=Zebra"],
        r"^error: --attention_maps.prompt 'Zebra': characters not in the model's vocabulary: 'Zb'",
    ),
}


@pytest.mark.parametrize("args,message", list(CASES.values()), ids=list(CASES))
def test_bad_value_is_one_line_that_names_it_and_nothing_is_written(args, message, folder, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the GPU case holds on a GPU machine too
    before = snapshot(folder)
    line = refused(args, capsys)
    assert re.search(message, line), line
    assert snapshot(folder) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where nobody can create files")
def test_log_folder_where_nothing_can_be_written_even_by_root(folder, capsys):
    line = refused([*FIT, "--trainer.logger.init_args.save_dir=/proc/logs"], capsys)
    assert line.startswith("error: --trainer.logger.init_args.save_dir /proc/logs: cannot write in /proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_log_folder(folder, capsys):
    (folder / "logs").mkdir(mode=0o555)
    line = refused([*FIT, "--trainer.logger.init_args.save_dir=logs"], capsys)
    assert line.startswith("error: --trainer.logger.init_args.save_dir logs: cannot write in logs (Permission denied)")


def test_mistyped_config_key_is_one_line_that_names_it(folder, capsys):
    (folder / "mine.yaml").write_text("model:\n  lerning_rate: 1.0e-3\n")
    line = refused([*FIT, "--config=mine.yaml"], capsys)
    assert "Option 'lerning_rate' is not accepted" in line


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", r"the corpus .*own.txt is empty: give a file with text in it"),
        (b"\xff\xfeR\x00O\x00", r"the corpus .*own.txt is UTF-16 text, not UTF-8: convert it first"),
        (bytes(range(256)) * 10, r"the corpus .*own.txt is not a text file \(it holds NUL bytes\)"),
        (b"To be", r"the corpus own.txt has 5 characters: too short for one window of block_size \+ 1 = 17"),
    ],
    ids=["empty", "utf-16", "binary", "too short"],
)
def test_unusable_corpus_names_the_file(content, message, folder, capsys):
    (folder / "own.txt").write_bytes(content)
    before = snapshot(folder)
    line = refused([*FIT, "--data.corpus=own.txt"], capsys)
    assert re.search(message, line), line
    assert snapshot(folder) == before


@pytest.fixture
def checkpoint(corpus_dir, tmp_path_factory) -> Path:
    """A tiny trained run's ``last.ckpt``."""
    from ..conftest import tiny_fit_args

    run = tmp_path_factory.mktemp("run")
    cwd = Path.cwd()
    try:
        os.chdir(run)
        cli_main(tiny_fit_args(corpus_dir, 2))
    finally:
        os.chdir(cwd)
    return run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--writer.path=a_file/samples.txt"], r"--writer.path a_file/samples.txt: a_file is a file, not a folder"),
        (["--writer.path=."], r"--writer.path \. is a folder: give the path of a file to write"),
        pytest.param(
            ["--writer.path=/proc/samples.txt"],
            r"--writer.path /proc/samples.txt: cannot write in /proc",
            marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc"),
        ),
        (["--sample.temperature=0"], r"--sample.temperature 0.0: give a number above 0$"),
        (["--sample.top_k=0"], r"--sample.top_k 0: give 1 or more, or null for all$"),
        (["--sample.num_samples=0"], r"--sample.num_samples 0: give 1 or more$"),
        (["--sample.max_new_tokens=-1"], r"--sample.max_new_tokens -1: give 0 or more$"),
        (["--sample.prompt="], r"--sample.prompt '': give some text"),
        (["--sample.prompt=Zebra"], r"--sample.prompt 'Zebra': characters not in the model's vocabulary: 'Zb'"),
        (["--attention_maps.png=."], r"--attention_maps.png \. is a folder: give the path of a file to write"),
        (
            ["--sample.prompt=Zebra", "--sample.top_k=0", "--sample.temperature=-1"],
            r"temperature -1.0: give a .*; --sample.top_k 0: give 1 .*; --sample.prompt 'Zebra': characters not in",
        ),
    ],
    ids=[
        "writer under a file",
        "writer is a folder",
        "writer in /proc",
        "temperature",
        "top_k",
        "num_samples",
        "tokens",
        "empty",
        "chars",
        "attention png is a folder",
        "all at once",
    ],
)
def test_bad_predict_values_print_no_sample_and_write_nothing(extra, message, checkpoint, folder, capsys):
    before = snapshot(folder)
    line = refused(["predict", f"--ckpt_path={checkpoint}", *extra], capsys)
    assert re.search(message, line), line
    assert snapshot(folder) == before
