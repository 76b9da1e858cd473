"""Fact accuracy per checkpoint for training recipes, as JSON lines (a benchmark, not a test).

    python benchmarks/recipe_sweep.py --name lr1e-3 train.learning_rate=1e-3 train.epochs=2
    python benchmarks/recipe_sweep.py --config configs/cpu-quick.yaml --name quick --base

Builds (or finds) the data and model stages of the config, then trains the config with the given overrides through
the pipeline's own train stage, keeping a checkpoint every `train.save_every` steps, and answers the dev questions
(`data.dev_questions`, data/eval/dev.jsonl; never the sealed test set) with each checkpoint exactly as the validate
stage does (greedy, in batches, scored by src/farense/fact_scoring.py). One JSON line per checkpoint: step, epochs
seen, validation loss where the trainer measured one, fact accuracy (overall and indirect), wrong declines,
contradictions, live declines, off-topic redirects, and the training tokens/s. `--base` adds a line for the untuned
base. Every checkpoint's answers go to `--out/NAME/answers-step-N.jsonl`.

Choosing a recipe by the dev questions is what they are for; the figure to report is the validate stage's on the
sealed test set, which no sweep reads.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from benchmarks.scratch_train import train_stage_in_scratch  # noqa: E402
from farense.checkpoint import list_checkpoints, read_state  # noqa: E402
from farense.config import load_config, parse_override  # noqa: E402
from farense.evaluate import (  # noqa: E402
    answer_questions,
    attach_adapter,
    load_base,
    most_common_system_prompt,
    qa_summary,
)
from farense.eval_questions import load_questions  # noqa: E402
from farense.jsonl import read_jsonl  # noqa: E402
from farense.fact_scoring import SCORER_VERSION  # noqa: E402
from farense.stages import run_local  # noqa: E402
from farense.train import read_metrics  # noqa: E402


def emit(**row: object) -> None:
    row |= {"machine": platform.machine(), "device": str(mx.default_device()), "mlx": mx.__version__}
    print(json.dumps(row), flush=True)


def score(model_dir: Path, adapter_dir: Path | None, questions, system_prompt, cfg) -> tuple[dict, list[dict]]:  # noqa: ANN001
    model, tokenizer, _ = load_base(model_dir, cfg.train.compute_path)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    scored, seconds = answer_questions(model, tokenizer, questions, system_prompt, cfg.eval.max_tokens,
                                       cfg.eval.batch_size)  # fmt: skip
    summary = qa_summary(questions, scored, seconds)
    shares = ("fact_accuracy", "indirect_accuracy", "wrong_declines", "live_declined", "off_topic_redirected",
              "decline_precision", "overall_accuracy")  # fmt: skip
    row = {k: summary.get(k) for k in shares} | {"contradictions": summary.get("contradictions")}
    row |= {f"fact_accuracy_{p}": summary.get(f"fact_accuracy_{p}") for p in ("n", "low", "high")}
    return row | {"scorer": SCORER_VERSION, "answer_seconds": round(seconds, 2)}, scored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "farense.yaml")
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "sweeps")
    ap.add_argument("--base", action="store_true", help="also score the untuned base")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.learning_rate=1e-3")
    args = ap.parse_args()

    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_config(args.config, overrides | {"train.keep_checkpoints": 1000}, root=ROOT)
    stages = run_local(cfg, until="model")
    data_dir, model_dir = (Path(stages[s]["path"]) for s in ("data", "model"))
    questions = load_questions(cfg.data.dev_questions, cfg.eval.max_questions)
    system_prompt = most_common_system_prompt(read_jsonl(data_dir / "train.jsonl"))
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    common = {"name": args.name, "overrides": overrides, "questions": len(questions)}

    if args.base:
        summary, _ = score(model_dir, None, questions, system_prompt, cfg)
        emit(**common, step=0, epochs=0.0, **summary)

    with train_stage_in_scratch(cfg, data_dir, model_dir) as (train, ctx, train_seconds):
        val_loss = {int(r["step"]): r["loss"] for r in read_metrics(ctx.out_dir / "metrics.csv") if r["kind"] == "valid"}
        n_per_epoch = train["steps"] / max(train["epochs_seen"], 1e-9)
        emit(**common, measure="train", seconds=round(train_seconds, 1), steps=train["steps"],
             tokens_per_s=train["tokens_per_s"], trained_tokens=train["trained_tokens"], best_step=train["best_step"])  # fmt: skip
        adapter = ctx.work_dir.parent / "adapter"
        adapter.mkdir()
        shutil.copyfile(ctx.out_dir / "adapter_config.json", adapter / "adapter_config.json")
        for ckpt in reversed(list_checkpoints(ctx.work_dir / "checkpoints")):  # oldest first
            step = read_state(ckpt).step
            shutil.copyfile(ckpt / "adapters.safetensors", adapter / "adapters.safetensors")
            summary, scored = score(model_dir, adapter, questions, system_prompt, cfg)
            with open(out / f"answers-step-{step:06d}.jsonl", "w", encoding="utf-8") as f:
                for q, s in zip(questions, scored):
                    f.write(json.dumps({"id": q.id, "category": q.category, "question": q.question, **s},
                                       ensure_ascii=False) + "\n")  # fmt: skip
            emit(**common, step=step, epochs=round(step / n_per_epoch, 2), val_loss=val_loss.get(step), **summary)


if __name__ == "__main__":
    main()
