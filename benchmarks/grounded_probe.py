"""Grounded answers without retraining: a tuned adapter answers the dev questions with and without the club's facts in
its system prompt (a benchmark, not a test; dev only, never the sealed test set).

    python benchmarks/grounded_probe.py artifacts/validate/<key> [...]

One JSON line per validate artifact and prompt: dev fact accuracy, indirect, wrong declines, live declined,
off-topic redirected, overall accuracy, contradictions, and the answering seconds. The facts are data/facts.txt's,
joined on one line after the system prompt (not `data.facts`'s block: this probe predates it). Issue #34 lists grounded answers as an optional lever
"with the model trained to use them"; this probe measures the untrained half, which needs no training compute.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
from farense.config import FarenseConfig  # noqa: E402
from farense.evaluate import answer_questions, attach_adapter, dev_questions, load_base, qa_summary  # noqa: E402
from farense.grounding import read_facts  # noqa: E402

FACTS_FILE = ROOT / "data/facts.txt"
KEYS = ("fact_accuracy", "indirect_accuracy", "wrong_declines", "live_declined", "off_topic_redirected",
        "overall_accuracy", "contradictions")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("validate_dirs", type=Path, nargs="+", help="validate artifacts (their adapter/ and config)")
    args = ap.parse_args()
    facts = " ".join(read_facts(FACTS_FILE))
    for vdir in args.validate_dirs:
        cfg = FarenseConfig.model_validate_json((vdir / "farense_config.json").read_text(encoding="utf-8"))
        manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
        model_dir = vdir.parent.parent / "model" / manifest["inputs"]["model"]  # artifacts/<stage>/<key>
        questions = dev_questions(cfg)
        metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
        system_prompt = metrics["system_prompt"]
        model, tokenizer, _ = load_base(model_dir)
        model = attach_adapter(model, vdir / "adapter")
        for label, prompt in (("plain", system_prompt), ("facts", f"{system_prompt} Factos: {facts}")):
            scored, seconds = answer_questions(model, tokenizer, questions, prompt, cfg.eval.max_tokens,
                                               cfg.eval.batch_size)  # fmt: skip
            summary = qa_summary(questions, scored, seconds)
            print(json.dumps({"validate": vdir.name, "prompt": label, "seed": cfg.train.seed,
                              "data": str(cfg.data.path), **{k: summary.get(k) for k in KEYS},
                              "questions": len(questions), "seconds": round(seconds, 1),
                              "machine": platform.processor() or platform.machine()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
