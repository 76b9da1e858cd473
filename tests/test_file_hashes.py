"""The stat-keyed cache of input file hashes: an unchanged file is not read again, a changed one always is."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from farense import file_hashes
from farense.config import load_config
from farense.file_hashes import CACHE_FILE, FileHashes
from farense.pipeline import make_plan


def settled(path: Path, content: bytes, age_s: float = 60.0) -> Path:
    """A file last written `age_s` ago (older than the racy window)."""
    path.write_bytes(content)
    past = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(past, past))
    return path


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    f = settled(tmp_path / "base.gguf", b"GGUF weights")
    cache = tmp_path / "cache" / CACHE_FILE
    first = FileHashes(cache)
    assert first.sha256(f) == sha(b"GGUF weights") and first.hashed == [f.resolve()]
    first.save()
    assert json.loads(cache.read_text())[str(f.resolve())]["sha256"] == sha(b"GGUF weights")
    again = FileHashes(cache)
    assert again.sha256(f) == sha(b"GGUF weights") and again.hashed == []
    assert again.sha256(tmp_path / "." / "base.gguf") == sha(b"GGUF weights") and again.hashed == []  # same file


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    f = settled(tmp_path / "base.gguf", b"GGUF weights")
    cache = tmp_path / CACHE_FILE
    hashes = FileHashes(cache)
    hashes.sha256(f)
    hashes.save()
    old_mtime = f.stat().st_mtime_ns

    settled(f, b"GGUF WEIGHTS", age_s=30.0)  # the same size, a later mtime
    assert FileHashes(cache).sha256(f) == sha(b"GGUF WEIGHTS")

    # The same size and the old mtime put back (cp -p, rsync -t --inplace): ctime still tells.
    f.write_bytes(b"gguf weights")
    os.utime(f, ns=(old_mtime, old_mtime))
    changed = FileHashes(cache)
    assert changed.sha256(f) == sha(b"gguf weights") and changed.hashed == [f.resolve()]

    # Another file in its place (a new inode), same size and times.
    replacement = settled(tmp_path / "new.gguf", b"GGUF weighTS")
    os.utime(replacement, ns=(old_mtime, old_mtime))
    os.replace(replacement, f)
    assert FileHashes(cache).sha256(f) == sha(b"GGUF weighTS")


def test_a_file_written_just_now_is_hashed_but_not_remembered(tmp_path: Path) -> None:
    f = tmp_path / "fresh.jsonl"
    f.write_bytes(b"{}\n")  # a write later in the same mtime tick would keep the signature
    hashes = FileHashes(tmp_path / CACHE_FILE)
    assert hashes.sha256(f) == sha(b"{}\n")
    hashes.save()
    assert not (tmp_path / CACHE_FILE).exists()


def test_an_unreadable_or_unwritable_cache_is_only_slower(tmp_path: Path) -> None:
    f = settled(tmp_path / "data.jsonl", b"{}\n")
    (tmp_path / CACHE_FILE).write_text("{not json")
    broken = FileHashes(tmp_path / CACHE_FILE)
    assert broken.sha256(f) == sha(b"{}\n")
    broken.save()
    assert FileHashes(tmp_path / CACHE_FILE).sha256(f) == sha(b"{}\n")
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    unwritable = FileHashes(tmp_path / "blocked" / CACHE_FILE)
    assert unwritable.sha256(f) == sha(b"{}\n")
    unwritable.save()  # no error


def test_the_plan_hashes_unchanged_inputs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    settled(data / "qa.jsonl", b'{"prompt": "Onde?", "completion": "Faro."}\n')
    model = settled(tmp_path / "tiny.gguf", b"GGUF" + bytes(64))
    cfg = load_config(None, {"artifacts_dir": str(tmp_path / "artifacts"), "data.path": str(data),
                             "model.source": str(model)})  # fmt: skip
    read: list[Path] = []
    real = file_hashes.sha256_file
    monkeypatch.setattr(file_hashes, "sha256_file", lambda p: read.append(Path(p)) or real(p))

    first = make_plan(cfg, "model")
    assert sorted(p.name for p in read) == ["qa.jsonl", "tiny.gguf"]
    read.clear()
    assert make_plan(cfg, "model") == first and read == []
    settled(model, b"GGUF" + bytes(63) + b"\1", age_s=10.0)
    changed = make_plan(cfg, "model")
    assert [p.name for p in read] == ["tiny.gguf"]
    assert changed["data"].key == first["data"].key and changed["model"].key != first["model"].key
