"""Stage keys and the plan of a run: which stage artifacts exist for this config and inputs, which must be built.

A stage key hashes the content of the stage's inputs (dataset bytes, base model identity, upstream stage keys),
its config section and its code version (the source of the modules that implement it). Computing the plan reads
files but builds nothing, and an input file unchanged since it was last hashed is not read again (farense.file_hashes),
so `farense run` can tell in about a second that everything is cached, whatever the size of the base model file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farense.config import STAGES, FarenseConfig, Stage
from farense.errors import DataError
from farense.file_hashes import CACHE_FILE, FileHashes
from farense.model import resolve_source
from farense.store import ArtifactStore, StageRecord, hash_path, sha256_file, stage_key

SRC = Path(__file__).resolve().parent

# Modules whose source makes a stage's code version; editing one invalidates that stage and what follows.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "data": ("data.py", "data_schema.py"),
    "model": ("model.py", "gguf.py"),
    "train": ("train.py", "batching.py", "loss.py", "checkpoint.py", "compute.py", "fast_math.py", "memory.py",
              "distributed.py", "train_worker.py", "jsonl.py"),
    "validate": ("evaluate.py", "train.py", "batching.py", "loss.py", "compute.py", "fast_math.py", "jsonl.py",
                 "prompting.py", "text.py", "eval_questions.py", "club_facts.py", "fact_scoring.py", "accuracy.py",
                 "validation_report.py"),
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


def source_inputs(cfg: FarenseConfig, stage: str, sha256: Callable[[Path], str] = sha256_file) -> dict[str, str]:
    """Content hashes of a stage's external inputs (files the user provides); `sha256` hashes one file."""
    if stage == "data":
        if not cfg.data.path.exists():
            raise DataError(f"{cfg.data.path}: dataset not found (set data.path to a JSONL file or a folder)")
        facts = cfg.data.facts
        grounded = {"facts": hash_path(facts, sha256)} if facts is not None and facts.is_file() else {}
        return {"dataset": hash_path(cfg.data.path, sha256), **grounded}
    if stage == "model":
        return {"source": resolve_source(cfg.model, sha256).identity}
    if stage == "validate":
        # The sealed test set is hashed only so that a changed file is answered again; nothing chooses by it.
        return {name: hash_path(q, sha256) if q.exists() else "none"
                for name, q in (("questions", cfg.data.dev_questions), ("test_questions", cfg.data.test_questions))}
    return {}


def make_plan(cfg: FarenseConfig, until: str = "export") -> dict[str, StagePlan]:
    """Keys of every stage up to `until`, in order. Input files are hashed through the artifacts folder's cache of
    file hashes: an unchanged file (same size, times and inode) is not read again."""
    hashes = FileHashes(cfg.artifacts_dir / "cache" / CACHE_FILE)
    plans: dict[str, StagePlan] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        if stage == "benchmark" and not cfg.benchmark.enabled:
            continue
        inputs = source_inputs(cfg, stage, hashes.sha256)
        for up in UPSTREAM[stage]:
            if up in plans:
                inputs[up] = plans[up].key
        section = _section_for_key(cfg, stage)
        version = code_version(stage)
        plans[stage] = StagePlan(stage, stage_key(stage, inputs, section, version), inputs, section, version,
                                 tuple(u for u in UPSTREAM[stage] if u in plans))
    hashes.save()
    return plans


# The plan `farense run` made before starting the flow run in this same process (see `planned`).
_handed_plan: ContextVar[tuple[FarenseConfig, str, dict[str, StagePlan]] | None] = ContextVar(
    "handed_plan", default=None
)


@contextmanager
def planned(cfg: FarenseConfig, until: str, plans: dict[str, StagePlan]) -> Iterator[None]:
    """Inside this block, `plan_for` an equal config and the same `until` returns `plans` instead of planning again:
    `farense run` plans to decide whether to start Prefect at all, then hands its plan to the flow run it starts.
    Not a flow parameter: a plan given from outside could file artifacts under keys that are not their content's."""
    token = _handed_plan.set((cfg, until, plans))
    try:
        yield
    finally:
        _handed_plan.reset(token)


def plan_for(cfg: FarenseConfig, until: str) -> dict[str, StagePlan]:
    """The plan handed over by `planned` when it was made for this config and `until`, else a new one."""
    handed = _handed_plan.get()
    if handed is not None and handed[1] == until and handed[0] == cfg:
        return handed[2]
    return make_plan(cfg, until)


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # done | stale | missing
    key: str
    path: Path


def stage_statuses(
    cfg: FarenseConfig, until: str = "export", plans: dict[str, StagePlan] | None = None
) -> list[StageStatus]:
    """Each stage's state (done, stale, missing) under `plans`, or under a new plan up to `until`."""
    store = ArtifactStore(cfg.artifacts_dir)
    out = []
    for sp in (plans if plans is not None else make_plan(cfg, until)).values():
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
