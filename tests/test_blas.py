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
