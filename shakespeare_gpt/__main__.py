"""The command-line entry point; the only place the package sets process-wide state, and narrowly."""

import warnings

import torch

from .cli import cli_main

if __name__ == "__main__":
    # Lightning 2.6 on torch 2.13 warns about a torch-internal deprecation on every run; it is noise here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    cli_main()
