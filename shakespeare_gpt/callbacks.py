"""Callbacks the CLI attaches: writing predicted samples out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SampleWriter(Callback):
    """Prints every predicted sample to stdout and writes them all to one text file.

    The file is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written file behind.

    Args:
        path: the text file the samples are written to (replaced on each predict run).
    """

    def __init__(self, path: str = "lightning_logs/samples.txt") -> None:
        self.path = Path(path)
        self.samples: list[str] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.samples = []

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[str], batch, batch_idx, dataloader_idx=0):
        for text in outputs:
            self.samples.append(text)
            sys.stdout.write(f"----- sample {len(self.samples)} -----\n{text}\n")
        sys.stdout.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.part")
        body = "".join(f"----- sample {i} -----\n{text}\n" for i, text in enumerate(self.samples, 1))
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, self.path)
        sys.stdout.write(f"wrote {len(self.samples)} sample(s) to {self.path}\n")
