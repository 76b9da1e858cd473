"""Grounded answers (`data.facts`): the facts file's rules, the rows the data stage writes, and the system prompt that
the validate stage and serving then ask with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.config import DataConfig, FarenseConfig
from farense.data import prepare_dataset
from farense.errors import DataError
from farense.evaluate import most_common_system_prompt
from farense.grounding import FACTS_HEADER, facts_block, grounded_row, read_facts
from farense.jsonl import read_jsonl
from farense.pipeline import make_plan

SYSTEM = "És o assistente do SC Farense."
FACTS = ["O Farense foi fundado a 1 de abril de 1910, em Faro.", "As cores do Farense são o preto e o branco."]


def chat_row(i: int, system: bool = True) -> dict:
    turns = [{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": f"Resposta {i}."}]
    return {"messages": ([{"role": "system", "content": SYSTEM}] if system else []) + turns}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_facts(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_facts_are_lines_with_blanks_and_comments_skipped(tmp_path: Path) -> None:
    f = write_facts(tmp_path / "facts.txt", f"# the club\n\n  {FACTS[0]}  \n{FACTS[1]}\n")
    assert read_facts(f) == FACTS
    assert facts_block(FACTS) == f"{FACTS_HEADER}\n- {FACTS[0]}\n- {FACTS[1]}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "facts file not found"),
        (b"# only a comment\n\n", "no fact"),
        (b"ok\n" + "x".encode() * 1001 + b"\n", "facts.txt:2: a fact of 1001 characters"),
        (b"ok\nstill ok\nbad \xff byte\n", "facts.txt:3: not UTF-8"),
    ],
)
def test_a_bad_facts_file_names_the_file_and_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    f = tmp_path / "facts.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_facts(f)


def test_a_row_gets_the_facts_after_its_system_prompt_or_as_one() -> None:
    block = facts_block(FACTS)
    with_system = grounded_row(chat_row(1), block)
    assert with_system["messages"][0] == {"role": "system", "content": f"{SYSTEM}\n{block}"}
    assert with_system["messages"][1:] == chat_row(1)["messages"][1:]
    without = grounded_row(chat_row(2, system=False), block)
    assert without["messages"][0] == {"role": "system", "content": block}
    assert chat_row(1)["messages"][0]["content"] == SYSTEM  # the input row is left as it was


def test_the_data_stage_grounds_every_row_and_keeps_the_split(tmp_path: Path) -> None:
    rows = [chat_row(i) for i in range(40)] + [chat_row(40, system=False)]
    src = write_rows(tmp_path / "qa.jsonl", rows)
    facts = write_facts(tmp_path / "facts.txt", "\n".join(FACTS) + "\n")
    plain, grounded = tmp_path / "plain", tmp_path / "grounded"
    prepare_dataset(DataConfig(path=src, valid_fraction=0.2, seed=3), plain)
    prepare_dataset(DataConfig(path=src, valid_fraction=0.2, seed=3, facts=facts), grounded)

    block = facts_block(FACTS)
    for split in ("train.jsonl", "valid.jsonl"):
        before, after = read_jsonl(plain / split), read_jsonl(grounded / split)
        assert [grounded_row(r, block) for r in before] == after  # the same rows in the same split, grounded
        assert all(block in r["messages"][0]["content"] for r in after)
    # What validate, `farense ask` and `farense serve` ask with: the training data's most common system prompt.
    assert most_common_system_prompt(read_jsonl(grounded / "train.jsonl")) == f"{SYSTEM}\n{block}"
    assert most_common_system_prompt(read_jsonl(plain / "train.jsonl")) == SYSTEM


def test_text_rows_cannot_be_grounded(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "text.jsonl", [{"text": f"Texto {i}."} for i in range(10)])
    facts = write_facts(tmp_path / "facts.txt", FACTS[0])
    with pytest.raises(DataError, match=r"text\.jsonl:1"):
        prepare_dataset(DataConfig(path=src, facts=facts), tmp_path / "out")


def test_the_data_stage_key_follows_the_facts_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "qa.jsonl", [chat_row(i) for i in range(10)])
    facts = write_facts(tmp_path / "facts.txt", FACTS[0] + "\n")

    def data_key(**data_section: object) -> str:
        cfg = FarenseConfig.model_validate(
            {"artifacts_dir": str(tmp_path / "artifacts"), "data": {"path": str(data), **data_section}}
        )
        return make_plan(cfg, until="data")["data"].key

    plain, grounded = data_key(), data_key(facts=str(facts))
    write_facts(facts, FACTS[1] + "\n")
    assert len({plain, grounded, data_key(facts=str(facts))}) == 3


def test_a_relative_facts_path_is_resolved_against_the_project_root(tmp_path: Path) -> None:
    cfg = FarenseConfig.model_validate({"data": {"facts": "data/facts.txt"}}).resolve_paths(tmp_path)
    assert cfg.data.facts == (tmp_path / "data/facts.txt").resolve()
    assert FarenseConfig().resolve_paths(tmp_path).data.facts is None
