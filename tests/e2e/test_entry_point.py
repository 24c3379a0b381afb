"""The installed ``shakespeare-gpt`` script and ``python -m shakespeare_gpt`` as a user runs them: what only
a real process shows is that stderr holds one line and nothing else (no library's warning, no traceback)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes: the slow tier


def test_the_script_refuses_a_bad_value_in_one_line_and_no_third_party_noise(tmp_path):
    script = shutil.which("shakespeare-gpt") or str(Path(sys.executable).parent / "shakespeare-gpt")
    result = subprocess.run(
        [script, "fit", "--data.batch_size", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith('error: Parser key "data.batch_size": Not of type PositiveInt: 0')
    assert len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_predict_without_a_checkpoint_says_to_give_one(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "shakespeare_gpt", "predict"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: the character model needs a vocabulary: give --ckpt_path")
    assert len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
