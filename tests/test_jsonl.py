"""farense.jsonl, the one JSON Lines reader (training splits, validation rows, question sets, the draft corpus)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.errors import DataError
from farense.jsonl import numbered_jsonl_objects, read_jsonl


def test_objects_in_order_with_their_line_numbers_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": "São Luís"}\n{"c": [1, 2]}', encoding="utf-8")  # no final newline
    assert list(numbered_jsonl_objects(path)) == [(1, {"a": 1}), (4, {"b": "São Luís"}), (5, {"c": [1, 2]})]
    assert read_jsonl(path) == [{"a": 1}, {"b": "São Luís"}, {"c": [1, 2]}]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize(("line", "message"), [
    ("{oops", r"bad.jsonl:2: not valid JSON \(.*\); fix or remove the line"),
    ("[1, 2]", r"bad.jsonl:2: expected a JSON object, got list"),
    ('"text"', r"bad.jsonl:2: expected a JSON object, got str"),
])  # fmt: skip
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"ok": True}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_jsonl(path)
