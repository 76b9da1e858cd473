"""The two question sets, their schema, and the one near-copy rule between them and the training data.

- `data/eval/dev.jsonl` (config `data.dev_questions`): for every choice (recipes, sweeps, checkpoints, the publish
  gate).
- `data/eval/test.jsonl` (config `data.test_questions`): the sealed test set, written from the facts list of
  data/README.md only. The validate stage answers and reports it; nothing reads it to choose anything
  (`tests/test_sealed_test_set.py` enforces that).

One question a line:

    {"id": "t-stadium-04", "category": "fact", "facts": ["stadium"], "asks": ["stadium.name"],
     "wording": "indirect", "question": "Se eu for a Faro ver a equipa jogar, para que recinto devo ir?",
     "reference": "O Farense joga em casa no Estádio de São Luís, em Faro."}

`asks` names the parts of the facts a right answer states (farense.club_facts.PARTS); `claim` (false premises)
the patterns of the false claim an answer must not restate; `must` / `must_not` add question-specific patterns.
`wording` is "indirect" only when the question's word set has Jaccard <= 0.35 with every training question (a test
checks it against the training data).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from farense.errors import DataError
from farense.club_facts import FACTS, PARTS
from farense.jsonl import numbered_jsonl_objects
from farense.text import fold, normalize_words

Category = Literal["fact", "yes_no", "combined", "false_premise", "live", "off_topic"]
CATEGORIES: tuple[Category, ...] = ("fact", "yes_no", "combined", "false_premise", "live", "off_topic")
MUST_DECLINE: frozenset[str] = frozenset({"live", "off_topic"})
FACT_CATEGORIES: frozenset[str] = frozenset({"fact", "yes_no", "combined", "false_premise"})

# The near-copy rule: an eval question this close to a training question (or to a question of the other eval set)
# tests recall of that row, not understanding. Compared on content words: function words and the club's and
# player's names carry no content here ("Qual era a nacionalidade de Hassan Nader?" and "Quem é Hassan Nader?" differ).
NEAR_JACCARD = 0.6
NEAR_RATIO = 0.75
NEAR_RATIO_JACCARD = 0.5
NEAR_CONTAINED_WORDS = 4
FUNCTION_WORDS = frozenset(fold(w) for w in """
    que qual quais quem onde quando como quanto quanta quantos quantas porque porquê pq q e é era foi foram são ser
    esta está estava tem têm tinha há de do da dos das em no na nos nas num numa ao aos à às a o os as um uma para pra
    com sem se me te lhe vos mim ti eu tu você vocês ele ela eles elas isso isto aquilo esse essa este aquele aquela
    seu sua seus suas meu minha teu tua nosso nossa já ainda também mais muito não sim mas ou então pois diz dizer
    diga sabes sabe sabia podes pode poderia podia favor bem lá aí cá tá
    farense farenses sporting clube sc scf hassan nader""".split())
# At most this much word overlap with every training question makes a question "indirect".
INDIRECT_JACCARD = 0.35


def _compile(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


class HeldOutQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    question: str = Field(min_length=1)
    reference: str = Field(min_length=1)
    category: Category = "fact"
    facts: tuple[str, ...] = Field((), description="Which facts of data/README.md the question is about")
    asks: tuple[str, ...] = Field((), description="Parts of the facts a right answer states (club_facts.PARTS)")
    claim: tuple[str, ...] = Field((), description="False premises: patterns of the false claim")
    must: tuple[str, ...] = Field((), description="More patterns a right answer contains, all of them")
    must_not: tuple[str, ...] = Field((), description="More patterns that contradict the facts")
    wording: Literal["direct", "indirect"] = "direct"
    fact: str | None = Field(None, description="Older files: a free-text topic; `facts` is what scoring reads")

    @field_validator("question", "reference")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v

    @field_validator("claim", "must", "must_not")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _compile(v)

    @field_validator("facts", "asks")
    @classmethod
    def _known(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        known, what = (FACTS, "fact(s)") if info.field_name == "facts" else (PARTS, "part(s)")
        if bad := [x for x in v if x not in known]:
            raise ValueError(f"unknown {what} {bad}; known: {sorted(known)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "HeldOutQuestion":
        if self.category in MUST_DECLINE and (self.asks or self.must):
            raise ValueError(f"a {self.category} question must be declined: it lists no asks or must")
        if self.category in FACT_CATEGORIES - {"fact"} and not (self.asks or self.must):
            raise ValueError(f"a {self.category} question lists what a right answer states (asks or must)")
        if self.claim and self.category != "false_premise":
            raise ValueError("only false_premise questions have a claim")
        return self

    @property
    def scored(self) -> bool:
        """Counts for fact accuracy: it names what a right answer states, or the right answer is a decline. Older
        `{"question", "reference"}` lines count for token F1 only."""
        return bool(self.asks or self.must) or self.category in MUST_DECLINE


def load_questions(path: Path, limit: int = -1) -> list[HeldOutQuestion]:
    """Questions, one JSON object per line; a bad line is an error naming the file, line and field."""
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


# ---------------------------------------------------------------- near copies


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _wording(text: str) -> tuple[list[str], set[str]]:
    """A text's normalised words and its content words: what the near-copy rule compares."""
    words = normalize_words(text)
    return words, {w for w in words if w not in FUNCTION_WORDS}


