"""The six stages as plain functions over paths, and a sequential runner that needs no Prefect.

Each `run_<stage>` receives the config and a `StageContext` (upstream artifact folders, the temp output folder,
a persistent work folder, a reporter) and returns the summary that goes into the stage manifest.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farense.benchmark import benchmark_stage
from farense.config import STAGES, FarenseConfig
from farense.data import prepare_dataset
from farense.errors import FarenseError
from farense.evaluate import validate_stage
from farense.export import export_stage, publish
from farense.kernel_cache import use_kernel_cache
from farense.model import prepare_base_model
from farense.pipeline import StagePlan, build_stage, make_plan
from farense.progress import NullReporter, Reporter
from farense.stage_context import StageContext
from farense.store import ArtifactStore, describe_holder
from farense.train import train_stage


def run_data(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    stats = prepare_dataset(cfg.data, ctx.out_dir)
    ctx.reporter.table(
        "data-stats",
        [{"metric": k, "value": v} for k, v in _flatten(stats).items()],
        "Dataset validation and split statistics",
    )
    return stats


def run_model(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    return prepare_base_model(cfg.model, ctx.out_dir, progress=ctx.reporter.progress)


def run_train(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    return train_stage(cfg, ctx)


def run_validate(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    return validate_stage(cfg, ctx)


def run_benchmark(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    return benchmark_stage(cfg, ctx)


def run_export(cfg: FarenseConfig, ctx: StageContext) -> dict[str, Any]:
    return export_stage(cfg, ctx)


STAGE_FUNCTIONS: dict[str, Callable[[FarenseConfig, StageContext], dict[str, Any]]] = {
    "data": run_data,
    "model": run_model,
    "train": run_train,
    "validate": run_validate,
    "benchmark": run_benchmark,
    "export": run_export,
}


def execute_stage(
    cfg: FarenseConfig,
    sp: StagePlan,
    upstream: dict[str, Path],
    reporter: Reporter | None = None,
    holder: dict[str, Any] | None = None,
    on_takeover: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, bool]:
    """Build one stage (or find it built) under the stage's build lock. Returns its artifact folder and whether it
    was built now. `holder` (e.g. the flow run) is written into the lock for whoever waits on it; `on_takeover`
    gets the holder of a lock left by a killed process."""
    store = ArtifactStore(cfg.artifacts_dir)
    rep = reporter or NullReporter()
    # Before any GPU work: compiled CUDA kernels live with the artifacts, so a fresh GPU worker reuses them.
    use_kernel_cache(cfg.artifacts_dir / "cache" / "kernels")

    def waiting(other: dict[str, Any]) -> None:
        rep.log(f"{sp.stage}: waiting: {sp.stage}/{sp.key} is being built by {describe_holder(other)}")

    def taking_over(dead: dict[str, Any]) -> None:
        rep.log(f"{sp.stage}: taking over the lock of {sp.stage}/{sp.key} left by {describe_holder(dead)}, "
                "which ended without releasing it (killed?); resuming its work")  # fmt: skip
        if on_takeover is not None:
            on_takeover(dead)

    with store.lock(sp.stage, sp.key, holder, on_wait=waiting, on_takeover=taking_over):
        path, built = _build_locked(cfg, sp, upstream, store, rep)
    if sp.stage == "export":  # after the commit: `latest` may only ever point at a complete export
        publish(cfg, path, rep)
    return path, built


def _build_locked(
    cfg: FarenseConfig, sp: StagePlan, upstream: dict[str, Path], store: ArtifactStore, rep: Reporter
) -> tuple[Path, bool]:

    def produce(tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        ctx = StageContext(upstream=upstream, out_dir=tmp, work_dir=store.work_dir(sp.stage, sp.key), reporter=rep)
        summary = STAGE_FUNCTIONS[sp.stage](cfg, ctx)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary

    record, built = build_stage(store, sp, cfg, produce)
    if built:  # only now is the scratch state (training checkpoints) no longer needed
        shutil.rmtree(store.work_dir(sp.stage, sp.key), ignore_errors=True)
    return record.path, built


def run_local(
    cfg: FarenseConfig,
    until: str = "export",
    only: str | None = None,
    fresh: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the stages in order without Prefect. Returns, per stage, its path and whether it was built."""
    plans = make_plan(cfg, only or until)
    store = ArtifactStore(cfg.artifacts_dir)
    targets = [only] if only else list(plans)
    results: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for stage in plans:
        sp = plans[stage]
        if stage not in targets:
            rec = store.get(stage, sp.key)
            if rec is None:
                raise FarenseError(
                    f"--only {only}: upstream stage '{stage}' has no artifact for key {sp.key}; "
                    f"run `farense run --until {only}` first"
                )
            paths[stage] = rec.path
            continue
        if fresh:
            store.remove(stage, sp.key)
        path, built = execute_stage(cfg, sp, {u: paths[u] for u in sp.upstream}, reporter)
        paths[stage] = path
        results[stage] = {"path": str(path), "key": sp.key, "built": built}
    return results


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


__all__ = ["STAGES", "StageContext", "execute_stage", "run_local"]
