"""Runs at the edges, as a user meets them, in real processes: a disk that fills up in the middle of a
run, a corpus of hundreds of megabytes, and sampling from a model of a text with a small alphabet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import TINY_TEXT, tiny_fit_args

pytestmark = pytest.mark.slow  # real processes: the slow tier

ROOT = Path(__file__).resolve().parents[2]
PYTHON = [sys.executable, "-m", "shakespeare_gpt"]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
# Lists the checkpoints of a folder and whether each loads: run inside the namespace that holds the full disk.
LOADS = (
    "import json, sys, torch, pathlib; print(json.dumps({p.name: bool(torch.load(p, weights_only=True)['state_dict'])"
    " for p in sorted(pathlib.Path(sys.argv[1]).iterdir())}))"
)


def tmpfs_works() -> bool:
    """Whether this process may mount a small filesystem of its own (a user and mount namespace)."""
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not tmpfs_works(), reason="needs unshare and user namespaces, to mount a small tmpfs")
def test_a_disk_that_fills_up_mid_run_is_one_line_and_leaves_every_checkpoint_whole(tmp_path):
    # One checkpoint's size, from a run on an ordinary disk.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text(TINY_TEXT)
    probe = subprocess.run([*PYTHON, *tiny_fit_args(Path("data"), 2)], cwd=tmp_path, env=ENV, capture_output=True)
    assert probe.returncode == 0, probe.stderr
    size = (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").stat().st_size
    # Room for the logs and two checkpoints (best and last), not three: the first validation saves,
    # the second's new best (written before the old one goes) finds the disk full.
    disk = tmp_path / "disk"
    disk.mkdir()
    fit = [*PYTHON, *tiny_fit_args(Path(tmp_path / "data"), 8)]
    checkpoints = "lightning_logs/version_0/checkpoints"
    script = (
        f"mount -t tmpfs -o size={int(2.6 * size) // 1024 + 48}k tmpfs {disk} && cd {disk} && "
        f'{" ".join(fit)}; echo rc=$?; {sys.executable} -c "{LOADS}" {checkpoints}; '
        f"{' '.join(PYTHON)} predict --ckpt_path lightning_logs --sample.max_new_tokens 5 --trainer.logger false "
        f"--writer.path /dev/null --sample.prompt F"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "rc=1" in done.stdout and "Traceback" not in done.stderr, done.stderr
    assert err == [
        f"error: cannot write a checkpoint in {checkpoints} (No space left on device): the checkpoints already "
        "there are intact; free some space, then resume with --ckpt_path last"
    ], done.stderr
    loads = json.loads(done.stdout.splitlines()[1])
    assert "last.ckpt" in loads and any(n.startswith("best-") for n in loads) and all(loads.values()), loads
    assert "----- sample 1 -----\nF" in done.stdout  # and predict takes the folder as it was left


def peak_memory(args: list[str], cwd: Path) -> tuple[int, str]:
    """The peak resident memory, in bytes, of ``shakespeare-gpt args`` run in ``cwd``, and its stderr."""
    with open(cwd / "stderr", "w") as err:
        process = subprocess.Popen([*PYTHON, *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak
    stderr = (cwd / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss * 1024, stderr


def test_a_corpus_of_300_mb_trains_and_validates_in_bounded_memory(tmp_path):
    lines = [f"{word} {i % 97}: {TINY_TEXT[i % 4000 : i % 4000 + 40]}\n" for i, word in enumerate(["abc"] * 5000)]
    block = "".join(lines).encode()
    with open(tmp_path / "big.txt", "wb") as f:
        for _ in range(300_000_000 // len(block)):
            f.write(block)
    (tmp_path / "small.txt").write_bytes(block[:200_000])
    big = (tmp_path / "big.txt").stat().st_size
    args = tiny_fit_args(Path("."), 4, "--data.cache_dir=cache", "--data.val_batch_size=256")
    small, _ = peak_memory([*args, "--data.corpus=small.txt"], tmp_path)
    peak, stderr = peak_memory([*args, "--data.corpus=big.txt"], tmp_path)
    # The model, Python, torch and Lightning are the small corpus's run; the large one adds a constant
    # (reading and encoding buffers, the pages of the val split its windows touch), not its 300 MB
    # (before: about 30 times the text, 9 GB). Measured: 140 MB more, on a 2-core AMD EPYC.
    assert peak - small < 200 << 20, f"peak {peak >> 20} MB for {big >> 20} MB of text, {small >> 20} MB for 200 KB"
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [p.split(".")[-1] for p in cache] == ["train", "val"]  # a byte a character, memory-mapped
    assert sum((tmp_path / "cache" / p).stat().st_size for p in cache) == big
    assert "validation: 262," in stderr and "evenly spread windows" in stderr  # a bounded pass, and said
    print(f"peak memory: {peak >> 20} MB for {big >> 20} MB of text, {small >> 20} MB for 200 KB")


def test_the_readme_s_predict_samples_a_model_of_a_20_character_text_without_newlines(tmp_path):
    text = "".join("abcdefghij KLMNOPQR,"[(i * 7) % 20] for i in range(6000))  # 20 characters, no newline
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text(text)
    fit = subprocess.run([*PYTHON, *tiny_fit_args(Path("data"), 2)], cwd=tmp_path, env=ENV, capture_output=True)
    assert fit.returncode == 0, fit.stderr
    # The README's command, with the default prompt (a newline, which this text lacks) and top_k 40 (> 20).
    predict = [*PYTHON, "predict", "--config", str(ROOT / "configs" / "predict.yaml"), "--ckpt_path", "lightning_logs"]
    done = subprocess.run(predict, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("----- sample") == 2
    samples = tmp_path / "lightning_logs" / "version_0" / "samples.txt"  # beside the run sampled
    assert samples.read_text().count("----- sample") == 2
    assert f"wrote 2 sample(s) to {samples.relative_to(tmp_path)}" in done.stdout
