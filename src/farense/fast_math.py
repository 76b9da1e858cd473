"""exp and SwiGLU made of cheap MLX operations, for the CPU.

On Linux CPU the mlx-cpu wheel evaluates exp, sigmoid and tanh one element at a time: 12-18 ns per element, where an
add or a multiply costs 0.2 ns (2-core EPYC, `benchmarks/fast_math.py`). The MLP's SiLU is the biggest user: every
layer takes the sigmoid of a (tokens x 1536) activation for SmolLM2, forward and backward. Here exp is a range
reduction and a degree-6 polynomial for 2**f, built from adds, multiplies and bit shifts: about 3 ns per element,
within 1.2e-7 relative of mx.exp (float32 rounding is 6e-8).

`use_fast_math(model)` gives the SwiGLU MLPs of mlx-lm's llama, qwen2 and qwen3 layers this swiglu, whose backward
pass recomputes the sigmoid instead of keeping intermediates. farense.compute does so on the CPU for answering, and
for training when `train.fast_math` asks (its rounding changes the adapter). Measured on a fresh clone
(`benchmarks/fast_math.py`, 2026-11-28): a training step of the embedded model (batch 4 x 127) 3.85 -> 3.42 s,
greedy answers 0.322 -> 0.291 s each, the same 75 answers. Also tried and not kept, since the whole step was no
faster: attention's softmax built on this exp (mx.fast's attention kernel wins on the whole).

`cross_entropy` is the loss's on this exp, forward and backward (its vjp recomputes the softmax from the saved
log-sum-exp); farense.loss's masked-head loss takes it for a model with this SwiGLU. Measured alternating
(`benchmarks/train_speed.py`, 2026-11-28): the bare loop at 4 x 128 (every position trained) 183.0 and 158.6
against 151.2 and 144.1 tokens/s; the two-process train stage at batch 8 (steady) 230.1 against 213.2. It keeps
a few more (positions x vocabulary) buffers: peak 1.99 against 1.49 GB a process in that stage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
ROUND = 12582912.0  # 1.5 * 2**23: x + ROUND - ROUND rounds x to the nearest integer (|x| < 2**22)
ROUND_BITS = 0x4B400000  # the bits of ROUND as a float32; its low bits then hold round(x)
EXP2_POLY = (1.5316424e-4, 1.3395476e-3, 9.6180989e-3, 5.5503368e-2, 2.4022648e-1, 6.9314718e-1, 1.0)  # 2**f
EXP_MIN, EXP_MAX = -87.3, 88.7  # clamped so the exponent field never wraps: 1e-38 below, inf above 88.38


def _exp(x: mx.array) -> mx.array:
    t = mx.clip(x.astype(mx.float32), EXP_MIN, EXP_MAX) * LOG2E
    shifted = t + ROUND
    whole = shifted - ROUND  # round(t)
    f = t - whole  # in [-0.5, 0.5]
    p = mx.array(EXP2_POLY[0], mx.float32)
    for c in EXP2_POLY[1:]:
        p = p * f + c
    # 2**whole: the integer sits in the low bits of `shifted`; move it into the float's exponent field.
    scale = mx.view(mx.left_shift(mx.view(shifted, mx.int32) - (ROUND_BITS - 127), 23), mx.float32)
    return (p * scale).astype(x.dtype)


@mx.custom_function
def exp(x: mx.array) -> mx.array:
    """e**x to float32 precision (1.2e-7 relative), from adds, multiplies and shifts; 1e-38 below -87.3 and inf
    above 88.38 (mx.exp: above 88.72)."""
    return _exp(x)


@exp.vjp
def _exp_vjp(primals: Any, cotangent: mx.array, output: mx.array) -> mx.array:
    return cotangent * output


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu`: silu(gate) * x. Its backward pass recomputes the sigmoid from `gate` rather than keeping
    the forward pass's intermediates."""
    return gate * (1.0 / (1.0 + _exp(-gate))) * x


