"""Training checkpoints that resume exactly: adapter, optimizer state, step, data position, best loss;
the RNG and the data order are functions of (seed, step), so restoring the step restores them.

Each checkpoint is a folder `step-000200/` written in a temp folder and renamed into place; its manifest holds a
sha256 per file, so a truncated or corrupt checkpoint is detected and the previous one is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from farense.store import sha256_file, write_json_atomic

ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "training_state.json"
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Where a run stands. Data position is derived from `step`: micro-batch = step * grad_accumulation."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    batch_size: int = 0
    grad_accumulation: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    trained_tokens: int = 0
    config_hash: str = ""
    history: dict[str, Any] = field(default_factory=dict)


def _trainable(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_checkpoint(root: Path, model: nn.Module, optimizer: optim.Optimizer, state: TrainState) -> Path:
    """Write `root/step-XXXXXX/` atomically and return it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / ADAPTERS), _trainable(model))
    mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    write_json_atomic(tmp / MANIFEST, {"step": state.step, "sha256": files})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"manifest unreadable ({e.__class__.__name__})"
    for name, digest in manifest.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if sha256_file(f) != digest:
            return f"{name} checksum mismatch (truncated or corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a line for each newer one that was skipped as corrupt."""
    problems = []
    for path in list_checkpoints(root):
        why = verify_checkpoint(path)
        if why is None:
            return path, problems
        problems.append(f"checkpoint {path.name} is unusable: {why}; falling back to an earlier one")
    return None, problems


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE).read_text()))


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainState:
    """Restore adapter weights, optimizer moments and step; return the TrainState. (The RNG needs no saving: the
    trainer reseeds it from (seed, micro-batch index) before every micro-batch.)"""
    model.load_weights(str(path / ADAPTERS), strict=False)
    opt_state = tree_unflatten(list(mx.load(str(path / OPTIMIZER)).items()))
    optimizer.state = opt_state
    mx.eval(model.parameters(), optimizer.state)
    return read_state(path)


def prune_checkpoints(root: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest `keep` checkpoints and the best one."""
    for i, path in enumerate(list_checkpoints(root)):
        if i < keep:
            continue
        if best_step is not None and path.name == f"step-{best_step:06d}":
            continue
        shutil.rmtree(path, ignore_errors=True)
