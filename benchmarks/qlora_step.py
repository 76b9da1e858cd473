"""QLoRA training-step benchmark: tokens/s and peak memory of one compute path on a random-weight llama.

    python benchmarks/qlora_step.py --shape mistral-7b --path quantized,recompute --batch 4 --seq 512 --check-loss
    python benchmarks/qlora_step.py --shape mistral-7b --path recompute --trace 5 --out runs.jsonl   # + kernel trace

Prints one JSON line per path (each path runs in its own process, so peaks don't mix). Needs only mlx and mlx-lm:
farense.compute is imported from this repository's src/, and farense's package import is stdlib-only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_START = time.time()  # process_to_first_step_s counts from here (interpreter start is ~0.1 s earlier)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
try:
    import farense  # noqa: F401  (preloads OpenBLAS on Linux CPU; must precede mlx)
except ImportError:
    pass
# Before anything else imports mlx: sets MLX's CUDA graph size (see farense/compute.py).
from farense import compute  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

from farense.compute import RecomputeLoRALinear, apply_compute_path  # noqa: E402
from farense.fast_math import use_swiglu  # noqa: E402

from child_argv import without  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from shapes import SHAPES  # noqa: E402
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PATHS = ("quantized", "dequantized", "recompute", "recompute-low-memory", "lora-bf16")
# Variants measured while choosing the recompute design; kept so that the numbers in benchmarks/results/GPU_RESULTS.md
# can be re-run.
EXPERIMENTS = ("dequant-matmul", "checkpoint-dequant", "recompute-stocklora", "recompute-mxdequant",
               "recompute-swiglu", "recompute-stock-swiglu", "recompute-sdpa-after", "recompute-undeferred-norms")
DIM_FLAGS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "intermediate": "intermediate_size",
             "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size"}


class DequantMatmulLinear(nn.QuantizedLinear):
    """Dequantize then matmul with plain autodiff: the dense weight stays alive until the backward pass."""

    def __call__(self, x):
        w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                          mode=self.mode)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


class CheckpointDequantLinear(nn.QuantizedLinear):
    """Dequantize then matmul inside mx.checkpoint: the backward pass recomputes the forward matmul too."""

    def __call__(self, x):
        def dense(x, w, scales, biases):
            wd = mx.dequantize(w, scales, biases, self.group_size, self.bits, mode=self.mode)
            return x @ wd.astype(x.dtype).T

        y = mx.checkpoint(dense)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


@mx.custom_function
def swiglu_keep_inputs(gate, x):
    """mlx-lm's swiglu whose backward pass recomputes silu(gate) instead of keeping it."""
    return nn.silu(gate) * x


@swiglu_keep_inputs.vjp
def _swiglu_keep_inputs_vjp(primals, cotangent, output):
    gate, x = primals
    sig = mx.sigmoid(gate)
    dgate = cotangent * x * (sig * (1 + gate * (1 - sig)))
    return dgate, cotangent * (gate * sig)