@swiglu.vjp
def _swiglu_vjp(primals: Any, cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    gate, x = primals
    s = 1.0 / (1.0 + _exp(-gate))
    silu_gate = gate * s
    return cotangent * x * (s + silu_gate * (1.0 - s)), cotangent * silu_gate


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """`nn.losses.cross_entropy(logits, targets)` (classes on the last axis, no reduction) with this module's exp.
    The loss's log-sum-exp takes an exp of every trained position's logit, forward and again backward: positions x
    vocabulary (49,152 for SmolLM2) of them, the most of any op after the SwiGLU's."""
    peak = mx.max(logits, axis=-1, keepdims=True)
    log_sum_exp = peak.squeeze(-1) + mx.log(_exp(logits - peak).sum(axis=-1))
    return log_sum_exp - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


@cross_entropy.vjp
def _cross_entropy_vjp(primals: Any, cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
    logits, targets = primals
    at_target = targets[..., None]
    log_sum_exp = output[..., None] + mx.take_along_axis(logits, at_target, axis=-1)
    grad = _exp(logits - log_sum_exp) * cotangent[..., None]  # softmax x cotangent
    grad = mx.put_along_axis(grad, at_target, mx.take_along_axis(grad, at_target, axis=-1) - cotangent[..., None],
                             axis=-1)  # fmt: skip
    return grad, mx.zeros_like(targets)


def _causal_softmax(q: mx.array, k: mx.array) -> mx.array:
    """softmax(q k^T) under a causal mask, with q (B, H, L, D) and k (B, KV, L, D): the probabilities (B, KV, rep L,
    L) of q grouped by key head, rep = H / KV query heads per key head (mlx's grouped layout)."""
    b, heads, length, dim = q.shape
    grouped = q.reshape(b, k.shape[1], -1, dim)
    scores = (grouped @ k.swapaxes(-1, -2)).reshape(b, k.shape[1], -1, length, length)
    positions = mx.arange(length)
    causal = positions[:, None] >= positions[None, :]
    # Masked scores are exactly 0 after the exp: _exp clamps exp(-inf) to 1e-38, whose quotients by the row sums
    # would be denormals (slow on x86) and would let a position see later ones, however little.
    scores = mx.where(causal, scores, -mx.inf)
    e = mx.where(causal, _exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
    return (e / e.sum(axis=-1, keepdims=True)).reshape(grouped.shape[:-1] + (length,))


def causal_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")` (q: B, H, L, D; k, v: B, KV, L,
    D; scale q first) with this module's exp in the softmax. On the CPU mlx's own takes the scalar exp and, in the
    backward pass, the autodiff of its unfused graph; this one's vjp applies the softmax's gradient directly to the
    probabilities the forward pass kept. A training step of the embedded model at 4 x 127, alternating with one
    that keeps mlx's attention (`benchmarks/fast_math.py --only train_step`, 2026-11-28, when the vjp still
    recomputed the probabilities): 3.165 against 3.221 s on one OpenBLAS thread, 1.987 against 2.054 s on two."""
    return _attention_and_probabilities(q, k, v)[0]


@mx.custom_function
def _attention_and_probabilities(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """causal_attention's output and its probabilities (B, KV, rep L, L), which the vjp takes as they are. Keeping
    them costs B x H x L x L floats a layer (2.4 MB at 4 x 128 for SmolLM2), as mlx's unfused attention keeps them
    too; recomputing them from q and k (as flash attention does on a GPU) made one layer's compiled forward and
    backward pass at 4 x 128 take 16.0 instead of 10.9 ms on two OpenBLAS threads, 18.0 instead of 12.5 on one,
    for the same gradients bit for bit (2026-11-29)."""
    p = _causal_softmax(q, k)
    return (p @ v).reshape(q.shape), p


@_attention_and_probabilities.vjp
def _attention_vjp(primals: Any, cotangents: Any, outputs: Any) -> tuple[mx.array, ...]:
    q, k, v = primals
    output, p = outputs
    grouped = q.reshape(p.shape[:-1] + q.shape[-1:])
    d_out = cotangents[0].reshape(grouped.shape)
    d_v = p.swapaxes(-1, -2) @ d_out
    d_scores = p * (d_out @ v.swapaxes(-1, -2) - (d_out * output.reshape(grouped.shape)).sum(axis=-1, keepdims=True))
    return (d_scores @ k).reshape(q.shape), d_scores.swapaxes(-1, -2) @ grouped, d_v


def _attention_call(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    """mlx-lm llama Attention.__call__, with causal_attention where the whole sequence attends causally at once (a
    training step, a validation loss); with a cache or a mask array (answering) it is mlx-lm's own."""
    if cache is not None or not (isinstance(mask, str) and mask == "causal"):
        return self.mlx_lm_call(x, mask=mask, cache=cache)
    b, length, _ = x.shape
    q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
    k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    out = causal_attention(self.rope(q) * self.scale, self.rope(k), v)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


# ---------------------------------------------------------------- the model's layers

# mlx-lm MLP classes whose __call__ is exactly `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
SWIGLU_MLP_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
_swapped_classes: dict[Any, type] = {}


def _mlp_class(cls: type, fn: Callable, name: str, call: Callable | None) -> type:
    if (cls, fn, call) not in _swapped_classes:

        def __call__(self: nn.Module, x: mx.array) -> mx.array:
            return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))

        body = {"__call__": call or __call__, "swiglu": staticmethod(fn)}
        _swapped_classes[cls, fn, call] = type(name + cls.__name__, (cls,), body)
    return _swapped_classes[cls, fn, call]


