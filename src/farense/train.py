"""QLoRA training on mlx-lm's pieces: model loading, LoRA layers, chat/text tokenization with prompt masking.

What is ours is the loop and its state: a data order derived from (seed, epoch), checkpoints that resume to the
same adapter an uninterrupted run reaches, NaN/OOM/Ctrl-C handling, and a callback protocol that lets the task layer
show progress without the trainer knowing about Prefect.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import psutil
from mlx.utils import tree_flatten, tree_map

# Imported before any MLX GPU use: on CUDA it bounds MLX's kernel queue (MLX_MAX_OPS_PER_BUFFER), which keeps
# the recompute path's peak memory down; MLX reads that setting at its first GPU use.
from farense.compute import apply_compute_path, select_compute_path
from farense.checkpoint import (
    TrainState,
    find_resumable,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from farense import distributed
from farense.config import LORA_TARGET_MODULES, FarenseConfig, TrainConfig
from farense import fast_math
from farense.memory import estimate_memory_bytes, fit_batch, keep_freed_host_memory, memory_budget_bytes, oom_message
from farense.batching import BatchOrder, collate, drop_unlearnable, tokenize_rows  # noqa: F401
from farense.blas import blas_core, blas_status, warn_if_slow_blas
from farense.errors import TrainingError, TrainingInterrupted
from farense.jsonl import read_jsonl
from farense.loss import chosen_loss, loss_fn, loss_inputs, training_cross_entropy, use_masked_head  # noqa: F401
from farense.store import hash_json

METRIC_FIELDS = (
    "kind", "step", "epoch", "loss", "learning_rate", "tokens_per_s", "trained_tokens", "rss_gb", "peak_gb",
    "seconds", "total_steps",  # total_steps: for `farense monitor`'s ETA
)  # fmt: skip


# ---------------------------------------------------------------- reports and callbacks


@dataclass(frozen=True)
class TrainReport:
    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    tokens_per_s: float
    trained_tokens: int
    rss_gb: float
    peak_gb: float
    seconds: float


@dataclass(frozen=True)
class ValReport:
    step: int
    total_steps: int
    epoch: int
    loss: float
    best_loss: float
    seconds: float


class TrainingCallback(Protocol):
    def on_train_report(self, report: TrainReport) -> None: ...

    def on_val_report(self, report: ValReport) -> None: ...

    def on_checkpoint(self, path: Path, state: TrainState) -> None: ...


class MetricsFile:
    """Appends reports to a CSV that later stages plot; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})

    def on_train_report(self, report: TrainReport) -> None:
        self._append({"kind": "train", **asdict(report)})

    def on_val_report(self, report: ValReport) -> None:
        self._append({"kind": "valid", **asdict(report)})

    def on_checkpoint(self, path: Path, state: TrainState) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [
            {k: (float(v) if k not in ("kind",) and v != "" else v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


# ---------------------------------------------------------------- data


def evaluate(
    model: nn.Module, examples: Sequence[tuple[list[int], int]], batch_size: int, max_seq_length: int,
    max_batches: int = -1, masked_head: bool | None = None, group: mx.distributed.Group | None = None,
) -> float:  # fmt: skip
    """Token-weighted mean loss over the validation examples, in a fixed order (masked_head None: automatic).
    With a group of several processes each evaluates every size-th batch and the sums are added up."""
    if not examples:
        return float("nan")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batches > 0:
        chunks = chunks[:max_batches]
    size = group.size() if group is not None else 1
    if size > 1:
        chunks = distributed.shard(chunks, group.rank(), size)
    masked = use_masked_head(model) if masked_head is None else masked_head
    total, tokens = mx.array(0.0), mx.array(0)
    was_training = model.training
    model.eval()
    for chunk in chunks:
        loss, ntoks = chosen_loss(masked)(model, *loss_inputs(*collate(examples, chunk, max_seq_length), masked))
        total, tokens = total + loss * ntoks, tokens + ntoks
        mx.eval(total, tokens)
    if was_training:
        model.train()
    if size > 1:
        total, tokens = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(tokens, group=group)
    return (total / mx.maximum(tokens, 1)).item()


# ---------------------------------------------------------------- model


def load_for_training(model_dir: Path, tcfg: TrainConfig) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load the 4-bit base, choose the compute path, add LoRA layers; only the adapters are trainable
    (`train.fine_tune_type=full`: no adapters, every weight of the dense base is trainable). On a CPU,
    the process keeps freed host memory for reuse from here on (farense.memory.keep_freed_host_memory)."""
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    model.freeze()
    path = select_compute_path(tcfg.compute_path)
    compute = apply_compute_path(model, path, fast_math=tcfg.fast_math, low_memory=tcfg.low_memory)
    compute["host_memory_kept"] = mx.default_device() == mx.cpu and keep_freed_host_memory()
    if tcfg.fine_tune_type == "full":
        if path == "quantized":
            raise TrainingError(
                "train.fine_tune_type=full trains every weight, which needs a dense base: set "
                "train.compute_path=dequantized (the quantized path keeps 4-bit weights that cannot be trained)"
            )
        model.unfreeze()
    else:
        linear_to_lora_layers(model, tcfg.lora_layers, lora_parameters(tcfg))
    if tcfg.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    mx.eval(model.parameters())
    return model, tokenizer, {"compute_path": path, **compute}


def lora_parameters(tcfg: TrainConfig) -> dict[str, Any]:
    return {
        "rank": tcfg.lora_rank,
        "scale": tcfg.lora_scale,
        "dropout": tcfg.lora_dropout,
        "keys": [LORA_TARGET_MODULES[t] for t in tcfg.lora_targets],
    }


def adapter_config(cfg: FarenseConfig, num_layers: int) -> dict[str, Any]:
    """The `adapter_config.json` stock mlx-lm reads (`mlx_lm.generate --adapter-path`, `mlx_lm.fuse`)."""
    return {
        "fine_tune_type": cfg.train.fine_tune_type,
        "num_layers": num_layers if cfg.train.lora_layers < 0 else cfg.train.lora_layers,
        "lora_parameters": lora_parameters(cfg.train),
        "model": str(cfg.model.source),
    }


def build_optimizer(tcfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    """AdamW, linear warm-up then cosine (or linear: `train.lr_decay`) decay to `train.final_lr_fraction` of the
    peak (a tenth by default), over the run's `total_steps` or `train.schedule_steps` where set (schedules count
    optimizer steps)."""
    lr = tcfg.learning_rate
    total_steps = tcfg.schedule_steps or total_steps
    warmup = min(tcfg.warmup_steps, max(total_steps - 1, 0))
    end, length = lr * tcfg.final_lr_fraction, max(total_steps - warmup, 1)
    if tcfg.lr_decay == "linear":
        decay = optim.linear_schedule(lr, end, length)
    else:
        decay = optim.cosine_decay(lr, length, end=end)
    schedule = optim.join_schedules([optim.linear_schedule(lr * 1e-3, lr, warmup), decay], [warmup]) if warmup else decay
    return optim.AdamW(
        learning_rate=schedule, betas=[0.9, tcfg.adam_beta2], weight_decay=tcfg.weight_decay,
        bias_correction=tcfg.adam_bias_correction,
    )


# ---------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    state: TrainState
    seconds: float
    tokens_per_s: float
    peak_gb: float


# One compiled graph for gradient and update when there is no accumulation: 4% faster than two graphs for the
# Mistral-7B shape on an H200 (benchmarks/results/GPU_RESULTS.md, 2026-11-27), the same on the 2-core CPU. False:
# two graphs, as with accumulation (tests compare the two).
ONE_GRAPH_STEP = True


def train_loop(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_set: Sequence[tuple[list[int], int]],
    valid_set: Sequence[tuple[list[int], int]],
    tcfg: TrainConfig,
    state: TrainState,
    callbacks: Sequence[TrainingCallback] = (),
    checkpoint_dir: Path | None = None,
) -> LoopResult:
    """Run optimizer steps from `state.step` to `state.total_steps`. `model`/`optimizer` already hold the state
    of `state.step` (fresh, or loaded from a checkpoint)."""
    order = BatchOrder(train_set, state.batch_size, tcfg.seed)
    accum = state.grad_accumulation
    masked = use_masked_head(model, tcfg.masked_lm_head)
    # Data parallel (farense.distributed): the same global batches on every rank, each taking its share.
    group = distributed.world()
    rank, size = group.rank(), group.size()
    if size > state.batch_size:
        raise TrainingError(f"train.batch_size={state.batch_size} is smaller than the {size} training processes; "
                            "raise it to at least one example per process")
    loss_and_grad = nn.value_and_grad(model, chosen_loss(masked))
    compiled_state = [model.state, optimizer.state, mx.random.state]

    def gradient(inputs: tuple[mx.array, ...], prev_grad: Any) -> tuple[mx.array, mx.array, Any]:
        (loss, ntoks), grad = loss_and_grad(model, *inputs)
        loss, ntoks, grad = distributed.weight_by_tokens(loss, ntoks, grad, group)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        return loss, ntoks, grad

    def update(grad: Any) -> None:
        grad = distributed.average(grad, group)
        if accum > 1:
            grad = tree_map(lambda g: g / accum, grad)
        if tcfg.max_grad_norm is not None:
            grad, _ = optim.clip_grad_norm(grad, tcfg.max_grad_norm)
        optimizer.update(model, grad)

    def whole(inputs: tuple[mx.array, ...]) -> tuple[mx.array, mx.array]:
        loss, ntoks, grad = gradient(inputs, None)
        update(grad)
        return loss, ntoks

    compiled = partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    micro_step, apply_update = compiled(gradient), compiled(update)
    # Without accumulation the gradient and the update are one graph, evaluated once a step (no gradient tree
    # materialized between two graphs, one synchronization instead of two).
    whole_step = compiled(whole) if accum == 1 and ONE_GRAPH_STEP else None

    eval_seconds = 0.0

    def val_report(seconds_start: float) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        vloss = evaluate(model, valid_set, state.batch_size, tcfg.max_seq_length, tcfg.max_eval_batches, masked,
                         group)
        if state.best_val_loss is None or vloss < state.best_val_loss:
            state.best_val_loss, state.best_step = vloss, state.step
        rep = ValReport(state.step, state.total_steps, state.epoch, vloss, state.best_val_loss,
                        time.perf_counter() - seconds_start)  # fmt: skip
        eval_seconds += time.perf_counter() - t0
        for cb in callbacks:
            cb.on_val_report(rep)

    def checkpoint() -> None:
        if checkpoint_dir is None or rank != 0:
            return
        finite = all(mx.isfinite(v).all().item() for _, v in tree_flatten(model.trainable_parameters()))
        if not finite:
            raise TrainingError(
                f"adapter weights became NaN or inf at step {state.step}; not saved, kept the last good checkpoint. "
                f"Lower train.learning_rate (now {tcfg.learning_rate}) or check the data"
            )
        path = save_checkpoint(checkpoint_dir, model, optimizer, state)
        prune_checkpoints(checkpoint_dir, tcfg.keep_checkpoints, state.best_step)
        for cb in callbacks:
            cb.on_checkpoint(path, state)

    model.train()
    mx.reset_peak_memory()
    start = time.perf_counter()
    window_start, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
    run_tokens = 0
    if state.step == 0 and valid_set:
        val_report(start)

    def inputs_for(micro: int) -> tuple[tuple[mx.array, ...], int]:
        """The step's model inputs and this rank's count of real tokens, built on the host."""
        _, _, idx = order.batch_at(micro)
        batch, lengths = collate(train_set, distributed.shard(idx, rank, size), tcfg.max_seq_length)
        return loss_inputs(batch, lengths, masked), int(np.asarray(lengths)[:, 1].sum())

    # The next micro-batch's inputs are built while the device computes the current one (the step's graph is
    # queued with async_eval): the host's collate and target positions no longer leave the device idle.
    upcoming = inputs_for(state.step * accum) if state.step < state.total_steps else None

    def count_step(step_tokens: int) -> None:
        nonlocal window_tokens, run_tokens
        state.step += 1
        state.epoch, state.batch_in_epoch, _ = order.batch_at(state.step * accum)
        state.trained_tokens += step_tokens
        window_tokens += step_tokens
        run_tokens += step_tokens

    # True from the moment the model holds a step's update (lazily: the graph is queued) until the loop counts
    # that step. Ctrl-C lands when the main thread wakes from waiting on the device, inside this window: the
    # step is then finished and counted before the checkpoint, so the checkpoint's step matches its weights.
    uncounted = False
    try:
        while state.step < state.total_steps:
            grad = None
            step_tokens = 0
            for k in range(accum):
                micro = state.step * accum + k
                epoch, offset, _ = order.batch_at(micro)
                inputs, real_tokens = upcoming
                # dropout noise is a function of the position (and the rank: each sees other examples)
                mx.random.seed(rng_seed(tcfg.seed, micro * size + rank))
                if whole_step is not None:
                    loss, ntoks = whole_step(inputs)
                    uncounted = True
                    mx.async_eval(loss, ntoks, model.state, optimizer.state)
                else:
                    loss, ntoks, grad = micro_step(inputs, grad)
                    mx.async_eval(loss, ntoks, grad)
                last = micro + 1 == state.total_steps * accum
                upcoming = None if last else inputs_for(micro + 1)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss became {loss_value} at step {state.step + 1} (epoch {epoch}, batch {offset}); "
                        f"kept the last good checkpoint. Lower train.learning_rate (now {tcfg.learning_rate}) "
                        "or check the data"
                    )
                step_tokens += distributed.sum_across(real_tokens, group)
                window_loss += loss_value
                window_n += 1
            if whole_step is None:
                apply_update(grad)
                uncounted = True
                mx.eval(model.state, optimizer.state)
            count_step(step_tokens)
            uncounted = False

            if state.step % tcfg.log_every == 0 or state.step == state.total_steps:
                now = time.perf_counter()
                rep = TrainReport(
                    step=state.step,
                    total_steps=state.total_steps,
                    epoch=state.epoch,
                    loss=window_loss / max(window_n, 1),
                    learning_rate=float(optimizer.learning_rate.item()),
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    trained_tokens=state.trained_tokens,
                    rss_gb=psutil.Process().memory_info().rss / 1e9,
                    peak_gb=mx.get_peak_memory() / 1e9,
                    seconds=now - start,
                )
                for cb in callbacks:
                    cb.on_train_report(rep)
                window_start, window_tokens, window_loss, window_n = now, 0, 0.0, 0
            if valid_set and (state.step % tcfg.eval_every == 0 or state.step == state.total_steps):
                val_report(start)
            if state.step % tcfg.save_every == 0 or state.step == state.total_steps:
                checkpoint()
    except KeyboardInterrupt:
        # A step whose update is already in the model is finished and counted (its tokens: this process's, when
        # the interrupt came before they were summed across processes); a step still accumulating gradients is
        # dropped. Either way the checkpoint holds exactly the steps it says.
        if uncounted:
            mx.eval(model.state, optimizer.state)
            count_step(step_tokens or real_tokens)
        checkpoint()
        raise TrainingInterrupted(
            f"interrupted at step {state.step}/{state.total_steps}; checkpoint saved, rerun to continue"
        ) from None
    except RuntimeError as e:
        if "memory" in str(e).lower() or "alloc" in str(e).lower():
            raise TrainingError(oom_message(tcfg, e)) from None
        raise
    seconds = time.perf_counter() - start
    # Tokens per second of training: validation passes are excluded, checkpoints and callbacks are not.
    train_seconds = max(seconds - eval_seconds, 1e-9)
    return LoopResult(state, seconds, run_tokens / train_seconds, mx.get_peak_memory() / 1e9)


def rng_seed(seed: int, micro_batch: int) -> int:
    return (seed * 1_000_003 + micro_batch) % (2**63)


def steps_for(tcfg: TrainConfig, n_batches: int, accum: int) -> int:
    if tcfg.max_steps is not None:
        return tcfg.max_steps
    return max(1, (tcfg.epochs * n_batches) // accum)


# ---------------------------------------------------------------- the stage


def train_stage(cfg: FarenseConfig, ctx: Any) -> dict[str, Any]:
    """Train adapters on the data stage's splits over the model stage's 4-bit base, resuming from ctx.work_dir."""
    tcfg = cfg.train
    processes = distributed.requested_processes(tcfg)
    if processes > 1 and not distributed.launched():
        return distributed.launch_train(cfg, ctx, processes)
    group = distributed.world()
    data_dir, model_dir = ctx.upstream["data"], ctx.upstream["model"]
    reporter = ctx.reporter
    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_dir = work / "checkpoints"

    mx.random.seed(tcfg.seed)
    model, tokenizer, compute = load_for_training(model_dir, tcfg)
    compute["loss"] = "masked-head" if use_masked_head(model, tcfg.masked_lm_head) else "default"
    fast_ce = compute["loss"] == "masked-head" and training_cross_entropy(model) is fast_math.cross_entropy
    compute["cross_entropy"] = "fast_math" if fast_ce else "mlx"
    if compute["compute_path"] != "quantized" and mx.default_device() == mx.cpu:
        warn_if_slow_blas()
    train_set, skipped_train = drop_unlearnable(
        tokenize_rows(read_jsonl(data_dir / "train.jsonl"), tokenizer, tcfg.mask_prompt), tcfg.max_seq_length
    )
    valid_set, skipped_valid = drop_unlearnable(
        tokenize_rows(read_jsonl(data_dir / "valid.jsonl"), tokenizer, tcfg.mask_prompt), tcfg.max_seq_length
    )
    if skipped_train or skipped_valid:
        reporter.log(
            f"train: skipped {skipped_train} train and {skipped_valid} valid examples whose prompt fills "
            f"train.max_seq_length={tcfg.max_seq_length} (no answer token left to learn); raise it to keep them"
        )

    resume_from, problems = find_resumable(ckpt_dir)
    for line in problems:
        reporter.log(line)
    config_hash = hash_json(cfg.section("train"))
    memory_note = None
    if resume_from is not None:
        saved = read_state(resume_from)
        batch, accum = saved.batch_size, saved.grad_accumulation
    else:
        batch, accum = tcfg.batch_size, tcfg.grad_accumulation
        if tcfg.auto_fit_memory:
            est = partial(estimate_memory_bytes, model, seq=tcfg.max_seq_length, args=getattr(model, "args", None),
                          grad_checkpoint=tcfg.grad_checkpoint)  # fmt: skip
            per_rank = lambda b: est(math.ceil(b / group.size()))  # noqa: E731  (each rank holds its share)
            batch, accum, memory_note = fit_batch(per_rank, batch, accum, memory_budget_bytes())
            if memory_note:
                reporter.log(memory_note)

    n_batches = len(BatchOrder(train_set, batch, tcfg.seed))
    total = steps_for(tcfg, n_batches, accum)
    optimizer = build_optimizer(tcfg, total)
    optimizer.init(model.trainable_parameters())
    state = TrainState(total_steps=total, batch_size=batch, grad_accumulation=accum, config_hash=config_hash)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if state.config_hash != config_hash:
            raise TrainingError(f"{resume_from}: checkpoint was made with another train config; delete {work}")
        reporter.log(f"train: resuming from {resume_from.name} (step {state.step}/{state.total_steps})")

    callbacks: list[TrainingCallback] = []
    if group.rank() == 0:  # one writer: rank 0 keeps the metrics, checkpoints and outputs
        callbacks = [MetricsFile(work / "metrics.csv", state.step), ReporterCallback(reporter)]
    result = train_loop(model, optimizer, train_set, valid_set, tcfg, state, callbacks, ckpt_dir)
    if group.rank() != 0:
        return {"steps": state.step, "rank": group.rank()}

    out = Path(ctx.out_dir)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    num_layers = len(model.layers)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, num_layers), indent=2))
    best = ckpt_dir / f"step-{state.best_step:06d}" if state.best_step else None
    if best is not None and best.is_dir():
        shutil.copy(best / "adapters.safetensors", out / "best_adapters.safetensors")
    shutil.copy(work / "metrics.csv", out / "metrics.csv")
    summary = {
        "steps": state.step,
        "total_steps": state.total_steps,
        "epochs_seen": state.epoch + state.batch_in_epoch / max(n_batches, 1),
        "batch_size": batch,
        "grad_accumulation": accum,
        "memory_adjustment": memory_note,
        "train_examples": len(train_set),
        "skipped_too_long": skipped_train + skipped_valid,
        "valid_examples": len(valid_set),
        "trained_tokens": state.trained_tokens,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "tokens_per_s": round(result.tokens_per_s, 2),
        "peak_gb": round(result.peak_gb, 3),
        "resumed_from_step": None if resume_from is None else int(resume_from.name.split("-")[1]),
        "blas": blas_status(),
        "blas_core": blas_core(),
        "device": str(mx.default_device()),
        "processes": group.size(),
        **compute,
    }
    (out / "training_state.json").write_text(json.dumps(asdict(state) | {"summary": summary}, indent=2))
    reporter.table(
        "train-summary", [{"metric": k, "value": str(v)} for k, v in summary.items()], "Training run summary"
    )
    return summary


class ReporterCallback:
    """Turns training reports into progress bars (terminal) and progress artifacts (Prefect UI)."""

    def __init__(self, reporter: Any) -> None:
        self.reporter = reporter
        self.rows: list[dict[str, Any]] = []

    def on_train_report(self, r: TrainReport) -> None:
        self.reporter.progress(
            f"train: step {r.step}/{r.total_steps} loss {r.loss:.3f} {r.tokens_per_s:.0f} tok/s "
            f"rss {r.rss_gb:.2f} GB peak {r.peak_gb:.2f} GB",
            r.step / max(r.total_steps, 1),
        )

    def on_val_report(self, r: ValReport) -> None:
        self.rows.append({"step": r.step, "val_loss": round(r.loss, 4), "best": round(r.best_loss, 4)})
        self.reporter.log(f"train: step {r.step} validation loss {r.loss:.4f} (best {r.best_loss:.4f})")

    def on_checkpoint(self, path: Path, state: TrainState) -> None:
        self.reporter.log(f"train: checkpoint {path.name}")

