"""The command-line entry point (``python -m shakespeare_gpt``, or the ``shakespeare-gpt`` script).

Entry points (this one and the tools') are the only places the package sets process-wide state,
and narrowly: ``quiet_third_party`` drops warnings and log lines that do not apply to this project.
"""

import torch

from .cli import cli_main
from .utils import quiet_third_party


def main() -> None:
    quiet_third_party()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    cli_main()


if __name__ == "__main__":
    main()
