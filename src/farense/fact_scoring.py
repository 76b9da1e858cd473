"""Scorer v2: does an answer state the club's facts right, decline only what it cannot know, and not contradict itself?

The facts of data/README.md are written down once (farense.club_facts), as the parts a right answer states (`PARTS`) and the
alternatives that contradict them (`CONTRADICTIONS`: other places, colours, years, positions, "campeão"). A
question (farense.eval_questions) names the parts it asks for; the rules, by category:

- fact, yes_no, combined: not declined; every asked part stated; nothing contradicting any fact; no year or
  season the facts lack; and it does not open with a negation (none of these questions has a premise to deny, so
  an opening "Não." that the rest of the answer refutes is a contradiction, and counted as one).
- false_premise: the same parts (the correction), no contradiction, the false `claim` not restated, and it does
  not open by agreeing ("Sim", "Certo", ...).
- live, off_topic: declined or redirected, and nothing invented next to the decline: no price, date, score, time,
  person or number beyond the facts' own.

A contradiction or claim does not count inside a clause that denies it ("nunca foi campeão", "não joga no Bessa").
Pure Python (no MLX); `tests/test_fact_scoring.py` holds a table of hand-written right and wrong answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from farense.club_facts import MONTHS, CONTRADICTIONS, KNOWN_SEASONS, KNOWN_YEARS, PARTS
from farense.eval_questions import HeldOutQuestion

SCORER_VERSION = 2
_I = re.IGNORECASE
_YEAR = re.compile(r"(?<!\d)(1[89]\d\d|20\d\d)(?!\d)")
_SEASON = re.compile(r"(?<!\d)(?:19|20)?(\d\d)\s?[-/–]\s?(?:19|20)?(\d\d)(?!\d)")

# How this bot says it cannot answer (its decline and redirect sentences and their variants).
DECLINE = re.compile(
    r"n[ãa]o tenho (ess[ae]|est[ae]|a |o |os |as |um |uma |informa|dados|contact|registo|recomenda|valores|n[úu]mero)"
    r"|canais oficiais|fontes oficiais|n[ãa]o fa[çc]o previs|n[ãa]o dou conselhos|n[ãa]o comento"
    r"|respondo (apenas |s[óo] )?a perguntas sobre o (sporting clube )?(clube|farense)|n[ãa]o sei responder"
    r"|n[ãa]o (disponho|possuo|consigo (responder|ajudar|dizer))|s[óo] (posso|consigo) (ajudar|responder|falar)"
    r"|n[ãa]o posso ajudar|sou o assistente do (sporting clube )?farense",
    _I,
)
# A reply word: "Não." or "Não, ..." answers the question with no; "Não venceu: ..." is a sentence that starts so.
_OPENS_NO = re.compile(r"^\W*(n[ãa]o|nunca|negativo|errado|falso)\s*[.,;:!—–-]", _I)
_OPENS_YES = re.compile(r"^\W*(sim\b|(certo|exato|exatamente|correto|verdade|isso mesmo)\s*[.,;:!—–-])", _I)
_CLAUSE_DENIES = re.compile(r"\b(n[ãa]o|nunca|nem|jamais)\b", _I)
_CLAUSE_BREAK = re.compile(r"[.;,:!?()]|\bmas\b|\bporém\b|\bcontudo\b", _I)

# What a decline must not carry: invented specifics.
SPECIFICS: dict[str, str] = {
    "a price": r"\d\s?(?:€|euros?\b)|€\s?\d|\bgr[áa]tis\b|\bgratuit[oa]\b",
    "a time": r"(?<!\d)\d{1,2}\s?h\s?\d{0,2}\b|(?<!\d)\d{1,2}:\d{2}(?!\d)",
    "a date": rf"(?<!\d)\d{{1,2}}\s?\.?\s?[ºo°]?\s+de\s+(?:{MONTHS})\b|(?<!\d)\d{{1,2}}/\d{{1,2}}(?!\d)",
    "a score": r"(?<!\d)\d{1,2}\s?(?:-|x|–|a)\s?\d{1,2}(?!\d)",
    "a number": r"\d|\b(?:dois|duas|tr[êe]s|quatro|cinco|seis|sete|oito|nove|dez|onze|doze|vinte|trinta|cem|mil|milh[õo]es)\b",
}
# Capitalised words a decline or redirect may use; any other one not opening a sentence names someone.
KNOWN_NAMES = frozenset(
    "farense sporting clube sc scf faro algarve portugal portuguesa estádio estadio são sao luís luis taça taca "
    "uefa primeira liga hassan nader europa eu desculpa lamento obrigado olá ola bom boa".split()
)
_CAPITALISED = re.compile(r"(?<![.!?:]\s)(?<!^)\b([A-ZÁÀÂÃÉÊÍÓÔÕÚÇ][\wÀ-ÿ]+)")


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text, _I) is not None


def is_decline(answer: str) -> bool:
    return DECLINE.search(answer) is not None


def _asserted(pattern: str, answer: str) -> bool:
    """Whether `pattern` occurs in a clause that does not deny it ("não joga no Bessa" denies "Bessa")."""
    for m in re.finditer(pattern, answer, _I):
        start = max((b.end() for b in _CLAUSE_BREAK.finditer(answer, 0, m.start())), default=0)
        if not _CLAUSE_DENIES.search(answer, start, m.start()):
            return True
    return False


def _without_fact_parts(answer: str) -> str:
    for p in PARTS.values():
        answer = re.sub(p, " ", answer, flags=_I)
    return answer


def invented_specifics(answer: str, question: str = "") -> list[str]:
    """What a decline states beyond the facts and the question's own words: prices, dates, scores, times, names,
    numbers ("nos anos 90" asked is not invented when the decline repeats it)."""
    rest = _without_fact_parts(answer)
    for said in set(re.findall(r"\d+", question)):
        rest = re.sub(rf"(?<!\d){said}(?!\d)", " ", rest)
    found = [name for name, p in SPECIFICS.items() if _has(p, rest)]
    names = [w for w in _CAPITALISED.findall(rest) if w.casefold() not in KNOWN_NAMES]
    return found + ([f"a name ({', '.join(names[:3])})"] if names else [])


def contradictions(answer: str) -> list[str]:
    """Which facts the answer contradicts: other places, colours, titles, years or seasons."""
    found = [name for name, p in CONTRADICTIONS.items() if _asserted(p, answer)]
    years = sorted(y for y in set(_YEAR.findall(answer)) - KNOWN_YEARS if _asserted(rf"(?<!\d){y}(?!\d)", answer))
    seasons = sorted({f"{a}-{b}" for a, b in _SEASON.findall(answer)
                      if (int(a) + 1) % 100 == int(b) and (int(a), int(b)) not in KNOWN_SEASONS})  # fmt: skip
    return found + [f"a year the facts lack ({', '.join(years)})"] * bool(years) + [
        f"a season the facts lack ({', '.join(seasons)})"
    ] * bool(seasons)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    declined: bool
    why: str
    contradiction: bool = False  # opened with a negation the question gives no reason for


def score_answer(q: HeldOutQuestion, answer: str) -> Verdict:
    """Whether `answer` is right for `q`, and why not when it is not."""
    declined = is_decline(answer)
    if q.category in ("live", "off_topic"):
        if not declined:
            return Verdict(False, False, "should decline (it cannot know this) but answered")
        invented = invented_specifics(answer, q.question) + [f"matches {p}" for p in q.must_not if _has(p, answer)]
        return Verdict(not invented, True, f"declined but states {', '.join(invented)}" if invented else "declined, as it should")
    if not q.scored:
        return Verdict(False, declined, "no parts listed: not scored")
    if declined:
        return Verdict(False, True, "declined a question the facts answer")
    reasons = [f"missing {a}" for a in q.asks if not _has(PARTS[a], answer)]
    reasons += [f"missing {p}" for p in q.must if not _has(p, answer)]
    reasons += [f"contradicts: {c}" for c in contradictions(answer)]
    reasons += [f"restates the false claim ({p})" for p in q.claim if _asserted(p, answer)]
    reasons += [f"contradicts: matches {p}" for p in q.must_not if _has(p, answer)]
    opens_no = q.category != "false_premise" and _OPENS_NO.search(answer) is not None
    if opens_no:
        reasons.insert(0, "opens with a negation, but the facts say yes")
    if q.category == "false_premise" and _OPENS_YES.search(answer):
        reasons.insert(0, "agrees with the false premise")
    return Verdict(not reasons, False, "; ".join(reasons) or "every asked part, nothing contradicting", opens_no)
