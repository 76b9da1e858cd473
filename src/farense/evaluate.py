"""Validation stage: is the tuned adapter better than the base model, measured on data it did not train on.

Two measures, each for base and tuned: the loss (and perplexity) on the validation split, computed exactly as the
trainer computes it (and taken from the trainer's own validations, at step 0 and at the adapter's step, when they
are that same measurement: two passes over the split saved, about 50 s on 2 CPU cores), and greedy answers to
the held-out questions scored for fact accuracy and declines (farense.fact_scoring) and by token F1. The adapter
evaluated is copied into this stage's folder and loaded with mlx-lm's own adapter loader, so what is measured is what
`mlx_lm.generate --adapter-path` and the export stage will serve.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from farense.checkpoint import STATE
from farense.compute import apply_compute_path, select_compute_path
from farense.config import FarenseConfig
from farense.errors import FarenseError
from farense.accuracy import fact_summary, flat_rates, headline
from farense.eval_questions import HeldOutQuestion, load_questions
from farense.fact_scoring import SCORER_VERSION, Verdict, score_answer
from farense.jsonl import read_jsonl
from farense.prompting import chat_prompt
from farense.store import sha256_file
from farense.text import normalize_words
from farense.train import drop_unlearnable, read_metrics, tokenize_rows
from farense.train import evaluate as trainer_evaluate
from farense.validation_report import answer_rows, answers_markdown, metric_rows

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"
ANSWERS_MD = "answers.md"



# ---------------------------------------------------------------- scoring


def token_f1(prediction: str, reference: str) -> dict[str, float]:
    """SQuAD-style word overlap of a prediction with a reference: precision, recall, F1 and exact match."""
    pred, ref = normalize_words(prediction), normalize_words(reference)
    exact = float(pred == ref)
    if not pred or not ref:
        same = float(pred == ref)
        return {"f1": same, "precision": same, "recall": same, "exact": exact}
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact": exact}
    precision, recall = common / len(pred), common / len(ref)
    return {"f1": 2 * precision * recall / (precision + recall), "precision": precision, "recall": recall,
            "exact": exact}  # fmt: skip


# ---------------------------------------------------------------- inputs


def most_common_system_prompt(rows: Sequence[dict[str, Any]]) -> str | None:
    """The system message the training data uses most, so questions are asked the way the model was taught."""
    counts = Counter(
        m["content"]
        for r in rows
        for m in r.get("messages", [])[:1]
        if isinstance(m, dict) and m.get("role") == "system" and isinstance(m.get("content"), str)
    )
    return counts.most_common(1)[0][0] if counts else None


# ---------------------------------------------------------------- models


def load_base(model_dir: Path, compute_path: str = "auto") -> tuple[nn.Module, Any, dict[str, Any]]:
    """The 4-bit base with the compute path applied (dense matmuls on CPU, where quantized ones are slow)."""
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir))
    path = select_compute_path(compute_path)
    info = apply_compute_path(model, path)
    model.eval()
    return model, tokenizer, {"compute_path": path, **info}


def attach_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Add the adapter with mlx-lm's loader (the code path of `--adapter-path`)."""
    from mlx_lm.tuner.utils import load_adapters

    model = load_adapters(model, str(adapter_dir))
    model.eval()
    mx.eval(model.parameters())
    return model


def select_adapter(train_dir: Path, dest: Path, which: str) -> dict[str, Any]:
    """Copy the trained adapter to `dest` in mlx-lm's layout; `which` is "best" (lowest validation loss) or
    "final". "best" falls back to the final adapter when training never validated."""
    best = train_dir / "best_adapters.safetensors"
    source = best if which == "best" and best.is_file() else train_dir / ADAPTER_FILE
    if not source.is_file():
        raise FarenseError(f"{train_dir}: no {source.name}; the train stage output is incomplete, rerun it")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest / ADAPTER_FILE)
    shutil.copyfile(train_dir / ADAPTER_CONFIG, dest / ADAPTER_CONFIG)
    return {"file": source.name, "sha256": sha256_file(dest / ADAPTER_FILE), "bytes": (dest / ADAPTER_FILE).stat().st_size}


