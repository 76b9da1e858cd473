"""Memory: what a training batch needs, what this process may use, and, on a glibc CPU host, keeping freed host
memory for reuse while training."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import psutil
from mlx.utils import tree_flatten

from farense.config import TrainConfig


def estimate_memory_bytes(model: nn.Module, batch: int, seq: int, args: Any, grad_checkpoint: bool) -> int:
    """Weights + adapters with AdamW moments + activations (a Korthikanti-style per-layer estimate) + logits."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    hidden = getattr(args, "hidden_size", 512)
    layers = getattr(args, "num_hidden_layers", len(getattr(model, "layers", [])) or 1)
    heads = getattr(args, "num_attention_heads", 8)
    vocab = getattr(args, "vocab_size", 32000)
    per_layer = batch * seq * (34 * hidden + 5 * heads * seq) * 2
    activations = per_layer * (1 if grad_checkpoint else layers)
    logits = 3 * batch * seq * vocab * 4
    return int(weights + 3 * trainable + activations + logits)


def memory_budget_bytes() -> int:
    """What this process may use: free RAM on CPU, the recommended working set on a GPU."""
    try:
        if mx.default_device() == mx.gpu:
            info = mx.device_info()
            if "max_recommended_working_set_size" in info:
                return int(info["max_recommended_working_set_size"])
            if "memory_size" in info:
                return int(info["memory_size"] * 0.9)
    except (AttributeError, RuntimeError):
        pass
    return int(psutil.virtual_memory().available * 0.85)


def fit_batch(
    estimate: Any, batch: int, accum: int, budget: int
) -> tuple[int, int, str | None]:  # estimate: Callable[[int], int]
    """Halve the batch and double accumulation until the estimate fits. Returns (batch, accum, message)."""
    b, a = batch, accum
    while b > 1 and estimate(b) > budget:
        b, a = b // 2, a * 2 if b % 2 == 0 else math.ceil(a * b / (b // 2))
    if (b, a) == (batch, accum):
        return b, a, None
    return b, a, (
        f"estimated {estimate(batch) / 1e9:.1f} GB for batch {batch} exceeds the {budget / 1e9:.1f} GB available: "
        f"training with batch {b} x accumulation {a} (effective batch {b * a}, was {batch * accum})"
    )


def oom_message(tcfg: TrainConfig, error: BaseException) -> str:
    return (
        f"out of memory while training ({error}). Lower train.batch_size (now {tcfg.batch_size}) and raise "
        f"train.grad_accumulation to keep the effective batch, lower train.max_seq_length (now "
        f"{tcfg.max_seq_length}), or set train.grad_checkpoint=true"
    )


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 256 << 20


def keep_freed_host_memory() -> bool:
    """Serve every host buffer from the heap and keep what is freed there, instead of mapping each large buffer
    from the kernel and unmapping it when freed (glibc does so above a threshold that grows to at most 32 MB). A
    training step frees and allocates the same large buffers every step, the logits at the trained positions
    (positions x vocabulary floats) among them; with the default the kernel zeroes fresh pages for each: 4% of a
    one-process CPU step's perf samples were in `clear_page_erms`. The two-process train stage (batch 8, 30 steps,
    alternating) ran at steady 221.8 and 222.8 against 206.2 and 211.7 tokens/s; the default run's train stage at
    222.8 against 217.8, with the same adapter (2026-11-28). Costs about 0.3-0.5 GB of resident memory for the
    embedded model; lasts for the process. Returns False where there is no glibc (macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD_BYTES))
    return all(mallopt(param, value) == 1 for param, value in settings)
