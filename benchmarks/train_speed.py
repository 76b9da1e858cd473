"""Training speed on this machine, as JSON lines (a benchmark, not a test).

    python benchmarks/train_speed.py                       # embedded SmolLM2, all measurements
    python benchmarks/train_speed.py --only windows --paths quantized,dequantized

Measurements:
  windows: the bare loop on fixed batches of `batch x seq` tokens cut from the sample data (no padding, no prompt
           mask), per compute path; this is the "batch 4 x 128" figure.
  loop:    the bare loop (no callbacks, no checkpoints, no validation) on the data stage's chat split.
           Both run as the processes the train stage would start (`--processes auto`: `train.devices`, two
           data-parallel processes of one OpenBLAS thread each on a 2-core CPU), the same global batch split between
           them; tokens/s counts every process's tokens. `--processes 1` is one process on every core.
  stage:   the pipeline's train stage on the same split and config (callbacks, metrics file, checkpoints).
  profile: where a `windows` step's time goes, per part of the model, with GFLOP/s (benchmarks/step_profile.py).
Tokens/s counts non-padding tokens per second of loop time; peak_gb is MLX's peak, rss_gb the process RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import psutil  # noqa: E402

from benchmarks.child_argv import without  # noqa: E402
from benchmarks.scratch_train import train_stage_in_scratch  # noqa: E402
from farense.blas import blas_core, blas_status  # noqa: E402
from farense.checkpoint import TrainState  # noqa: E402
from farense.config import load_config, parse_override  # noqa: E402
from farense.distributed import launched, local_ring, requested_processes, world  # noqa: E402
from farense.jsonl import read_jsonl  # noqa: E402
from farense.stages import run_local  # noqa: E402
from farense.train import (  # noqa: E402
    BatchOrder,
    collate,
    build_optimizer,
    drop_unlearnable,
    load_for_training,
    read_metrics,
    tokenize_rows,
    train_loop,
)


def emit(**row: object) -> None:
    if launched() and world().rank() != 0:
        return  # one line per measurement: rank 0's, whose tokens/s already counts every rank's tokens
    row |= {"machine": platform.machine(), "blas": blas_status(), "blas_core": blas_core(), "mlx": mx.__version__}
    print(json.dumps(row), flush=True)


def windows(tokens: list[int], seq: int, count: int) -> list[tuple[list[int], int]]:
    return [(tokens[i * seq : (i + 1) * seq + 1], 0) for i in range(count)]


def padding_share(examples: list[tuple[list[int], int]], tcfg) -> float:  # noqa: ANN001
    """Pad tokens over all tokens the model processes in one epoch of the loop's batches."""
    order = BatchOrder(examples, tcfg.batch_size, tcfg.seed)
    real = processed = 0
    for idx in order.batches:
        batch, lengths = collate(examples, idx, tcfg.max_seq_length)
        processed += batch.size
        real += int(lengths[:, 1].sum().item())
    return round(1 - real / processed, 4)


def bare_loop(cfg, model_dir: Path, examples_fn, steps: int, path: str, label: str) -> None:  # noqa: ANN001
    tcfg = cfg.train.model_copy(update={"compute_path": path, "max_steps": steps + 1})
    mx.random.seed(tcfg.seed)
    model, tokenizer, compute = load_for_training(model_dir, tcfg)
    examples = examples_fn(tokenizer, tcfg)
    optimizer = build_optimizer(tcfg, steps + 1)
    state = TrainState(total_steps=1, batch_size=tcfg.batch_size, grad_accumulation=tcfg.grad_accumulation)
    train_loop(model, optimizer, examples, [], tcfg, state)  # warm-up step (compilation)
    state.total_steps = steps + 1
    result = train_loop(model, optimizer, examples, [], tcfg, state)
    emit(measure=label, compute_path=compute["compute_path"], processes=world().size(),
         openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"), padding_share=padding_share(examples, tcfg),
         masked_lm_head=tcfg.masked_lm_head, steps=steps, batch=tcfg.batch_size,
         seq=tcfg.max_seq_length, tokens_per_s=round(result.tokens_per_s, 1), seconds=round(result.seconds, 2),
         peak_gb=round(result.peak_gb, 3), rss_gb=round(psutil.Process().memory_info().rss / 1e9, 3))  # fmt: skip


def profile(cfg, model_dir: Path, examples_fn, steps: int) -> None:  # noqa: ANN001
    """One JSON line: the loop's step time, then each part of that step timed alone."""
    import mlx.nn as nn

    from benchmarks.step_profile import profile_step
    from farense.train import loss_fn

    tcfg = cfg.train.model_copy(update={"max_steps": steps + 1})
    mx.random.seed(tcfg.seed)
    model, tokenizer, compute = load_for_training(model_dir, tcfg)
    examples = examples_fn(tokenizer, tcfg)
    optimizer = build_optimizer(tcfg, steps + 1)
    state = TrainState(total_steps=1, batch_size=tcfg.batch_size, grad_accumulation=1)
    train_loop(model, optimizer, examples, [], tcfg, state)
    state.total_steps = steps + 1
    result = train_loop(model, optimizer, examples, [], tcfg, state)
    batch, lengths = collate(examples, list(range(tcfg.batch_size)), tcfg.max_seq_length)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    step = mx.compile(lambda: loss_and_grad(model, batch, lengths))
    grads = step()[1]
    mx.eval(grads)
    update = lambda: optimizer.apply_gradients(grads, model.trainable_parameters())  # noqa: E731
    loop_step_s = result.seconds / steps
    out = profile_step(model, batch, lengths, loss_fn, step, update, loop_step_s)
    emit(measure="profile", compute_path=compute["compute_path"], loop_tokens_per_s=round(result.tokens_per_s, 1),
         **out)  # fmt: skip


