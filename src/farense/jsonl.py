"""The one JSON Lines reader: every line an object, and an error that names the file and line when one is not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farense.errors import DataError


def numbered_jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every object of a JSON Lines file, in order."""
    return [row for _, row in numbered_jsonl_objects(path)]
