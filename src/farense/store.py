"""Content-addressed artifact store: `artifacts/<stage>/<key>/`, written in a temp folder, renamed into place.

A stage folder counts as done only when it holds `manifest.json`, which is written last, inside the temp folder,
just before the atomic rename. A process killed mid-stage leaves only a `.tmp-*` folder that is never read and is
swept on the next write.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farense import __version__

MANIFEST = "manifest.json"
CONFIG_FILE = "farense_config.json"  # not config.json: model folders need that name
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path, sha256: Callable[[Path], str] = sha256_file) -> str:
    """Hash of a file's bytes, or of a folder's relative paths and file bytes (hidden files skipped). `sha256`
    hashes one file (farense.file_hashes.FileHashes.sha256 remembers unchanged files)."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0" + sha256(f).encode() + b"\0")
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: str, inputs: dict[str, str], config: dict[str, Any], code_version: str) -> str:
    """Key of a stage run: its inputs' content hashes, its config section and its code version."""
    return hash_json({"stage": stage, "inputs": inputs, "config": config, "code": code_version})[:16]


@dataclass(frozen=True)
class StageRecord:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / key

    def work_dir(self, stage: str, key: str) -> Path:
        """Persistent scratch space of an unfinished stage run (training checkpoints live here)."""
        return self.stage_dir(stage) / f".work-{key}"

    def get(self, stage: str, key: str) -> StageRecord | None:
        """The finished artifact for this key, or None. A folder without a readable manifest is not finished."""
        path = self.path(stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if manifest.get("key") != key:
            return None
        return StageRecord(stage, key, path, manifest)

    def others(self, stage: str, key: str) -> list[StageRecord]:
        """Finished artifacts of this stage under other keys (what `status` calls stale), newest first."""
        found = []
        stage_dir = self.stage_dir(stage)
        if not stage_dir.is_dir():
            return []
        for p in stage_dir.iterdir():
            if p.name.startswith(".") or p.name == key or not p.is_dir():
                continue
            rec = self.get(stage, p.name)
            if rec is not None:
                found.append(rec)
        return sorted(found, key=lambda r: r.manifest.get("created_at", 0), reverse=True)

    @contextmanager
    def write(
        self,
        stage: str,
        key: str,
        *,
        inputs: dict[str, str],
        config: dict[str, Any],
        code_version: str,
        summary: dict[str, Any] | None = None,
    ) -> Iterator[Path]:
        """Yield a temp folder to fill; on success write config + manifest and rename it to `<stage>/<key>`.

        `summary` may be mutated by the caller inside the block; it lands in the manifest.
        """
        stage_dir = self.stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_temp(stage_dir, key)
        tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
            files = {
                str(p.relative_to(tmp).as_posix()): {"bytes": p.stat().st_size}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {
                "stage": stage,
                "key": key,
                "created_at": time.time(),
                "farense_version": __version__,
                "code_version": code_version,
                "inputs": inputs,
                "files": files,
                "summary": summary or {},
            }
            _write_json_atomic(tmp / MANIFEST, manifest)
            final = self.path(stage, key)
            if final.exists():  # an unfinished leftover (no manifest): never read, replaced
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _sweep_temp(self, stage_dir: Path, key: str) -> None:
        for p in stage_dir.glob(f".tmp-{key}-*"):
            pid = _pid_of(p.name)
            if pid is None or not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)

    def remove(self, stage: str, key: str) -> None:
        shutil.rmtree(self.path(stage, key), ignore_errors=True)

    def lock_path(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f".lock-{key}"

    def holder(self, stage: str, key: str) -> dict[str, Any] | None:
        """Who holds (or, if dead, last held) the stage's build lock, as it wrote itself into the lock file."""
        return _read_holder(self.lock_path(stage, key))

    @contextmanager
    def lock(
        self,
        stage: str,
        key: str,
        holder: dict[str, Any] | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
        on_takeover: Callable[[dict[str, Any]], None] | None = None,
        poll_seconds: float = 0.5,
    ) -> Iterator[dict[str, Any]]:
        """Hold the build lock of `<stage>/<key>` (an flock on `.lock-<key>`, so the kernel frees it when its
        process dies, SIGKILL included). A second builder waits, after `on_wait(holder)`. The holder writes who it
        is into the file and empties it on release: finding it non-empty once the lock is ours means its last
        holder died mid-build, and `on_takeover(that holder)` runs before we go on."""
        path = self.lock_path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **(holder or {})}
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and on_wait is not None:
                        on_wait(_read_holder(path) or {})
                    waited = True
                    time.sleep(poll_seconds)  # polling, not a blocking flock: signals (Ctrl-C) stay prompt
            previous = _read_holder(path)
            if previous and on_takeover is not None:
                on_takeover(previous)
            me["since"] = time.time()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            yield me
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty file; a killed holder leaves its name behind
            os.close(fd)  # closing the last descriptor releases the flock


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    _write_json_atomic(Path(path), obj)


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # absent, or a holder killed while writing its name: nothing to report


def describe_holder(holder: dict[str, Any]) -> str:
    """`pid 123 on host (flow run 'name' <id>) since 2026-11-22 18:20:01 UTC`."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"])) if "since" in holder else "?"
    run = f" (flow run '{holder['flow_run_name']}' {holder['flow_run_id']})" if holder.get("flow_run_id") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{run} since {since}"


def _pid_of(name: str) -> int | None:
    parts = name.split("-")
    try:
        return int(parts[-2])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether another process of this host has this pid (this process counts as not alive: its own leftovers go)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
