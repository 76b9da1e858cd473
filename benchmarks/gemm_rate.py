"""The card's measured bf16 matrix-product rate (the MFU denominator): torch, and MLX where it is installed.

    python benchmarks/gemm_rate.py            # 8192^3 bf16 on random data, median of 20 after 5 warm-ups

Prints one JSON line with TFLOP/s per library.
"""

from __future__ import annotations

import json
import sys
import time


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


def main() -> int:
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