@mx.custom_function
def _sdpa_after_cotangent(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@_sdpa_after_cotangent.vjp
def _sdpa_after_cotangent_vjp(primals, cotangent, output):
    """The attention's backward pass (which recomputes what it needs from q, k and v) once the cotangent exists."""
    q, k, v, scale, mask = primals
    q, k, v = (mx.depends(a, cotangent) for a in (q, k, v))
    attend = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # noqa: E731
    return tuple(mx.vjp(attend, [q, k, v], [cotangent])[1])


def sdpa_after_cotangent(queries, keys, values, cache, scale, mask, sinks=None):
    if cache is not None or sinks is not None:
        return stock_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    return _sdpa_after_cotangent(queries, keys, values, scale, mask)


stock_sdpa = llama.scaled_dot_product_attention


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    for flag in DIM_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help="override the shape preset")
    p.add_argument("--path", default="recompute", help=f"comma-separated: {', '.join(PATHS + EXPERIMENTS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=16.0)
    p.add_argument("--dtype", default=None, help="model dtype; default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="mlx-lm's gradient checkpointing (every layer recomputed in the backward pass)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="don't mx.compile the step")
    p.add_argument("--check-loss", action="store_true",
                   help="also run the first batch on the native quantized path; report loss and gradient diffs")
    p.add_argument("--memory-limit-gb", type=float,
                   help="mx.set_memory_limit: past it, evaluation waits for queued GPU work and its buffers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-profile", action="store_true",
                   help="instead of timing: memory kept from the forward pass for the backward pass, and the peak")
    p.add_argument("--prebuild", action="store_true",
                   help="build each step's graph in a second thread while the device runs the one before")
    p.add_argument("--trace", type=int, default=0, metavar="STEPS",
                   help="after timing, run STEPS more steps under a CUPTI trace (torch) and add where the time went")
    p.add_argument("--kernels", action="store_true",
                   help="instead of training: time dequantize kernels and the matmuls of one layer; check the kernel")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    for path in args.path.split(","):
        if path not in PATHS + EXPERIMENTS:
            p.error(f"--path: unknown path {path!r}; choose from {', '.join(PATHS + EXPERIMENTS)}")
    return args


def model_shape(args: argparse.Namespace) -> dict:
    shape = dict(SHAPES[args.shape])
    for flag, key in DIM_FLAGS.items():
        if getattr(args, flag) is not None:
            shape[key] = getattr(args, flag)
    return shape


def build_model(shape: dict, dtype: mx.Dtype, quantize: bool, group_size: int, bits: int) -> nn.Module:
    """Random weights in `dtype`, materialized block by block so the fp32 init never exists whole."""
    model = llama.Model(llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, **shape))
    model.set_dtype(dtype)
    if quantize:
        nn.quantize(model, group_size=group_size, bits=bits)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def add_lora(model: nn.Module, rank: int, scale: float) -> None:
    model.freeze()
    config = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": LORA_KEYS}
    linear_to_lora_layers(model, len(model.layers), config)


def strip_lora(model: nn.Module) -> None:
    bases = [(name, m.linear) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    model.update_modules(tree_unflatten(bases))


def apply_path(model: nn.Module, path: str, dtype: mx.Dtype) -> dict:
    if path == "lora-bf16":
        return {"path": path, "layers_converted": 0, "dtype": str(dtype).removeprefix("mlx.core."),
                "base_weight_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters()))}
    if path in ("dequant-matmul", "checkpoint-dequant"):
        info = apply_compute_path(model, "quantized")
        cls = DequantMatmulLinear if path == "dequant-matmul" else CheckpointDequantLinear
        for _, m in model.named_modules():
            if type(m) is nn.QuantizedLinear:
                m.__class__ = cls
        return {**info, "path": path}
    if path == "recompute-sdpa-after":
        llama.scaled_dot_product_attention = sdpa_after_cotangent
        return {**apply_compute_path(model, "recompute", None), "path": path}
    if path in ("recompute-swiglu", "recompute-stock-swiglu"):
        # The recompute path's MLPs take farense.compute.recompute_swiglu; these put back mlx-lm's (autodiff keeps
        # silu and its sigmoid), or one that recomputes them without waiting for the cotangent.
        info = apply_compute_path(model, "recompute", None)
        use_swiglu(model, swiglu_keep_inputs if path == "recompute-swiglu" else llama.swiglu, path.title())
        return {**info, "path": path}
    if path in ("recompute-low-memory", "recompute-undeferred-norms"):
        # train.low_memory; undeferred-norms keeps its MLP half only (the norms go back in front of the projections).
        info = apply_compute_path(model, "recompute", None, low_memory=True)
        if path == "recompute-undeferred-norms":
            for _, m in model.named_modules():
                if isinstance(m, compute.DeferredRMSNorm):
                    m.__class__ = nn.RMSNorm
                elif isinstance(m, compute.RecomputeQuantizedLinear):
                    m.input_norm = None
        return {**info, "path": path}
    if path in ("recompute-stocklora", "recompute-mxdequant"):
        compute.USE_CUDA_DEQUANT_KERNEL = path != "recompute-mxdequant"
        return {**apply_compute_path(model, "recompute", None), "path": path}
    return apply_compute_path(model, path, None if mx.default_device() == mx.gpu else dtype)


def memory_profile(model, loss_value_and_grad, batch, lengths) -> dict:
    """Evaluate the loss first: what is then alive beyond the weights is what the backward pass was left."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    (loss, _), grads = loss_value_and_grad(model, batch, lengths)
    mx.eval(loss)
    mx.synchronize()
    kept, forward_peak = mx.get_active_memory() - base, mx.get_peak_memory() - base
    mx.eval(grads)
    mx.synchronize()
    return {"kept_for_backward_gb": round(kept / 1e9, 3), "forward_peak_gb": round(forward_peak / 1e9, 3),
            "peak_gb": round((mx.get_peak_memory() - base) / 1e9, 3), "loss": loss.item()}


def grad_rel_diff(grads: dict, reference: dict) -> float:
    worst = 0.0
    for name, ref in reference.items():
        norm = mx.linalg.norm(ref.astype(mx.float32)).item()
        if norm > 0:
            diff = mx.linalg.norm((grads[name] - ref).astype(mx.float32)).item()
            worst = max(worst, diff / norm)
    return worst


def device_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return f"{kind}: {info.get('device_name', 'unknown')}"


def run_one(args: argparse.Namespace, path: str) -> dict:
    mx.random.seed(args.seed)
    if args.memory_limit_gb:
        mx.set_memory_limit(int(args.memory_limit_gb * 1e9))
    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.bfloat16 if on_gpu else mx.float32)
    shape = model_shape(args)
    model = build_model(shape, dtype, path != "lora-bf16", args.group_size, args.bits)

    batch = mx.random.randint(0, shape["vocab_size"], (args.batch, args.seq + 1))
    lengths = mx.array([[0, args.seq]] * args.batch)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)

    reference = None
    if args.check_loss and path != "lora-bf16":
        # Native quantized first, on the same weights, LoRA init and batch; then the path under test.
        add_lora(model, args.rank, args.lora_scale)
        lora_init = model.trainable_parameters()
        (loss_q, _), grads_q = loss_value_and_grad(model, batch, lengths)
        mx.eval(loss_q, grads_q, lora_init)
        reference = (loss_q.item(), dict(tree_flatten(grads_q)))
        del grads_q
        strip_lora(model)

    info = apply_path(model, path, dtype)
    add_lora(model, args.rank, args.lora_scale)
    if path == "recompute-stocklora":
        for _, m in model.named_modules():
            if type(m) is RecomputeLoRALinear:
                m.__class__ = LoRALinear
    if reference is not None:
        model.update(lora_init)
    if args.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    mx.eval(model.parameters())

    result = {"path": path + ("+checkpoint" if args.grad_checkpoint else ""), "shape": args.shape, "batch": args.batch, "seq": args.seq}
    if reference is not None:
        (loss_p, _), grads_p = loss_value_and_grad(model, batch, lengths)
        mx.eval(loss_p, grads_p)
        result["loss_diff"] = abs(loss_p.item() - reference[0])
        result["grad_rel_diff"] = grad_rel_diff(dict(tree_flatten(grads_p)), reference[1])
        result["loss_quantized"] = reference[0]
        del grads_p, reference

    if args.memory_profile:
        return {**result, **memory_profile(model, loss_value_and_grad, batch, lengths), "device": device_name(),
                "dtype": info["dtype"], "base_weight_gb": round(info["base_weight_bytes"] / 1e9, 3)}

    optimizer = optim.AdamW(learning_rate=2e-4, weight_decay=0.01)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, lengths):
        (loss, _), grads = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss

    if args.compile:
        step = mx.compile(step, inputs=state, outputs=state)

    first_loss, first_step_s = None, None
    for _ in range(args.warmup):
        loss = step(batch, lengths)
        mx.eval(state, loss)
        first_loss = first_loss if first_loss is not None else loss.item()
        first_step_s = first_step_s or time.time() - _START
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    run_steps = prebuilt_steps(step, state) if args.prebuild else plain_steps(step, state)
    tic = time.perf_counter()
    losses = run_steps(args.steps, batch, lengths)
    loss = losses[-1]
    first_loss = first_loss if first_loss is not None else losses[0]
    mx.synchronize()
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    if args.trace:
        from kernel_trace import cupti_trace, summarize_kernels

        save = args.out.with_name(f"{args.out.stem}-{path}-trace.json.gz") if args.out else None
        with cupti_trace(save) as traced:
            tic_trace = time.perf_counter()
            run_steps(args.trace, batch, lengths)
            mx.synchronize()
            trace_wall = time.perf_counter() - tic_trace
        result["trace"] = {**summarize_kernels(traced["kernels"], args.trace),
                           "wall_ms_per_step": round(trace_wall * 1e3 / args.trace, 3)}

    result.update({
        "tokens_per_s": round(args.batch * args.seq * args.steps / seconds, 1),
        "peak_gb": round(peak / 1e9, 3),
        "loss": loss,
        "losses": losses,
        "prebuild": args.prebuild,
        "first_loss": first_loss,
        "process_to_first_step_s": None if first_step_s is None else round(first_step_s, 2),
        "steps": args.steps,
        "step_s": round(seconds / args.steps, 4),
        "device": device_name(),
        "mlx_version": mx.__version__,
        "dtype": info["dtype"],
        "compile": args.compile,
        "group_size": args.group_size,
        "bits": args.bits,
        "base_weight_gb": round(info["base_weight_bytes"] / 1e9, 2),
        "dims": shape,
        "memory_limit_gb": args.memory_limit_gb,
        "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
    })
    return result


def plain_steps(step, state):
    """Each step's graph built, then evaluated to the end, before the next is built."""

    def run(n: int, *batch) -> list[float]:
        losses = []
        for _ in range(n):
            loss = step(*batch)
            mx.eval(state, loss)
            losses.append(loss.item())
        return losses

    return run


def prebuilt_steps(step, state):
    """The next step's graph is built in a second thread while this thread queues the current one for the device
    (`mx.async_eval` lets go of the GIL), and is queued before this thread waits for the current loss. Building a
    7B step's graph takes the host tens of milliseconds, during which the device would otherwise wait: MLX queues
    only about 10 CUDA graphs ahead of the device. Each queue asks for the loss only: a step's optimizer update is
    then evaluated with the next step, which reads it."""
    pool = ThreadPoolExecutor(1)
    stream = mx.default_stream(mx.default_device())  # MLX's streams belong to threads: build on this one's

    def build(*batch):
        with mx.stream(stream):
            return step(*batch)

    def run(n: int, *batch) -> list[float]:
        losses = []
        loss = step(*batch)
        upcoming = pool.submit(build, *batch) if n > 1 else None
        mx.async_eval(loss)
        for i in range(n):
            nxt = upcoming.result() if upcoming is not None else None
            if nxt is not None:
                upcoming = pool.submit(build, *batch) if i + 2 < n else None
                mx.async_eval(nxt)
            losses.append(loss.item())
            loss = nxt
        mx.eval(state)
        return losses

    return run


def _median_seconds(fn, repeats: int = 20) -> float:
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def kernel_timings(args: argparse.Namespace) -> dict:
    """Per-weight costs behind the step times: dequantize (mx vs farense's kernel), dense and quantized matmuls."""
    mx.random.seed(args.seed)
    shape = model_shape(args)
    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype) if args.dtype else (mx.bfloat16 if on_gpu else mx.float32)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    tokens = args.batch * args.seq
    result = {"path": "kernels", "shape": args.shape, "batch": args.batch, "seq": args.seq,
              "device": device_name(), "mlx_version": mx.__version__, "dtype": str(dtype).removeprefix("mlx.core.")}
    gs, bits = args.group_size, args.bits
    for name, (out_dims, in_dims) in {"q": (hidden, hidden), "kv": (kv, hidden), "up": (inter, hidden),
                                      "down": (hidden, inter), "lm_head": (shape["vocab_size"], hidden)}.items():
        w = (mx.random.uniform(-1, 1, (out_dims, in_dims)) / in_dims**0.5).astype(dtype)
        wq, scales, biases = mx.quantize(w, gs, bits)
        x = mx.random.normal((tokens, in_dims)).astype(dtype)
        dy = mx.random.normal((tokens, out_dims)).astype(dtype)
        mx.eval(wq, scales, biases, x, dy)
        ref = mx.dequantize(wq, scales, biases, gs, bits)
        row = {}
        compute.USE_CUDA_DEQUANT_KERNEL = True
        mine = compute._dequantize(wq, scales, biases, gs, bits, "affine", dtype)
        row["kernel_max_abs_diff"] = mx.abs(mine.astype(mx.float32) - ref.astype(mx.float32)).max().item()
        moved = wq.nbytes + scales.nbytes + biases.nbytes + ref.nbytes
        t = _median_seconds(lambda: mx.dequantize(wq, scales, biases, gs, bits))
        row["mx_dequantize_ms"], row["mx_dequantize_gbps"] = round(t * 1e3, 3), round(moved / t / 1e9)
        t = _median_seconds(lambda: compute._dequantize(wq, scales, biases, gs, bits, "affine", dtype))
        row["kernel_dequantize_ms"], row["kernel_dequantize_gbps"] = round(t * 1e3, 3), round(moved / t / 1e9)
        flops = 2 * tokens * out_dims * in_dims
        t = _median_seconds(lambda: x @ ref.T)
        row["dense_fwd_ms"], row["dense_fwd_tflops"] = round(t * 1e3, 3), round(flops / t / 1e12)
        t = _median_seconds(lambda: dy @ ref)
        row["dense_bwd_ms"] = round(t * 1e3, 3)
        t = _median_seconds(lambda: mx.quantized_matmul(x, wq, scales, biases, True, gs, bits))
        row["qmm_fwd_ms"] = round(t * 1e3, 3)
        t = _median_seconds(lambda: mx.quantized_matmul(dy, wq, scales, biases, False, gs, bits))
        row["qmm_bwd_ms"] = round(t * 1e3, 3)
        result[name] = row
    return result


def emit(result: dict, out: Path | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if out is not None:
        with out.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kernels:
        emit(kernel_timings(args), args.out)
        return 0
    paths = args.path.split(",")
    if len(paths) == 1:
        emit(run_one(args, paths[0]), args.out)
        return 0
    failed = 0
    argv = list(sys.argv[1:] if argv is None else argv)
    for path in paths:
        proc = subprocess.run([sys.executable, __file__, *without(argv, "--path", "--out"), "--path", path],
                              capture_output=True, text=True, env=os.environ.copy())
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            emit(json.loads(lines[-1]), args.out)
        else:
            failed += 1
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            emit({"path": path, "shape": args.shape, "error": " | ".join(tail), "returncode": proc.returncode},
                 args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
