"""The installed ``shakespeare-gpt`` script and ``python -m shakespeare_gpt`` as a user runs them: what only
a real process shows is that stderr holds one line and nothing else (no library's warning, no traceback)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpt2_finetune.yaml"

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


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shakespeare_gpt", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("how", ["offline mode", "no route to the Hub"])
def test_no_network_and_no_local_copy_is_one_line_at_once(tmp_path, corpus_dir, how):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-cache")}
    if how == "offline mode":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a Hub that cannot be reached: nothing listens on this machine's port 443
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "https://127.0.0.1"
    start = time.monotonic()
    args = ["validate", f"--config={CONFIG}", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    result = run_cli(args, env, tmp_path)
    assert result.returncode == 1 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines() == [
        "error: cannot load 'gpt2': it is not a folder here, and the Hugging Face Hub cannot be reached to download "
        "it; download it where there is network (e.g. hf download gpt2, into the Hugging Face cache) or give a local "
        "folder with its config.json, weights and tokenizer files, e.g. --model.pretrained path/to/folder"
    ]
