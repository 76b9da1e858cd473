"""Text normalising shared by scoring, the eval sets' near-copy rule and the draft: case and accents folded."""

from __future__ import annotations

import re
import unicodedata

# Articles carry no content; SQuAD drops the English ones, we drop the Portuguese ones too.
_ARTICLES = frozenset({"o", "a", "os", "as", "um", "uma", "uns", "umas", "the", "an"})
_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def fold(text: str) -> str:
    """Lower case without accents: "Estádio São Luís" -> "estadio sao luis"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def normalize_words(text: str) -> list[str]:
    """Lower case, accents and punctuation removed, articles dropped: "O Estádio São Luís!" -> [estadio, sao, luis]."""
    return [w for w in _NON_WORD.sub(" ", fold(text)).replace("_", " ").split() if w not in _ARTICLES]
