"""The CPU kernels torch and MKL run, pinned so that one recipe and seed give one result on any AVX2 machine.

torch picks its vectorised CPU kernels (softmax, norms, reductions, the optimizer's element-wise updates) by
what the processor offers, and MKL picks its matrix-product code path the same way and also by the
alignment of the buffers it is handed. The kernels add floats in different orders, and training turns a
last-bit difference into another model within a few hundred steps: the same commit, recipe and seed
trained different generators on different 2-core AMD EPYC machines (issue 26, docs/reproducibility.md).

`pin_cpu_kernels` sets, before torch computes anything, the two variables that fix both choices:

- ATEN_CPU_CAPABILITY=avx2: torch's AVX2 kernels even where AVX-512 is there (never higher than the
  processor has: torch would run AVX-512 instructions on a machine without them and die of SIGILL);
- MKL_CBWR=AVX2: MKL's conditional numerical reproducibility on its AVX2 branch, the same code path on
  any AVX2 machine and results that do not depend on the buffers' alignment.

Both are read lazily (torch at its first dispatched kernel, MKL at its first call), so setting them when
`rlprm` is imported works even where torch was imported first, as long as it has not computed yet. A value
the user set is kept; RLPRM_CPU_KERNELS=native sets neither (the machine's fastest kernels, numbers that
differ across machines). A processor without AVX2 and FMA, or one that is not x86, keeps its own kernels:
its numbers differ from an AVX2 machine's either way. Thread counts are pinned elsewhere, per job
(`run.threads`): torch splits a large reduction across its threads, so 1 and 2 threads can give
different sums.
"""

from __future__ import annotations

import os

ESCAPE = "RLPRM_CPU_KERNELS"
"""Environment variable: `native` leaves the kernels to the machine; anything else (or unset) pins them."""

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
"""What is pinned, and to what, on an x86 processor with AVX2 and FMA."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The processor's feature flags (Linux), or None where they cannot be read."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def can_pin(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether the pinned kernels run here: an x86-64 processor with AVX2 and FMA (what torch's AVX2 kernels need)."""
    if machine is None:
        if hasattr(os, "uname"):
            machine = os.uname().machine
        else:  # Windows; `platform` costs `import rlprm` 6 ms, so only here
            import platform

            machine = platform.machine()
    machine = machine.lower()
    if machine not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is not None and {"avx2", "fma"} <= flags


def pin_cpu_kernels(environ=None, flags: set[str] | None = None, machine: str | None = None) -> dict[str, str]:
    """Set PINNED's variables in `environ` (os.environ) where the user has not; returns those this call set.

    Nothing is set under RLPRM_CPU_KERNELS=native or on a processor that cannot run the pinned kernels.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ESCAPE, "").strip().lower() == "native" or not can_pin(flags, machine):
        return {}
    added = {k: v for k, v in PINNED.items() if not environ.get(k)}
    environ.update(added)
    return added


def kernel_report() -> dict[str, object]:
    """What this process runs with, for a run's summary: torch's kernel level, MKL's branch, torch's threads."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "AUTO"), "torch_threads": torch.get_num_threads()}