def in_ranks(n: int, only: str) -> None:
    """Run this script's `only` measurement as `n` data-parallel processes on this host (loopback ring, one
    OpenBLAS thread per core each, as the train stage starts them: farense.distributed.local_ring); rank 0 prints."""
    argv = without(sys.argv[1:], "--only", "--processes")
    with tempfile.TemporaryDirectory() as work:
        procs = [subprocess.Popen([sys.executable, __file__, *argv, "--only", only, "--processes", str(n)],
                                  env=os.environ | env, stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL)
                 for r, env in enumerate(local_ring(n, Path(work)))]  # fmt: skip
        out = procs[0].communicate()[0]
        codes = [p.wait() for p in procs]
    sys.stdout.write(out.decode())
    if any(codes):
        sys.exit(f"{only} in {n} processes failed: exit codes {codes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--paths", default="dequantized,quantized", help="compute paths for `windows`")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override for every measurement, e.g. train.masked_lm_head=false")
    ap.add_argument("--only", choices=["windows", "loop", "stage", "profile"], default=None)
    ap.add_argument("--processes", default="auto", help="processes for `windows` and `loop`: auto (train.devices) or N")
    args = ap.parse_args()

    overrides = {"train.batch_size": args.batch, "train.grad_accumulation": 1, "train.max_seq_length": args.seq,
                 "train.max_steps": args.steps, "train.eval_every": 10**6, "train.save_every": 10**6,
                 "train.log_every": 10**6, "train.warmup_steps": 0}  # fmt: skip
    overrides |= dict(parse_override(text) for text in args.set)
    cfg = load_config(args.config, overrides, root=ROOT)
    built = run_local(cfg, until="model")  # before any ranks look for it
    processes = requested_processes(cfg.train) if args.processes == "auto" else int(args.processes)
    in_ranks_here = processes > 1 and not launched()
    data_dir, model_dir = Path(built["data"]["path"]), Path(built["model"]["path"])

    def stream_windows(tokenizer, tcfg):  # noqa: ANN001, ANN202
        rows = read_jsonl(data_dir / "train.jsonl")
        stream = [t for toks, _ in tokenize_rows(rows, tokenizer, mask_prompt=False) for t in toks]
        return windows(stream, tcfg.max_seq_length, len(stream) // (tcfg.max_seq_length + 1))

    def chat_split(tokenizer, tcfg):  # noqa: ANN001, ANN202
        rows = tokenize_rows(read_jsonl(data_dir / "train.jsonl"), tokenizer, tcfg.mask_prompt)
        return drop_unlearnable(rows, tcfg.max_seq_length)[0]

    if args.only == "profile":
        profile(cfg, model_dir, stream_windows, args.steps)
        return
    if args.only in (None, "windows") and in_ranks_here:
        in_ranks(processes, "windows")
    elif args.only in (None, "windows"):
        for path in args.paths.split(","):
            steps = args.steps if path != "quantized" else max(2, args.steps // 4)  # the native CPU path is slow
            bare_loop(cfg, model_dir, stream_windows, steps, path, "windows")
    if args.only in (None, "loop") and in_ranks_here:
        in_ranks(processes, "loop")
    elif args.only in (None, "loop"):
        bare_loop(cfg, model_dir, chat_split, args.steps, cfg.train.compute_path, "loop")
    if args.only in (None, "stage"):
        # Same config as `loop`, plus what the stage adds: metrics file, progress callbacks, checkpoint at the end,
        # validation at the start and end. The loop times steps 2 to N+1 after a warm-up step that holds the
        # compilation; the stage logs every step, and its steady figure is over the same steps (after its first).
        stage_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": args.steps + 1,
                                                                                 "log_every": 1})})
        with train_stage_in_scratch(stage_cfg, data_dir, model_dir) as (summary, ctx, wall):
            rows = read_metrics(ctx.out_dir / "metrics.csv")
        # Not `windows`: a local of that name would hide the function from stream_windows above.
        train = [r for r in rows if r["kind"] == "train"]
        first, last = train[0], train[-1]
        after_first = (last["trained_tokens"] - first["trained_tokens"]) / (last["seconds"] - first["seconds"])
        emit(measure="stage", compute_path=summary["compute_path"], processes=summary.get("processes", 1),
             fast_math_layers=summary.get("fast_math_layers"),
             steps=summary["steps"], batch=args.batch, seq=args.seq, tokens_per_s=summary["tokens_per_s"],
             step_tokens_per_s=[round(r["tokens_per_s"], 1) for r in train], steady_tokens_per_s=round(after_first, 1),
             first_valid_s=rows[0]["seconds"] if rows and rows[0]["kind"] == "valid" else None,
             stage_wall_s=round(wall, 2), peak_gb=summary["peak_gb"])  # fmt: skip


if __name__ == "__main__":
    main()