def _near(q: tuple[list[str], set[str]], o: tuple[list[str], set[str]]) -> str | None:
    (qw, qc), (ow, oc) = q, o
    if not qw or not ow:
        return None
    if qc and qc == oc:
        return "the same content words"
    if (j := jaccard(qc, oc)) >= NEAR_JACCARD:
        return f"content-word Jaccard {j:.2f}"
    qs, os_ = " ".join(qw), " ".join(ow)
    if j >= NEAR_RATIO_JACCARD and (r := difflib.SequenceMatcher(None, qs, os_, autojunk=False).ratio()) >= NEAR_RATIO:
        return f"difflib ratio {r:.2f} with content-word Jaccard {j:.2f}"
    shorter, longer = (qs, os_) if len(qw) <= len(ow) else (os_, qs)
    if len(shorter.split()) >= NEAR_CONTAINED_WORDS and f" {shorter} " in f" {longer} ":
        return "contains the other word for word"
    return None


def near_copy(question: str, other: str) -> str | None:
    """Why `question` is a near copy of `other`, or None. Near copies: the same content words; content-word
    Jaccard >= 0.6; difflib ratio >= 0.75 on the folded text while sharing half the content words; or one contains
    the other whole (at least 4 words)."""
    return _near(_wording(question), _wording(other))


def near_copies(questions: Sequence[str], others: Sequence[str]) -> list[tuple[int, int, str]]:
    """(index in questions, index in others, why) for every near-copy pair; each text is normalised once."""
    other_wordings = [_wording(o) for o in others]
    found = []
    for i, q in enumerate(questions):
        qwording = _wording(q)
        for j, owording in enumerate(other_wordings):
            # Cheap bound first: pairs sharing no content word are near copies only by containing one another.
            if qwording[1] and owording[1] and not qwording[1] & owording[1] and len(owording[0]) < NEAR_CONTAINED_WORDS:
                continue
            if why := _near(qwording, owording):
                found.append((i, j, why))
    return found


def max_jaccard(question: str, others: Sequence[Sequence[str]]) -> float:
    """The highest word-set Jaccard of `question` with any of `others` (already normalised word lists)."""
    qw = normalize_words(question)
    return max((jaccard(qw, o) for o in others), default=0.0)


def training_questions(data_path: Path) -> list[str]:
    """Every question the model is trained on: the user turns of chat rows and the prompts of completion rows, in
    the JSONL file or folder the data stage reads."""
    files = sorted(data_path.glob("*.jsonl")) if data_path.is_dir() else [data_path]
    found: list[str] = []
    for f in files:
        for _, row in numbered_jsonl_objects(f):
            found += [m["content"] for m in row.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
            found += [row["prompt"]] if isinstance(row.get("prompt"), str) else []
    return found
