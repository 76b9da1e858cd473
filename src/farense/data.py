"""Data stage: validate JSONL examples line by line, drop duplicates, split by content, write mlx-lm's files.

Each line is read as bytes and judged alone, so one bad line (invalid UTF-8, broken JSON, too long, too deeply
nested, wrong shape) is quarantined with its file, line number and reason while the others are kept.
Decisions on ambiguous input:
- Empty or whitespace-only lines are rejected as "empty line" (not silently skipped), so counts add up:
  lines = valid + rejected + duplicates.
- A UTF-8 BOM is stripped at the start of a file only; CRLF line ends are accepted.
- Duplicates are rows equal after normalization (a completions row equals the same chat conversation); the first
  is kept.
- mlx-lm picks one dataset class from the first row of a file, so text rows cannot share train.jsonl with chat
  rows: `prepare_dataset` refuses such a mix (completions rows become chat, so those mix freely).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from farense.config import DataConfig
from farense.data_schema import Format, InvalidExample, parse_example
from farense.errors import DataError
from farense.grounding import facts_block, grounded_row, read_facts

RAW_CHARS = 500
_RAW_BYTES = RAW_CHARS * 4  # enough bytes for RAW_CHARS characters of any script
_BOM = b"\xef\xbb\xbf"


class Rejection(BaseModel):
    file: str
    line: int
    reason: str
    raw: str  # the line's first RAW_CHARS characters, undecodable bytes replaced


class ValidationReport(BaseModel):
    valid: int
    rejected: list[Rejection]
    duplicates: int
    format: str  # "chat", "completions", "text", "mixed", or "none" when no row is valid
    files: list[str]
    per_format: dict[str, int]

    @property
    def lines(self) -> int:
        return self.valid + len(self.rejected) + self.duplicates


@dataclass(frozen=True)
class CleanRow:
    file: str
    line: int
    format: Format
    row: dict[str, Any]
    canonical: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical.encode("utf-8")).hexdigest()


def canonical_json(row: dict[str, Any]) -> str:
    """The one serialization used for duplicate detection, split hashing and content hashes."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def dataset_files(path: Path) -> list[Path]:
    """The JSONL files of a dataset: the file itself, or a folder's `*.jsonl`, recursive, sorted, hidden skipped."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: dataset not found; set data.path to a JSONL file or a folder of them")
    files = sorted(
        p
        for p in path.rglob("*.jsonl")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: no *.jsonl file in this folder (hidden files are skipped)")
    return files


def validate_source(path: Path, max_line_bytes: int = 1_000_000) -> tuple[list[dict], ValidationReport]:
    """Clean, deduplicated rows in input order (completions as chat messages) and the report; writes nothing."""
    clean, report = scan_source(path, max_line_bytes)
    return [c.row for c in clean], report


def scan_source(path: Path, max_line_bytes: int = 1_000_000) -> tuple[list[CleanRow], ValidationReport]:
    """Like `validate_source`, keeping each clean row's file, line, format and canonical JSON."""
    files = dataset_files(path)
    clean: list[CleanRow] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    duplicates = 0
    for file in files:
        try:
            f = open(file, "rb")
        except OSError as e:
            raise DataError(f"{file}: cannot read the file: {e.strerror}") from None
        with f:
            for lineno, content, size in _lines(f, max_line_bytes):
                try:
                    fmt, row = _parse_line(lineno, content, size, max_line_bytes)
                except InvalidExample as e:
                    raw = content[:_RAW_BYTES].decode("utf-8", errors="replace")[:RAW_CHARS]
                    rejected.append(Rejection(file=str(file), line=lineno, reason=str(e), raw=raw))
                    continue
                canonical = canonical_json(row)
                if canonical in seen:
                    duplicates += 1
                    continue
                seen.add(canonical)
                clean.append(CleanRow(str(file), lineno, fmt, row, canonical))
    per_format = dict(Counter(c.format for c in clean))
    if len(per_format) == 1:
        fmt_name = next(iter(per_format))
    else:
        fmt_name = "mixed" if per_format else "none"
    report = ValidationReport(
        valid=len(clean),
        rejected=rejected,
        duplicates=duplicates,
        format=fmt_name,
        files=[str(f) for f in files],
        per_format=per_format,
    )
    return clean, report


def _lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """(line number, bytes without the line end, size in bytes). Over-long lines yield only a prefix, never
    read whole into memory."""
    lineno = 0
    limit = max_line_bytes + 2  # room for "\r\n"
    while chunk := f.readline(limit):
        lineno += 1
        if chunk.endswith(b"\n") or len(chunk) < limit:
            content = chunk.removesuffix(b"\n").removesuffix(b"\r")
            yield lineno, content, len(content)
            continue
        size, prefix = len(chunk), chunk[:_RAW_BYTES]
        while rest := f.readline(1 << 20):
            ended = rest.endswith(b"\n")
            piece = rest.removesuffix(b"\n").removesuffix(b"\r") if ended else rest
            size += len(piece)
            prefix += piece[: _RAW_BYTES - len(prefix)]
            if ended:
                break
        yield lineno, prefix, size


def _parse_line(lineno: int, content: bytes, size: int, max_line_bytes: int) -> tuple[Format, dict[str, Any]]:
    if size > max_line_bytes:
        raise InvalidExample(
            f"line is {size:,} bytes, over max_line_bytes={max_line_bytes:,}; "
            "shorten or split the example, or raise data.max_line_bytes"
        )
    offset = 0
    if lineno == 1 and content.startswith(_BOM):
        content, offset = content[len(_BOM) :], len(_BOM)
    elif content.startswith(_BOM):
        raise InvalidExample("UTF-8 BOM inside the file (files joined with `cat` keep theirs); remove it")
    if not content.strip():
        raise InvalidExample("empty line")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = content[e.start]
        raise InvalidExample(
            f"invalid UTF-8 at byte {e.start + offset} of the line (0x{bad:02x}); save the file as UTF-8"
        ) from None
    try:
        obj = json.loads(text)
        return parse_example(obj)
    except json.JSONDecodeError as e:
        raise InvalidExample(f"invalid JSON at column {e.colno}: {e.msg}; fix the line or remove it") from None
    except RecursionError:
        raise InvalidExample(
            "JSON nested too deeply to read; an example holds strings in at most a few levels, flatten it"
        ) from None


