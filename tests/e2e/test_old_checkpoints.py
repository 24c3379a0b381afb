"""Checkpoints written by the code before issue 20's refactor still load, sample, score and resume.

The code of that commit is taken from this clone's history (``git archive``) and run in a process of
its own, which writes a checkpoint and prints what it samples and scores; the code here then reads
the same checkpoint. Needs the commit in the history (a full clone, as CI's).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shakespeare_gpt.cli import cli_main

from ..conftest import TINY_MODEL_ARGS, TINY_TEXT

pytestmark = pytest.mark.slow  # real processes: the slow tier

BEFORE = "8956ed5"  # the last commit before the refactor
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ["--sample.prompt=All:", "--sample.max_new_tokens=30", "--sample.seed=7", "--sample.top_k=5"]
# Run by the old code: fit, then what it samples and scores for the checkpoint it wrote.
OLD_RUN = """
import json, sys, shakespeare_gpt
from shakespeare_gpt.cli import build
assert shakespeare_gpt.__file__.startswith(sys.argv[1]), shakespeare_gpt.__file__  # the old code, not this one
fit, sample = json.loads(sys.argv[2]), json.loads(sys.argv[3])
build(["fit", *fit], run=True)
ckpt = "lightning_logs/version_0/checkpoints/last.ckpt"
build(["predict", f"--ckpt_path={ckpt}", *sample, "--writer.path=old_sample.txt"], run=True)
cli = build(["validate", f"--ckpt_path={ckpt}", "--data.corpus=input.txt"], run=True)
print(json.dumps({"val_loss": float(cli.trainer.callback_metrics["val/loss"])}))
"""


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> tuple[Path, dict]:
    """A folder where the old code trained the tiny model, and what it measured."""
    root = tmp_path_factory.mktemp("before")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "shakespeare_gpt"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    (root / "input.txt").write_text(TINY_TEXT, encoding="utf-8")
    fit = ["--data.corpus=input.txt", "--data.batch_size=4", *TINY_MODEL_ARGS, "--model.dropout=0.1"]
    fit += ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false"]
    out = subprocess.run(
        [sys.executable, "-c", OLD_RUN, str(root), json.dumps(fit), json.dumps(SAMPLE)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return root, json.loads(out.stdout.strip().splitlines()[-1])


def test_an_old_checkpoint_samples_and_scores_what_the_code_that_wrote_it_did(old_run, tmp_path):
    root, measured = old_run
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cli_main(["predict", f"--ckpt_path={ckpt}", *SAMPLE, f"--writer.path={tmp_path / 'new_sample.txt'}"])
    assert (tmp_path / "new_sample.txt").read_text() == (root / "old_sample.txt").read_text()
    cli = cli_main(["validate", f"--ckpt_path={ckpt}", f"--data.corpus={root / 'input.txt'}"])
    assert cli.trainer.callback_metrics["val/loss"].item() == pytest.approx(measured["val_loss"], abs=1e-6)


def test_an_old_run_resumes(old_run, tmp_path, monkeypatch):
    root, _ = old_run
    monkeypatch.chdir(tmp_path)
    ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4"]
    cli = cli_main(
        ["fit", f"--ckpt_path={ckpt}", f"--data.corpus={root / 'input.txt'}", "--trainer.max_steps=6", *quiet]
    )
    assert cli.trainer.global_step == 6 and cli.model.hparams.n_embd == 16