def use_swiglu(model: nn.Module, fn: Callable, name: str, call: Callable | None = None) -> int:
    """Give every SwiGLU MLP of mlx-lm's llama, qwen2 and qwen3 layers `fn` as its swiglu (its weights, LoRA layers
    and names stay as they are; its class becomes `name` + the class name); return how many MLPs changed. `call`,
    when given, is the MLP's __call__(self, x) instead of down_proj(fn(gate_proj(x), up_proj(x)))."""
    # A model's classes come from modules already imported: look only there, and import nothing new.
    classes = {getattr(sys.modules[name], "MLP", None) for name in SWIGLU_MLP_MODULES if name in sys.modules}
    classes.discard(None)
    swapped = 0
    for _, m in model.named_modules():
        base = next((c for c in type(m).__mro__ if c in classes), None)
        if base is not None and type(m) is not (cls := _mlp_class(base, fn, name, call)):
            m.__class__ = cls
            swapped += 1
    return swapped


def use_fast_math(model: nn.Module) -> int:
    """This module's swiglu in every SwiGLU MLP (use_swiglu) and its causal_attention in every attention of mlx-lm's
    llama layers (use_fast_attention); return how many MLPs changed."""
    use_fast_attention(model)
    return use_swiglu(model, swiglu, "FastMath")


def use_fast_attention(model: nn.Module) -> int:
    """Give every attention of mlx-lm's llama layers (SmolLM2, Llama, Mistral) causal_attention for whole causal
    sequences; its weights, LoRA layers and names stay; return how many changed."""
    llama = sys.modules.get("mlx_lm.models.llama")
    if llama is None:
        return 0
    cls = _fast_attention_class(llama.Attention)
    swapped = 0
    for _, m in model.named_modules():
        if type(m) is llama.Attention:
            m.__class__ = cls
            swapped += 1
    return swapped


def _fast_attention_class(base: type) -> type:
    if base not in _swapped_classes:
        body = {"__call__": _attention_call, "mlx_lm_call": base.__call__}
        _swapped_classes[base] = type("FastMathAttention", (base,), body)
    return _swapped_classes[base]


def uses_fast_attention(model: nn.Module) -> int:
    """How many of the model's attentions take causal_attention."""
    return sum(getattr(type(m), "__call__", None) is _attention_call for _, m in model.named_modules())


def uses_fast_math(model: nn.Module) -> bool:
    layers = getattr(getattr(model, "model", model), "layers", None) or [None]
    return getattr(type(getattr(layers[0], "mlp", None)), "swiglu", None) is swiglu
