"""Benchmark stage: LoRA on the dequantized base vs QLoRA on the 4-bit base, and base vs tuned, measured here.

Training speed and peak memory come from short runs of the real training loop (same batches, same seed, one
throwaway state per mode); generation speed from mlx-lm's own generation loop; sizes from bytes on disk; quality
from the validation stage. Every number in `comparison_results.json` and in the pictures is from this run.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from farense.blas import blas_core, blas_status
from farense.checkpoint import TrainState
from farense.compute import apply_compute_path, select_compute_path
from farense.config import BenchmarkConfig, FarenseConfig
from farense.evaluate import ADAPTER_DIR, ADAPTER_FILE, METRICS_FILE, attach_adapter, load_base
from farense.evaluate import most_common_system_prompt
from farense.eval_questions import load_questions
from farense.jsonl import read_jsonl
from farense.prompting import chat_prompt
from farense.train import (
    TrainReport,
    build_optimizer,
    drop_unlearnable,
    lora_parameters,
    read_metrics,
    tokenize_rows,
    train_loop,
)

RESULTS_FILE = "comparison_results.json"
LOSS_PNG = "loss_curves.png"
COMPARISON_PNG = "comparison.png"

# Benchmark mode -> compute path of farense.compute. "lora" is the LoRA baseline on a full-precision copy of the
# base; the two "qlora" modes keep the 4-bit weights (dequantized per matmul, or MLX's quantized matmul).
TRAIN_MODES = {"lora": "dequantized", "qlora-recompute": "recompute", "qlora-native": "quantized"}


# ---------------------------------------------------------------- training throughput


class _StepTimes:
    """Collects the per-step reports of a benchmark run (log_every=1)."""

    def __init__(self) -> None:
        self.reports: list[TrainReport] = []

    def on_train_report(self, report: TrainReport) -> None:
        self.reports.append(report)

    def on_val_report(self, report: Any) -> None:
        pass

    def on_checkpoint(self, path: Path, state: Any) -> None:
        pass


def training_run_shape(b: BenchmarkConfig, mode: str, on_cpu: bool) -> tuple[int, int, int, int]:
    """(timed steps, warm-up steps, batch size, max sequence length) of one training mode's measurement.

    The native quantized matmul is so slow on CPU that its run there is one short example per step, and its one
    timed step includes the graph compilation the other modes warm up for. On a GPU it runs like the others: its
    first step there compiles CUDA kernels (timed, that step made the mode read 0.5 tokens/s on an H200)."""
    if mode == "qlora-native" and on_cpu:
        return b.native_train_steps, 0, 1, b.native_max_seq_length
    return b.train_steps, b.warmup_steps, b.batch_size, b.max_seq_length


def measure_training(cfg: FarenseConfig, model_dir: Path, train_set: list, mode: str) -> dict[str, Any]:
    """Tokens/s and peak memory of `warmup + steps` optimizer steps of the real loop; only the steps after the
    warm-up (graph compilation, first allocations) are timed."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    on_cpu = mx.default_device() == mx.cpu
    steps, warmup, batch, seq = training_run_shape(cfg.benchmark, mode, on_cpu)
    total = warmup + steps
    tcfg = cfg.train.model_copy(update={
        "compute_path": TRAIN_MODES[mode], "batch_size": batch, "grad_accumulation": 1,
        "max_seq_length": seq, "max_steps": total, "log_every": 1, "eval_every": total + 1,
        "save_every": total + 1, "warmup_steps": 0, "grad_checkpoint": False,
    })  # fmt: skip
    model, _ = load(str(model_dir))
    model.freeze()
    # float16/bfloat16 arithmetic is emulated on CPU (10-45x slower than float32): there every mode computes in
    # float32, as the trainer's dequantized path does, so the modes differ only in how they hold the base weights.
    compute = apply_compute_path(model, TRAIN_MODES[mode], dtype=mx.float32 if on_cpu else None,
                                 fast_math=tcfg.fast_math)
    if on_cpu:
        model.apply(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)
        compute["dtype"] = "float32"
    # Seeded after the conversion (which may draw random numbers): every mode starts from the same adapter.
    mx.random.seed(tcfg.seed)
    linear_to_lora_layers(model, tcfg.lora_layers, lora_parameters(tcfg))
    mx.eval(model.parameters())
    optimizer = build_optimizer(tcfg, total)
    optimizer.init(model.trainable_parameters())
    state = TrainState(total_steps=total, batch_size=tcfg.batch_size, grad_accumulation=1)
    times = _StepTimes()
    result = train_loop(model, optimizer, train_set, [], tcfg, state, [times])
    reps = times.reports
    t0, tok0 = (reps[warmup - 1].seconds, reps[warmup - 1].trained_tokens) if warmup else (0.0, 0)
    timed_tokens = reps[-1].trained_tokens - tok0
    timed_seconds = reps[-1].seconds - t0
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    del model, optimizer
    _release()
    return {
        "mode": mode,
        "compute_path": compute["path"],
        "weights_dtype": compute.get("dtype"),
        "weight_bytes": compute.get("base_weight_bytes"),
        "trainable_parameters": int(trainable),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "batch_size": tcfg.batch_size,
        "max_seq_length": tcfg.max_seq_length,
        "tokens": int(timed_tokens),
        "seconds": round(timed_seconds, 3),
        "tokens_per_s": round(timed_tokens / max(timed_seconds, 1e-9), 2),
        "seconds_per_step": round(timed_seconds / max(steps, 1), 3),
        "peak_gb": round(result.peak_gb, 4),
        "first_loss": round(reps[0].loss, 5),  # same adapter, same batch: equal across modes up to rounding
        "final_loss": round(reps[-1].loss, 5),
    }


