"""Real ``predict`` processes, their stdout a pipe: the samples reach it as they are drawn, and a signal
stops the sampling at once, with the text printed kept and written to samples.txt."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import fit_tiny_run

pytestmark = pytest.mark.slow  # real processes: the slow tier


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run of 4 steps, fitted in this process."""
    return fit_tiny_run(tmp_path_factory.mktemp("predict"))


def start_predict(run: Path, samples: Path, *extra: str) -> subprocess.Popen:
    args = ["predict", f"--ckpt_path={run}", f"--writer.path={samples}", "--sample.prompt=All:", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "shakespeare_gpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def read_until(process: subprocess.Popen, done: Callable[[str], bool]) -> str:
    """What the process has printed, read from the pipe as it comes, once ``done`` says it is enough."""
    out, deadline = b"", time.monotonic() + 120
    while not done(out.decode()):
        assert time.monotonic() < deadline, f"printed only {out!r}"
        if select.select([process.stdout], [], [], 1)[0]:
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            assert chunk, f"predict ended early: {process.stderr.read().decode()}"
            out += chunk
    return out.decode()


def test_the_first_characters_reach_a_pipe_while_the_sample_is_drawn(run, tmp_path):
    head = "----- sample 1 -----\nAll:"
    process = start_predict(run, tmp_path / "samples.txt", "--sample.max_new_tokens=1000000")
    try:
        printed = read_until(process, lambda out: len(out) >= len(head) + 20)
        assert printed.startswith(head)
        assert process.poll() is None  # a million characters to draw: far from done
        process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143  # 128 + SIGTERM
    assert printed + rest.decode() == (tmp_path / "samples.txt").read_text()
    assert f"interrupted by SIGTERM: wrote 0 sample(s) and the start of sample 1 to {tmp_path / 'samples.txt'}\n" in (
        err.decode()
    )


def test_ctrl_c_stops_at_once_keeping_the_text_printed_and_writing_it_to_samples_txt(run, tmp_path):
    samples = tmp_path / "samples.txt"
    process = start_predict(
        run, samples, "--sample.num_samples=4", "--sample.batch_size=2", "--sample.max_new_tokens=3000"
    )
    try:
        printed = read_until(process, lambda out: "----- sample 3 -----\nAll:" in out)  # the first batch is done
        process.send_signal(signal.SIGINT)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    printed += rest.decode()
    assert process.returncode == 130  # 128 + SIGINT
    assert printed == samples.read_text()  # what was printed, and only that
    texts = [s.split("\n", 1)[1] for s in printed.split("----- sample ")[1:]]
    assert [len(t) for t in texts[:2]] == [len("All:") + 3000 + 1] * 2 and len(texts) == 3
    assert len(texts[2]) < len("All:") + 3000 + 1  # sample 3 was stopped in the middle
    assert f"interrupted by SIGINT: wrote 2 sample(s) and the start of sample 3 to {samples}\n" in err.decode()


def test_a_reader_that_stops_reading_ends_predict_quietly_with_the_text_printed_written(run, tmp_path):
    samples = tmp_path / "samples.txt"
    process = start_predict(run, samples, "--sample.max_new_tokens=1000000")
    try:
        printed = read_until(process, lambda out: len(out) >= 40)  # as `| head -c 40` reads, then goes
        process.stdout.close()
        err = process.stderr.read().decode()
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 141  # 128 + SIGPIPE, as a shell reports a process the broken pipe ended
    assert (
        "Traceback" not in err
        and f"interrupted by SIGPIPE: wrote 0 sample(s) and the start of sample 1 to {samples}" in err
    )
    assert samples.read_text().startswith(printed)  # all it printed, and what it drew before it noticed
