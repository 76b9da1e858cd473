"""Make MLX's CPU matmuls use OpenBLAS instead of the reference BLAS the mlx-cpu wheel bundles.

The Linux `mlx-cpu` wheel links a netlib reference BLAS (about 6 GFLOP/s for fp32 GEMM on this class of machine).
Loading Debian's OpenBLAS with RTLD_GLOBAL before MLX is imported puts its `cblas_*` symbols first in the global
lookup scope, so libmlx binds to them (measured 160-180 GFLOP/s). No environment variable or re-exec is needed.

OpenBLAS picks its kernels for the CPU when it loads, unless `OPENBLAS_CORETYPE` names them; `blas_core()` says
which it runs, and the train summary and benchmark results record it. The kernels decide the speed: on a 2-core
AMD EPYC (Zen 5) OpenBLAS picks "Cooperlake" (AVX-512), and one-thread sgemm at the model's shapes runs at 221-240
GFLOP/s, against 122-129 with `OPENBLAS_CORETYPE=Haswell` (AVX2), which that machine's environment sets
(`benchmarks/gemm_rate.py --cpu`, 2026-11-29).
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libopenblas.so.0",
)
FIX = "sudo apt-get install libopenblas0-pthread   (Debian/Ubuntu; other distros: their OpenBLAS package)"

_state: dict[str, str | None] = {"library": None, "status": "not-attempted", "core": None}


def _core_name(lib: ctypes.CDLL) -> str | None:
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode() if name else None


def ensure_fast_blas() -> str:
    """Load OpenBLAS globally on Linux; return what happened ("openblas:<path>", "not-linux", ...)."""
    if _state["status"] != "not-attempted":
        return _state["status"] or ""
    if not sys.platform.startswith("linux") or os.environ.get("FARENSE_NO_OPENBLAS") == "1":
        _state["status"] = "not-needed" if not sys.platform.startswith("linux") else "disabled"
        return _state["status"]
    if "mlx.core" in sys.modules:
        _state["status"] = "too-late"
        return _state["status"]
    for candidate in OPENBLAS_CANDIDATES:
        if candidate.startswith("/") and not os.path.exists(candidate):
            continue
        try:
            lib = ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state["library"] = candidate
        _state["core"] = _core_name(lib)
        _state["status"] = f"openblas:{candidate}"
        return _state["status"]
    _state["status"] = "reference-blas"
    return _state["status"]


def blas_status() -> str:
    return _state["status"] or "not-attempted"


def blas_core() -> str | None:
    """The kernels OpenBLAS runs ("Cooperlake", "SkylakeX", "Haswell", ...); None without OpenBLAS."""
    return _state["core"]


def warn_if_slow_blas() -> None:
    """Called by the trainer on CPU: training with the reference BLAS is ~25x slower."""
    status = blas_status()
    if status == "reference-blas":
        warnings.warn(f"OpenBLAS not found: MLX CPU matmuls use the slow reference BLAS. Fix: {FIX}", stacklevel=2)
    elif status == "too-late":
        warnings.warn(
            "mlx was imported before farense, so OpenBLAS could not be preloaded: import farense first",
            stacklevel=2,
        )
