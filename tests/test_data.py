"""Data stage: every bad-input rule, line numbers and reasons, the content-stable split, and the written files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator

from farense.config import DataConfig
from farense.data import ValidationReport, _unit_hash, canonical_json, prepare_dataset, split_rows, validate_source
from farense.data_schema import SCHEMAS, write_schemas
from farense.errors import DataError


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def qa(q: str, a: str) -> dict:
    return chat(("user", q), ("assistant", a))


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write(path: Path, *lines: bytes, end: bytes = b"\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(ln + end for ln in lines))
    return path


def rejected(report: ValidationReport) -> list[tuple[int, str]]:
    return [(r.line, r.reason) for r in report.rejected]


GOOD_A = qa("Quando foi fundado o Farense?", "Em 1910.")
GOOD_B = qa("Qual é o estádio?", "O Estádio de São Luís.")


def test_good_rows_are_all_kept_in_order_and_normalized(tmp_path):
    rows_in = [
        GOOD_A,
        chat(("system", "És o assistente do Farense."), ("user", "Cores?"), ("assistant", "Preto e branco.")),
        chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), id=7, source="faq"),
        {"prompt": "Alcunha?", "completion": "Os Leões de Faro.", "meta": {"x": 1}},
    ]
    rows, report = validate_source(write(tmp_path / "d.jsonl", *map(line, rows_in)))
    assert report.rejected == []
    assert (report.valid, report.duplicates, report.format) == (4, 0, "mixed")
    assert report.per_format == {"chat": 3, "completions": 1}
    assert rows[:2] == rows_in[:2]
    assert rows[2] == chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))  # extra keys dropped
    assert rows[3] == qa("Alcunha?", "Os Leões de Faro.")


def test_text_rows_stay_text(tmp_path):
    rows, report = validate_source(write(tmp_path / "t.jsonl", line({"text": "Farense"}), line({"text": "Faro"})))
    assert rows == [{"text": "Farense"}, {"text": "Faro"}]
    assert (report.format, report.per_format) == ("text", {"text": 2})


def test_bom_at_start_and_crlf_line_ends_are_accepted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(GOOD_A) + b"\r\n" + line(GOOD_B) + b"\r\n")
    rows, report = validate_source(path)
    assert rows == [GOOD_A, GOOD_B]
    assert report.rejected == []


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(line(GOOD_A) + b"\n" + line(GOOD_B))
    assert validate_source(path)[0] == [GOOD_A, GOOD_B]


ROLE_ORDER = "turns must alternate user/assistant, merge the two"
EXPECTED = "expected 'messages' (chat), 'prompt' and 'completion' (completions) or 'text' (text)"
BAD_LINES = {
    "empty line": (b"", "empty line"),
    "whitespace line": (b"  \t ", "empty line"),
    "invalid json": (b'{"text": "a",}', "invalid JSON at column 14: Expecting property name enclosed in double quotes; "
                     "fix the line or remove it"),
    "truncated json": (b'{"text": "a"',
                       "invalid JSON at column 13: Expecting ',' delimiter; fix the line or remove it"),
    "bom mid-file": (b"\xef\xbb\xbf" + line(GOOD_A),
                     "UTF-8 BOM inside the file (files joined with `cat` keep theirs); remove it"),
    "invalid utf-8": (b'{"text": "caf\xe9"}', "invalid UTF-8 at byte 13 of the line (0xe9); save the file as UTF-8"),
    "top-level array": (b"[1, 2]", f"the line is a JSON array, not an object; {EXPECTED}"),
    "top-level string": (b'"hello"', f"the line is a JSON string, not an object; {EXPECTED}"),
    "top-level null": (b"null", f"the line is a JSON null, not an object; {EXPECTED}"),
    "unknown format": (line({"question": "q", "answer": "a"}),
                       f"unknown format (keys: 'question', 'answer'); {EXPECTED}"),
    "two formats": (line({"text": "t", **GOOD_A}), "keys of several formats (chat and text); keep one format per row"),
    "messages not a list": (line({"messages": "hi"}), "messages: expected an array, got a string"),
    "empty messages": (line({"messages": []}),
                       "messages: empty list; a conversation needs a user turn and an assistant answer"),
    "message not an object": (line({"messages": ["hi"]}), "messages[0]: expected an object, got a string"),
    "unknown role": (line(chat(("user", "a"), ("assistant", "b"), ("bot", "c"))),
                     "messages[2].role: 'bot' is not one of system/user/assistant"),
    "content not a string": (line({"messages": [{"role": "user", "content": ["a"]}, GOOD_A["messages"][1]]}),
                             "messages[0].content: expected a string, got an array"),
    "missing content": (line({"messages": [{"role": "user"}, GOOD_A["messages"][1]]}),
                        "messages[0].content: required field missing; add it"),
    "several problems": (line({"messages": [{"role": "bot", "content": 1}, {"content": "x"}]}),
                         "messages[0].content: expected a string, got a number; "
                         "messages[0].role: 'bot' is not one of system/user/assistant; "
                         "messages[1].role: required field missing; add it"),
    "empty content": (line(qa("", "b")),
                      "messages[0].content: empty or whitespace only; write the text or drop the row"),
    "whitespace content": (line(qa("a", " \n\t")),
                           "messages[1].content: empty or whitespace only; write the text or drop the row"),
    "no assistant turn": (line(chat(("user", "a"))), "messages[0].role: the conversation must end with an assistant "
                          "turn, got 'user'; add the answer or drop the last turn"),
    "ends with user": (line(chat(("user", "a"), ("assistant", "b"), ("user", "c"))),
                       "messages[2].role: the conversation must end with an assistant turn, got 'user'; "
                       "add the answer or drop the last turn"),
    "starts with assistant": (line(chat(("assistant", "a"), ("user", "b"), ("assistant", "c"))),
                              "messages[0].role: the conversation must start with a user turn, got 'assistant'"),
    "assistant after system": (line(chat(("system", "s"), ("assistant", "a"))), "messages[1].role: the conversation "
                               "must start with a user turn after the system message, got 'assistant'"),
    "system only": (line(chat(("system", "s"))),
                    "messages: only a system message; add a user turn and an assistant answer"),
    "system not first": (line(chat(("user", "a"), ("system", "s"), ("assistant", "b"))),
                         "messages[1].role: 'system' is only allowed as the first message; move it to the start"),
    "two user turns": (line(chat(("user", "a"), ("user", "b"), ("assistant", "c"))),
                       f"messages[1].role: 'user' follows another 'user' turn; {ROLE_ORDER}"),
    "tools": (line({**GOOD_A, "tools": [{"type": "function"}]}),
              "tools: tool-calling rows are not supported; remove 'tools' and the tool turns"),
    "missing completion": (line({"prompt": "a"}), "completion: required field missing; add it"),
    "blank prompt": (line({"prompt": " ", "completion": "b"}),
                     "prompt: empty or whitespace only; write the text or drop the row"),
    "completion not a string": (line({"prompt": "a", "completion": None}), "completion: expected a string, got a null"),
    "blank text": (line({"text": ""}), "text: empty or whitespace only; write the text or drop the row"),
    "text not a string": (line({"text": 3}), "text: expected a string, got a number"),
    "unpaired surrogate": (b'{"text": "a\\ud800b"}',
                           "text: contains an unpaired surrogate \\ud800, which is not Unicode; fix the escape"),
}


@pytest.mark.parametrize("bad,reason", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_a_bad_line_is_rejected_with_its_reason_and_the_others_kept(tmp_path, bad, reason):
    path = write(tmp_path / "d.jsonl", line(GOOD_A), bad, line(GOOD_B))
    rows, report = validate_source(path)
    assert rejected(report) == [(2, reason)]
    assert rows == [GOOD_A, GOOD_B]
    assert report.rejected[0].file == str(path)
    assert report.rejected[0].raw == bad.decode("utf-8", errors="replace")


def test_long_lines_are_rejected_without_parsing(tmp_path):
    at_limit = line({"text": "x" * 40})
    limit = len(at_limit)
    over = b"{not json" + b"y" * limit  # would be invalid JSON: proves the length check comes first
    huge = b"z" * 3_000_000
    path = write(tmp_path / "d.jsonl", at_limit, over, huge, line({"text": "w" * 40}), end=b"\r\n")
    rows, report = validate_source(path, max_line_bytes=limit)
    over_reason = f"line is {len(over):,} bytes, over max_line_bytes={limit:,}; shorten or split the example, " \
                  "or raise data.max_line_bytes"
    assert rejected(report) == [(2, over_reason), (3, over_reason.replace(f"{len(over):,}", "3,000,000"))]
    assert rows == [{"text": "x" * 40}, {"text": "w" * 40}]
    assert len(report.rejected[1].raw) == 500


def test_deeply_nested_json_is_rejected_without_recursion_error(tmp_path):
    depth = 100_000
    arrays = b"[" * depth + b"]" * depth
    in_text = b'{"text": ' + b"[" * depth + b"]" * depth + b"}"
    in_objects = b'{"a":' * depth + b"1" + b"}" * depth
    rows, report = validate_source(write(tmp_path / "deep.jsonl", arrays, line(GOOD_A), in_text, in_objects))
    reason = "JSON nested too deeply to read; an example holds strings in at most a few levels, flatten it"
    assert rejected(report) == [(1, reason), (3, reason), (4, reason)]
    assert rows == [GOOD_A]
    assert report.rejected[0].raw == "[" * 500


def test_invalid_utf8_in_the_middle_line_only_rejects_that_line(tmp_path):
    lines = [line({"text": f"linha {i} ação"}) for i in range(5)]
    lines[2] = b'{"text": "linha 2 a\xc3\x28o"}'  # a lead byte followed by a non-continuation byte
    rows, report = validate_source(write(tmp_path / "d.jsonl", *lines))
    assert rejected(report) == [(3, "invalid UTF-8 at byte 19 of the line (0xc3); save the file as UTF-8")]
    assert rows == [{"text": f"linha {i} ação"} for i in (0, 1, 3, 4)]
    assert report.rejected[0].raw == '{"text": "linha 2 a\ufffd(o"}'


def test_invalid_utf8_offset_counts_a_stripped_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "\xff"}\n')
    assert rejected(validate_source(path)[1]) == [
        (1, "invalid UTF-8 at byte 13 of the line (0xff); save the file as UTF-8")
    ]


def test_exact_duplicates_are_removed_counted_and_the_first_kept(tmp_path):
    other_spacing = b'{"messages":[{"content":"Em 1910.","role":"assistant"}]}'.replace(
        b"[", b'[{"role":"user","content":"Quando foi fundado o Farense?"},', 1
    )
    as_completion = line({"prompt": GOOD_A["messages"][0]["content"], "completion": "Em 1910."})
    path = write(tmp_path / "d.jsonl", line(GOOD_A), line(GOOD_B), line(GOOD_A), other_spacing, as_completion)
    rows, report = validate_source(path)
    assert rows == [GOOD_A, GOOD_B]
    assert (report.valid, report.duplicates, report.rejected) == (2, 3, [])
    assert report.per_format == {"chat": 2}


def test_lines_add_up(tmp_path):
    path = write(tmp_path / "d.jsonl", line(GOOD_A), b"", line(GOOD_A), b"oops", line(GOOD_B))
    _, report = validate_source(path)
    assert (report.valid, len(report.rejected), report.duplicates, report.lines) == (2, 2, 1, 5)


def test_a_folder_is_read_recursively_in_sorted_order_with_line_numbers_per_file(tmp_path):
    root = tmp_path / "ds"
    b = write(root / "b.jsonl", line(GOOD_B), b"{bad")
    a = write(root / "a.jsonl", line(GOOD_A), b"")
    c = write(root / "sub" / "c.jsonl", line({"prompt": "p", "completion": "c"}), line(chat(("user", "u"))))
    write(root / "notes.txt", b"not data")
    write(root / ".cache" / "x.jsonl", b"hidden, never read")
    rows, report = validate_source(root)
    assert report.files == [str(a), str(b), str(c)]
    assert [(r.file, r.line) for r in report.rejected] == [(str(a), 2), (str(b), 2), (str(c), 2)]
    assert rows == [GOOD_A, GOOD_B, qa("p", "c")]


def test_missing_path_and_empty_folder_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: dataset not found"):
        validate_source(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \*\.jsonl file in this folder"):
        validate_source(tmp_path / "empty")


def test_validate_source_writes_nothing(tmp_path):
    write(tmp_path / "d.jsonl", line(GOOD_A), b"bad")
    before = sorted(tmp_path.rglob("*"))
    validate_source(tmp_path)
    assert sorted(tmp_path.rglob("*")) == before


def numbered(n: int, start: int = 0) -> list[dict]:
    return [qa(f"pergunta {i}", f"resposta {i}") for i in range(start, start + n)]


def test_split_is_seeded_stable_by_content_and_keeps_input_order():
    rows = numbered(200)
    train, valid = split_rows(rows, 0.1, seed=42)
    assert 8 <= len(valid) <= 35 and len(train) + len(valid) == 200
    assert train == [r for r in rows if r in train] and valid == [r for r in rows if r in valid]
    assert split_rows(rows, 0.1, seed=42) == (train, valid)
    assert split_rows(rows, 0.1, seed=7)[1] != valid
    assert split_rows(list(reversed(rows)), 0.1, seed=42)[1] == list(reversed(valid))

    more = numbered(50, start=200)
    new_train, new_valid = split_rows(more[:25] + rows + more[25:], 0.1, seed=42)
    assert [r for r in new_valid if r in rows] == valid
    assert [r for r in new_train if r in rows] == train


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_both_splits_are_non_empty_from_two_rows(fraction):
    for n in (2, 3, 10):
        train, valid = split_rows(numbered(n), fraction, seed=0)
        assert len(train) >= 1 and len(valid) >= 1 and len(train) + len(valid) == n
    assert sum(map(len, split_rows(numbered(1), 0.5, seed=0))) == 1
    assert split_rows([], 0.1, seed=0) == ([], [])


def test_fallback_moves_the_row_with_the_smallest_or_largest_hash():
    rows = numbered(5)
    units = [_unit_hash(canonical_json(r), 3) for r in rows]
    assert split_rows(rows, 1e-9, seed=3)[1] == [rows[units.index(min(units))]]
    assert split_rows(list(reversed(rows)), 1e-9, seed=3)[1] == [rows[units.index(min(units))]]
    assert split_rows(rows, 1 - 1e-9, seed=3)[0] == [rows[units.index(max(units))]]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_dataset_writes_mlx_files_parquet_quarantine_and_stats(tmp_path, capsys):
    src = write(
        tmp_path / "src.jsonl",
        *[line(r) for r in numbered(30)],
        line({"prompt": "Olá", "completion": "Bom dia!"}),
        b"",
        line(numbered(1)[0]),
        b"[1]",
    )
    out = tmp_path / "out"
    stats = prepare_dataset(DataConfig(path=src, valid_fraction=0.2, seed=1), out)
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in out.iterdir()) == [
        "rejected.jsonl", "rows.parquet", "stats.json", "train.jsonl", "valid.jsonl"
    ]

    train, valid = read_jsonl(out / "train.jsonl"), read_jsonl(out / "valid.jsonl")
    expected_train, expected_valid = split_rows(numbered(30) + [qa("Olá", "Bom dia!")], 0.2, seed=1)
    assert (train, valid) == (expected_train, expected_valid)
    assert (out / "train.jsonl").read_bytes().isascii()

    quarantine = read_jsonl(out / "rejected.jsonl")
    assert [(q["file"], q["line"], q["reason"], q["raw"]) for q in quarantine] == [
        (str(src), 32, "empty line", ""),
        (str(src), 34, f"the line is a JSON array, not an object; {EXPECTED}", "[1]"),
    ]

    table = pq.read_table(out / "rows.parquet")
    assert table.column_names == ["split", "format", "file", "line", "n_messages", "chars", "hash", "json"]
    assert table.num_rows == 31
    assert table["line"].to_pylist() == list(range(1, 32))
    assert table["format"].to_pylist() == ["chat"] * 30 + ["completions"]
    assert set(table["n_messages"].to_pylist()) == {2}
    assert table["split"].to_pylist().count("valid") == len(valid)
    assert [json.loads(j) for j in table["json"].to_pylist()] == numbered(30) + [qa("Olá", "Bom dia!")]
    assert len(set(table["hash"].to_pylist())) == 31
    chars = [len(f"pergunta {i}") + len(f"resposta {i}") for i in range(30)] + [len("Olá") + len("Bom dia!")]
    assert table["chars"].to_pylist() == chars

    assert stats == json.loads((out / "stats.json").read_text())
    assert stats == {
        "files": 1,
        "lines": 34,
        "valid": 31,
        "rejected": 2,
        "duplicates": 1,
        "format": "mixed",
        "per_format": {"chat": 30, "completions": 1},
        "split": {"train": len(train), "valid": len(valid)},
        "chars": {"min": 11, "p50": 22, "p90": 22, "max": 22, "mean": round(sum(chars) / 31, 1)},
    }


def test_prepare_dataset_text_rows(tmp_path):
    src = write(tmp_path / "t.jsonl", *[line({"text": "ab" * i}) for i in range(1, 11)])
    stats = prepare_dataset(DataConfig(path=src), tmp_path / "out")
    assert stats["chars"] == {"min": 2, "p50": 10, "p90": 18, "max": 20, "mean": 11.0}
    assert stats["split"]["train"] + stats["split"]["valid"] == 10 and stats["split"]["valid"] >= 1
    table = pq.read_table(tmp_path / "out" / "rows.parquet")
    assert table["n_messages"].to_pylist() == [None] * 10
    rows = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "valid.jsonl")
    assert all(set(r) == {"text"} for r in rows)


def test_config_fields_reach_the_data_stage(tmp_path):
    src = write(tmp_path / "d.jsonl", *[line(r) for r in numbered(40)], line({"text": "x" * 200}))
    small = prepare_dataset(DataConfig(path=src, max_line_bytes=150), tmp_path / "a")
    assert (small["valid"], small["rejected"]) == (40, 1)
    with pytest.raises(DataError, match="text rows"):
        prepare_dataset(DataConfig(path=src), tmp_path / "b")
    base = read_jsonl(tmp_path / "a" / "valid.jsonl")
    prepare_dataset(DataConfig(path=src, max_line_bytes=150, seed=5), tmp_path / "c")
    assert read_jsonl(tmp_path / "c" / "valid.jsonl") != base
    half = prepare_dataset(DataConfig(path=src, max_line_bytes=150, valid_fraction=0.5), tmp_path / "d")
    assert half["split"]["valid"] > small["split"]["valid"]


def test_prepare_dataset_without_a_valid_row_is_a_data_error(tmp_path):
    src = write(tmp_path / "bad.jsonl", b"", b"{oops", line(chat(("user", "a"))), b"[]")
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(path=src), tmp_path / "out")
    assert str(err.value) == (
        f"{src}: no valid example among 4 lines; first problems: {src}:1: empty line; "
        f"{src}:2: invalid JSON at column 2: Expecting property name enclosed in double quotes; fix the line or "
        f"remove it; {src}:3: messages[0].role: the conversation must end with an assistant turn, got 'user'; "
        "add the answer or drop the last turn"
    )
    assert not (tmp_path / "out").exists()


def test_prepare_dataset_refuses_text_mixed_with_chat(tmp_path):
    src = write(tmp_path / "m.jsonl", line(GOOD_A), line({"text": "solto"}), line(GOOD_B))
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(path=src), tmp_path / "out")
    assert str(err.value) == (
        f"{src}: 1 text rows (first at {src}:2) mixed with 2 chat/completions rows; mlx-lm trains one format per "
        "dataset: turn the text rows into prompt/completion pairs or move them to another dataset"
    )


def test_schemas_are_valid_draft_2020_12_and_exported(tmp_path):
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)
    paths = write_schemas(tmp_path / "schemas")
    assert [p.name for p in paths] == ["chat.schema.json", "completions.schema.json", "text.schema.json"]
    assert {p.name.split(".")[0]: json.loads(p.read_text()) for p in paths} == SCHEMAS
