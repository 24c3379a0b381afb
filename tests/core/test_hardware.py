"""The defaults the machine decides (hardware.py): the precision, from the CPU's or GPU's bf16
instructions (mocked both ways), and the CPU threads; what the user sets always wins. A real
command's one line, and a really busy machine, are in tests/e2e/test_machine_defaults.py."""

from __future__ import annotations

import pytest
import torch

from shakespeare_gpt import hardware
from shakespeare_gpt.cli import build

from ..conftest import tiny_fit_args


@pytest.fixture
def cpu_with(monkeypatch):
    """Make torch report a CPU with (only) the given instruction sets."""

    def features(*names: str) -> None:
        monkeypatch.setattr(
            torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **dict.fromkeys(names, True)}
        )

    return features


def precision_of(corpus_dir, *extra: str) -> str:
    """The precision the trainer of a tiny ``fit`` gets (built, not run)."""
    return build(tiny_fit_args(corpus_dir, 2, *extra)[1:], save_config=False).trainer.precision


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ((), "32-true"),
        (("avx2", "avx512_f"), "32-true"),  # AVX-512 alone: bf16 is emulated, and slower
        (("avx512_f", "avx512_bf16"), "bf16-mixed"),
        (("amx_tile", "amx_bf16"), "bf16-mixed"),
    ],
)
def test_training_is_bf16_only_where_the_cpu_has_bf16_instructions(cpu_with, corpus_dir, features, expected):
    cpu_with(*features)
    assert precision_of(corpus_dir) == expected


@pytest.mark.parametrize("features", [(), ("avx512_bf16",)])
@pytest.mark.parametrize("given", ["32-true", "bf16-mixed", "64-true"])
def test_an_explicit_precision_always_wins(cpu_with, corpus_dir, features, given):
    cpu_with(*features)
    assert precision_of(corpus_dir, f"--trainer.precision={given}") == given


def test_sampling_on_a_cpu_stays_in_fp32_and_a_gpu_with_bf16_trains_in_it(cpu_with, monkeypatch):
    cpu_with("avx512_bf16")
    assert hardware.default_precision(cuda=False, subcommand="predict")[0] == "32-true"
    assert hardware.default_precision(cuda=False, subcommand="validate")[0] == "bf16-mixed"  # as fit scored it
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "an Ampere GPU")
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        for subcommand in ("fit", "predict"):
            assert hardware.default_precision(cuda=True, subcommand=subcommand)[0] == expected


def test_threads_are_set_by_the_flag_and_left_to_omp_num_threads(corpus_dir, monkeypatch):
    before = torch.get_num_threads()
    try:
        build(tiny_fit_args(corpus_dir, 2, "--threads=1")[1:], save_config=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice: nothing measured, nothing said
    assert hardware.default_threads() == (torch.get_num_threads(), None)
