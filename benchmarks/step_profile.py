"""Where one training step's time goes: each part of the model timed alone, forward and forward+backward.

Used by `train_speed.py --only profile`. Every part is compiled and timed on the same batch shape as the loop
(median of `repeats` runs after a warm-up); GFLOP/s uses the analytic matmul FLOPs of that part (forward: 2 per
multiply-add; backward: the activation gradients of the frozen base, plus the small LoRA weight gradients).
"Python overhead" is what the timed loop step costs beyond the compiled step and the optimizer update.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from farense.loss import training_cross_entropy


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    mx.eval(fn())  # compile and first allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(module: nn.Module, fn: Callable[[mx.array], mx.array], x: mx.array) -> Callable[[], Any]:
    """Forward and backward of `fn` with respect to its input and `module`'s trainable parameters."""
    ct = mx.random.normal(fn(x).shape).astype(x.dtype)

    def loss(params: Any, inp: mx.array) -> mx.array:
        module.update(params)
        return (fn(inp) * ct).sum()

    grad = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
    params = module.trainable_parameters()

    def run() -> Any:
        out = grad(params, x)
        module.update(params)  # tracing left placeholders in the module
        return out

    return run


def profile_step(model: nn.Module, batch: mx.array, lengths: mx.array, loss_fn: Callable[..., Any],
                 step: Callable[[], Any], update: Callable[[], Any], loop_step_s: float,
                 repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Time the parts of one step on `batch`; `step` runs one compiled micro-step, `update` one optimizer update,
    `loop_step_s` is the loop's measured seconds per step."""
    args = model.args
    inner = model.model
    inputs = batch[:, :-1]
    B, T = inputs.shape
    D, L, V = args.hidden_size, len(inner.layers), args.vocab_size
    H, Hkv = args.num_attention_heads, args.num_key_value_heads
    hd = D // H
    F = args.intermediate_size
    n = B * T
    r = _lora_rank(model)
    h = inner.embed_tokens(inputs)
    mx.eval(h)
    layer = inner.layers[-1]
    step_s = median_seconds(step, repeats)
    update_s = median_seconds(update, repeats)

    attn_lin = 2 * n * (2 * D * D + 2 * D * Hkv * hd)
    attn_sdpa = 2 * 2 * B * H * T * T * hd
    lora_attn = 2 * n * r * (4 * D + 2 * D + 2 * Hkv * hd)
    mlp_lin = 2 * n * 3 * D * F
    lora_mlp = 2 * n * r * (3 * D + 3 * F)
    head = 2 * n * D * V
    parts: dict[str, dict[str, float]] = {}

    def part(name: str, fwd: Callable[[], Any], both: Callable[[], Any], flop_fwd: float, flop_bwd: float,
             times: int = 1) -> None:  # fmt: skip
        f = median_seconds(fwd, repeats) * times
        fb = median_seconds(both, repeats) * times if both is not None else f
        parts[name] = {
            "forward_s": round(f, 4),
            "backward_s": round(fb - f, 4),
            "forward_gflops": round(flop_fwd / max(f, 1e-9) / 1e9, 1),
            "backward_gflops": round(flop_bwd / max(fb - f, 1e-9) / 1e9, 1) if both is not None else None,
        }

    embed = mx.compile(lambda: inner.embed_tokens(inputs))
    part("embedding", embed, None, 0.0, 0.0)

    mask = "causal"
    attn = lambda x: layer.self_attn(layer.input_layernorm(x), mask)  # noqa: E731
    part("attention", mx.compile(lambda: attn(h)), _fwd_bwd(layer.self_attn, attn, h),
         (attn_lin + attn_sdpa + lora_attn) * L, (attn_lin + 2 * attn_sdpa + 2 * lora_attn) * L, times=L)  # fmt: skip
    mlp = lambda x: layer.mlp(layer.post_attention_layernorm(x))  # noqa: E731
    part("mlp", mx.compile(lambda: mlp(h)), _fwd_bwd(layer.mlp, mlp, h),
         (mlp_lin + lora_mlp) * L, (mlp_lin + 2 * lora_mlp) * L, times=L)  # fmt: skip

    targets = batch[:, 1:]
    steps_ = mx.arange(1, T + 1)
    loss_mask = mx.logical_and(steps_ >= lengths[:, 0:1], steps_ <= lengths[:, 1:])

    # The trainer's cross-entropy: fast_math's where the model has its SwiGLU (farense.loss).
    cross_entropy = training_cross_entropy(model)

    def head_loss(x: mx.array) -> mx.array:
        logits = _project(model, inner.norm(x))
        return (cross_entropy(logits, targets) * loss_mask).sum()

    grad_head = mx.compile(mx.grad(head_loss))
    part("lm_head_loss", mx.compile(lambda: head_loss(h)), lambda: grad_head(h), head, head)

    accounted = sum(p["forward_s"] + p["backward_s"] for p in parts.values())
    flop_step = sum(
        x for x in ((attn_lin + attn_sdpa + lora_attn) * L * 2, (mlp_lin + lora_mlp) * L * 2, head * 2)
    ) + attn_sdpa * L  # fmt: skip
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "batch": B,
        "seq": T,
        "parts": parts,
        "optimizer_s": round(update_s, 4),
        "compiled_step_s": round(step_s, 4),
        "step_not_in_parts_s": round(step_s - accounted, 4),
        "loop_step_s": round(loop_step_s, 4),
        "python_overhead_s": round(loop_step_s - step_s - update_s, 4),
        "step_gflop": round(flop_step / 1e9, 1),
        "step_gflops": round(flop_step / step_s / 1e9, 1),
        "trainable_parameters": trainable,
        "loss_mask_share": round(float(loss_mask.sum().item()) / n, 3),
    }


def _project(model: nn.Module, x: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(x)
    return model.lm_head(x)


def _lora_rank(model: nn.Module) -> int:
    for _, m in model.named_modules():
        if hasattr(m, "lora_a"):
            return int(m.lora_a.shape[1])
    return 0
