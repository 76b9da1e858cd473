"""`farense data validate`: exit codes, JSON report, no traceback for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = os.environ | {"COLUMNS": "200"}


def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farense.cli", "data", "validate", *args], capture_output=True, text=True, env=ENV
    )


def test_json_report_with_good_and_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"prompt": "Onde joga o Farense?", "completion": "No Estádio de São Luís."}\n'
        "{not json\n"
        '{"messages": [{"role": "bot", "content": "x"}]}\n'
        '{"prompt": "Onde joga o Farense?", "completion": "No Estádio de São Luís."}\n',
        encoding="utf-8",
    )
    proc = validate(str(f), "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["valid"] == 1 and report["duplicates"] == 1 and report["format"] == "completions"
    assert [r["line"] for r in report["rejected"]] == [2, 3]
    assert "messages[0].role" in report["rejected"][1]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"], "validate writes nothing"


def test_exit_1_when_nothing_is_valid_and_2_when_missing(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("nope\n")
    proc = validate(str(f))
    assert proc.returncode == 1
    assert f"{f}:1: invalid JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = validate(str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_dataset_is_clean() -> None:
    proc = validate(str(Path(__file__).resolve().parents[1] / "data" / "farense"), "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["valid"] >= 300 and report["rejected"] == []
