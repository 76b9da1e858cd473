"""Fact accuracy: does an answer state the club's facts right, and decline what it cannot know?

Each held-out question (one JSON object per line of `data/eval/questions.jsonl`) has a category and the key facts a
right answer must contain, as regular expressions matched case-insensitively:

    {"id": "stadium-2", "category": "fact", "question": "estádio?", "must": ["S[ãa]o Lu[íi]s"], "must_not": [],
     "reference": "O Farense joga em casa no Estádio de São Luís, em Faro."}

- fact: answered (not declined), every `must` pattern present, no `must_not` pattern, no year the facts lack.
- false_premise: the same, where `must` holds the correction (e.g. "n[ãa]o" and "1910") and `must_not` the
  agreement ("^\\W*sim").
- live: information the bot cannot have (tickets, next match, current coach): it must decline.
- off_topic: not about the club: it must decline or redirect to the club.

Questions written in the older `{"question", "reference"}` form load as category "fact" with no key facts; they
count for token F1 only, not for fact accuracy. Pure Python (no MLX): the scorer is tested on hand-made answers.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farense.errors import DataError

Category = Literal["fact", "false_premise", "live", "off_topic"]
CATEGORIES: tuple[Category, ...] = ("fact", "false_premise", "live", "off_topic")
MUST_DECLINE: frozenset[str] = frozenset({"live", "off_topic"})

# How this bot says it cannot answer (the training data's decline and redirect sentences and their variants).
DECLINE = re.compile(
    r"n[ãa]o tenho (ess[ae]|est[ae]|a |o |os |as |um |uma |informa|dados|contact|registo|recomenda|valores|n[úu]mero)"
    r"|canais oficiais|fontes oficiais|n[ãa]o fa[çc]o previs|n[ãa]o dou conselhos|n[ãa]o comento"
    r"|respondo (apenas |s[óo] )?a perguntas sobre o (sporting clube )?(clube|farense)|n[ãa]o sei responder",
    re.IGNORECASE,
)
# The years the club's facts mention; an answer to a fact question stating any other year invents a fact.
KNOWN_YEARS = frozenset({"1910", "1990", "1994", "1995", "1996"})
_YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")


class HeldOutQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    question: str = Field(min_length=1)
    reference: str = Field(min_length=1)
    category: Category = "fact"
    fact: str | None = Field(None, description="Which fact of data/README.md the question is about")
    must: tuple[str, ...] = Field((), description="Patterns a right answer contains, all of them")
    must_not: tuple[str, ...] = Field((), description="Patterns that contradict the facts")

    @field_validator("question", "reference")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("must", "must_not")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from None
        return v

    @property
    def scored(self) -> bool:
        """Counts for fact accuracy: it names key facts, or the right answer is a decline."""
        return bool(self.must) or self.category in MUST_DECLINE


def numbered_jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def load_questions(path: Path, limit: int = -1) -> list[HeldOutQuestion]:
    """Held-out questions, one JSON object per line; a bad line is an error naming the file, line and field."""
    questions: list[HeldOutQuestion] = []
    seen: dict[str, int] = {}
    for n, row in numbered_jsonl_objects(path):
        row.setdefault("id", str(len(questions) + 1))
        try:
            q = HeldOutQuestion.model_validate(row)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<line>"
            raise DataError(f"{path}:{n}: field '{field}': {first['msg']}") from None
        if q.id in seen:
            raise DataError(f"{path}:{n}: id '{q.id}' is already used on line {seen[q.id]}")
        seen[q.id] = n
        questions.append(q)
    return questions[:limit] if limit > 0 else questions


def is_decline(answer: str) -> bool:
    return DECLINE.search(answer) is not None


@dataclass(frozen=True)
class Verdict:
    passed: bool
    declined: bool
    why: str


def score_answer(q: HeldOutQuestion, answer: str) -> Verdict:
    """Whether `answer` is right for `q`, and why not when it is not."""
    declined = is_decline(answer)
    if q.category in MUST_DECLINE:
        if not declined:
            return Verdict(False, False, "should decline (it cannot know this) but answered")
        bad = [p for p in q.must_not if re.search(p, answer, re.IGNORECASE)]
        return Verdict(not bad, True, f"declined but states {bad}" if bad else "declined, as it should")
    if not q.must:
        return Verdict(False, declined, "no key facts listed: not scored")
    if declined:
        return Verdict(False, True, "declined a question the facts answer")
    missing = [p for p in q.must if not re.search(p, answer, re.IGNORECASE)]
    wrong = [p for p in q.must_not if re.search(p, answer, re.IGNORECASE)]
    years = sorted(set(_YEAR.findall(answer)) - KNOWN_YEARS)
    reasons = (
        [f"missing {', '.join(missing)}"] * bool(missing)
        + [f"contradicts: matches {', '.join(wrong)}"] * bool(wrong)
        + [f"states a year the facts lack: {', '.join(years)}"] * bool(years)
    )
    return Verdict(not reasons, False, "; ".join(reasons) or "every key fact, nothing contradicting")


def fact_summary(questions: Sequence[HeldOutQuestion], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Fact accuracy (fact and false-premise questions), decline precision and recall, and per-category scores."""
    pairs = [(q, v) for q, v in zip(questions, verdicts) if q.scored]
    if not pairs:
        return {"fact_accuracy": None, "scored_questions": 0}
    per: dict[str, list[bool]] = defaultdict(list)
    for q, v in pairs:
        per[q.category].append(v.passed)
    facts = [v for q, v in pairs if q.category in ("fact", "false_premise")]
    must_decline = [v for q, v in pairs if q.category in MUST_DECLINE]
    declined = [(q, v) for q, v in pairs if v.declined]
    live = [v for q, v in pairs if q.category == "live"]

    def share(xs: Sequence[bool]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "fact_accuracy": share([v.passed for v in facts]),
        "fact_questions": len(facts),
        "facts_declined": sum(v.declined for v in facts),
        "live_decline_rate": share([v.declined for v in live]),
        "live_questions": len(live),
        "decline_precision": share([q.category in MUST_DECLINE for q, _ in declined]),
        "decline_recall": share([v.declined for v in must_decline]),
        "overall_accuracy": share([v.passed for _, v in pairs]),
        "scored_questions": len(pairs),
        "per_category": {c: {"n": len(per[c]), "accuracy": share(per[c])} for c in CATEGORIES if per[c]},
        "per_fact": {
            fact: share([v.passed for q, v in pairs if q.fact == fact])
            for fact in sorted(Counter(q.fact for q, _ in pairs if q.fact))
        },
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def headline(r: dict[str, Any]) -> str:
    """One line of what matters: fact accuracy, declines, then loss and F1."""
    parts = [f"val loss {r['val_loss']:.4f}"]
    if r.get("fact_accuracy") is not None:
        parts = [
            f"fact accuracy {_pct(r['fact_accuracy'])} ({r['fact_questions']} questions, {r['facts_declined']} declined)",
            f"live-information declines {_pct(r.get('live_decline_rate'))}",
            f"decline precision {_pct(r.get('decline_precision'))}",
        ] + parts
    if r.get("qa_f1") is not None:
        parts.append(f"Q&A F1 {r['qa_f1']:.3f}")
    return ", ".join(parts)
