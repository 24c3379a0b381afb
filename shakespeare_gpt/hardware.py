"""What the machine offers a run, and the defaults it decides: the precision and the CPU threads.

A command that does not set ``--trainer.precision`` trains and scores in bf16-mixed where the
hardware computes in bf16 natively (an NVIDIA GPU from Ampere on; a CPU with AVX512-BF16 or AMX),
and in fp32 elsewhere, where bf16 would be emulated and slower; a resumed or scored run keeps the
precision its run recorded. Sampling stays in fp32 (on a CPU bf16 is no faster one token at a time;
see ``docs/benchmarks.md``).

A command that does not set ``--threads`` (nor ``OMP_NUM_THREADS``) uses torch's default, one
thread per core, unless other processes keep cores busy (Linux: measured from ``/proc/stat``):
then it leaves them those cores. Two processes that each spin a thread on every core slow each
other down several times over.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

TORCH_THREADS = torch.get_num_threads()  # torch's own default, before anyone sets it
AFFINITY = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
CPUS = len(AFFINITY)  # the CPUs this process may run on
STAT = Path("/proc/stat")  # Linux's count of clock ticks each CPU spent busy and idle


def cpu_bf16() -> list[str] | None:
    """This CPU's bf16 instruction sets (AVX512-BF16, AMX-BF16); none where bf16 would be emulated;
    None where this torch cannot tell (it has no ``torch.cpu.get_capabilities``)."""
    if not hasattr(torch.cpu, "get_capabilities"):
        return None
    capabilities = torch.cpu.get_capabilities()
    return [name.upper().replace("_", "-") for name in ("avx512_bf16", "amx_bf16") if capabilities.get(name)]


def default_precision(device: str, subcommand: str | None) -> tuple[str, str]:
    """The precision of a run on ``device`` (cpu, cuda, mps) that sets none, and why, in words."""
    if subcommand == "predict":
        return "32-true", "sampling stays in fp32"
    if device == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"this GPU ({torch.cuda.get_device_name()}) computes in bf16 natively"
        return "32-true", f"this GPU ({torch.cuda.get_device_name()}) has no native bf16"
    if device != "cpu":
        return "32-true", f"bf16 on {device} is not measured here"
    found = cpu_bf16()
    if found is None:
        return "32-true", f"torch {torch.__version__} cannot tell whether this CPU has bf16 instructions"
    if found:
        return "bf16-mixed", f"this CPU ({' and '.join(found)}) computes in bf16 natively"
    return "32-true", "this CPU has no bf16 instructions (bf16 would be emulated, and slower)"


def _cpu_ticks() -> tuple[int, int, float] | None:
    """Busy and total clock ticks of the CPUs this process may run on, and this process's own CPU seconds."""
    if not STAT.is_file():
        return None
    allowed = {f"cpu{i}" for i in AFFINITY}
    busy = total = 0
    for line in STAT.read_text().splitlines():
        name, *ticks = line.split()
        if name in allowed:
            user, nice, system, idle, iowait, irq, softirq = (int(t) for t in ticks[:7])
            busy += user + nice + system + irq + softirq
            total += user + nice + system + idle + iowait + irq + softirq
    return busy, total, time.process_time()


_since = _cpu_ticks()  # the first window opens at import: a command's parsing falls inside it


def busy_cores(min_window: float = 0.1) -> float:
    """How many cores other processes kept busy since the last call (the first: since import).

    Counts the CPUs this process may run on, minus this process's own CPU time. Linux only (0
    elsewhere). A window shorter than ``min_window`` seconds is first waited out.
    """
    global _since
    now = _cpu_ticks()
    if now is None or _since is None:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    if now[1] - _since[1] < min_window * hz * CPUS:
        time.sleep(min_window)
        now = _cpu_ticks()
    busy, total, own = (a - b for a, b in zip(now, _since, strict=True))
    _since = now
    return max(0.0, CPUS * (busy - own * hz) / total) if total else 0.0


def default_threads() -> tuple[int, str | None]:
    """CPU threads for a run that sets none: torch's default, or fewer beside busy cores; and why, if fewer."""
    if "OMP_NUM_THREADS" in os.environ:  # the user's choice, which torch has already taken
        return torch.get_num_threads(), None
    busy = busy_cores()
    threads = max(1, min(TORCH_THREADS, round(CPUS - busy)))
    if threads == TORCH_THREADS:
        return threads, None
    return threads, (
        f"{busy:.1f} of the {CPUS} cores are busy with other processes: using {threads} thread(s), not "
        f"{TORCH_THREADS}, so that neither slows to a crawl (--threads chooses)"
    )


def host_memory() -> int:
    """Bytes of memory this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine() -> str:
    """The CPU (or GPU), its native bf16, cores, threads and torch version of this process, in a few words."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    bf16 = cpu_bf16()
    cpu += f" ({', '.join(bf16)})" if bf16 else " (no native bf16)" if bf16 == [] else ""
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s); torch {torch.__version__}"
