"""The validate stage's report: one row per answered question, the metric table, and answers.md.

The sealed test set comes first (it is the figure to report), then the dev set (the one choices are made on).
Every share is shown with its 95% interval and n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from farense.accuracy import pct, unflat_rate
from farense.eval_questions import CATEGORIES, HeldOutQuestion

SETS = (("test", "test_", "Sealed test set"), ("dev", "", "Dev set"))
RATES = ("fact_accuracy", "indirect_accuracy", "wrong_declines", "live_declined", "off_topic_redirected",
         "decline_precision", "overall_accuracy")  # fmt: skip
COUNTS = ("contradictions",)
MEASURES = ("val_loss", "perplexity", "qa_f1", "qa_exact", "answer_tokens", "answers_cut", "generation_tokens_per_s")


def answer_rows(sets: dict[str, list[HeldOutQuestion]], answers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per question: its set, base and tuned answers, verdicts and why. `answers[model]` lists the test
    set's answers first, then the dev set's (the order the validate stage asks them in)."""
    ordered = [("test", q) for q in sets["test"]] + [("dev", q) for q in sets["dev"]]
    return [
        {
            "set": name,
            "id": q.id,
            "category": q.category,
            "wording": q.wording,
            "question": q.question,
            "reference": q.reference,
            **{f"{m}_{k}": answers[m][j][k] for m in ("base", "tuned") for k in ("answer", "passed", "why")},
            "base_f1": round(answers["base"][j]["f1"], 4),
            "tuned_f1": round(answers["tuned"][j]["f1"], 4),
            "base_tokens": answers["base"][j]["tokens"],
            "tuned_tokens": answers["tuned"][j]["tokens"],
        }
        for j, (name, q) in enumerate(ordered)
    ]


def metric_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of {"metric", "base", "tuned"}: each set's rates as "84% [73-91%] (n=57)", counts, then the losses."""
    rows: list[dict[str, Any]] = []
    for _, prefix, label in SETS:
        for k in RATES:
            if any(unflat_rate(results[m], prefix + k) for m in results):
                rows.append({"metric": f"{label}: {k}", **{m: pct(unflat_rate(results[m], prefix + k)) for m in results}})
        for k in COUNTS:
            if any(results[m].get(prefix + k) is not None for m in results):
                rows.append({"metric": f"{label}: {k}", **{m: results[m].get(prefix + k) for m in results}})
        for c in CATEGORIES:
            per = {m: results[m].get(prefix + "per_category", {}).get(c) for m in results}
            if any(per.values()):
                rows.append({"metric": f"{label}: accuracy {c}", **{m: pct(per[m]) for m in results}})
    for k in MEASURES:
        if any(results[m].get(k) is not None for m in results):
            rows.append({"metric": k, **{m: None if results[m].get(k) is None else round(results[m][k], 4)
                                         for m in results}})  # fmt: skip
    return rows


def _cell(text: Any) -> str:
    return "n/a" if text is None else str(text).replace("|", "\\|").replace("\n", "<br>")


def answers_markdown(rows: Sequence[dict[str, Any]], results: dict[str, dict[str, Any]]) -> str:
    def mark(passed: bool) -> str:
        return "pass" if passed else "**fail**"

    lines = [
        "# Validation: base vs tuned",
        "",
        "The sealed test set is the figure to report; the dev set is the one every choice is made on.",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        *(f"| {r['metric']} | {_cell(r['base'])} | {_cell(r['tuned'])} |" for r in metric_rows(results)),
        "",
    ]
    for name, _, label in SETS:
        chosen = [r for r in rows if r["set"] == name]
        if not chosen:
            continue
        lines += [
            f"## {label} ({len(chosen)} questions)",
            "",
            "| id | category | wording | question | tuned answer | tuned | why | base answer | base |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['id']} | {r['category']} | {r['wording']} | {_cell(r['question'])} | {_cell(r['tuned_answer'])} | "
            f"{mark(r['tuned_passed'])} | {_cell(r['tuned_why'])} | {_cell(r['base_answer'])} | {mark(r['base_passed'])} |"
            for r in chosen
        ]
        lines.append("")
    return "\n".join(lines)
