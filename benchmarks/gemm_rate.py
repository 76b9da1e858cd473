"""The card's measured bf16 matrix-product rate (the MFU denominator): torch, and MLX where it is installed.

    python benchmarks/gemm_rate.py            # 8192^3 bf16 on random data, median of 20 after 5 warm-ups
    python benchmarks/gemm_rate.py --cpu      # float32 through MLX's CPU matmul (OpenBLAS) at SmolLM2's shapes
    python benchmarks/gemm_rate.py --cpu --check   # and MLX's CPU matmul against float64 NumPy on 432 cases

Prints one JSON line with TFLOP/s per library (with --cpu: GFLOP/s per shape, and the OpenBLAS kernels that ran;
OPENBLAS_NUM_THREADS sets the threads, one per training process in the default CPU run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def torch_rate(n: int, repeats: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def mlx_rate(n: int, repeats: int = 20) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(mx.bfloat16)
    b = mx.random.normal((n, n)).astype(mx.bfloat16)
    mx.eval(a, b)
    for _ in range(5):
        mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(a @ b)
        mx.synchronize()
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


# (rows, inner, columns) of the training step's matmuls for SmolLM2-135M at 4 x 128 tokens: k/v, q/o, gate/up,
# down, and the lm_head at about half the positions (the prompt-masked loss)
CPU_SHAPES = ((512, 576, 192), (512, 576, 576), (512, 576, 1536), (512, 1536, 576), (256, 576, 49152))


def cpu_rates(repeats: int = 20) -> dict[str, float]:
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "src"), str(root)]
    import farense  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    from benchmarks.step_profile import median_seconds

    rates = {}
    for m, k, n in CPU_SHAPES:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b, a @ b, a @ b)  # two warm-ups, and median_seconds runs a third
        seconds = median_seconds(lambda a=a, b=b: a @ b, repeats)
        rates[f"{m}x{k}x{n}"] = round(2 * m * k * n / seconds / 1e9, 1)
    return rates


def cpu_check() -> float:
    """The largest error of MLX's CPU matmul against float64 NumPy, relative to max|a| max|b| k, over 144 shapes
    (odd and even, down to one row or column) times three layouts (plain, a transposed, b transposed)."""
    import itertools

    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    worst = 0.0
    for m, k, n in itertools.product([1, 3, 17, 64, 127, 512], [5, 64, 576, 1536], [1, 7, 192, 576, 1536, 4099]):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        for a_t, b_t in ((False, False), (True, False), (False, True)):
            x = mx.array(a.T.copy()).T if a_t else mx.array(a)
            y = mx.array(b.T.copy()).T if b_t else mx.array(b)
            err = np.abs(np.array(x @ y) - a.astype(np.float64) @ b.astype(np.float64)).max()
            worst = max(worst, float(err / (np.abs(a).max() * np.abs(b).max() * k)))
    return worst


def main() -> int:
    if "--cpu" in sys.argv:
        import os

        rates = cpu_rates()
        from farense.blas import blas_core, blas_status

        out = {"bench": "gemm_rate", "dtype": "float32", "gflops": rates, "blas": blas_status(),
               "blas_core": blas_core(), "threads": os.environ.get("OPENBLAS_NUM_THREADS")}  # fmt: skip
        if "--check" in sys.argv:
            out["max_relative_error"] = cpu_check()
        print(json.dumps(out), flush=True)
        return 0
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    out = {"bench": "gemm_rate", "n": n, "dtype": "bfloat16"}
    for name, fn in (("torch_tflops", torch_rate), ("mlx_tflops", mlx_rate)):
        try:
            out[name] = round(fn(n), 1)
        except Exception as e:  # noqa: BLE001  (a library missing on this host)
            out[name] = f"{e.__class__.__name__}: {e}"
    try:
        import torch

        out["device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
