"""Make MLX's CPU matmuls use OpenBLAS instead of the reference BLAS the mlx-cpu wheel bundles.

The Linux `mlx-cpu` wheel links a netlib reference BLAS (about 6 GFLOP/s for fp32 GEMM on this class of machine).
Loading Debian's OpenBLAS with RTLD_GLOBAL before MLX is imported puts its `cblas_*` symbols first in the global
lookup scope, so libmlx binds to them (measured 160-180 GFLOP/s). No environment variable or re-exec is needed.

OpenBLAS picks its kernels for the CPU when it loads, unless `OPENBLAS_CORETYPE` names them; `blas_core()` says
which it runs, and the train summary and benchmark results record it. The kernels decide the speed: on a 2-core
AMD EPYC (Zen 5) OpenBLAS picks "Cooperlake" (AVX-512), and one-thread sgemm at the model's shapes runs at 221-240
GFLOP/s, against 122-129 with `OPENBLAS_CORETYPE=Haswell` (AVX2), which that machine's environment sets
(`benchmarks/gemm_rate.py --cpu`, 2026-11-29).

OpenBLAS 0.3.21 (Debian 12) does not know every CPU model: on a 2-core Intel Xeon of family 6, model 207 with
AVX-512 and AVX-512 BF16 (2026-12-07) it fell back to its generic "Prescott" kernels, one-thread sgemm at the
model's shapes 16-30 GFLOP/s, against 68-149 with "Cooperlake" and 38-78 with "Haswell" (`OPENBLAS_NUM_THREADS=1
OPENBLAS_CORETYPE=... python benchmarks/gemm_rate.py --cpu`). So when `OPENBLAS_CORETYPE` is unset, farense sets
it from the CPU's instruction sets before OpenBLAS loads (`coretype_for`); the training processes inherit it. A
value set in the environment is kept.
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

_state: dict[str, str | None] = {"library": None, "status": "not-attempted", "core": None, "chose": None}

# OpenBLAS kernel families by the instruction sets they need, best first (Debian's DYNAMIC_ARCH build has these).
CORETYPES: tuple[tuple[str, frozenset[str]], ...] = (
    ("Cooperlake", frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_bf16"})),
    ("SkylakeX", frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def coretype_for(flags: set[str] | frozenset[str]) -> str | None:
    """The OpenBLAS kernels a CPU with these /proc/cpuinfo flags runs best; None for older CPUs (OpenBLAS's own
    detection stands)."""
    return next((name for name, needs in CORETYPES if needs <= flags), None)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            line = next((x for x in f if x.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def choose_coretype() -> str | None:
    """Set OPENBLAS_CORETYPE from the CPU's flags when the environment does not; returns what was chosen."""
    if os.environ.get("OPENBLAS_CORETYPE") or not sys.platform.startswith("linux"):
        return None
    chosen = coretype_for(cpu_flags())
    if chosen:
        os.environ["OPENBLAS_CORETYPE"] = chosen
    return chosen


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
    _state["chose"] = choose_coretype()
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