# ---------------------------------------------------------------- generation throughput


def _no_eos(eos_ids: set[int]):  # noqa: ANN202 - an mlx-lm logits processor
    """Forbid end-of-sequence so every run generates exactly the requested number of tokens."""
    mask: dict[int, mx.array] = {}

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        n = logits.shape[-1]
        if n not in mask:
            mask[n] = mx.array([float("-inf") if i in eos_ids else 0.0 for i in range(n)], dtype=logits.dtype)
        return logits + mask[n]

    return processor


def measure_generation(model: nn.Module, tokenizer: Any, prompt: list[int], tokens: int) -> dict[str, Any]:
    """Prompt and generation tokens/s and peak memory, as mlx-lm's stream_generate reports them, after a warm-up."""
    from mlx_lm.generate import stream_generate

    processors = [_no_eos(set(tokenizer.eos_token_ids))]
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=2, logits_processors=processors):
        pass
    mx.reset_peak_memory()
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=tokens, logits_processors=processors):
        pass
    assert last is not None
    return {
        "prompt_tokens": last.prompt_tokens,
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tokens": last.generation_tokens,
        "generation_tps": round(last.generation_tps, 2),
        "peak_gb": round(last.peak_memory, 4),
    }


def generation_rows(cfg: FarenseConfig, model_dir: Path, adapter_dir: Path, prompt_of: Any) -> list[dict[str, Any]]:
    """Base and tuned (adapter unfused, as `--adapter-path` serves it) on each benchmarked compute path."""
    paths = [select_compute_path(cfg.train.compute_path)]
    if cfg.benchmark.native_generation and "quantized" not in paths:
        paths.append("quantized")
    rows = []
    for path in paths:
        model, tokenizer, _ = load_base(model_dir, path)
        prompt = prompt_of(tokenizer)
        dtype = _dense_dtype_name(model)
        for name in ("base", "tuned"):
            if name == "tuned":
                model = attach_adapter(model, adapter_dir)
            label = name if path == paths[0] else f"{name} ({path}, {dtype})"
            rows.append({"label": label, "model": name, "compute_path": path, "dtype": dtype,
                         **measure_generation(model, tokenizer, prompt, cfg.benchmark.generation_tokens)})  # fmt: skip
        del model
        _release()
    return rows


# ---------------------------------------------------------------- sizes


