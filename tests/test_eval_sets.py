"""The dev and sealed test sets: one near-copy rule against every training line and between the two sets, the
indirect wordings the test set promises, and what it covers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from farense.eval_questions import (
    INDIRECT_JACCARD,
    HeldOutQuestion,
    load_questions,
    max_jaccard,
    near_copies,
    near_copy,
    training_questions,
)
from farense.text import normalize_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sets() -> dict[str, list[HeldOutQuestion]]:
    return {name: load_questions(ROOT / f"data/eval/{name}.jsonl") for name in ("dev", "test")}


@pytest.fixture(scope="module")
def training() -> list[str]:
    return training_questions(ROOT / "data/farense")


@pytest.fixture(scope="module")
def candidates() -> list[str]:
    """The candidate rows of data/augment, kept free of near copies for the recipes that will train on them."""
    return training_questions(ROOT / "data/augment")


def test_the_near_copy_rule() -> None:
    # The issue's example: a dev question that holds a training question word for word.
    assert near_copy("Qual é a idade do Farense? Desde quando existe?", "Qual é a idade do Farense?")
    assert near_copy("Em que ano foi fundado o Farense?", "O Farense foi fundado em que ano?")  # word order
    assert near_copy("cores?", "Cores?") and near_copy("De que nacionalidade era o Nader?",
                                                       "Qual era a nacionalidade de Hassan Nader?")  # fmt: skip
    # Other content is another question, however alike the frame.
    assert not near_copy("Qual era a nacionalidade de Hassan Nader?", "Quem é Hassan Nader?")
    assert not near_copy("Qual é o estádio do Farense?", "Quem é o treinador do Farense?")
    assert not near_copy("Em que ano o Farense foi campeão nacional?", "Em que ano foi fundado o Farense?")


@pytest.mark.parametrize("name", ["dev", "test"])
def test_no_eval_question_is_a_near_copy_of_a_training_question(name: str, sets: dict, training: list[str],
                                                                candidates: list[str]) -> None:  # fmt: skip
    rows = training + candidates
    found = near_copies([q.question for q in sets[name]], rows)
    assert not found, [(sets[name][i].id, rows[j], why) for i, j, why in found[:10]]


def test_the_two_sets_share_no_near_copies(sets: dict) -> None:
    found = near_copies([q.question for q in sets["test"]], [q.question for q in sets["dev"]])
    assert not found, [(sets["test"][i].id, sets["dev"][j].id, why) for i, j, why in found]
    ids = [q.id for q in sets["test"] + sets["dev"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ["dev", "test"])
def test_wording_labels_follow_the_jaccard_rule(name: str, sets: dict, training: list[str]) -> None:
    words = [normalize_words(t) for t in training]
    wrong = [(q.id, q.wording, round(max_jaccard(q.question, words), 2)) for q in sets[name]
             if (q.wording == "indirect") != (max_jaccard(q.question, words) <= INDIRECT_JACCARD)]  # fmt: skip
    assert not wrong, wrong


def test_the_test_set_covers_what_the_issue_asks(sets: dict) -> None:
    test = sets["test"]
    assert len(test) >= 150
    assert sum(q.wording == "indirect" for q in test) >= 0.4 * len(test)
    by = Counter(q.category for q in test)
    assert by["yes_no"] >= 10 and by["combined"] >= 10 and by["false_premise"] >= 10
    assert by["live"] >= 15 and by["off_topic"] >= 10
    assert all(q.scored for q in test)
    facts = Counter(f for q in test for f in q.facts)
    for fact in ("found", "stadium", "colours", "best", "uefa", "cup", "nader", "faro"):
        assert facts[fact] >= 10, fact


def test_the_dev_set_keeps_every_kind_of_question(sets: dict) -> None:
    dev = sets["dev"]
    assert len(dev) >= 60 and all(q.scored for q in dev)
    by = Counter(q.category for q in dev)
    assert by["live"] >= 5 and by["false_premise"] >= 5 and by["off_topic"] >= 3
