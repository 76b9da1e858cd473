"""The fact scorer on hand-made answers, and the shipped held-out set's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.errors import DataError
from farense.fact_scoring import HeldOutQuestion, fact_summary, is_decline, load_questions, score_answer

ROOT = Path(__file__).resolve().parents[1]
DECLINE = "Não tenho essa informação atualizada; consulta os canais oficiais do clube."

STADIUM = HeldOutQuestion(id="s", question="estádio?", reference="Estádio de São Luís.", must=(r"S[ãa]o Lu[íi]s",))
COLOURS = HeldOutQuestion(id="c", question="cores?", reference="Preto e branco.", must=("preto", "branco"),
                          must_not=(r"verde|azul",))  # fmt: skip
FOUNDED = HeldOutQuestion(id="f", question="fundação?", reference="1910.", must=("1910",))
PREMISE = HeldOutQuestion(id="p", category="false_premise", question="Foi fundado em 1930, certo?",
                          reference="Não, em 1910.", must=(r"\bn[ãa]o\b", "1910"), must_not=(r"^\W*sim\b",))  # fmt: skip
LIVE = HeldOutQuestion(id="l", category="live", question="Quem treina o Farense agora?", reference=DECLINE)
OFF = HeldOutQuestion(id="o", category="off_topic", question="Receita de bacalhau?", reference="...")


def test_a_right_answer_passes_with_or_without_accents() -> None:
    assert score_answer(STADIUM, "O Farense joga no Estádio de São Luís, em Faro.").passed
    assert score_answer(STADIUM, "joga no estadio de sao luis").passed
    assert score_answer(COLOURS, "As cores do Farense são o Preto e o Branco.").passed


def test_a_missing_or_wrong_fact_fails_and_says_why() -> None:
    v = score_answer(COLOURS, "As cores do Farense são o preto e o verde.")
    assert not v.passed and "missing branco" in v.why and "contradicts" in v.why
    v = score_answer(STADIUM, "O Farense joga no Estádio da Luz.")
    assert not v.passed and v.why.startswith("missing")


def test_an_invented_year_fails_a_fact_answer() -> None:
    v = score_answer(FOUNDED, "O Farense foi fundado em 1910 e renovado em 1932.")
    assert not v.passed and "1932" in v.why
    assert score_answer(FOUNDED, "Fundado a 1 de abril de 1910; 5.º em 1994-95.").passed


def test_a_decline_on_a_fact_question_fails() -> None:
    v = score_answer(STADIUM, DECLINE)
    assert not v.passed and v.declined and "declined a question the facts answer" in v.why


def test_a_decline_on_live_information_passes_and_an_answer_fails() -> None:
    assert score_answer(LIVE, DECLINE).passed
    assert score_answer(LIVE, "Não tenho informação atualizada sobre a equipa técnica.").passed
    v = score_answer(LIVE, "O treinador do Farense é o José Mourinho.")
    assert not v.passed and "should decline" in v.why
    assert score_answer(OFF, "Sou o assistente do Sporting Clube Farense e respondo a perguntas sobre o clube.").passed


def test_a_false_premise_must_be_corrected_not_agreed_with() -> None:
    assert score_answer(PREMISE, "Não. O Farense foi fundado a 1 de abril de 1910.").passed
    assert not score_answer(PREMISE, "Sim, foi fundado em 1930.").passed
    assert not score_answer(PREMISE, "Sim, em 1910.").passed


def test_summary_counts_accuracy_declines_and_categories() -> None:
    qs = [STADIUM, COLOURS, PREMISE, LIVE, OFF]
    answers = ["Estádio de São Luís.", DECLINE, "Não, em 1910.", DECLINE, "A receita é simples."]
    s = fact_summary(qs, [score_answer(q, a) for q, a in zip(qs, answers)])
    assert s["fact_accuracy"] == pytest.approx(2 / 3) and s["fact_questions"] == 3
    assert s["facts_declined"] == 1
    assert s["live_decline_rate"] == 1.0
    assert s["decline_precision"] == pytest.approx(1 / 2)  # declined the colours question too
    assert s["decline_recall"] == pytest.approx(1 / 2)  # answered the off-topic one
    assert s["per_category"]["off_topic"] == {"n": 1, "accuracy": 0.0}


def test_questions_without_key_facts_are_not_scored() -> None:
    plain = HeldOutQuestion(id="1", question="Onde joga?", reference="No São Luís.")
    assert not plain.scored
    assert fact_summary([plain], [score_answer(plain, "No São Luís.")])["fact_accuracy"] is None


def test_bad_question_lines_name_the_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "a", "reference": "b"}\n{"question": "c", "reference": "d", "must": ["(unclosed"]}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'must'.*not a valid regular expression"):
        load_questions(bad)
    bad.write_text('{"question": "a", "reference": "b", "category": "rumour"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'category'"):
        load_questions(bad)
    bad.write_text('{"id": "x", "question": "a", "reference": "b"}\n{"id": "x", "question": "c", "reference": "d"}\n')
    with pytest.raises(DataError, match="id 'x' is already used on line 1"):
        load_questions(bad)


def test_is_decline_recognises_the_training_data_declines() -> None:
    rows = [json.loads(line) for line in open(ROOT / "data/farense/qa.jsonl", encoding="utf-8")]
    answers = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    assert is_decline(DECLINE)
    assert not is_decline("O Farense joga no Estádio de São Luís, em Faro.")
    assert sum(map(is_decline, answers)) >= 20


def test_shipped_held_out_set_covers_what_the_issue_asks() -> None:
    qs = load_questions(ROOT / "data/eval/questions.jsonl")
    by = lambda c: [q for q in qs if q.category == c]  # noqa: E731
    assert len(qs) >= 60 and all(q.scored for q in qs)
    assert len(by("live")) >= 10 and len(by("false_premise")) >= 5 and len(by("off_topic")) >= 3
    facts = {q.fact for q in by("fact")} - {"combo"}
    for fact in facts:
        assert sum(q.fact == fact for q in qs if q.category != "live") >= 3, fact


def test_held_out_questions_are_not_training_questions() -> None:
    from farense.evaluate import normalize_words

    train = set()
    for line in open(ROOT / "data/farense/qa.jsonl", encoding="utf-8"):
        train |= {" ".join(normalize_words(m["content"])) for m in json.loads(line)["messages"] if m["role"] == "user"}
    for line in open(ROOT / "data/farense/completions.jsonl", encoding="utf-8"):
        train.add(" ".join(normalize_words(json.loads(line)["prompt"])))
    for q in load_questions(ROOT / "data/eval/questions.jsonl"):
        assert " ".join(normalize_words(q.question)) not in train, q.question


def test_held_out_questions_are_worded_unlike_every_training_question() -> None:
    """Near copies count too: no training question reads like a held-out one (same words, or nearly the same
    characters), so the held-out score measures answers to new wordings, not recall of seen ones."""
    from difflib import SequenceMatcher

    from farense.evaluate import normalize_words

    train = []
    for line in open(ROOT / "data/farense/qa.jsonl", encoding="utf-8"):
        train += [normalize_words(m["content"]) for m in json.loads(line)["messages"] if m["role"] == "user"]
    for line in open(ROOT / "data/farense/completions.jsonl", encoding="utf-8"):
        train.append(normalize_words(json.loads(line)["prompt"]))
    for q in load_questions(ROOT / "data/eval/questions.jsonl"):
        words = normalize_words(q.question)
        for seen in train:
            jaccard = len(set(words) & set(seen)) / len(set(words) | set(seen))
            assert jaccard < 0.8, (q.question, " ".join(seen))
            assert SequenceMatcher(None, " ".join(words), " ".join(seen)).ratio() < 0.85, (q.question, " ".join(seen))
