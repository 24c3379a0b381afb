"""The command-line entry point (``python -m shakespeare_gpt``, or the ``shakespeare-gpt`` script).

The only place the package sets process-wide state, and narrowly: warnings and log lines from
third parties that do not apply to this project are dropped here, not in the library.
"""

import logging
import warnings

import torch

from .cli import cli_main


class DropLines(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def main() -> None:
    # Lightning 2.6 on torch 2.13 warns about a torch-internal deprecation on every run; it is noise here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Sampling or validating a checkpoint needs none of the callbacks that wrote it.
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
    # fit writes to a fresh version_N folder; one that has checkpoints is one the user asked for
    # (a resumed run, or a fixed --trainer.logger.init_args.version).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Advertisements for Lightning's cloud services, printed on every run; and the seed (config.yaml records it).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropLines("💡 Tip"))
    logging.getLogger("lightning.fabric.utilities.seed").addFilter(DropLines("Seed set to"))
    # "Received SIGTERM: 2" on Ctrl-C: the interrupt callback says what the signal did instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(DropLines("[rank"))
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    cli_main()


if __name__ == "__main__":
    main()
