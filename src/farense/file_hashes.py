"""sha256 of the run's input files, remembered by their stat signature so that an unchanged file is read once.

Planning a run hashes the dataset and the base model file; for a 4 GB Mistral GGUF that is a full read and sha256
on every `farense run` and every nightly deployment run. `FileHashes` keeps, per resolved path, the file's size,
mtime_ns, ctime_ns, inode and device with the sha256 it had then (`<artifacts_dir>/cache/file-sha256.json`), and
hashes again when any of these changed. ctime is there because mtime can be set back (`cp -p`, `rsync -t
--inplace`, `touch -d`) while ctime cannot. A file modified within RACY_SECONDS of its hashing is not remembered:
a write in the same timestamp tick as the hash would leave the signature unchanged (git's "racy" entries).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from farense.store import sha256_file

CACHE_FILE = "file-sha256.json"
RACY_SECONDS = 2.0


def stat_signature(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHashes:
    """sha256 of files, from the cache file where their signature is unchanged. `save()` writes what was learnt;
    the cache is only ever an optimisation: unreadable, it is ignored; unwritable, it is not written."""

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self.entries: dict[str, dict[str, Any]] = {}
        self.hashed: list[Path] = []  # files read and hashed by this instance (tests and timings look at it)
        self._changed = False
        if cache_file is not None:
            try:
                loaded = json.loads(cache_file.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass

    def sha256(self, path: Path) -> str:
        key = str(Path(path).resolve())
        before = stat_signature(Path(key))
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(Path(key))
        self.hashed.append(Path(key))
        racy = time.time_ns() - before[1] < RACY_SECONDS * 1e9
        if stat_signature(Path(key)) == before and not racy:  # not written to while (or just before) it was read
            self.entries[key] = {"stat": before, "sha256": digest}
            self._changed = True
        return digest

    def save(self) -> None:
        if self.cache_file is None or not self._changed:
            return
        kept = {k: v for k, v in self.entries.items() if os.path.exists(k)}  # forget deleted files
        tmp = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}.tmp")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(kept, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.cache_file)  # whole or not at all, whoever else writes it meanwhile
            self._changed = False
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
