"""The small tools as a user runs them (``python -m ...``): what only a real process shows is its
stderr, which must hold nothing but the tool's own line (no warning from a library, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
