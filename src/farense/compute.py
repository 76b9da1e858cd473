"""How the frozen 4-bit base weights take part in a training step.

Three compute paths, chosen per machine (`select_compute_path`) and applied to the base model in place before the
LoRA layers are added (`apply_compute_path`):

- "quantized": mlx's own QuantizedLinear / QuantizedEmbedding. Best on Apple GPUs, where quantized matmuls are fast.
- "dequantized": the 4-bit weights are expanded once into ordinary Linear / Embedding layers (fp32 on CPU), so
  matmuls go to BLAS. The CPU path: training steps ran 8-17x faster than on the quantized path here. On the CPU
  the MLPs also take farense.fast_math's SwiGLU for answering (mlx's CPU exp is scalar); that one import is lazy.
- "recompute": QuantizedLinear subclasses whose forward dequantizes the weight and calls a dense matmul, and whose
  custom vjp dequantizes again in the backward pass instead of keeping the dense weight alive (as bitsandbytes
  does). Their `to_lora` gives a LoRALinear whose vjp keeps no fp32 copy of its input either, and the MLPs take
  `recompute_swiglu`, which keeps no activation but its inputs. With `low_memory` (train.low_memory) the backward
  pass also recomputes each MLP's swiglu output and each block's norm outputs (`recompute_mlp`,
  `defer_input_norms`). The CUDA path: faster than bf16 LoRA, in less memory than the native quantized path
  (benchmarks/results/GPU_RESULTS.md).

This module imports only mlx, mlx-lm and (lazily) farense.fast_math, which imports only mlx: benchmarks can ship it
to hosts without the rest of farense's dependencies.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# MLX's CUDA backend keeps every input of a queued kernel alive until the CUDA graph holding it has run, and queues
# up to 10 graphs of 30 kernels (H100/H200 default). The recompute path's transient dense weights then pile up: a
# Mistral-7B step peaked at 29.4 GB on an H200 (22.9 on an H100) and at 20.1 GB on both with 10 kernels per graph
# (same speed on the H200, 5% slower on the H100). MLX reads this once, when it first uses the GPU, so it is set
# here, at import, unless the environment already sets it.
CUDA_KERNELS_PER_GRAPH = "10"
if sys.platform.startswith("linux"):
    os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", CUDA_KERNELS_PER_GRAPH)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402

COMPUTE_PATHS = ("quantized", "dequantized", "recompute")


def select_compute_path(requested: str = "auto") -> str:
    """Resolve "auto" for this machine; return an explicit path as is after checking it."""
    if requested == "auto":
        if mx.metal.is_available():
            return "quantized"
        if cuda_available():
            return "recompute"
        return "dequantized"
    if requested not in COMPUTE_PATHS:
        raise ValueError(f"compute path {requested!r} is not one of 'auto', {', '.join(map(repr, COMPUTE_PATHS))}")
    return requested


def apply_compute_path(
    model: nn.Module, path: str, dtype: mx.Dtype | None = None, fast_math: bool = True, low_memory: bool = False
) -> dict[str, Any]:
    """Convert the base model's quantized layers in place for `path`; return what was done, for run metadata.

    `dtype` is the dense weight dtype: by default fp32 on CPU and the scales' dtype elsewhere ("dequantized"),
    the scales' dtype ("recompute"); "quantized" ignores it. `fast_math`: on the CPU, "dequantized" also gives the
    MLPs farense.fast_math's SwiGLU and llama's attention its causal_attention for whole sequences (greedy answers
    were the same on all 75 held-out questions; answering keeps mlx's attention; training takes them only when
    train.fast_math asks, since they change the adapter's rounding). `low_memory`: on "recompute", the
    backward pass also recomputes each MLP's swiglu output (`recompute_mlp`) and each block's norm outputs
    (`defer_input_norms`) instead of keeping them: a Mistral-7B step at 4 x 512 on an H200 peaked at 13.66 GB
    instead of 16.42, and ran 8% slower (benchmarks/results/GPU_RESULTS.md, 2026-11-28).
    """
    path = select_compute_path(path)
    fast_math_layers = fast_attention_layers = recompute_swiglu_layers = deferred_norms = 0
    if path == "quantized":
        converted = 0
        out_dtype = _quantized_dtype(model)
    elif path == "dequantized":
        out_dtype = dtype or (mx.float32 if mx.default_device() == mx.cpu else _quantized_dtype(model))
        converted = _replace_quantized(model, lambda m: _dequantized_layer(m, out_dtype))
        if out_dtype is not None:
            # Norms and other dense weights follow, so activations stay in one dtype end to end.
            model.apply(lambda a: a.astype(out_dtype) if mx.issubdtype(a.dtype, mx.floating) else a)
        if fast_math and mx.default_device() == mx.cpu:
            from farense.fast_math import use_fast_math, uses_fast_attention  # mlx's CPU exp is scalar: see there

            fast_math_layers = use_fast_math(model)
            fast_attention_layers = uses_fast_attention(model)
    else:
        from farense.fast_math import use_swiglu  # only its MLP swap: the exp there is for the CPU

        converted = _replace_quantized(model, lambda m: _recompute_layer(m, dtype))
        out_dtype = dtype or _quantized_dtype(model)
        if low_memory:
            recompute_swiglu_layers = use_swiglu(model, recompute_swiglu, "RecomputeLowMemory", recompute_mlp)
            deferred_norms = defer_input_norms(model)
        else:
            recompute_swiglu_layers = use_swiglu(model, recompute_swiglu, "Recompute")
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {
        "path": path,
        "layers_converted": converted,
        "dtype": _dtype_name(out_dtype),
        "base_weight_bytes": int(weight_bytes),
        "fast_math_layers": fast_math_layers,
        "fast_attention_layers": fast_attention_layers,
        "recompute_swiglu_layers": recompute_swiglu_layers,
        "deferred_norms": deferred_norms,
        "low_memory": bool(low_memory and path == "recompute"),
        "mlx_max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),
    }


class RecomputeQuantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its dequantized weight and dequantizes again for the backward pass."""

    input_norm: "_NormRef | None" = None  # set by defer_input_norms: this layer normalizes its own input

    def __call__(self, x: mx.array) -> mx.array:
        y = dequantized_matmul(self.normed(x), self["weight"], self["scales"], self.get("biases"), *self._quant_args())
        if "bias" in self:
            y = y + self["bias"]
        return y

    def normed(self, x: mx.array) -> mx.array:
        return x if self.input_norm is None else self.input_norm(x)

    def _quant_args(self) -> tuple[int, int, str]:
        return self.group_size, self.bits, self.mode

    def to_lora(self, r: int = 8, scale: float = 20.0, dropout: float = 0.0) -> "RecomputeLoRALinear":
        """Called by mlx-lm's linear_to_lora_layers; same parameter names as LoRALinear.from_base gives."""
        output_dims, packed_dims = self.weight.shape
        lora = RecomputeLoRALinear(packed_dims * 32 // self.bits, output_dims, r=r, dropout=dropout, scale=scale)
        lora.linear = self
        lora.dropout_p = dropout
        return lora


class RecomputeQuantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose tied output projection (`as_linear`) takes the recompute path."""

    def as_linear(self, x: mx.array) -> mx.array:
        return dequantized_matmul(
            x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, self.mode
        )


class RecomputeLoRALinear(LoRALinear):
    """LoRALinear over a RecomputeQuantizedLinear, base and adapter in one custom vjp.

    Stock LoRALinear multiplies the bf16 input by fp32 lora_a, and autodiff keeps that fp32 copy of the input
    until the backward pass: one per adapted projection, about a third of the activation memory of a 7B step.
    Here the backward pass uses the bf16 input it keeps anyway. Parameter names and shapes are LoRALinear's, so
    saved adapters load into stock mlx-lm; with dropout it falls back to LoRALinear's own forward.
    """

    dropout_p: float = 0.0

    def _stock_call(self, x: mx.array) -> mx.array:
        base = self.linear
        if not isinstance(base, RecomputeQuantizedLinear) or base.input_norm is None:
            return super().__call__(x)
        norm, base.input_norm = base.input_norm, None
        try:
            return super().__call__(norm(x))
        finally:
            base.input_norm = norm

    def fusable(self) -> bool:
        """Whether the custom vjp applies: a recompute base, and no dropout at work."""
        return isinstance(self.linear, RecomputeQuantizedLinear) and not (self.dropout_p > 0 and self.training)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.fusable():
            return self._stock_call(x)
        norm = self.linear.input_norm
        if norm is None:
            return self.fused(lora_dequantized_matmul, x)
        return self.fused(lora_normed_dequantized_matmul, x, extra=(norm.module["weight"], norm.module.eps))

    def fused(self, fn: Any, *inputs: mx.array, extra: tuple = ()) -> mx.array:
        """fn(*inputs, lora_a, lora_b, weight, scales, biases, scale, *extra, group_size, bits, mode) + bias: one of
        this module's custom functions, given this layer's adapter and base weights."""
        base = self.linear
        lora = (self.lora_a, self.lora_b, base["weight"], base["scales"], base.get("biases"), self.scale)
        y = fn(*inputs, *lora, *extra, *base._quant_args())
        return y + base["bias"] if "bias" in base else y


@mx.custom_function
def recompute_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's swiglu, silu(gate) * x. Autodiff would keep silu(gate) and its sigmoid for the backward pass; this
    vjp recomputes them from `gate`, and only once the cotangent exists (mx.depends), since nothing else stops the
    scheduler from recomputing every layer's at once as soon as the forward pass is done. Mistral-7B shape, 4 x 512,
    on an H200: peak 20.06 -> 16.42 GB, 12,878 -> 13,362 tokens/s (benchmarks/results/GPU_RESULTS.md, 2026-11-28);
    without the wait the peak stayed at 20.06 GB."""
    return nn.silu(gate) * x


@recompute_swiglu.vjp
def _recompute_swiglu_vjp(primals, cotangent, output):
    gate, x = (mx.depends(a, cotangent) for a in primals)
    return _swiglu_backward(gate, x, mx.sigmoid(gate), cotangent)


def _swiglu_backward(gate: mx.array, x: mx.array, sig: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    """The gradients of silu(gate) * x, from its inputs and sig = sigmoid(gate)."""
    return cotangent * x * (sig * (1 + gate * (1 - sig))), cotangent * (gate * sig)


def recompute_mlp(mlp: nn.Module, x: mx.array) -> mx.array:
    """The recompute path's MLP: down_proj(swiglu(gate_proj(x), up_proj(x))). When down_proj is a
    RecomputeLoRALinear, swiglu and down_proj are one custom function (`lora_swiglu_down`) whose backward pass
    recomputes the swiglu, so no layer keeps silu(gate) * up (tokens x intermediate) for the backward pass: the
    LoRA gradient of down_proj is the only thing that needs it."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    down = mlp.down_proj
    if not isinstance(down, RecomputeLoRALinear) or not down.fusable():
        return down(recompute_swiglu(gate, up))
    return down.fused(lora_swiglu_down, gate, up)


class _NormRef:
    """A projection's reference to the RMSNorm before it, kept out of the module tree (not a parameter twice)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.RMSNorm) -> None:
        self.module = module

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.module["weight"], self.module.eps)


class DeferredRMSNorm(nn.RMSNorm):
    """An RMSNorm whose consumers normalize their own input (defer_input_norms); it passes x through."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


# Transformer blocks whose input_layernorm feeds only self_attn's q/k/v_proj, and post_attention_layernorm only
# the MLP's gate_proj and up_proj.
DEFERRABLE_NORMS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                    "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}  # fmt: skip


def defer_input_norms(model: nn.Module) -> int:
    """Move each transformer block's RMSNorms into the recompute projections that read them; return how many.

    Autodiff would keep each norm's output for the LoRA gradients of the projections after it, beside the norm's
    input, which the residual stream keeps anyway: two activations of tokens x hidden per layer. A projection that
    normalizes its own input (`lora_normed_dequantized_matmul`) recomputes the norm in its backward pass instead.
    Only for mlx-lm's llama, qwen2 and qwen3 blocks whose projections are all on the recompute path."""
    from farense.fast_math import SWIGLU_MLP_MODULES

    blocks = tuple(getattr(sys.modules[n], "TransformerBlock") for n in SWIGLU_MLP_MODULES if n in sys.modules)
    deferred = 0
    for _, block in model.named_modules():
        if not isinstance(block, blocks):
            continue
        for norm_name, (parent, projections) in DEFERRABLE_NORMS.items():
            norm, owner = getattr(block, norm_name, None), getattr(block, parent, None)
            layers = [getattr(owner, name, None) for name in projections]
            if type(norm) is not nn.RMSNorm or not all(type(m) is RecomputeQuantizedLinear for m in layers):
                continue
            for layer in layers:
                layer.input_norm = _NormRef(norm)
            norm.__class__ = DeferredRMSNorm
            deferred += 1
    return deferred


def _dequantize(w, scales, biases, group_size, bits, mode, dtype=None):
    if _use_cuda_dequant(w, bits, mode, dtype):
        return _cuda_affine4_dequantize(w, scales, biases, group_size, dtype)
    wd = mx.dequantize(w, scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode)
    return wd if dtype is None or wd.dtype == dtype else wd.astype(dtype)


def _dequantize_after(cotangent, w, *args):
    """Dequantize in the backward pass only once the cotangent exists, so that one layer's dense weight is alive at
    a time: the weight inputs are constants, and nothing else stops the scheduler from expanding them early."""
    return _dequantize(mx.depends(w, cotangent), *args)


@mx.custom_function
def dequantized_matmul(x, w, scales, biases, group_size, bits, mode):
    """x @ dequantize(w).T; the backward pass dequantizes w again rather than keeping it."""
    return x @ _dequantize(w, scales, biases, group_size, bits, mode, x.dtype).T


@dequantized_matmul.vjp
def _dequantized_matmul_vjp(primals, cotangent, output):
    x, w, scales, biases, group_size, bits, mode = primals
    return (cotangent @ _dequantize_after(cotangent, w, scales, biases, group_size, bits, mode, x.dtype),)


@mx.custom_function
def lora_dequantized_matmul(x, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode):
    """LoRALinear's forward, x @ W.T + scale * (x @ a) @ b, with W dequantized on the fly.

    The adapter matmuls run in the activations' dtype (bf16 on a GPU, as under PyTorch autocast) with fp32
    parameters and gradients; in fp32 this is stock LoRALinear's arithmetic.
    """
    return _lora_forward(x, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode)


def _lora_forward(x, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode):
    y = x @ _dequantize(w, scales, biases, group_size, bits, mode, x.dtype).T
    return mx.addmm(y, x @ lora_a.astype(x.dtype), lora_b.astype(x.dtype), alpha=scale)


@lora_dequantized_matmul.vjp
def _lora_dequantized_matmul_vjp(primals, cotangent, output):
    return _lora_backward(primals[0], cotangent, *primals[1:])


def _lora_backward(x, cotangent, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode):
    """The gradients of lora_dequantized_matmul for input `x`: dx, grad lora_a, grad lora_b."""
    a = lora_a.astype(x.dtype)
    xa = x @ a
    dxa = scale * (cotangent @ lora_b.astype(x.dtype).T)
    # Weight gradients sum over every leading (batch, position) axis.
    grad_b = scale * (_rows(xa).T @ _rows(cotangent))
    grad_a = _rows(x).T @ _rows(dxa)
    dx = cotangent @ _dequantize_after(cotangent, w, scales, biases, group_size, bits, mode, x.dtype)
    dx = mx.addmm(dx, dxa, a.T)
    return dx, grad_a.astype(lora_a.dtype), grad_b.astype(lora_b.dtype)


@mx.custom_function
def lora_normed_dequantized_matmul(x, lora_a, lora_b, w, scales, biases, scale, norm_weight, eps, *quant):
    """lora_dequantized_matmul(rms_norm(x, norm_weight, eps), ...): a LoRA projection that normalizes its own input
    (defer_input_norms). Its backward pass recomputes the norm from x, which the residual stream keeps anyway, so
    no layer keeps its normalized input for the LoRA gradient."""
    return _lora_forward(mx.fast.rms_norm(x, norm_weight, eps), lora_a, lora_b, w, scales, biases, scale, *quant)


@lora_normed_dequantized_matmul.vjp
def _lora_normed_dequantized_matmul_vjp(primals, cotangent, output):
    x, lora_a, lora_b, w, scales, biases, scale, norm_weight, eps, *quant = primals
    x = mx.depends(x, cotangent)
    norm = lambda x: mx.fast.rms_norm(x, norm_weight, eps)  # noqa: E731
    dxn, grad_a, grad_b = _lora_backward(norm(x), cotangent, lora_a, lora_b, w, scales, biases, scale, *quant)
    return mx.vjp(norm, [x], [dxn])[1][0], grad_a, grad_b


@mx.custom_function
def lora_swiglu_down(gate, up, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode):
    """lora_dequantized_matmul(silu(gate) * up, ...): a LoRA down_proj over mlx-lm's swiglu. Its backward pass
    recomputes the swiglu from gate and up (which the swiglu's own gradient needs anyway) once the cotangent
    exists, instead of keeping it: 1.9 GB less for a Mistral-7B step at 4 x 512."""
    return _lora_forward(nn.silu(gate) * up, lora_a, lora_b, w, scales, biases, scale, group_size, bits, mode)


@lora_swiglu_down.vjp
def _lora_swiglu_down_vjp(primals, cotangent, output):
    gate, up, *lora = primals
    gate, up = (mx.depends(a, cotangent) for a in (gate, up))
    sig = mx.sigmoid(gate)
    dh, grad_a, grad_b = _lora_backward(gate * sig * up, cotangent, *lora)
    return (*_swiglu_backward(gate, up, sig, dh), grad_a, grad_b)


# One thread per packed uint32: eight 4-bit codes in, eight 16-bit values out in one 16-byte store.
_AFFINE4_SOURCE = """
    const size_t packed = size_t(w_shape[0]) * size_t(w_shape[1]);
    const size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= packed) {
        return;
    }
    const uint32_t codes = w[e];
    const size_t g = e / (GROUP_SIZE / 8);
    const float s = static_cast<float>(scales[g]);
    const float b = static_cast<float>(biases[g]);
    alignas(16) T vals[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        vals[j] = static_cast<T>(s * static_cast<float>((codes >> (4 * j)) & 0xFu) + b);
    }
    *reinterpret_cast<uint4*>(out + e * 8) = *reinterpret_cast<const uint4*>(vals);
"""
_cuda_kernels: dict[str, Any] = {}
# The benchmark turns this off to measure mx.dequantize instead.
USE_CUDA_DEQUANT_KERNEL = True


def _use_cuda_dequant(w, bits, mode, dtype) -> bool:
    return (
        USE_CUDA_DEQUANT_KERNEL
        and bits == 4
        and mode == "affine"
        and dtype is not None
        and dtype in (mx.bfloat16, mx.float16)
        and w.ndim == 2
        and mx.default_device() == mx.gpu
        and cuda_available()
    )


def _cuda_affine4_dequantize(w, scales, biases, group_size, dtype):
    kernel = _cuda_kernels.get("affine4")
    if kernel is None:
        kernel = mx.fast.cuda_kernel(
            name="farense_affine4_dequantize",
            input_names=["w", "scales", "biases"],
            output_names=["out"],
            source=_AFFINE4_SOURCE,
        )
        _cuda_kernels["affine4"] = kernel
    rows, packed_cols = w.shape
    (out,) = kernel(
        inputs=[w, scales, biases],
        template=[("T", dtype), ("GROUP_SIZE", group_size)],
        grid=(rows * packed_cols, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(rows, packed_cols * 8)],
        output_dtypes=[dtype],
    )
    return out


def _rows(a: mx.array) -> mx.array:
    return a.reshape(-1, a.shape[-1])


def cuda_available() -> bool:
    """Whether MLX computes on a CUDA GPU here."""
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return True
    return sys.platform.startswith("linux") and mx.default_device() == mx.gpu


def _replace_quantized(model: nn.Module, convert) -> int:
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not isinstance(
            module, (RecomputeQuantizedLinear, RecomputeQuantizedEmbedding)
        ):
            new = convert(module)
            if new is not module:
                replaced.append((name, new))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def _dequantized_layer(m: nn.Module, dtype: mx.Dtype | None) -> nn.Module:
    weight = _dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, m.mode, dtype)
    if isinstance(m, nn.QuantizedEmbedding):
        new = nn.Embedding(*weight.shape)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
        if "bias" in m:
            new.bias = m["bias"] if dtype is None else m["bias"].astype(dtype)
    new.weight = weight
    # Materialize now so the packed weight can be freed layer by layer, not all at the first step.
    mx.eval(new.parameters())
    new.freeze()
    return new


def _recompute_layer(m: nn.Module, dtype: mx.Dtype | None) -> nn.Module:
    cls = RecomputeQuantizedEmbedding if isinstance(m, nn.QuantizedEmbedding) else RecomputeQuantizedLinear
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.group_size, new.bits, new.mode = m.group_size, m.bits, m.mode
    if isinstance(m, nn.QuantizedEmbedding):
        new.num_embeddings, new.dims = m.num_embeddings, m.dims
    for key, value in m.items():
        if isinstance(value, mx.array) and dtype is not None and key in ("scales", "biases", "bias"):
            value = value.astype(dtype)
        new[key] = value
    new.freeze()
    return new


def _quantized_dtype(model: nn.Module) -> mx.Dtype | None:
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return m.scales.dtype
    return _dense_dtype(model)


def _dense_dtype(model: nn.Module) -> mx.Dtype | None:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return None


def _dtype_name(dtype: mx.Dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("mlx.core.")
