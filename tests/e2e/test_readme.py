"""The README's commands, run as written, so the README cannot drift from the code.

Every line of a ``bash`` block in the README must be one of the commands handled here, and each
is run in order, in one scratch folder, as a user would type it, with only these additions to
stay fast: training commands get a tiny model and a few steps (``SMALL``), ``make demo`` gets
them through its ``FIT_ARGS`` and uses the installed environment, the study tour runs a few steps
a run (and must write nothing outside its scratch folders, then, run again, nothing at all), and
TensorBoard is started on the logs and asked what it serves. ``make test``, ``pytest`` and
``pytest -m slow`` are what CI runs (``.ci/run``), so they are checked to be there, not run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ..conftest import TINY_MODEL_ARGS, TINY_TEXT

pytestmark = pytest.mark.slow  # real processes: the slow tier

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = [
    *TINY_MODEL_ARGS,
    "--data.batch_size=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
]
# The same for the pretrained-model path: a smaller window, and no character-model flags.
SMALL_PRETRAINED = ["--model.block_size=16", *SMALL[len(TINY_MODEL_ARGS) :]]
TINY_GPT2 = ["--vocab-size=300", "--n-layer=1", "--n-head=2", "--n-embd=32", "--n-positions=64"]


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks, comments dropped, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tour(folder: Path) -> None:
    """configs/ablations/tour.yaml with four steps a run."""
    path = folder / "configs" / "ablations" / "tour.yaml"
    study = yaml.safe_load(path.read_text())
    study["args"] = ["--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    path.write_text(yaml.safe_dump(study))


def files_outside(folder: Path, scratch: list[Path]) -> dict[Path, tuple]:
    """Every file under ``folder`` but those under ``scratch``, with its bytes, mode and mtime."""
    return {
        p: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not any(p.is_relative_to(s) for s in scratch)
    }


def check_tensorboard(folder: Path, logdir: str) -> None:
    """Start TensorBoard as the README says and ask it what a newcomer would see first."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "tensorboard"), "--logdir", logdir, "--port", str(port), "--host", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data"

    def get(path: str):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                plugins = get("/plugins_listing")
                tags = get("/plugin/scalars/tags")
                if tags:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not come up with the runs in 60 s"
            time.sleep(0.5)
        assert plugins["custom_scalars"]["enabled"] and plugins["text"]["enabled"]
        run_tags = next(t for r, t in tags.items() if r.startswith("cpu/"))
        assert {"train/loss", "val/loss", "val/bpc"} <= set(run_tags) and "epoch" not in run_tags
        layout = get("/plugin/custom_scalars/layout")
        first = layout["category"][0]
        assert first["title"] == "Loss"
        assert first["chart"][0]["multiline"]["tag"] == [r"^(train|val|train_eval)/loss$"]
        run = "cpu/version_0"  # make demo's run: the Images and Projector tabs
        assert set(get("/plugin/images/tags")[run]) == {"attention/layer_0"}  # the tiny model's one layer
        embeddings = get(f"/plugin/projector/info?run={run}")["embeddings"]
        assert [e["tensorShape"] for e in embeddings] == [[65, 16]]  # tiny Shakespeare's characters, 16 dims
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_readme_command_runs_as_written(tmp_path):
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"], "the two commands come first"
    folder = tmp_path / "clone"
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    for name in ("configs", "reports"):
        shutil.copytree(ROOT / name, folder / name)
    short_tour(folder)
    # A repository of its own, as a clone is, so that what the commands change shows in git status.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        run([*git, *args], folder)
    (folder / "my_text.txt").write_text(TINY_TEXT)  # the tour's "text of your own", not committed
    handled = []
    for line in commands:
        words = shlex.split(line)
        if line == "make demo":
            # The installed environment stands in for .venv: -o keeps make from reinstalling it.
            venv = BIN.parent
            fit_args = " ".join([*SMALL, "--trainer.max_steps=4"])
            out = run(["make", "-o", f"{venv}/.core", "demo", f"VENV={venv}", f"FIT_ARGS={fit_args}"], folder)
            assert out.stdout.count("----- sample") == 2
            # From the run just trained, and beside it.
            assert "checkpoint: lightning_logs/cpu/version_0/checkpoints/best-step4-" in out.stderr
            assert (folder / "lightning_logs/cpu/version_0/samples.txt").read_text().count("----- sample") == 2
        elif line in ("make test", ". .venv/bin/activate && pytest", "pytest -m slow"):
            # CI runs these (.ci/run: make's set-up, then both tiers); here they would run this test again.
            ci = (ROOT / ".ci" / "run").read_text()
            assert "make setup" in ci and "\npytest\n" in ci and "\npytest -m slow\n" in ci
        elif words[0] == "shakespeare-gpt":
            extra = []
            if words[1] == "fit":
                steps = 6 if "--ckpt_path" in words else 4  # a resumed run goes on from the last one's 4
                small = SMALL_PRETRAINED if "tiny_gpt2" in line else SMALL
                extra = [*small, f"--trainer.max_steps={steps}"]
                if "ddp" in words:
                    extra += ["--trainer.max_steps=2"]
            elif words[1] == "predict":
                extra = ["--sample.max_new_tokens=20"]
            out = run([str(BIN / "shakespeare-gpt"), *words[1:], *extra], folder)
            if words[1] == "predict":
                assert out.stdout.count("----- sample 1 -----\nROMEO:") == 1
            if "--attention_maps.png" in words:
                png = words[words.index("--attention_maps.png") + 1]
                assert f"wrote the attention maps to {png}" in out.stdout and (folder / png).stat().st_size > 0
            if "--ckpt_path" in words and words[1] == "fit":
                assert "Restoring states" in out.stderr + out.stdout
        elif words[:2] == ["tensorboard", "--logdir"]:
            check_tensorboard(folder, words[2])
        elif words[:3] == ["python", "-m", "shakespeare_gpt.tools.tiny_gpt2"]:
            run([sys.executable, *words[1:], *TINY_GPT2], folder)
        elif words[:3] == ["python", "-m", "shakespeare_gpt.tools.compare"]:
            run([sys.executable, *words[1:], "--max-new-tokens=20"], folder)
            report = (folder / words[words.index("--out") + 1]).read_text()
            assert "| CPU recipe | ShakespeareGPT |" in report and "| tiny GPT-2 | PretrainedLM |" in report
        elif words[:3] == ["python", "-m", "shakespeare_gpt.tools.ablate"]:
            report = folder / words[words.index("--report") + 1]
            scratch = [folder / "lightning_logs" / "ablations" / "tour", report]  # --logs's default, --report
            before = files_outside(folder, scratch)
            run([sys.executable, *words[1:]], folder)
            assert files_outside(folder, scratch) == before  # reports/ and the rest as they were: git sees no change
            text = (report / "README.md").read_text()
            assert "| 4 | Adding the feed-forward layer improves performance. | **" in text
            assert f"`{line} --report-only` writes this report again" in text
            assert (report / "results.csv").read_text().count("\n") == 7  # 3 variants x 2 seeds
            before = files_outside(folder, [])
            out = run([sys.executable, *words[1:]], folder)
            assert "tour: every run is done already, so nothing is run or written" in out.stdout
            assert files_outside(folder, []) == before
            assert run(["git", "status", "--porcelain"], folder).stdout == "?? my_text.txt\n"
        else:
            pytest.fail(f"the README's command {line!r} is not run by this test: add it here")
        handled.append(line)
    assert handled == commands