# ---------------------------------------------------------------- measures


def validation_loss(
    model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], cfg: FarenseConfig,
    measured: tuple[float, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Token-weighted loss over the validation split, with the trainer's tokenization, masking and truncation.
    `measured` is (loss, where) when the train stage already computed this very loss (`losses_from_training`)."""
    examples, skipped = drop_unlearnable(
        tokenize_rows(rows, tokenizer, cfg.train.mask_prompt), cfg.train.max_seq_length
    )
    start = time.perf_counter()
    if measured is None:
        loss = trainer_evaluate(model, examples, cfg.train.batch_size, cfg.train.max_seq_length, cfg.eval.max_batches)
        source = "validate stage"
    else:
        loss, source = measured
    batches = math.ceil(len(examples) / cfg.train.batch_size)
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
        "examples": len(examples),
        "batches": min(batches, cfg.eval.max_batches) if cfg.eval.max_batches > 0 else batches,
        "skipped_too_long": skipped,
        "seconds": round(time.perf_counter() - start, 3),
        "measured_by": source,
    }


def losses_from_training(train_dir: Path, cfg: FarenseConfig, adapter_file: str) -> dict[str, tuple[float, str]]:
    """The validation losses the train stage already measured that are the ones this stage would measure: the
    base model's (its step-0 validation) and the evaluated adapter's (the validation at that adapter's step), as
    {"base" | "tuned": (loss, where)}. The same split, batches, truncation and masking (the trainer's `evaluate`);
    only the summation order differs when training ran as several processes (about 1e-7 relative). Empty when the
    validation batches differ (`train.max_eval_batches` against `eval.max_batches`) or the run did not validate
    there; each missing loss is then computed here (a pass over the split: about 25 s on 2 CPU cores)."""
    metrics, state_file = train_dir / "metrics.csv", train_dir / STATE
    if cfg.train.max_eval_batches != cfg.eval.max_batches or not metrics.is_file() or not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    step = state.get("best_step") if adapter_file == "best_adapters.safetensors" else state.get("step")
    measured = {int(r["step"]): r["loss"] for r in read_metrics(metrics) if r["kind"] == "valid"}
    found = {"base": 0, "tuned": step}
    return {name: (measured[s], f"train stage, step {s}") for name, s in found.items() if s in measured}


@dataclass
class Answer:
    text: str
    tokens: int
    prompt_tokens: int
    seconds: float
    finish_reason: str | None


def generate_answer(model: nn.Module, tokenizer: Any, prompt: list[int], max_tokens: int) -> Answer:
    """Greedy decoding (mlx-lm's default sampler is argmax), stopping at the end-of-turn token or max_tokens."""
    from mlx_lm.generate import stream_generate

    start = time.perf_counter()
    text, last = [], None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text.append(response.text)
        last = response
    seconds = time.perf_counter() - start
    if last is None:
        return Answer("", 0, len(prompt), seconds, None)
    return Answer("".join(text).strip(), last.generation_tokens, last.prompt_tokens, seconds, last.finish_reason)


def answer_batch(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_tokens: int,
                 batch_size: int) -> tuple[list[Answer], float]:  # fmt: skip
    """Greedy answers to many prompts, `batch_size` decoded together (decoding on a CPU is bound by reading the
    weights, so a batch of 16 costs little more per step than one). Returns the answers and the seconds taken."""
    from mlx_lm.generate import batch_generate

    if batch_size <= 1:
        answers = [generate_answer(model, tokenizer, p, max_tokens) for p in prompts]
        return answers, sum(a.seconds for a in answers)
    start = time.perf_counter()
    answers: list[Answer] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i : i + batch_size]]
        r = batch_generate(model, tokenizer, chunk, max_tokens=max_tokens, return_token_ids=True,
                           completion_batch_size=batch_size, prefill_batch_size=batch_size)  # fmt: skip
        for p, text, ids in zip(chunk, r.texts, r.token_ids or [[]] * len(chunk)):
            reason = "length" if len(ids) >= max_tokens else "stop"
            answers.append(Answer(text.strip(), len(ids), len(p), 0.0, reason))
    return answers, time.perf_counter() - start


def answer_questions(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[HeldOutQuestion],
    system_prompt: str | None,
    max_tokens: int,
    batch_size: int = 16,
) -> tuple[list[dict[str, Any]], float]:
    """Each question answered greedily and scored: token F1 against the reference, the fact verdict."""
    prompts = [chat_prompt(tokenizer, q.question, system_prompt) for q in questions]
    answers, seconds = answer_batch(model, tokenizer, prompts, max_tokens, batch_size)
    scored = []
    for q, a in zip(questions, answers):
        v = score_answer(q, a.text)
        cut = a.finish_reason == "length"  # stopped by max_tokens, not by the model
        why = v.why + (f" (answer cut at {max_tokens} tokens)" if cut and not v.passed else "")
        scored.append({"answer": a.text, **token_f1(a.text, q.reference), "tokens": a.tokens, "cut": cut,
                       "passed": v.passed, "declined": v.declined, "contradiction": v.contradiction,
                       "why": why})  # fmt: skip
    return scored, seconds


def qa_summary(questions: Sequence[HeldOutQuestion], scored: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    n = len(scored)
    if n == 0:
        return {"qa_f1": None, "qa_recall": None, "qa_exact": None, "answer_tokens": None, "fact_accuracy": None}
    mean = lambda k: sum(s[k] for s in scored) / n  # noqa: E731
    verdicts = [Verdict(s["passed"], s["declined"], s["why"], s["contradiction"]) for s in scored]
    tokens = sum(s["tokens"] for s in scored)
    return {
        "qa_f1": mean("f1"),
        "qa_precision": mean("precision"),
        "qa_recall": mean("recall"),
        "qa_exact": mean("exact"),
        "answer_tokens": mean("tokens"),
        "answers_cut": sum(bool(s.get("cut")) for s in scored),  # stopped by eval.max_tokens, not by the model
        "answer_seconds": seconds / n,
        "generation_tokens_per_s": tokens / max(seconds, 1e-9),
        **flat_rates(fact_summary(questions, verdicts)),
    }


# ---------------------------------------------------------------- the stage


def dev_questions(cfg: FarenseConfig) -> list[HeldOutQuestion]:
    """The dev questions: what every choice is made on (recipes, checkpoints, the publish gate)."""
    path = cfg.data.dev_questions
    return load_questions(path, cfg.eval.max_questions) if path.is_file() else []


def sealed_test_questions(cfg: FarenseConfig) -> list[HeldOutQuestion]:
    """The sealed test set, read only to be answered and reported (tests/test_sealed_test_set.py keeps it so)."""
    path = cfg.data.test_questions
    return load_questions(path) if path.is_file() else []


def prefixed(prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in summary.items()}


def validate_stage(cfg: FarenseConfig, ctx: Any) -> dict[str, Any]:
    """Evaluate base and tuned on the validation split, the dev questions and the sealed test set; write metrics
    (dev figures under their names, the test set's under test_*) and every answer."""
    data_dir, model_dir, train_dir = (Path(ctx.upstream[s]) for s in ("data", "model", "train"))
    out, reporter = Path(ctx.out_dir), ctx.reporter
    adapter = select_adapter(train_dir, out / ADAPTER_DIR, cfg.eval.adapter)

    valid_rows = read_jsonl(data_dir / "valid.jsonl")
    system_prompt = most_common_system_prompt(read_jsonl(data_dir / "train.jsonl"))
    sets = {"dev": dev_questions(cfg), "test": sealed_test_questions(cfg)}
    for name, path in (("dev", cfg.data.dev_questions), ("test", cfg.data.test_questions)):
        if not sets[name]:
            reporter.log(f"validate: no {name} questions at {path}")
    questions = sets["test"] + sets["dev"]  # answered together: one set of batches for both
    n_test = len(sets["test"])

    model, tokenizer, compute = load_base(model_dir, cfg.train.compute_path)
    measured = losses_from_training(train_dir, cfg, adapter["file"])
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    for i, name in enumerate(("base", "tuned")):
        if name == "tuned":
            model = attach_adapter(model, out / ADAPTER_DIR)
        loss = validation_loss(model, tokenizer, valid_rows, cfg, measured.get(name))
        reporter.progress(f"validate: {name} validation loss {loss['val_loss']:.4f} ({loss['measured_by']})",
                          (2 * i + 1) / 4)  # fmt: skip
        answers[name], seconds = answer_questions(
            model, tokenizer, questions, system_prompt, cfg.eval.max_tokens, cfg.eval.batch_size
        )
        share = seconds / max(len(questions), 1)
        test, dev = answers[name][:n_test], answers[name][n_test:]
        results[name] = {**loss, **qa_summary(sets["dev"], dev, share * len(dev)),
                         **prefixed("test_", qa_summary(sets["test"], test, share * len(test)))}  # fmt: skip
        reporter.progress(f"validate: {name} answered {len(questions)} questions", (2 * i + 2) / 4)
        reporter.log(f"validate: {name}: sealed test: {headline(results[name], 'test_')}")
        reporter.log(f"validate: {name}: dev: {headline(results[name])}")
        if name == "tuned" and (cut := (results[name].get("answers_cut") or 0) + (results[name].get("test_answers_cut") or 0)):
            reporter.log(f"validate: {cut} tuned answers were cut at eval.max_tokens={cfg.eval.max_tokens}: they are "
                         "scored as cut; raise it to score whole answers")  # fmt: skip
    del model
    mx.clear_cache()

    rows = answer_rows(sets, answers)
    with open(out / ANSWERS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    markdown = answers_markdown(rows, results)
    (out / ANSWERS_MD).write_text(markdown, encoding="utf-8")

    base, tuned = results["base"], results["tuned"]
    metrics = {
        "base": base,
        "tuned": tuned,
        "delta": {
            "val_loss": tuned["val_loss"] - base["val_loss"],
            "qa_f1": None if base["qa_f1"] is None else tuned["qa_f1"] - base["qa_f1"],
            "fact_accuracy": None if base.get("fact_accuracy") is None else tuned["fact_accuracy"] - base["fact_accuracy"],
        },
        "tuned_beats_base": tuned["val_loss"] < base["val_loss"],
        "adapter": adapter,
        "system_prompt": system_prompt,
        "questions": len(sets["dev"]),
        "test_questions": n_test,
        "max_tokens": cfg.eval.max_tokens,
        "scorer": SCORER_VERSION,
        # What the numbers were measured on: metrics of two runs compare only when these match.
        "valid_sha256": sha256_file(data_dir / "valid.jsonl"),
        "questions_sha256": sha256_file(cfg.data.dev_questions) if sets["dev"] else None,
        "test_questions_sha256": sha256_file(cfg.data.test_questions) if n_test else None,
        "compute": compute,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))

    reporter.markdown("validate-answers", markdown, "Sealed test and dev questions: base vs tuned answers, pass/fail and why")
    reporter.table("validate-metrics", metric_rows(results), "Fact accuracy (95% interval), declines, loss and Q&A F1")
    return {
        "base_val_loss": base["val_loss"],
        "tuned_val_loss": tuned["val_loss"],
        "base_perplexity": base["perplexity"],
        "tuned_perplexity": tuned["perplexity"],
        "base_qa_f1": base["qa_f1"],
        "tuned_qa_f1": tuned["qa_f1"],
        "base_test_fact_accuracy": base.get("test_fact_accuracy"),
        "tuned_test_fact_accuracy": tuned.get("test_fact_accuracy"),
        "base_fact_accuracy": base.get("fact_accuracy"),
        "tuned_fact_accuracy": tuned.get("fact_accuracy"),
        "tuned_live_declined": tuned.get("live_declined"),
        "tuned_wrong_declines": tuned.get("wrong_declines_k"),
        "tuned_beats_base": metrics["tuned_beats_base"],
        "questions": len(sets["dev"]),
        "test_questions": n_test,
        "answers_file": str(ANSWERS_MD),
        "adapter_file": adapter["file"],
        "compute_path": compute["compute_path"],
    }
