"""The benchmark, in-process on a tiny config: its JSON and table, its split of the arguments, and its
refusals (one line, exit status 1, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.tools import bench

from ..conftest import TINY_MODEL_ARGS


@pytest.fixture
def place(corpus_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A working folder holding ``tiny.yaml``: the tiny model on the tiny corpus, 4 steps, a validation at 2."""
    model = {k: yaml.safe_load(v) for k, v in (a.removeprefix("--model.").split("=") for a in TINY_MODEL_ARGS)}
    config = {
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4},
        "model": model,
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 2, "enable_progress_bar": False},
    }
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny.yaml").write_text(json.dumps(config))
    monkeypatch.chdir(work)
    return work


TABLE_ROWS = [
    "config",
    "machine",
    "train step, Lightning fit path",
    "train step, bare PyTorch loop",
    "framework overhead",
    "model FLOP/s (Lightning path)",
    "batch fetch",
    "generate, KV cache",
    "generate, no cache",
    "cache speed-up",
]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_bench_writes_its_sections_and_table(place, capsys):
    """The in-process sections; the fit section runs ``fit`` processes, in the slow tier (tests/e2e/test_tools.py)."""
    argv = ["--config", "tiny.yaml", "--sections=train,generate", "--steps=2", "--warmup", "1", "--repeats=1"]
    result = bench.main([*argv, "--gen-tokens=10", "--trainer.accelerator", "cpu", "--out=b.json"])
    assert json.loads((place / "b.json").read_text()) == result
    assert list(result) == ["config", "extra_args", "machine", "precision", "train", "generate"]
    assert result["config"] == "tiny.yaml" and result["extra_args"] == ["--trainer.accelerator", "cpu"]
    train, gen = result["train"], result["generate"]
    assert list(train) == [
        "tokens_per_step",
        "gflop_per_step",
        "lightning_step_ms",
        "bare_step_ms",
        "framework_overhead",
        "lightning_tokens_per_s",
        "bare_tokens_per_s",
        "lightning_gflops",
        "batch_fetch_ms",
        "batch_fetch_share_of_step",
    ]
    assert train["tokens_per_step"] == 4 * 16 and train["lightning_step_ms"] > 0 and train["bare_step_ms"] > 0
    assert list(gen) == ["cached", "uncached", "speedup"] and gen["cached"] > 0
    *table, blank, wrote = capsys.readouterr().out.rstrip().splitlines()[-12:]
    assert [line.split("  ")[0] for line in table] == TABLE_ROWS and (blank, wrote) == ("", "wrote b.json")
    assert files(place) == {"b.json", "tiny.yaml"}  # no lock file, no logs


def test_only_the_sections_asked_for_run(place, capsys):
    argv = ["--config=tiny.yaml", "--sections", "generate", "--gen-tokens=5", "--repeats=1", "--out=g.json"]
    result = bench.main([*argv, "--trainer.accelerator=cpu"])
    assert list(result) == ["config", "extra_args", "machine", "precision", "generate"]
    assert files(place) == {"g.json", "tiny.yaml"}


def test_split_keeps_the_benchmark_flags_and_passes_the_rest_to_the_cli():
    argv = ["--config", "c.yaml", "--trainer.accelerator", "cpu", "--sections", "train,fit", "--steps=3"]
    own, extra = bench.split([*argv, "--model.compile=true", "--help"])
    assert own == ["--config=c.yaml", "--sections=[train,fit]", "--steps=3", "--help"]
    assert extra == ["--trainer.accelerator", "cpu", "--model.compile=true"]


BAD_FLAGS = [  # after --config tiny.yaml; what the one line must hold
    (["--sections", "trian"], ["sections", "'train', 'fit', 'generate'", "trian", "--help"]),
    (["--sections", "train,fitt"], ["sections", "fitt"]),
    (["--sections", ""], ["--sections is empty: give one or more of train, fit, generate"]),
    (["--steps", "0"], ["steps", "PositiveInt", " 0 "]),
    (["--steps"], ["--steps", "expected one argument"]),
    (["--warmup", "-1"], ["warmup", "NonNegativeInt", "-1"]),
    (["--repeats=two"], ["repeats", "PositiveInt", "two"]),
    (["--fit-repeats", "0"], ["fit_repeats", "PositiveInt"]),
    (["--fit-precisions", "bf17"], ["--fit-precisions bf17: give default or a --trainer.precision value", "bf17"]),
    (["--nanogpt", "."], ["--nanogpt .: give a nanoGPT checkout whose data is prepared"]),
    (["--gen-tokens", "1.5"], ["gen_tokens", "PositiveInt", "1.5"]),
    (["--config", "v.yaml"], ["--config given twice: the benchmark takes one config"]),
    (["--out", "."], ["--out . is a folder: give the path of a file to write"]),
    (["--out", "tiny.yaml/b.json"], ["--out tiny.yaml/b.json", "is a file, not a folder"]),
    (["--stpes", "3"], ["--stpes: not a benchmark flag (did you mean --steps?), and the CLI refuses it: "]),
    (["--model.n_layer=abc"], ["--config tiny.yaml with --model.n_layer=abc: the CLI refuses it: ", "n_layer"]),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_writes_nothing(place, capsys, argv, expected):
    before = files(place)
    line = refused(["--config", "tiny.yaml", *argv], capsys)
    for part in expected:
        assert part in line
    assert files(place) == before


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "error: the following arguments are required: config"),
        (["--config", "nope.yaml"], "error: --config nope.yaml: the CLI refuses it: "),
        (["--config", "."], "error: --config .: the CLI refuses it: "),
    ],
)
def test_without_a_usable_config_is_one_line(place, capsys, argv, expected):
    assert refused(argv, capsys).startswith(expected)


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps anywhere
    assert bench.DESCRIPTION in text and "--trainer.accelerator cpu" in text
    for flag, (_, default, help) in bench.FLAGS.items():
        assert f"{flag} " in text and help in text
        assert default is None or f"default: {default}".replace("'", "") in text.replace("'", ""), flag


def refused(argv: list[str], capsys) -> str:
    """``bench.main(argv)`` must exit 1 with one ``error:`` line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
