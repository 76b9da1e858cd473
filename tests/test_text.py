"""farense.text, the one accent-folding normaliser: token F1 and the eval sets' near-copy rule use its words, the
speculative-decoding draft its folded text."""

from __future__ import annotations

from farense.answer_draft import features
from farense.text import fold, normalize_words


def test_fold_lowers_case_and_drops_accents() -> None:
    assert fold("Estádio São Luís") == "estadio sao luis"
    assert fold("AÇÃO, Coração!") == "acao, coracao!"


def test_normalization_ignores_case_accents_punctuation_and_articles() -> None:
    assert normalize_words("O Estádio de São Luís, em FARO!") == ["estadio", "de", "sao", "luis", "em", "faro"]
    assert normalize_words("Um_clube; the team, an answer") == ["clube", "team", "answer"]
    assert normalize_words("") == []


def test_draft_features_are_folded_words_and_their_trigrams() -> None:
    assert features("Estádio?") == features("estadio") == {"estadio", " es", "est", "sta", "tad", "adi", "dio", "io "}
    assert "sao" in features("SÃO Luís") and "luis" in features("SÃO Luís")
