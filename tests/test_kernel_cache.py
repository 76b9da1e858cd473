"""Compiled CUDA kernels kept with the artifacts (MLX_PTX_CACHE_DIR), so a fresh GPU worker skips compilation, and
safe when many processes compile at once (each writes into its own folder and publishes whole files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from farense import kernel_cache
from farense.config import load_config
from farense.kernel_cache import private_folder, publish, use_kernel_cache
from farense.stages import run_local

ENV = ("MLX_PTX_CACHE_DIR", kernel_cache.SHARED_ENV, kernel_cache.OWNER_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kernel_cache.atexit, "register", lambda *a: None)  # no publishing at pytest's exit


def module(folder: Path, stem: str, ptx: bytes = b"ptx", txt: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if txt:
        (folder / f"{stem}.txt").write_text(f"kernel\t_Z{stem}\n")
    if ptx is not None:
        (folder / f"{stem}.ptx").write_bytes(ptx)


def test_kernel_cache_folder_is_versioned_and_an_explicit_setting_wins(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    got = use_kernel_cache(tmp_path / "kernels", private=False)
    assert got == str(tmp_path / "kernels" / f"mlx-{mx.__version__}")
    assert use_kernel_cache(tmp_path / "elsewhere") == got  # set once per process: MLX reads it once
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/opt/my-cache")
    assert use_kernel_cache(tmp_path / "kernels") == "/opt/my-cache"
    assert use_kernel_cache(tmp_path / "kernels", private=True) == "/opt/my-cache"


def test_a_process_compiles_into_its_own_folder_seeded_with_the_whole_shared_modules(tmp_path: Path) -> None:
    shared = tmp_path / "kernels" / f"mlx-{mx.__version__}"
    module(shared, "done")
    module(shared / "sub", "nested")  # newer MLX keeps some modules in subfolders
    module(shared, "half", ptx=None)  # a .txt without its .ptx: not a module MLX would read
    (shared / ".tmp-99-other.ptx").write_bytes(b"partial")  # another process's rename in flight
    mine = Path(use_kernel_cache(tmp_path / "kernels", private=True))
    assert mine.parent == shared / kernel_cache.PRIVATE_DIR and mine.name.endswith(f"-{os.getpid()}")
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(mine)
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file()) == [
        "done.ptx", "done.txt", "sub/nested.ptx", "sub/nested.txt"]  # fmt: skip
    assert (mine / "done.ptx").stat().st_ino == (shared / "done.ptx").stat().st_ino  # a link, not a copy
    assert use_kernel_cache(tmp_path / "kernels", private=True) == str(mine)  # once per process


def test_publishing_moves_only_new_whole_modules_and_removes_the_private_folder(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    module(shared, "old", ptx=b"kept")
    mine = private_folder(shared)
    module(mine, "new", ptx=b"compiled here")
    (mine / "new.cu").write_text("// source")
    (mine / "old.ptx").unlink()
    module(mine, "old", ptx=b"compiled again")  # a module the shared folder has: theirs is kept
    module(mine, "cut", ptx=None)  # MLX died between the files: nothing to publish
    assert publish(mine, shared) == 1
    assert (shared / "new.ptx").read_bytes() == b"compiled here"
    assert (shared / "new.txt").is_file() and (shared / "new.cu").is_file()
    assert (shared / "old.ptx").read_bytes() == b"kept"
    assert not (shared / "cut.txt").exists() and not mine.exists()
    assert not list(shared.glob(".tmp-*"))


def test_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = shared / kernel_cache.PRIVATE_DIR / f"{kernel_cache.socket.gethostname()}-{int(dead.stdout)}"
    module(stale, "x")
    live = shared / kernel_cache.PRIVATE_DIR / f"{kernel_cache.socket.gethostname()}-1"  # pid 1 is alive
    live.mkdir()
    private_folder(shared)
    assert not stale.exists() and live.exists()


def test_a_worker_process_gets_its_own_folder_and_publishes_at_exit(tmp_path: Path) -> None:
    parent = Path(use_kernel_cache(tmp_path / "kernels", private=True))
    shared = parent.parent.parent
    code = ("import os, sys; from pathlib import Path; from farense.kernel_cache import use_kernel_cache;"
            "d = Path(use_kernel_cache(sys.argv[1], private=True)); print(d);"
            "(d / 'w.txt').write_text('k\\t_Zk\\n'); (d / 'w.ptx').write_bytes(b'worker')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "unused")], capture_output=True, text=True,
                         env=os.environ.copy(), check=True)  # fmt: skip
    child = Path(out.stdout.strip())
    assert child != parent and child.parent == parent.parent  # inherited the shared folder, not the parent's own
    assert (shared / "w.ptx").read_bytes() == b"worker" and not child.exists()


def test_running_a_stage_points_mlx_at_the_artifacts_cache(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": "Sim."}]}
            for i in range(12)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, {"artifacts_dir": str(tmp_path / "artifacts"), "data.path": str(data)})
    run_local(cfg, only=None, until="data")
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "artifacts" / "cache" / "kernels" / f"mlx-{mx.__version__}")
