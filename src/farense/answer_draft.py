"""Guesses of the answer's next tokens, for farense.inference's speculative decoding. They cost no model: the
answers the adapter was trained on are the draft.

The fine-tuned model mostly answers with one of its training answers word for word (68 of the 75 held-out answers
of the default run). So the draft ranks the training answers by how close their questions are to the one asked
(weighted overlap of words and letter trigrams, accents folded), and proposes the rest of the best-ranked answer
that agrees with what has been decoded so far. Where none agrees from the start (the model began its answer in
its own words, or joined two answers), it proposes what follows the answer's last tokens in the best-ranked
training answer that contains them, and where no answer does, falls back to prompt lookup: the token that
followed the longest recent match of the sequence's tail in the sequence itself, in recent answers or in the
training answers. A guess is kept only where the model's own greedy token is the same, so answers never depend on
the draft; only their speed does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farense.text import fold

TOP_QUESTIONS = 3  # an answer is ranked by its closest questions, this many
NGRAM_GUESSES = 8  # prompt-lookup guesses per step when no training answer agrees (decode_speed.py compared 2-8)
ANCHOR_TOKENS = 4  # the longest tail of the answer looked up inside the training answers
WEAK_ANCHOR_GUESSES = 8  # guesses after a one-token match (a replay of the 75 held-out answers chose 8 of 8-48)


@dataclass
class DraftCorpus:
    """The distinct answers of the training rows, the most frequent last, each with the questions it answered."""

    answers: list[str] = field(default_factory=list)
    questions: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"answers": self.answers, "questions": self.questions}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DraftCorpus:
        answers = [str(a) for a in obj.get("answers", [])]
        questions = [[str(q) for q in qs] for qs in obj.get("questions", [])]
        return cls(answers, questions if len(questions) == len(answers) else [[] for _ in answers])


def draft_corpus(rows: Iterable[dict[str, Any]]) -> DraftCorpus:
    """The distinct answers of training rows (assistant turns, completions), the most frequent last, and the user
    turn (or prompt) before each."""
    counts: Counter[str] = Counter()
    questions: dict[str, list[str]] = {}
    for row in rows:
        pairs: list[tuple[Any, Any]] = [(row.get("prompt"), row.get("completion"))]
        last_user = None
        for m in row.get("messages", []):
            if m.get("role") == "user":
                last_user = m.get("content")
            elif m.get("role") == "assistant":
                pairs.append((last_user, m.get("content")))
        for q, a in pairs:
            if isinstance(a, str) and a.strip():
                counts[a] += 1
                asked = questions.setdefault(a, [])
                if isinstance(q, str) and q.strip() and q not in asked:
                    asked.append(q)
    answers = sorted(counts, key=lambda a: counts[a])  # stable: first seen first among equals
    return DraftCorpus(answers, [questions[a] for a in answers])


def features(text: str) -> set[str]:
    """Words and the letter trigrams of each word, lower case with accents folded ("Estádio?" ~ "estadio")."""
    words = re.findall(r"\w+", fold(text))
    out = set(words)
    for w in words:
        padded = f" {w} "
        out.update(padded[i : i + 3] for i in range(len(padded) - 2))
    return out


@dataclass
class DraftState:
    """One answer being decoded: the prompt, and the ranked candidate answers that still agree with it."""

    prompt: list[int]
    ranked: list[list[int]]
    rank_of: dict[int, int] = field(default_factory=dict)  # training answer index -> its place in `ranked`
    agreed_on: list[int] = field(default_factory=list)
    candidates: list[list[int]] = field(init=False)  # those of `ranked` that agree with `agreed_on`

    def __post_init__(self) -> None:
        self.candidates = self.ranked


class AnswerDraft:
    """Proposes the next tokens of an answer from the training answers (ranked by question) and prompt lookup."""

    def __init__(self, max_ngram: int = 4, memory: int = 256) -> None:
        self.max_ngram, self.memory = max_ngram, memory
        self._answers: list[list[int]] = []  # the corpus, most frequent last
        self._asked: list[tuple[set[str], float, int]] = []  # (question features, their weight, answer)
        self._idf: dict[str, float] = {}
        self._recent: list[tuple[set[str] | None, list[int]]] = []
        self._index: dict[tuple[int, ...], int] = {}
        self._inside: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # corpus n-gram -> (answer, where it ends)

    @property
    def has_memory(self) -> bool:
        return bool(self._answers or self._recent)

    def seed(self, answers: Sequence[Sequence[int]], questions: Sequence[Sequence[str]] = ()) -> None:
        """The training answers as token ids (each ending with end-of-turn), most frequent last, and the questions
        each answered (optional: without them candidates are ranked by frequency alone)."""
        self._answers = [list(a) for a in answers]
        # One index of the corpus serves both the anchored drafts and prompt lookup (its last place: the latest).
        self._inside = {}
        for i, a in enumerate(self._answers):
            for n in range(1, max(ANCHOR_TOKENS, self.max_ngram) + 1):
                for end in range(n, len(a)):
                    self._inside.setdefault(tuple(a[end - n : end]), []).append((i, end))
        asked = [(features(q), i) for i, qs in enumerate(questions) for q in qs]
        df = Counter(f for fs, _ in asked for f in fs)
        self._idf = {f: math.log(1 + len(asked) / c) for f, c in df.items()}
        self._asked = [(fs, self._weight(fs), i) for fs, i in asked]

    def remember(self, answer: list[int], question: str | None = None) -> None:
        """A finished answer (and its question): a later repeat of the question is drafted from it in full."""
        if not answer:
            return
        self._recent.append((features(question) if question else None, list(answer)))
        if len(self._recent) > 2 * self.memory:  # forget the oldest now and then, not on every answer
            self._recent = self._recent[-self.memory :]
            self._index = self._ngram_index([a for _, a in self._recent])
        else:
            self._index.update(self._ngram_index([answer]))  # the newest answer wins a tie

    def forget(self) -> None:
        """Drop the remembered answers; the training answers stay."""
        self._recent, self._index = [], {}

    def begin(self, prompt: Sequence[int], question: str | None = None) -> DraftState:
        """Rank the candidate answers for a new answer to `prompt` (token ids), asked as `question`."""
        # An answer's score: the mean similarity of its TOP_QUESTIONS closest questions to the one asked (the
        # right answer was first for 42 of the 75 held-out questions, against 36 with the closest question alone).
        similar: dict[int, list[float]] = {}
        asked = features(question) if question else set()
        if asked and self._idf:
            weight = self._weight(asked)
            for fs, w, i in self._asked:  # weighted Jaccard: shared weight over the union's
                shared = self._weight(asked & fs)
                similar.setdefault(i, []).append(shared / (weight + w - shared))
        score = {i: sum(sorted(ss, reverse=True)[:TOP_QUESTIONS]) / TOP_QUESTIONS for i, ss in similar.items()}
        ranked = sorted(range(len(self._answers)), key=lambda i: (score.get(i, 0.0), i), reverse=True)
        candidates = [self._answers[i] for i in ranked]
        # A recent answer to the same question comes first; other recent answers go after the corpus.
        repeats = [a for fs, a in reversed(self._recent) if asked and fs == asked]
        others = [a for fs, a in reversed(self._recent) if not (asked and fs == asked)]
        return DraftState(list(prompt), repeats + candidates + others, {i: r for r, i in enumerate(ranked)})

    def propose(self, state: DraftState, answer: list[int], limit: int) -> list[int]:
        """Up to `limit` guessed tokens to follow `answer` (the tokens decoded so far)."""
        if limit <= 0:
            return []
        n = len(answer)
        if answer != state.agreed_on:  # answers grow: filter the survivors, or start again from all of them
            grown = answer[: len(state.agreed_on)] == state.agreed_on
            state.candidates = [c for c in (state.candidates if grown else state.ranked) if c[:n] == answer]
            state.agreed_on = list(answer)
        for c in state.candidates:
            if len(c) > n:
                return c[n : n + limit]
        anchored = self._anchored(state, answer, limit)
        if anchored:
            return anchored
        seq, out = state.prompt + answer, []
        for _ in range(min(limit, NGRAM_GUESSES)):
            out.append(self.guess(seq + out))
        return out

    def _anchored(self, state: DraftState, answer: list[int], limit: int) -> list[int]:
        """What follows the answer's last tokens (the longest tail found, up to ANCHOR_TOKENS) in the best-ranked
        training answer containing them."""
        for n in range(min(ANCHOR_TOKENS, len(answer)), 0, -1):
            places = self._inside.get(tuple(answer[-n:]))
            if places:
                i, end = min(places, key=lambda p: state.rank_of.get(p[0], len(self._answers)))
                return self._answers[i][end : end + (limit if n > 1 else min(limit, WEAK_ANCHOR_GUESSES))]
        return []

    def guess(self, seq: list[int]) -> int:
        """Prompt lookup: what followed the longest match of the tail, in `seq`, recent answers, the corpus."""
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # latest earlier occurrence in this sequence
                if seq[i : i + n] == tail:
                    return seq[i + n]
            key = tuple(tail)
            if key in self._index:
                return self._index[key]
            if key in self._inside:
                i, end = self._inside[key][-1]
                return self._answers[i][end]
        return seq[-1]

    def _weight(self, fs: set[str]) -> float:
        return sum(self._idf.get(f, 1.0) for f in fs)

    def _ngram_index(self, texts: Sequence[Sequence[int]]) -> dict[tuple[int, ...], int]:
        index: dict[tuple[int, ...], int] = {}
        for a in texts:  # a later text wins a tie
            for n in range(1, self.max_ngram + 1):
                for i in range(len(a) - n):
                    index[tuple(a[i : i + n])] = a[i + n]
        return index
