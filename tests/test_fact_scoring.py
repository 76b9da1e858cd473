"""Scorer v2 on a table of hand-written answers: wrong ones that must fail (each kind of wrong the yardstick issue
names), right ones in other words that must pass; and the summary's intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.accuracy import fact_summary, flat_rates, headline, pct, wilson
from farense.errors import DataError
from farense.eval_questions import HeldOutQuestion, load_questions
from farense.fact_scoring import is_decline, score_answer

ROOT = Path(__file__).resolve().parents[1]
DECLINE = "Não tenho essa informação atualizada; consulta os canais oficiais do clube."


def q(category: str, asks: tuple[str, ...] = (), question: str = "?", **more: object) -> HeldOutQuestion:
    return HeldOutQuestion(id="x", question=question, reference="ref", category=category, asks=asks, **more)  # type: ignore[arg-type]


Q = {
    "year": q("fact", ("found.year",), facts=("found",)),
    "date": q("fact", ("found.date",), facts=("found",)),
    "stadium": q("fact", ("stadium.name",), facts=("stadium",)),
    "colours": q("fact", ("colours",), facts=("colours",)),
    "best": q("fact", ("best.place",), facts=("best",)),
    "best_when": q("fact", ("best.place", "best.season"), facts=("best",)),
    "uefa_yes": q("yes_no", ("uefa.cup", "uefa.season"), facts=("uefa",)),
    "europe_first": q("fact", ("uefa.first",), facts=("uefa",)),
    "cup_yes": q("yes_no", ("cup.final", "cup.year"), facts=("cup",)),
    "cup_outcome": q("fact", ("cup.final", "cup.lost"), facts=("cup",)),
    "nader": q("fact", ("nader.name",), facts=("nader",)),
    "nader_nation": q("fact", ("nader.nation",), facts=("nader",)),
    "nader_feat": q("fact", ("nader.topscorer", "nader.season"), facts=("nader",)),
    "nader_pos": q("fact", ("nader.position",), facts=("nader",)),
    "region": q("fact", ("faro.region",), facts=("faro",)),
    "city": q("fact", ("club.city",), facts=("city",)),
    "combo": q("combined", ("found.year", "stadium.name", "colours"), facts=("found", "stadium", "colours")),
    "fp_year": q("false_premise", ("found.year",), facts=("found",), claim=(r"\b1920\b",)),
    "fp_champion": q("false_premise", ("best.place",), facts=("best",)),
    "fp_stadium": q("false_premise", ("stadium.name",), facts=("stadium",), claim=(r"Bessa",)),
    "fp_cup": q("false_premise", ("cup.lost",), facts=("cup",)),
    "fp_nation": q("false_premise", ("nader.nation",), facts=("nader",), claim=(r"brasileir",)),
    "live": q("live"),
    "off": q("off_topic"),
}

# Wrong answers: each must fail. The kind says which rule catches it.
WRONG = [
    # a yes question answered with an opening negation the rest refutes (issue: uefa-2, cup-1, cup-3)
    ("uefa_yes", "Não. O Farense jogou a Taça UEFA em 1995-96.", "opens no"),
    ("cup_yes", "Não. O Farense foi finalista da Taça de Portugal em 1990.", "opens no"),
    ("cup_outcome", "Não, o Farense foi à final da Taça de Portugal e perdeu-a.", "opens no"),
    ("stadium", "Não, o Farense joga no Estádio de São Luís.", "opens no"),
    ("year", "Nunca. Foi fundado em 1910.", "opens no"),
    # numbers on word boundaries: "1995 o" is not "5.º"
    ("best", "Em 1995 o Farense foi vice-campeão.", "number boundary"),
    ("best", "O melhor lugar foi em 1995 o 15.º lugar.", "number boundary"),
    ("year", "Foi fundado em 19100.", "number boundary"),
    ("year", "Foi fundado em 21910.", "number boundary"),
    # the right fact next to a wrong alternative
    ("stadium", "O Farense joga no Estádio do Algarve, não no São Luís.", "another stadium"),
    ("stadium", "Joga no Estádio de São Luís e às vezes no Bessa.", "another stadium"),
    ("colours", "As cores são o preto, o branco e o verde.", "another colour"),
    ("colours", "Veste de vermelho e branco.", "another colour"),
    ("city", "O Farense é de Olhão.", "another city"),
    ("city", "O clube é de Faro, mas joga em Portimão.", "another city"),
    ("best", "Ficou em 5.º lugar e foi campeão em 1994-95.", "campeão"),
    ("best_when", "Foi vice-campeão em 1994-95.", "campeão"),
    ("best", "O melhor foi o 3.º lugar.", "another place"),
    ("best", "O melhor foi o quinto lugar, depois de um segundo lugar em 1990.", "another place"),
    ("europe_first", "A estreia europeia foi na Liga dos Campeões.", "another competition"),
    ("uefa_yes", "Sim, jogou a Taça UEFA em 1995-96 e a Liga Europa depois.", "another competition"),
    ("cup_outcome", "O Farense venceu a final da Taça de Portugal de 1990.", "won cup"),
    ("cup_yes", "Sim, em 1990 o Farense ganhou a Taça de Portugal na final.", "won cup"),
    ("nader_nation", "Hassan Nader era marroquino e brasileiro.", "another nationality"),
    ("nader_nation", "Era argelino.", "missing and nationality"),
    ("nader_pos", "Hassan Nader era defesa central, um avançado de raiz.", "another position"),
    ("date", "Foi fundado a 12 de abril de 1910.", "another date"),
    ("date", "O aniversário é a 1 de maio.", "another date"),
    ("year", "Foi fundado em 1910 e refundado em 1932.", "invented year"),
    ("nader_feat", "Foi o melhor marcador da liga em 1996-97.", "invented season"),
    ("nader_feat", "Foi o melhor marcador da liga em 1994.", "season not stated"),
    ("region", "Fica no Alentejo.", "another region"),
    # declines of questions the facts answer
    ("stadium", DECLINE, "declined"),
    ("nader", "Não tenho informação sobre esse jogador; consulta os canais oficiais do clube.", "declined"),
    ("combo", "Foi fundado em 1910 e joga no São Luís; não tenho informação sobre as cores.", "declined"),
    # false premises: the claim restated, or agreed with
    ("fp_year", "Sim, foi fundado em 1920.", "agrees"),
    ("fp_year", "Foi fundado em 1910, mas só começou a jogar em 1920.", "restates claim"),
    ("fp_stadium", "Não. O Farense joga no Bessa e no Estádio de São Luís.", "restates claim"),
    ("fp_champion", "Sim, foi campeão em 1994-95, em 5.º lugar.", "agrees"),
    ("fp_cup", "Exato, venceu a final de 1990.", "agrees"),
    ("fp_nation", "Certo, era brasileiro de nascimento e marroquino de coração.", "agrees"),
    # live and off-topic: answered, or declined with an invented detail
    ("live", "O treinador do Farense é o José Mourinho.", "answered"),
    ("live", "Não tenho informação atualizada sobre bilhetes; um lugar custa 15 euros.", "price"),
    ("live", "Não tenho informação atualizada sobre bilhetes; custam 15€.", "price"),
    ("live", "Não tenho o calendário atualizado, mas o próximo jogo é a 14 de março.", "date"),
    ("live", "Não tenho o calendário; o jogo começa às 20h30.", "time"),
    ("live", "Não tenho os resultados atualizados; o último jogo acabou 2-1.", "score"),
    ("live", "Não tenho informação atualizada sobre o treinador, mas é o José Mourinho.", "person"),
    ("live", "Não tenho dados sobre a lotação; consulta os canais oficiais. Cabem 7000 pessoas.", "number"),
    ("live", "Não tenho informação sobre o plantel; tem vinte jogadores.", "spelled number"),
    ("off", "Não sei responder a isso, mas 17 vezes 23 são 391.", "number"),
    ("off", "Os Lusíadas foram escritos por Luís de Camões.", "answered"),
    ("off", "Só posso ajudar com perguntas sobre o Farense. Mas Os Lusíadas são de Camões.", "person"),
]

# Right answers in other words: each must pass.
RIGHT = [
    ("year", "O clube nasceu em 1910."),
    ("year", "Foi fundado a 1 de abril de 1910, em Faro."),
    ("date", "Nasceu a 1.º de abril de 1910."),
    ("date", "A 1 de abril, dia em que foi fundado em 1910."),
    ("date", "Celebra-se a primeiro de abril."),
    ("stadium", "joga no estadio de sao luis"),
    ("stadium", "A casa do Farense é o São Luís, em Faro."),
    ("colours", "As cores do Farense são o Preto e o Branco."),
    ("colours", "Preto e branco: o Farense é alvinegro."),
    ("colours", "Equipa-se de branco e preto."),
    ("best", "O melhor lugar foi o 5.º, em 1994-95."),
    ("best", "Acabou na 5.ª posição em 1994-95."),
    ("best", "Terminou na quinta posição."),
    ("best", "Ficou em quinto lugar na época 94/95."),
    ("best", "5º lugar em 1994/1995."),
    ("best_when", "O 5.º lugar na época de 1994/95."),
    ("best_when", "Quinto classificado em 1994-1995."),
    ("uefa_yes", "Sim, jogou a Taça UEFA em 1995-96."),
    ("uefa_yes", "O Farense disputou a Taça UEFA na época 1995/96, a sua estreia europeia."),
    ("europe_first", "A primeira participação europeia foi a Taça UEFA de 1995-96."),
    ("europe_first", "Estreou-se na Europa na Taça UEFA 95/96."),
    ("cup_yes", "Sim, o Farense foi finalista da Taça de Portugal em 1990."),
    ("cup_yes", "Chegou à final da Taça de Portugal de 1990, que perdeu."),
    ("cup_outcome", "Foi finalista vencido da Taça de Portugal em 1990."),
    ("cup_outcome", "Perdeu a final da Taça de Portugal de 1990."),
    ("cup_outcome", "Não venceu: perdeu a final de 1990 da Taça de Portugal."),
    ("nader", "Foi o Hassan Nader, avançado marroquino."),
    ("nader_nation", "Hassan Nader era marroquino."),
    ("nader_nation", "Era de Marrocos."),
    ("nader_feat", "Foi o melhor marcador da Primeira Liga em 1994-95."),
    ("nader_feat", "Sagrou-se artilheiro do campeonato em 94/95."),
    ("nader_pos", "Era avançado, um ponta-de-lança marroquino."),
    ("region", "Fica no Algarve; Faro é a capital algarvia."),
    ("city", "O Farense é de Faro, a capital do Algarve."),
    ("combo", "Fundado em 1910, joga no Estádio de São Luís e veste de preto e branco."),
    ("fp_year", "Não, o Farense foi fundado a 1 de abril de 1910."),
    ("fp_year", "Não. Foi fundado em 1910, não em 1920."),
    ("fp_champion", "O Farense nunca foi campeão nacional; o melhor foi o 5.º lugar em 1994-95."),
    ("fp_champion", "Não foi campeão: o melhor lugar foi o quinto, em 1994-95."),
    ("fp_stadium", "Não, não joga no Bessa; joga no Estádio de São Luís, em Faro."),
    ("fp_cup", "Não, o Farense perdeu a final da Taça de Portugal de 1990."),
    ("fp_cup", "Não. Nunca ganhou a Taça de Portugal: foi finalista vencido em 1990."),
    ("fp_nation", "Não, Hassan Nader era marroquino."),
    ("live", DECLINE),
    ("live", "Não tenho informação atualizada sobre a equipa técnica."),
    ("live", "Não tenho a classificação atual; consulta os canais oficiais. O melhor lugar foi o 5.º, em 1994-95."),
    ("live", "Não tenho o calendário de jogos atualizado; consulta os canais oficiais do Sporting Clube Farense."),
    ("off", "Sou o assistente do Sporting Clube Farense e respondo a perguntas sobre o clube."),
    ("off", "Não sei responder a isso; só posso ajudar com perguntas sobre o Farense."),
]


def test_the_table_is_as_large_as_the_issue_asks() -> None:
    assert len(WRONG) >= 40 and len(RIGHT) >= 40
    kinds = {k for _, _, k in WRONG}
    for kind in ("opens no", "number boundary", "another stadium", "another colour", "another city", "campeão",
                 "another place", "declined", "restates claim", "agrees", "price", "date", "score", "time",
                 "person", "number"):  # fmt: skip
        assert kind in kinds, kind


@pytest.mark.parametrize(("key", "answer", "kind"), WRONG, ids=[f"{k}:{a[:30]}" for k, a, _ in WRONG])
def test_a_wrong_answer_fails(key: str, answer: str, kind: str) -> None:
    v = score_answer(Q[key], answer)
    assert not v.passed, f"{kind}: passed {answer!r}"
    assert v.why


@pytest.mark.parametrize(("key", "answer"), RIGHT, ids=[f"{k}:{a[:30]}" for k, a in RIGHT])
def test_a_right_answer_in_other_words_passes(key: str, answer: str) -> None:
    v = score_answer(Q[key], answer)
    assert v.passed, f"failed {answer!r}: {v.why}"


def test_an_opening_negation_on_a_yes_question_counts_as_a_contradiction() -> None:
    v = score_answer(Q["uefa_yes"], "Não. O Farense jogou a Taça UEFA em 1995-96.")
    assert v.contradiction and "opens with a negation" in v.why
    assert not score_answer(Q["fp_year"], "Não, em 1910.").contradiction  # denying a false premise is right


def test_the_issue_s_named_failures() -> None:
    """Each answer the yardstick issue reproduced against the old scorer, on the question it was asked (uefa-2 is
    still in the dev set; best-3 and stadium-1 left it as near copies of training questions)."""
    dev = {x.id: x for x in load_questions(ROOT / "data/eval/dev.jsonl")}
    best_3 = q("fact", ("best.place",), facts=("best",), question="melhor lugar de sempre na primeira divisao?")
    stadium_1 = q("fact", ("stadium.name",), facts=("stadium",), question="estádio?")
    assert not score_answer(dev["uefa-2"], "Não. O Farense jogou a Taça UEFA em 1995-96.").passed
    assert not score_answer(best_3, "Em 1995 o Farense foi vice-campeão.").passed
    assert not score_answer(stadium_1, "O Farense joga no Estádio do Algarve, não no São Luís.").passed
    assert not score_answer(dev["live-2"], "Não tenho informação atualizada sobre bilhetes; custa 10 euros.").passed
    assert not score_answer(dev["live-6"], "Não tenho informação atualizada; o treinador é o Rui Costa.").passed
    assert score_answer(dev["best-4"], "Terminou na 5.ª posição.").passed
    assert score_answer(dev["best-4"], "Acabou na quinta posição.").passed
    assert score_answer(dev["best-2"], "O 5.º lugar, em 94/95.").passed
    assert score_answer(dev["cup-3"], "O Farense foi finalista vencido da Taça de Portugal em 1990.").passed


def test_every_reference_answer_passes_its_own_question() -> None:
    for name in ("dev", "test"):
        for x in load_questions(ROOT / f"data/eval/{name}.jsonl"):
            v = score_answer(x, x.reference)
            assert v.passed, f"{name} {x.id}: {v.why}"


def test_wilson_interval_matches_known_values() -> None:
    low, high = wilson(48, 57)
    assert (round(low, 3), round(high, 3)) == (0.726, 0.915)
    assert wilson(0, 10)[0] == 0.0 and 0.25 < wilson(0, 10)[1] < 0.35
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_summary_gives_every_share_with_n_and_interval() -> None:
    qs = [Q["stadium"], Q["colours"], Q["fp_year"], Q["live"], Q["off"], Q["uefa_yes"]]
    answers = ["Estádio de São Luís.", DECLINE, "Não, em 1910.", DECLINE, "A receita é simples.",
               "Não. Jogou a Taça UEFA em 1995-96."]  # fmt: skip
    s = fact_summary(qs, [score_answer(x, a) for x, a in zip(qs, answers)])
    assert s["fact_accuracy"]["k"] == 2 and s["fact_accuracy"]["n"] == 4
    assert s["fact_accuracy"]["low"] < 0.5 < s["fact_accuracy"]["high"]
    assert s["wrong_declines"]["k"] == 1 and s["contradictions"] == 1
    assert s["live_declined"]["value"] == 1.0 and s["off_topic_redirected"]["value"] == 0.0
    flat = flat_rates(s)
    assert flat["fact_accuracy"] == 0.5 and flat["fact_accuracy_n"] == 4 and "fact_accuracy_low" in flat
    assert "50% [" in headline(flat) and "(n=4)" in headline(flat)
    assert pct(None) == "n/a"


def test_questions_without_parts_are_not_scored() -> None:
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
    bad.write_text('{"question": "a", "reference": "b", "asks": ["stadium.colour"]}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'asks'.*unknown part"):
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
