"""Two CPU processes through Lightning's own DDP (gloo): different training windows, one val loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from shakespeare_gpt.cli import cli_main

from ..conftest import tiny_fit_args

pytestmark = pytest.mark.slow  # real processes: the slow tier

ROOT = Path(__file__).resolve().parents[2]


class SaveFirstBatch(Callback):
    """Each rank writes the first batch it trained on to ``<folder>/rank<N>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 0:
            torch.save(batch[0].cpu(), self.folder / f"rank{trainer.global_rank}.pt")


def test_two_process_ddp_fit(corpus_dir, tmp_path, monkeypatch):
    callback = json.dumps({"class_path": "tests.e2e.test_ddp.SaveFirstBatch", "init_args": {"folder": str(tmp_path)}})
    args = [
        *tiny_fit_args(corpus_dir, 4),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--trainer.callbacks+={callback}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # Lightning launches the second process by running this same command line again.
    subprocess.run([sys.executable, "-m", "shakespeare_gpt", *args], cwd=tmp_path, env=env, check=True, timeout=300)

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.shape == rank1.shape and not torch.equal(rank0, rank1)  # each rank its own windows

    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ddp_val = torch.load(ckpt, weights_only=False)["callbacks"]
    logged = next(v["current_score"] for k, v in ddp_val.items() if k.startswith("ModelCheckpoint"))
    monkeypatch.chdir(tmp_path)
    data = [f"--data.corpus={corpus_dir / 'input.txt'}"]
    single = cli_main(["validate", f"--ckpt_path={ckpt}", *data, "--trainer.logger=false"])
    # The two processes each passed over the whole val split; one process on the same weights agrees
    # up to float32 rounding (the two runs use different thread counts, so sums run in other orders).
    assert single.trainer.callback_metrics["val/loss"].item() == pytest.approx(logged.item(), rel=1e-6)
