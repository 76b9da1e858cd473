"""Stage keys and the plan of a run: which stage artifacts exist for this config and inputs, which must be built.

A stage key hashes the content of the stage's inputs (dataset bytes, base model identity, upstream stage keys),
its config section and its code version (the source of the modules that implement it). Computing the plan reads
files but builds nothing, so `farense run` can tell in about a second that everything is cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farense.config import STAGES, FarenseConfig, Stage
from farense.errors import DataError
from farense.store import ArtifactStore, StageRecord, hash_path, stage_key

SRC = Path(__file__).resolve().parent

# Modules whose source makes a stage's code version; editing one invalidates that stage and what follows.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("data.py", "data_schema.py"),
    "model": ("model.py", "gguf.py"),
    "train": ("train.py", "batching.py", "loss.py", "checkpoint.py", "compute.py", "fast_math.py", "memory.py",
              "distributed.py", "train_worker.py", "jsonl.py"),
    "validate": ("evaluate.py", "train.py", "batching.py", "loss.py", "compute.py", "fast_math.py", "jsonl.py",
                 "prompting.py"),
    "benchmark": ("benchmark.py", "plots.py", "evaluate.py", "train.py", "batching.py", "loss.py", "compute.py",
                  "fast_math.py", "jsonl.py", "prompting.py"),
    "export": ("export.py", "evaluate.py", "jsonl.py"),
}

UPSTREAM: dict[str, tuple[str, ...]] = {
    "data": (),
    "model": (),
    "train": ("data", "model"),
    "validate": ("data", "model", "train"),
    "benchmark": ("data", "model", "train", "validate"),
    "export": ("model", "train", "validate", "benchmark"),
}


def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for name in STAGE_MODULES[stage]:
        f = SRC / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class StagePlan:
    stage: str
    key: str
    inputs: dict[str, str]
    config: dict[str, Any]
    code_version: str
    upstream: tuple[str, ...] = field(default=())


def _section_for_key(cfg: FarenseConfig, stage: str) -> dict[str, Any]:
    if stage == "data":
        d = cfg.section("data")
        d.pop("path"), d.pop("dev_questions"), d.pop("test_questions")  # content, not location, makes the key
        return d
    if stage == "model":
        return cfg.section("model") | {"source": None}
    if stage == "train":
        return cfg.section("train")
    if stage == "validate":
        return cfg.section("eval")
    if stage == "benchmark":
        return cfg.section("benchmark") | {"train": cfg.section("train")}
    return cfg.section("export")


def source_inputs(cfg: FarenseConfig, stage: str) -> dict[str, str]:
    """Content hashes of a stage's external inputs (files the user provides)."""
    if stage == "data":
        if not cfg.data.path.exists():
            raise DataError(f"{cfg.data.path}: dataset not found (set data.path to a JSONL file or a folder)")
        return {"dataset": hash_path(cfg.data.path)}
    if stage == "model":
        from farense.model import resolve_source

        return {"source": resolve_source(cfg.model).identity}
    if stage == "validate":
        # The sealed test set is hashed only so that a changed file is answered again; nothing chooses by it.
        return {name: hash_path(q) if q.exists() else "none"
                for name, q in (("questions", cfg.data.dev_questions), ("test_questions", cfg.data.test_questions))}
    return {}


def make_plan(cfg: FarenseConfig, until: str = "export") -> dict[str, StagePlan]:
    """Keys of every stage up to `until`, in order."""
    plans: dict[str, StagePlan] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        if stage == "benchmark" and not cfg.benchmark.enabled:
            continue
        inputs = source_inputs(cfg, stage)
        for up in UPSTREAM[stage]:
            if up in plans:
                inputs[up] = plans[up].key
        section = _section_for_key(cfg, stage)
        version = code_version(stage)
        plans[stage] = StagePlan(stage, stage_key(stage, inputs, section, version), inputs, section, version,
                                 tuple(u for u in UPSTREAM[stage] if u in plans))
    return plans


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # done | stale | missing
    key: str
    path: Path


def stage_statuses(cfg: FarenseConfig, until: str = "export") -> list[StageStatus]:
    store = ArtifactStore(cfg.artifacts_dir)
    out = []
    for sp in make_plan(cfg, until).values():
        if store.get(sp.stage, sp.key) is not None:
            state = "done"
        elif store.others(sp.stage, sp.key):
            state = "stale"
        else:
            state = "missing"
        out.append(StageStatus(sp.stage, state, sp.key, store.path(sp.stage, sp.key)))
    return out


def build_stage(
    store: ArtifactStore,
    sp: StagePlan,
    cfg: FarenseConfig,
    produce: Callable[[Path], dict[str, Any]],
) -> tuple[StageRecord, bool]:
    """Return the stage's artifact, building it with `produce(tmp_dir) -> summary` if it is not there yet.

    The second value says whether this call built it (False: it was already complete).
    """
    found = store.get(sp.stage, sp.key)
    if found is not None:
        return found, False
    summary: dict[str, Any] = {}
    with store.write(
        sp.stage,
        sp.key,
        inputs=sp.inputs,
        config=cfg.model_dump(mode="json"),
        code_version=sp.code_version,
        summary=summary,
    ) as tmp:
        summary.update(produce(tmp))
    record = store.get(sp.stage, sp.key)
    assert record is not None, f"{sp.stage} was written but has no manifest"
    return record, True


def describe_plan(plans: dict[str, StagePlan]) -> str:
    return json.dumps({s: p.key for s, p in plans.items()})


def resolve_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}': choose from {', '.join(STAGES)}")
    return name  # type: ignore[return-value]
