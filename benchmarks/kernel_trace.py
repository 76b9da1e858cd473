"""Where a CUDA step's time goes, kernel by kernel: a CUPTI trace of MLX's kernels, taken through torch.profiler.

MLX has no kernel profiler of its own on CUDA. CUPTI records every kernel the process launches, whichever library
launched it (CUDA-graph nodes included), and PyTorch ships it: `qlora_step.py --trace N` runs N more steps after its
timed ones inside `cupti_trace()` and adds `summarize_kernels()`'s figures to its JSON line. Needs torch on the GPU
host only; the name-to-category rule and the sums are plain Python (tests/test_kernel_trace.py).
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# First match wins; checked against the kernel's full (demangled) name, lower-cased.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("dequantize", r"dequant"),
    ("quantized_matmul", r"\bqmm|qmv|quantized_matmul|gemv_quant|affine_q"),
    ("attention", r"softmax|sdpa|attention|flash|fmha|cudnn"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|cublas|sm90_|sm80_|ampere_|hopper_|matmul"),
    ("norm_rope", r"rms_norm|layer_norm|rmsnorm|rope"),
    ("reduce", r"reduce|logsumexp|arg_max|argmax|\bsum\b"),
    ("copy_gather", r"copy|gather|scatter|slice|concat|transpose"),
)
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel by its name ("elementwise" for MLX's fused and unary/binary kernels)."""
    low = name.lower()
    for category, pattern in _COMPILED:
        if pattern.search(low):
            return category
    return "elementwise"


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the (start, end) intervals runs."""
    total, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total


def summarize_kernels(kernels: list[dict[str, Any]], steps: int, top: int = 25) -> dict[str, Any]:
    """Per-step milliseconds by category and the `top` kernels, from chrome-trace kernel events (`name`, `ts`,
    `dur` in microseconds)."""
    by_category: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for k in kernels:
        dur, category = float(k["dur"]), kernel_category(k["name"])
        by_category[category] += dur
        calls[category] += 1
        entry = by_name[k["name"]]
        entry[0] += dur
        entry[1] += 1
        intervals.append((float(k["ts"]), float(k["ts"]) + dur))
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    busy = busy_seconds(intervals)
    # Idle gaps, each charged to the kernel that ended it: the one the GPU was waiting for the host to launch.
    waited: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    end_so_far = None
    for k in sorted(kernels, key=lambda k: float(k["ts"])):
        start = float(k["ts"])
        if end_so_far is not None and start > end_so_far:
            entry = waited[k["name"]]
            entry[0] += start - end_so_far
            entry[1] += 1
        end_so_far = max(end_so_far or start, start + float(k["dur"]))
    per_step = lambda us: round(us / 1e3 / steps, 3)  # noqa: E731
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "steps": steps,
        "kernels_per_step": round(len(kernels) / steps, 1),
        "span_ms_per_step": per_step(span),
        "busy_ms_per_step": per_step(busy),
        "kernel_ms_per_step": per_step(sum(by_category.values())),
        "idle_ms_per_step": per_step(span - busy),
        "ms_per_step": {c: per_step(us) for c, us in sorted(by_category.items(), key=lambda item: -item[1])},
        "calls_per_step": {c: round(n / steps, 1) for c, n in sorted(calls.items(), key=lambda item: -item[1])},
        "idle_before": [{"name": name[:160], "idle_ms_per_step": per_step(us), "gaps_per_step": round(n / steps, 1)}
                        for name, (us, n) in sorted(waited.items(), key=lambda item: -item[1][0])[:top]],
        "top": [{"name": name[:160], "category": kernel_category(name), "ms_per_step": per_step(us),
                 "calls_per_step": round(n / steps, 1)} for name, (us, n) in ranked],
    }


@contextmanager
def cupti_trace(save: Path | None = None) -> Iterator[dict[str, Any]]:
    """Record every CUDA kernel launched inside the block; afterwards `box["kernels"]` holds their trace events
    (also written to `save` as gzipped JSON, when given)."""
    from torch.profiler import ProfilerActivity, profile

    box: dict[str, Any] = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield box
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    box["kernels"] = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if save is not None:
        with gzip.open(save, "wt", encoding="utf-8") as f:
            json.dump([{k: e[k] for k in ("name", "ts", "dur")} for e in box["kernels"]], f)
