"""The small tools as a user runs them (``python -m ...``): what only a real process shows is its
stderr, which must hold nothing but the tool's own line (no warning from a library, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shakespeare_gpt import hardware

pytestmark = pytest.mark.slow


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"shakespeare_gpt.tools.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bench_prints_its_table_and_no_warning(corpus_dir, tmp_path):
    config = {
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4},
        "model": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False},
    }
    (tmp_path / "tiny.yaml").write_text(json.dumps(config))
    args = ["--config=tiny.yaml", "--sections", "train,generate", "--steps=2", "--warmup=1", "--repeats=1"]
    done = run("bench", *args, "--gen-tokens=5", "--out=b.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"\.py:\d+: ", done.stderr), done.stderr  # how Python and Lightning print a warning
    assert "framework overhead" in done.stdout and done.stdout.endswith("wrote b.json\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "data", "tiny.yaml"]


FAKE_NANOGPT = """import sys
from pathlib import Path
Path("argv.txt").write_text(" ".join(sys.argv[1:]))
print("step 0: train loss 4.1000, val loss 4.2000")
print("step 4: train loss 3.1000, val loss 3.2500")
"""


def test_bench_fits_in_each_precision_and_nanogpt_in_turn(corpus_dir, tmp_path):
    """Whole ``fit`` processes, and a stand-in for nanoGPT's train.py that records the recipe it is given."""
    config = {
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4},
        "model": {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, "lr_schedule": "cosine"},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "max_steps": 4, "val_check_interval": 2},
    }
    (tmp_path / "tiny.yaml").write_text(json.dumps(config))
    nanogpt = tmp_path / "nanogpt"
    (nanogpt / "data" / "shakespeare_char").mkdir(parents=True)
    (nanogpt / "data" / "shakespeare_char" / "val.bin").write_bytes(b"")
    (nanogpt / "train.py").write_text(FAKE_NANOGPT)
    args = ["--config=tiny.yaml", "--sections=fit", "--fit-precisions", "default,64-true", f"--nanogpt={nanogpt}"]
    done = run("bench", *args, "--fit-repeats=2", "--out=b.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fit = json.loads((tmp_path / "b.json").read_text())["fit"]
    assert list(fit) == ["default", "64-true", "nanogpt"]
    assert fit["64-true"]["precision_each"] == ["64-true"] * 2 and len(set(fit["default"]["log_dir_each"])) == 2
    assert fit["default"]["precision_each"] == ["bf16-mixed" if hardware.cpu_bf16() else "32-true"] * 2
    assert all(0 < loss < 5 for loss in fit["default"]["best_val_loss_each"])  # ln(vocab) is about 3.3
    assert fit["nanogpt"]["val_loss_each"] == [3.25, 3.25] and fit["nanogpt"]["wall_s"] > 0
    recipe = (nanogpt / "argv.txt").read_text().split()
    for flag in ("--device=cpu", "--compile=False", "--n_layer=1", "--n_embd=16", "--block_size=16", "--max_iters=4"):
        assert flag in recipe
    assert "--batch_size=4" in recipe and "--decay_lr=True" in recipe and "x nanoGPT's time" in done.stdout


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("bench", ["--config=tiny.yaml", "--steps=0"], 'error: Parser key "steps": Not of type PositiveInt'),
        ("compare", ["m", "--max-new-tokens=0"], 'error: Parser key "max_new_tokens": Not of type PositiveInt'),
        ("tiny_gpt2", ["g", "--n-embd=30", "--n-head=4"], "error: --n-embd 30 is not a multiple of --n-head 4"),
    ],
)
def test_bad_input_is_the_only_line_on_stderr(module, args, expected, tmp_path):
    done = run(module, *args, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(expected), done.stderr
    assert list(tmp_path.iterdir()) == []
