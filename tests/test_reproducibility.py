"""The CPU kernel pinning (rlprm/reproducibility.py): set before torch computes, in every process that imports rlprm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlprm.reproducibility import ESCAPE, PINNED, can_pin, cpu_flags, pin_cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"avx", "avx2", "fma", "sse4_2"}

needs_avx2 = pytest.mark.skipif(not can_pin(), reason="the pinned kernels need an x86-64 processor with AVX2 and FMA")


def _fresh(code: str, **env: str) -> dict:
    """Run `code` in a new interpreter whose environment has none of the pinned variables (plus `env`); its JSON."""
    base = {k: v for k, v in os.environ.items() if k not in PINNED and k != ESCAPE}
    out = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ENV = ("import json, os, rlprm; print(json.dumps({'env': {k: os.environ.get(k) for k in "
       "('ATEN_CPU_CAPABILITY', 'MKL_CBWR')}}))")
SHOW = ("import json, os, rlprm, torch; print(json.dumps({'env': {k: os.environ.get(k) for k in "
        "('ATEN_CPU_CAPABILITY', 'MKL_CBWR')}, 'capability': torch.backends.cpu.get_cpu_capability()}))")


@needs_avx2
def test_importing_rlprm_pins_the_kernels_torch_then_runs():
    # torch reads ATEN_CPU_CAPABILITY at its first dispatched kernel, not at import: a script that imports torch
    # before rlprm (as the tests and benchmarks do) is pinned too, and one that imports rlprm first all the more
    got = _fresh("import torch; " + SHOW, ATEN_CPU_CAPABILITY="")  # empty counts as unset
    assert got["env"] == PINNED
    assert got["capability"] == "AVX2"


@needs_avx2
def test_a_users_own_setting_is_kept():
    got = _fresh(SHOW, ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    assert got["env"] == {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    assert got["capability"] == "DEFAULT"
    # one set, the other still pinned
    assert _fresh(ENV, MKL_CBWR="AVX512")["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX512"}


def test_native_leaves_the_machine_its_own_kernels():
    got = _fresh(ENV, **{ESCAPE: "native"})
    assert got["env"] == {"ATEN_CPU_CAPABILITY": None, "MKL_CBWR": None}


def test_pin_sets_only_where_the_processor_runs_the_pinned_kernels():
    env: dict[str, str] = {}
    assert pin_cpu_kernels(env, flags=AVX2 | {"avx512f"}, machine="x86_64") == PINNED and env == PINNED
    # never above the processor: torch would run AVX2 instructions on a machine without them (SIGILL)
    for flags, machine in ((AVX2 - {"avx2"}, "x86_64"), (AVX2 - {"fma"}, "x86_64"), (AVX2, "aarch64")):
        env = {}
        assert pin_cpu_kernels(env, flags=flags, machine=machine) == {} and env == {}
    env = {"MKL_CBWR": "COMPATIBLE", ESCAPE: ""}
    assert pin_cpu_kernels(env, flags=AVX2, machine="AMD64") == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert env["MKL_CBWR"] == "COMPATIBLE"
    env = {ESCAPE: " Native "}
    assert pin_cpu_kernels(env, flags=AVX2, machine="x86_64") == {} and env == {ESCAPE: " Native "}


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 fma\nbugs\t: none\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "missing")) is None
    info.write_text("processor\t: 0\n")
    assert cpu_flags(str(info)) is None
