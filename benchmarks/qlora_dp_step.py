"""Data-parallel QLoRA steps on a random-weight llama: tokens/s over all processes and the loss after N steps.

    # 2 GPUs, 4 x 512 each (global batch 8), under MLX's launcher (NCCL on CUDA, ring on CPUs):
    mlx.launch -n 2 --backend nccl benchmarks/qlora_dp_step.py --shape mistral-7b --batch 4 --steps 20
    # 1 GPU, the same global batch (8 x 512): the loss to compare; --batch 4: the one-GPU speed
    python benchmarks/qlora_dp_step.py --shape mistral-7b --batch 8 --steps 20

Every process builds the same model (same seed), and step s trains on the same global batch of random tokens
(seeded by s) whatever the process count; each process takes every N-th row. The step is the trainer's: the
gradient weighted by tokens and averaged with farense.distributed (mlx.nn.average_gradients), AdamW, compiled.
tokens/s counts the whole global batch, over the steps after --warmup. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_step  # noqa: E402  (imports farense.compute before mlx: the CUDA graph size)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402

from farense import distributed  # noqa: E402
from shapes import SHAPES, train_flops_per_token  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--path", default="recompute", choices=qlora_step.PATHS)
    p.add_argument("--batch", type=int, default=4, help="rows per process")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps in all; the loss reported is the last's")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comm", default="weighted", choices=["weighted", "plain", "none"],
                   help="weighted: the trainer's token-weighted average; plain: average_gradients alone (mlx-lm); "
                   "none: no communication at all (each process trains alone: the cost of everything but NCCL)")
    p.add_argument("--out", type=Path, help="rank 0 also appends the JSON line here")
    return p.parse_args(argv)


def global_batch(step: int, rows: int, seq: int, vocab: int, seed: int) -> mx.array:
    return mx.random.randint(0, vocab, (rows, seq + 1), key=mx.random.key(seed * 100_003 + step))


def main(argv=None) -> int:
    args = parse_args(argv)
    group = distributed.world()
    rank, size = group.rank(), group.size()
    on_gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if on_gpu else mx.float32
    shape = dict(SHAPES[args.shape])
    mx.random.seed(args.seed)
    model = qlora_step.build_model(shape, dtype, args.path != "lora-bf16", 64, 4)
    info = qlora_step.apply_path(model, args.path, dtype)
    qlora_step.add_lora(model, args.rank, args.lora_scale)
    mx.eval(model.parameters())
    build_s = time.time() - _START

    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch: mx.array, lengths: mx.array) -> mx.array:
        (loss, ntoks), grad = loss_and_grad(model, batch, lengths)
        if args.comm == "weighted":
            loss, ntoks, grad = distributed.weight_by_tokens(loss, ntoks, grad, group)
        if args.comm != "none":
            grad = distributed.average(grad, group)
        optimizer.update(model, grad)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rows = args.batch * size
    losses, first_step_s, tic = [], None, None
    for s in range(args.steps):
        if s == args.warmup:
            mx.synchronize()
            mx.reset_peak_memory()
            tic = time.perf_counter()
        batch = global_batch(s, rows, args.seq, shape["vocab_size"], args.seed)[rank::size]
        lengths = mx.array([[0, args.seq]] * args.batch)
        loss = step(batch, lengths)
        mx.eval(state, loss)
        losses.append(loss.item())
        if first_step_s is None:
            first_step_s = time.time() - _START
    mx.synchronize()
    seconds = time.perf_counter() - tic
    timed = args.steps - args.warmup
    tokens_per_s = rows * args.seq * timed / seconds
    flops = train_flops_per_token(shape, args.seq)
    result = {
        "bench": "qlora_dp_step", "path": args.path, "shape": args.shape, "processes": size,
        "batch_per_process": args.batch, "global_batch": rows, "seq": args.seq, "steps": args.steps,
        "timed_steps": timed, "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_process": round(tokens_per_s / size, 1), "step_s": round(seconds / timed, 4),
        "peak_gb": round(mx.get_peak_memory() / 1e9, 3), "loss_last": losses[-1], "loss_first": losses[0],
        "losses": [round(v, 5) for v in losses], "tflops_per_process": round(tokens_per_s / size * flops / 1e12, 1),
        "flops_per_token": flops, "process_to_first_step_s": round(first_step_s, 2), "build_s": round(build_s, 2),
        "backend": distributed.backend() if size > 1 else None, "comm": args.comm,
        "grad_bytes": sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters())),
        "mlx_max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER"), "device": qlora_step.device_name(),
        "mlx_version": mx.__version__, "dtype": info["dtype"],
    }  # fmt: skip
    if rank == 0:
        qlora_step.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
