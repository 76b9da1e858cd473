"""The `farense` flow (deployment `full-pipeline`) and one flow per stage for running stages alone."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from farense.config import STAGES, FarenseConfig, FarenseConfigOverrides, Stage, config_from_parameters
from farense.errors import FarenseError
from farense.pipeline import plan_for
from farense.store import ArtifactStore
from tasks.stages import stage_task


def run_stages(config: FarenseConfig, until: Stage, only: Stage | None = None, fresh: bool = False) -> dict[str, str]:
    """Submit the stage tasks in order, each given its upstream artifact paths."""
    cfg = config.resolve_paths(Path.cwd())
    plans = plan_for(cfg, only or until)  # the plan `farense run` made, when it started this run
    store = ArtifactStore(cfg.artifacts_dir)
    paths: dict[str, str] = {}
    for stage, plan in plans.items():
        if only and stage != only:
            record = store.get(stage, plan.key)
            if record is None:
                raise FarenseError(
                    f"only={only}: upstream stage '{stage}' is not built for this config; run until={only} first"
                )
            paths[stage] = str(record.path)
            continue
        if fresh:  # as in run_local: refresh_cache alone reruns the task, which then finds the artifact built
            store.remove(stage, plan.key)
        task = stage_task(stage, cfg, fresh=fresh)
        task(cfg, plan, {u: paths[u] for u in plan.upstream})
        # The key decides the folder: a cached result holds the path it was built at, which is wrong once the
        # artifacts tree has been moved or copied.
        paths[stage] = str(store.path(stage, plan.key))
    return paths


def config_for_run(config_file: str | None, config: FarenseConfigOverrides | None) -> FarenseConfig:
    """The one way every flow run (CLI, deployment, schedule) gets its config: the file, then the overrides."""
    cfg, path, applied = config_from_parameters(config_file, config)
    print(f"config: {path.resolve() if path else 'defaults (no farense.yaml here)'}"
          + (f" with overrides {applied}" if applied else ""))  # fmt: skip
    return cfg


@flow(name="farense", flow_run_name="farense-until-{until}", log_prints=True)
def farense(
    config_file: str | None = None,
    config: FarenseConfigOverrides | None = None,
    until: Stage = "export",
    only: Stage | None = None,
    fresh: bool = False,
) -> dict[str, str]:
    """Data → model → train → validate → benchmark → export, each stage cached by content.

    Args:
        config_file: YAML config, relative to the checkout; empty: ./farense.yaml (what `farense run` reads)
        config: Fields filled in here override the config file's; empty fields keep the file's values
        until: Last stage to run
        only: Run this stage alone (its upstream stages must be built)
        fresh: Rebuild the selected stages even when cached
    """
    return run_stages(config_for_run(config_file, config), until, only, fresh)


def _stage_flow(stage: Stage):  # noqa: ANN202 - a Prefect Flow
    def stage_flow(
        config_file: str | None = None, config: FarenseConfigOverrides | None = None, fresh: bool = False
    ) -> dict[str, str]:
        return run_stages(config_for_run(config_file, config), until=stage, fresh=fresh)

    # Set before @flow reads it: the Args become the descriptions in the UI's parameter form.
    stage_flow.__doc__ = f"""Run the pipeline up to the {stage} stage (upstream stages come from the cache).

    Args:
        config_file: YAML config, relative to the checkout; empty: ./farense.yaml (what `farense run` reads)
        config: Fields filled in here override the config file's; empty fields keep the file's values
        fresh: Rebuild the selected stages even when cached
    """
    return flow(name=f"farense-{stage}", flow_run_name=f"{stage}", log_prints=True)(stage_flow)


data_flow = _stage_flow("data")
model_flow = _stage_flow("model")
train_flow = _stage_flow("train")
validate_flow = _stage_flow("validate")
benchmark_flow = _stage_flow("benchmark")
export_flow = _stage_flow("export")

STAGE_FLOWS = dict(zip(STAGES, (data_flow, model_flow, train_flow, validate_flow, benchmark_flow, export_flow)))
