"""farense.inference: every speed option gives the validate stage's greedy answers, token for token; and
farense.answer_draft, the guesses speculative decoding checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.evaluate import attach_adapter, chat_prompt, generate_answer, load_base
from farense.answer_draft import AnswerDraft, DraftCorpus, draft_corpus
from farense.export import published_version, read_draft_corpus
from farense.inference import load
from test_evaluate import tiny_project

QUESTIONS = ["Onde joga o Farense?", "Quando foi fundado o Farense?", "Onde joga o Farense?", "Quais são as cores?"]


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tiny_project(tmp_path_factory.mktemp("inference"), **{"benchmark.enabled": False})
    project.run()
    return published_version(project.cfg.artifacts_dir)


@pytest.mark.parametrize("options", [
    {"fuse": False, "prefix_cache": False, "draft_tokens": 0},
    {"fuse": True, "prefix_cache": False, "draft_tokens": 0},
    {"fuse": True, "prefix_cache": True, "draft_tokens": 0},
    {"fuse": True, "prefix_cache": True, "draft_tokens": 4},
    {"fuse": False, "prefix_cache": False, "draft_tokens": 3},
    # a corpus to draft from before any answer: right and wrong guesses alike must leave the answers unchanged
    {"fuse": True, "prefix_cache": True, "draft_tokens": 8, "draft_corpus": "published"},
    {"fuse": True, "prefix_cache": True, "draft_tokens": 4, "draft_corpus": ["Não sei.", "O Farense é de Faro."]},
    {"fuse": True, "prefix_cache": False, "draft_tokens": 32,
     "draft_corpus": DraftCorpus(["Não sei.", "O Farense é de Faro."], [["Onde joga o Farense?"], ["Cores?"]])},
])  # fmt: skip
def test_fast_paths_answer_as_the_validate_stage(version: Path, options: dict) -> None:
    meta = json.loads((version / "metadata.json").read_text())
    base = Path(meta["base_model"]["path"])
    model, tokenizer, _ = load_base(base)
    model = attach_adapter(model, version)
    if options.get("draft_corpus") == "published":
        options = options | {"draft_corpus": read_draft_corpus(version)}
    im = load(base, version, system_prompt=meta["system_prompt"], **options)
    assert im.draft is None or im.draft.has_memory == bool(options.get("draft_corpus"))
    for q, n in [(q, 40) for q in QUESTIONS * 2] + [(QUESTIONS[0], 1), (QUESTIONS[1], 5)]:
        # the second round drafts from remembered answers; the last two stop at max_tokens
        ids = chat_prompt(tokenizer, q, meta["system_prompt"])
        expected = generate_answer(model, tokenizer, ids, n)
        got = im.generate(q, n)
        assert (got.text, got.tokens, got.finish_reason) == (expected.text, expected.tokens, expected.finish_reason)
        assert got.prompt_tokens == len(ids)
        assert got.prompt_tokens_cached == (im.options["prefix_tokens"] if options["prefix_cache"] else 0)
    # Streaming gives the same text, and the prefix cache is back to the prefix after each answer.
    pieces = list(im.stream(QUESTIONS[1], 40))
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == pieces[-1].text
    if options["prefix_cache"]:
        assert im._cache[0].offset == len(im._prefix) > 0


def test_prompt_lookup_guesses_from_the_sequence_then_from_earlier_answers() -> None:
    draft = AnswerDraft(max_ngram=3)
    assert draft.guess([5, 6, 7, 1, 5, 6]) == 7  # "5 6" was followed by 7
    assert draft.guess([1, 2, 3]) == 3  # nothing to go on: repeat the last token
    draft.remember([9, 2, 3, 4])
    assert draft.guess([1, 2, 3]) == 4


def test_a_seeded_corpus_drafts_before_any_answer_and_recent_answers_win() -> None:
    draft = AnswerDraft(max_ngram=2)
    assert not draft.has_memory
    draft.seed([[7, 8, 9], [1, 5]])
    assert draft.has_memory
    assert draft.guess([3, 7, 8]) == 9  # from the corpus: "7 8" -> 9
    assert draft.guess([4, 1]) == 5
    draft.remember([2, 1, 6])
    assert draft.guess([4, 1]) == 6  # the recent answer wins over the corpus
    assert draft.guess([3, 7, 8]) == 9  # the corpus still answers what recent answers do not


def test_the_answer_of_the_closest_training_question_is_proposed_whole() -> None:
    draft = AnswerDraft()
    stadium, colours, decline = [5, 6, 7, 8, 0], [5, 9, 10, 0], [11, 12, 0]  # 0: end of turn
    draft.seed([stadium, colours, decline], [["Onde joga o Farense?", "Qual é o estádio?"],
                                             ["Quais são as cores do clube?"], ["Quem é o treinador?"]])  # fmt: skip
    state = draft.begin([1, 2], "estadio do farense?")  # other words, no accent: still the stadium answer
    assert draft.propose(state, [], 32) == stadium
    assert draft.propose(state, [5, 6], 2) == [7, 8]  # the rest, as far as the limit allows
    # The model said 9 where the draft guessed 6: the next answer that agrees with "5 9" is proposed.
    assert draft.propose(state, [5, 9], 32) == [10, 0]
    # Nothing agrees with "5 3": prompt lookup guesses from the sequence and the corpus.
    guesses = draft.propose(state, [5, 3], 32)
    assert 0 < len(guesses) <= 8 and guesses[0] == draft.guess([1, 2, 5, 3])
    assert draft.propose(draft.begin([1, 2], "Quais as cores?"), [], 32) == colours
    # Without a question (token ids only), the most frequent answer (last in the corpus) comes first.
    assert draft.propose(draft.begin([1, 2]), [], 32) == decline
    assert draft.propose(state, [5], 0) == []


def test_an_answer_begun_in_other_words_is_drafted_from_where_it_joins_a_training_answer() -> None:
    draft = AnswerDraft()
    stadium, colours = [5, 6, 7, 8, 30, 31, 32, 33, 34, 35, 36, 0], [5, 9, 10, 0]
    draft.seed([stadium, colours], [["Onde joga o Farense?"], ["Quais são as cores do clube?"]])
    state = draft.begin([1, 2], "E o estadio?")
    # "Não. " (99) and then the colours answer: no answer agrees from the start, but "5 9" is inside the colours.
    assert draft.propose(state, [99, 5, 9], 32) == [10, 0]
    # A one-token tail is inside both: the better-ranked answer (the stadium) continues, a few tokens only.
    assert draft.propose(state, [99, 5], 32) == [6, 7, 8, 30, 31, 32, 33, 34]
    assert draft.propose(draft.begin([1, 2], "cores?"), [99, 5], 32) == [9, 10, 0]
    # Found nowhere: prompt lookup.
    assert draft.propose(state, [99, 98], 32)[0] == draft.guess([1, 2, 99, 98])


def test_a_repeated_question_is_drafted_from_its_last_answer() -> None:
    draft = AnswerDraft(memory=2)
    draft.seed([[5, 6, 0]], [["Onde joga o Farense?"]])
    draft.remember([7, 7, 8, 0], "Quem fundou o clube?")
    assert draft.propose(draft.begin([1], "Quem fundou o clube?"), [], 32) == [7, 7, 8, 0]
    assert draft.propose(draft.begin([1], "Onde joga o Farense?"), [], 32) == [5, 6, 0]
    for i in range(5):  # older answers are forgotten
        draft.remember([20 + i, 0], f"pergunta {i}")
    assert len(draft._recent) <= 4
    assert draft.propose(draft.begin([1], "Quem fundou o clube?"), [], 32) != [7, 7, 8, 0]


def test_draft_corpus_is_the_distinct_training_answers_most_frequent_last() -> None:
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "B"}]},
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "B"}]},
        {"prompt": "p", "completion": "C"},
        {"text": "plain text rows have no answer"},
    ]  # fmt: skip
    corpus = draft_corpus(rows)
    assert corpus.answers == ["A", "C", "B"]
    assert corpus.questions == [["q1"], ["p"], ["q2", "q3"]]
    assert DraftCorpus.from_json(corpus.to_json()) == corpus
    # a version published before questions were kept: answers only
    assert DraftCorpus.from_json({"answers": ["A", "B"]}) == DraftCorpus(["A", "B"], [[], []])


def test_the_dense_copy_loads_back_to_the_same_answers(version: Path, tmp_path: Path) -> None:
    meta = json.loads((version / "metadata.json").read_text())
    base, copy = Path(meta["base_model"]["path"]), tmp_path / "dense"
    first = load(base, version, system_prompt=meta["system_prompt"], dense_copy=copy)
    assert not first.options["from_dense_copy"] and (copy / "config.json").is_file()
    assert "quantization" not in json.loads((copy / "config.json").read_text())
    again = load(base, version, system_prompt=meta["system_prompt"], dense_copy=copy)
    assert again.options["from_dense_copy"] and again.context_length == first.context_length
    for q in QUESTIONS:
        a, b = first.generate(q, 30), again.generate(q, 30)
        assert (a.text, a.tokens) == (b.text, b.tokens)


def test_an_answer_abandoned_midway_leaves_the_prefix_cache_intact(version: Path) -> None:
    meta = json.loads((version / "metadata.json").read_text())
    im = load(Path(meta["base_model"]["path"]), version, system_prompt=meta["system_prompt"])
    expected = [im.generate(q, 30) for q in QUESTIONS]  # also gives the draft earlier answers
    for q in QUESTIONS:
        stream = im.stream(q, 30)
        next(stream)
        next(stream)
        stream.close()  # a client that went away
        assert im._cache[0].offset == len(im._prefix)
    assert [(g.text, g.tokens) for g in (im.generate(q, 30) for q in QUESTIONS)] == [(g.text, g.tokens) for g in expected]
