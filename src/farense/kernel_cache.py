"""MLX's compiled CUDA kernels kept with the artifacts, safe for many processes at once.

On CUDA, MLX compiles its kernels with NVRTC on first use and caches them in MLX_PTX_CACHE_DIR (by default under
/tmp, which a fresh GPU worker does not have): a Mistral-7B step took 63-72 s from process start to the first
optimizer step on an H100, against 14 s with the cache filled (benchmarks/results/GPU_RESULTS.md). So farense keeps
them in `<artifacts_dir>/cache/kernels/mlx-<version>` (the version keeps kernels of another MLX release out).

MLX writes a cached module in place (`<name>.ptx`, then `<name>.txt` with its kernel names, then `<name>.cu`),
and another process reading it meanwhile loads a partial file: in sweep 23 (20 training runs started at once on a
fresh host) one run failed with "Failed to load compiled ... kernel: Binary format ... is not recognized". The
data-parallel ranks of one CUDA train stage compile the same kernels at the same moment, so they share that risk.
So on CUDA each process gets a private folder (`.proc/<host>-<pid>` under the shared one) seeded with hard links
to the shared folder's complete modules, and at exit it publishes the modules it compiled with atomic renames,
the `.ptx` last (MLX reads a module when its `.ptx` exists). The shared folder only ever holds whole files.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
from pathlib import Path

import mlx.core as mx

from farense.compute import cuda_available
from farense.store import pid_alive

SHARED_ENV = "FARENSE_KERNEL_CACHE"  # the shared folder; inherited by worker processes
OWNER_ENV = "FARENSE_KERNEL_CACHE_PID"  # the process whose private folder MLX_PTX_CACHE_DIR names
PRIVATE_DIR = ".proc"
_MODULE_MARK = ".ptx"  # MLX treats a module as cached when this file exists


def use_kernel_cache(folder: os.PathLike | str, private: bool | None = None) -> str:
    """Point MLX's kernel cache at `folder/mlx-<version>`; returns the folder MLX will use.

    An MLX_PTX_CACHE_DIR the user set wins. On CUDA (or with `private=True`) this process gets its own folder,
    seeded from the shared one and published into it at exit; a worker process that inherits the variables gets
    its own too. MLX reads the variable once, at its first kernel compilation, so call this before any GPU work.
    """
    own = os.environ.get(OWNER_ENV)
    if os.environ.get("MLX_PTX_CACHE_DIR") and own is None:
        return os.environ["MLX_PTX_CACHE_DIR"]
    if own == str(os.getpid()):
        return os.environ["MLX_PTX_CACHE_DIR"]
    shared = Path(os.environ.get(SHARED_ENV) or Path(folder) / f"mlx-{mx.__version__}")
    if not (cuda_available() if private is None else private):
        os.environ["MLX_PTX_CACHE_DIR"] = str(shared)
        return str(shared)
    mine = private_folder(shared)
    os.environ.update({SHARED_ENV: str(shared), OWNER_ENV: str(os.getpid()), "MLX_PTX_CACHE_DIR": str(mine)})
    atexit.register(publish, mine, shared)
    return str(mine)


def _modules(folder: Path) -> dict[str, list[Path]]:
    """Complete modules under `folder` (outside .proc): stem -> its files, for stems whose .ptx exists."""
    files: dict[str, list[Path]] = {}
    for top, dirs, names in os.walk(folder):
        if Path(top) == folder and PRIVATE_DIR in dirs:
            dirs.remove(PRIVATE_DIR)  # other processes' private folders: not walked
        for name in names:
            rel = (Path(top) / name).relative_to(folder)
            if not name.startswith(".tmp-"):
                files.setdefault(str(rel.with_suffix("")), []).append(rel)
    return {stem: rels for stem, rels in files.items() if any(r.suffix == _MODULE_MARK for r in rels)}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)


def private_folder(shared: Path) -> Path:
    """A new folder for this process under `shared/.proc`, holding links to every complete shared module.
    Folders left by dead processes of this host are removed first."""
    procs = shared / PRIVATE_DIR
    procs.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in procs.glob(f"{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine = procs / f"{host}-{os.getpid()}"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    for rels in _modules(shared).values():
        for rel in rels:
            _link(shared / rel, mine / rel)
    return mine


def publish(mine: Path, shared: Path) -> int:
    """Move the modules this process compiled into `shared` (atomic renames, the .ptx of each last), then remove
    `mine`. Modules already there are kept. Returns how many modules were published."""
    if not mine.is_dir():
        return 0
    have = _modules(shared)
    count = 0
    for stem, rels in _modules(mine).items():
        if stem in have:
            continue
        for rel in sorted(rels, key=lambda r: r.suffix == _MODULE_MARK):
            tmp = (shared / rel).with_name(f".tmp-{os.getpid()}-{rel.name}")
            _link(mine / rel, tmp)
            os.replace(tmp, shared / rel)
        count += 1
    shutil.rmtree(mine, ignore_errors=True)
    return count
