"""The defaults the machine decides (hardware.py): the precision, from the CPU's or GPU's bf16
instructions (mocked both ways), and the CPU threads; what the user sets always wins. A real
command's one line, and a really busy machine, are in tests/e2e/test_machine_defaults.py."""

from __future__ import annotations

import os

import pytest
import torch
from jsonargparse import Namespace

from shakespeare_gpt import hardware
from shakespeare_gpt.cli import build, recorded

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


def test_sampling_stays_in_fp32_and_a_gpu_trains_in_bf16_only_if_it_computes_in_it(cpu_with, monkeypatch):
    cpu_with("avx512_bf16")
    assert hardware.default_precision("cpu", "validate")[0] == "bf16-mixed"  # as fit scored it
    assert hardware.default_precision("mps", "fit")[0] == "32-true"  # not measured here
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "an NVIDIA GPU")
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):

        def bf16(including_emulation: bool = True, native: bool = native) -> bool:
            assert including_emulation is False  # emulated bf16 (a V100, a T4) is slower: not chosen
            return native

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
        assert hardware.default_precision("cuda", "fit")[0] == expected
    for device in ("cpu", "cuda"):
        assert hardware.default_precision(device, "predict") == ("32-true", "sampling stays in fp32")


def test_a_torch_that_cannot_tell_gets_fp32_and_says_why(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    precision, why = hardware.default_precision("cpu", "fit")
    assert precision == "32-true" and "cannot tell whether this CPU has bf16 instructions" in why


def test_a_continued_or_scored_run_keeps_the_precision_and_threads_its_run_recorded(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("trainer:\n  precision: 64-true\nthreads: 1\n")
    config = Namespace(ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    for subcommand in ("fit", "validate", "test"):
        assert recorded(config, subcommand) == {"precision": "64-true", "threads": 1}
    assert recorded(config, "predict") == recorded(Namespace(ckpt_path=None), "fit") == {}


def test_threads_chosen_are_set_for_this_process_and_those_lightning_launches(corpus_dir, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # restored after the test
    try:
        build(tiny_fit_args(corpus_dir, 2, "--threads=1")[1:], save_config=False)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_beside_busy_cores_fewer_threads_unless_omp_num_threads_says(monkeypatch):
    monkeypatch.setattr(hardware, "busy_cores", lambda: float(hardware.CPUS))  # every core busy
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, why = hardware.default_threads()
    if hardware.TORCH_THREADS > 1:
        assert threads == 1 and why.startswith(f"{hardware.CPUS:.1f} of the {hardware.CPUS} cores are busy")
        assert why.endswith("(--threads chooses)")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice: nothing measured, nothing said
    monkeypatch.setattr(hardware, "busy_cores", lambda: pytest.fail("measured despite OMP_NUM_THREADS"))
    assert hardware.default_threads() == (torch.get_num_threads(), None)
