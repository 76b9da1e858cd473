"""Which OpenBLAS kernels MLX's CPU matmuls run: read from the library itself and recorded with every run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, farense
from farense.blas import blas_core, blas_status
print(json.dumps({"status": blas_status(), "core": blas_core()}))
"""


def test_blas_core_names_the_kernels_openblas_loaded():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if not probe["status"].startswith("openblas:"):
        pytest.skip(f"no OpenBLAS here ({probe['status']})")
    assert probe["core"], "OpenBLAS loaded but blas_core() is empty"
    wanted = os.environ.get("OPENBLAS_CORETYPE")
    if wanted:  # set by this machine's environment: OpenBLAS must report the same kernels
        assert probe["core"].lower() == wanted.lower()


def test_coretype_follows_the_cpu_s_instruction_sets():
    from farense.blas import coretype_for

    avx2 = {"sse2", "avx", "avx2", "fma"}
    avx512 = avx2 | {"avx512f", "avx512vl", "avx512bw", "avx512dq"}
    assert coretype_for(avx512 | {"avx512_bf16"}) == "Cooperlake"
    assert coretype_for(avx512) == "SkylakeX"
    assert coretype_for(avx2) == "Haswell"
    assert coretype_for({"sse2", "sse3"}) is None


def test_openblas_runs_the_kernels_the_cpu_supports_when_the_environment_names_none():
    """Without OPENBLAS_CORETYPE, OpenBLAS 0.3.21 fell back to its generic Prescott kernels on a CPU it did not
    know (5x slower sgemm); farense names the kernels from the CPU's flags before OpenBLAS loads."""
    from farense.blas import coretype_for, cpu_flags

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if not probe["status"].startswith("openblas:"):
        pytest.skip(f"no OpenBLAS here ({probe['status']})")
    wanted = coretype_for(cpu_flags())
    if wanted is None:
        pytest.skip("this CPU has no AVX2: OpenBLAS's own detection stands")
    assert probe["core"] not in ("Prescott", "Core2", "Katmai", "Penryn", "Nehalem"), probe
    assert probe["core"].lower() == wanted.lower() or (wanted == "Cooperlake" and probe["core"] == "SkylakeX"), probe