def _dense_dtype_name(model: nn.Module) -> str:
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).removeprefix("mlx.core.")
    return "?"


def folder_bytes(path: Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}") if f.is_file())


def dense_copy_bytes(model_dir: Path, scratch: Path) -> tuple[int, str]:
    """Bytes of the base saved dequantized (what LoRA without quantization stores and loads), measured by saving
    it with mlx-lm into scratch space and deleting it again."""
    from mlx_lm.utils import dequantize_model, load, save_model

    model, _ = load(str(model_dir))
    model = dequantize_model(model)
    dtype = next(str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters()))
    dest = scratch / "dense-base"
    shutil.rmtree(dest, ignore_errors=True)
    save_model(dest, model, donate_model=True)
    size = folder_bytes(dest, ".safetensors")
    shutil.rmtree(dest, ignore_errors=True)
    del model
    _release()
    return size, dtype


def _release() -> None:
    gc.collect()
    mx.clear_cache()


# ---------------------------------------------------------------- the stage


def benchmark_stage(cfg: FarenseConfig, ctx: Any) -> dict[str, Any]:
    """Measure LoRA vs QLoRA and base vs tuned; write comparison_results.json, a table and two PNGs."""
    from farense.plots import plot_comparison, plot_loss_curves  # matplotlib: only when the stage runs

    data_dir, model_dir, train_dir, valid_dir = (Path(ctx.upstream[s]) for s in ("data", "model", "train", "validate"))
    out, reporter = Path(ctx.out_dir), ctx.reporter
    scratch = Path(ctx.work_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    b = cfg.benchmark
    started = time.perf_counter()
    modes = [m for m in b.train_modes if m != "qlora-native" or b.native_train_steps > 0]
    total_parts = len(modes) + 2
    reporter.progress("benchmark: starting", 0.0)

    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    train_set, _ = drop_unlearnable(
        tokenize_rows(read_jsonl(data_dir / "train.jsonl"), tokenizer, cfg.train.mask_prompt), b.max_seq_length
    )

    training = []
    for i, mode in enumerate(modes):
        row = measure_training(cfg, model_dir, train_set, mode)
        training.append(row)
        reporter.progress(f"benchmark: {mode} {row['tokens_per_s']:.0f} tok/s", (i + 1) / total_parts)
        reporter.log(f"benchmark: training {mode}: {row['tokens_per_s']:.1f} tok/s, peak {row['peak_gb']:.3f} GB")

    system_prompt = most_common_system_prompt(read_jsonl(data_dir / "train.jsonl"))
    qpath = cfg.data.dev_questions
    questions = load_questions(qpath, 1) if qpath.is_file() else []
    question = questions[0].question if questions else _first_user_message(data_dir / "valid.jsonl")

    def prompt_of(tok: Any) -> list[int]:
        return chat_prompt(tok, question, system_prompt)

    generation = generation_rows(cfg, model_dir, valid_dir / ADAPTER_DIR, prompt_of)
    reporter.progress("benchmark: generation measured", (len(modes) + 1) / total_parts)

    disk = [
        {"label": "base 4-bit", "bytes": folder_bytes(model_dir, ".safetensors")},
        {"label": "adapter", "bytes": (valid_dir / ADAPTER_DIR / ADAPTER_FILE).stat().st_size},
    ]
    if b.measure_dense_size:
        size, dtype = dense_copy_bytes(model_dir, scratch)
        disk.insert(1, {"label": f"base dense ({dtype})", "bytes": size})
    reporter.progress("benchmark: sizes measured", 1.0)

    val = json.loads((valid_dir / METRICS_FILE).read_text())
    keep = ("val_loss", "perplexity", "qa_f1", "qa_recall", "qa_exact", "fact_accuracy", "fact_accuracy_n",
            "fact_accuracy_low", "fact_accuracy_high", "live_declined")  # the dev set's (the chart draws the interval)
    quality = {name: {k: val[name].get(k) for k in keep} for name in ("base", "tuned")}
    train_manifest = _manifest(train_dir)
    results = {
        "title": f"LoRA vs QLoRA, base vs tuned ({_model_name(model_dir)})",
        "training": training,
        "generation": generation,
        "disk": disk,
        "quality": quality,
        "questions": val.get("questions"),
        "pipeline_compute_path": train_manifest.get("summary", {}).get("compute_path"),
        "settings": {**b.model_dump(mode="json"), "prompt": question, "system_prompt": system_prompt},
        "environment": _environment(blas_status(), blas_core()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False))

    plot_loss_curves(read_metrics(train_dir / "metrics.csv"), out / LOSS_PNG)
    plot_comparison(results, out / COMPARISON_PNG)
    reporter.table("benchmark-comparison", table_rows(results), "LoRA vs QLoRA and base vs tuned, measured")
    reporter.image("benchmark-loss-curves", str(out.parent / ctx_key(out) / LOSS_PNG), "Train and validation loss")
    reporter.image("benchmark-comparison-chart", str(out.parent / ctx_key(out) / COMPARISON_PNG), "Comparison")
    by_mode = {r["mode"]: r for r in training}
    return {
        "training_tokens_per_s": {m: r["tokens_per_s"] for m, r in by_mode.items()},
        "training_peak_gb": {m: r["peak_gb"] for m, r in by_mode.items()},
        "generation_tps": {r["label"]: r["generation_tps"] for r in generation},
        "prompt_tps": {r["label"]: r["prompt_tps"] for r in generation},
        "disk_bytes": {d["label"]: d["bytes"] for d in disk},
        "tuned_val_loss": quality["tuned"]["val_loss"],
        "base_val_loss": quality["base"]["val_loss"],
        "files": [RESULTS_FILE, LOSS_PNG, COMPARISON_PNG],
    }


def ctx_key(tmp_out: Path) -> str:
    """The final folder name of a stage writing into `.tmp-<key>-<pid>-<ns>` (the store renames it on success),
    so artifact links point where the files will be, not at the temp folder."""
    name = tmp_out.name
    return name.split("-")[1] if name.startswith(".tmp-") else name


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for r in results["training"]:
        rows += [
            {"comparison": "training", "variant": r["mode"], "metric": "tokens/s", "value": r["tokens_per_s"]},
            {"comparison": "training", "variant": r["mode"], "metric": "peak GB", "value": r["peak_gb"]},
        ]
    for r in results["generation"]:
        rows += [
            {"comparison": "generation", "variant": r["label"], "metric": "prompt tokens/s", "value": r["prompt_tps"]},
            {"comparison": "generation", "variant": r["label"], "metric": "generation tokens/s",
             "value": r["generation_tps"]},
            {"comparison": "generation", "variant": r["label"], "metric": "peak GB", "value": r["peak_gb"]},
        ]  # fmt: skip
    for d in results["disk"]:
        rows.append({"comparison": "size on disk", "variant": d["label"], "metric": "MB", "value": round(d["bytes"] / 1e6, 3)})
    for name, q in results["quality"].items():
        for k in ("fact_accuracy", "val_loss", "perplexity", "qa_f1"):
            if q.get(k) is not None:
                rows.append({"comparison": "quality", "variant": name, "metric": k, "value": round(q[k], 4)})
    return rows


def _first_user_message(path: Path) -> str:
    for row in read_jsonl(path):
        for m in row.get("messages", []):
            if m.get("role") == "user":
                return m["content"]
        if "prompt" in row:
            return row["prompt"]
        if "text" in row:
            return row["text"][:200]
    return "Olá"


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _model_name(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return f"{cfg.get('model_type', 'model')}, {cfg.get('num_hidden_layers', '?')} layers"
    except (OSError, json.JSONDecodeError):
        return model_dir.name


def _environment(blas: str, blas_core: str | None) -> dict[str, Any]:
    versions = {}
    for pkg in ("mlx", "mlx-lm", "mlx-metal", "mlx-cpu", "mlx-cuda"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "blas": blas,
        "blas_core": blas_core,
        "versions": versions,
    }