def split_rows(rows: list[dict], valid_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, valid) in input order. Each row's split depends only on its content and the seed, so adding rows
    never moves an old one; with >= 2 rows neither split is empty."""
    in_valid = _valid_mask([canonical_json(r) for r in rows], valid_fraction, seed)
    train = [r for r, v in zip(rows, in_valid) if not v]
    valid = [r for r, v in zip(rows, in_valid) if v]
    return train, valid


def _valid_mask(canonicals: list[str], valid_fraction: float, seed: int) -> list[bool]:
    units = [_unit_hash(c, seed) for c in canonicals]
    mask = [u < valid_fraction for u in units]
    if len(units) >= 2 and not any(mask):
        mask[min(range(len(units)), key=units.__getitem__)] = True
    elif len(units) >= 2 and all(mask):
        mask[max(range(len(units)), key=units.__getitem__)] = False
    return mask


def _unit_hash(canonical: str, seed: int) -> float:
    """A row's position in [0, 1), uniform over contents, fixed for a seed."""
    digest = hashlib.sha256(f"{seed}\0{canonical}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def prepare_dataset(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Validate `cfg.path` and write train/valid JSONL, rows.parquet, rejected.jsonl and stats.json; return stats."""
    clean, report = scan_source(cfg.path, cfg.max_line_bytes)
    if not clean:
        problems = "; ".join(f"{r.file}:{r.line}: {r.reason}" for r in report.rejected[:3]) or "the files are empty"
        raise DataError(f"{cfg.path}: no valid example among {report.lines} lines; first problems: {problems}")
    text_rows = [c for c in clean if c.format == "text"]
    if text_rows and len(text_rows) < len(clean):
        first = text_rows[0]
        raise DataError(
            f"{cfg.path}: {len(text_rows)} text rows (first at {first.file}:{first.line}) mixed with "
            f"{len(clean) - len(text_rows)} chat/completions rows; mlx-lm trains one format per dataset: "
            "turn the text rows into prompt/completion pairs or move them to another dataset"
        )
    in_valid = _valid_mask([c.canonical for c in clean], cfg.valid_fraction, cfg.seed)  # the split of the rows as given
    if cfg.facts is not None:
        if text_rows:
            raise DataError(f"{cfg.path}: data.facts grounds chat and completions rows; this dataset is text rows "
                            f"(first at {text_rows[0].file}:{text_rows[0].line})")  # fmt: skip
        block = facts_block(read_facts(cfg.facts))
        clean = [replace(c, row=grounded_row(c.row, block)) for c in clean]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # ASCII escapes: mlx-lm opens these files with the locale's encoding.
    _write_jsonl(out_dir / "train.jsonl", [c.row for c, v in zip(clean, in_valid) if not v], ensure_ascii=True)
    _write_jsonl(out_dir / "valid.jsonl", [c.row for c, v in zip(clean, in_valid) if v], ensure_ascii=True)
    _write_jsonl(out_dir / "rejected.jsonl", [r.model_dump() for r in report.rejected], ensure_ascii=False)

    table = _rows_table(clean, in_valid)
    pq.write_table(table, out_dir / "rows.parquet")
    stats = _stats(report, table)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def _write_jsonl(path: Path, rows: list[dict[str, Any]], *, ensure_ascii: bool) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")


def _chars(row: dict[str, Any]) -> int:
    if "messages" in row:
        return sum(len(m["content"]) for m in row["messages"])
    return len(row["text"])


def _rows_table(clean: list[CleanRow], in_valid: list[bool]) -> pa.Table:
    schema = pa.schema(
        [
            ("split", pa.string()),
            ("format", pa.string()),
            ("file", pa.string()),
            ("line", pa.int64()),
            ("n_messages", pa.int32()),
            ("chars", pa.int64()),
            ("hash", pa.string()),
            ("json", pa.string()),
        ]
    )
    columns = {
        "split": ["valid" if v else "train" for v in in_valid],
        "format": [c.format for c in clean],
        "file": [c.file for c in clean],
        "line": [c.line for c in clean],
        "n_messages": [len(c.row["messages"]) if "messages" in c.row else None for c in clean],
        "chars": [_chars(c.row) for c in clean],
        "hash": [c.hash for c in clean],
        "json": [c.canonical for c in clean],
    }
    return pa.table(columns, schema=schema)


def _stats(report: ValidationReport, table: pa.Table) -> dict[str, Any]:
    chars = table["chars"]
    bounds = pc.min_max(chars)
    p50, p90 = pc.quantile(chars, q=[0.5, 0.9], interpolation="nearest").to_pylist()
    splits = Counter(table["split"].to_pylist())
    return {
        "files": len(report.files),
        "lines": report.lines,
        "valid": report.valid,
        "rejected": len(report.rejected),
        "duplicates": report.duplicates,
        "format": report.format,
        "per_format": report.per_format,
        "split": {"train": splits["train"], "valid": splits["valid"]},
        "chars": {
            "min": bounds["min"].as_py(),
            "p50": p50,
            "p90": p90,
            "max": bounds["max"].as_py(),
            "mean": round(pc.mean(chars).as_py(), 1),
        },
    }
