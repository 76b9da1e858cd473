"""One Prefect task per stage. The cache key is the stage's content key, and the cached result lives inside the
stage's own artifact folder, so deleting that folder also forgets the cache entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from farense.config import FarenseConfig
from farense.pipeline import StagePlan
from farense.stages import execute_stage
from tasks.recovery import lock_holder, mark_dead_holder_crashed
from tasks.reporting import PrefectReporter

RESULT_FILE = "prefect-result.json"


class StageCachePolicy(CachePolicy):
    """Key on the stage's content key (inputs + config section + code version), never on the run id."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        plan: StagePlan = inputs["plan"]
        return f"{plan.stage}/{plan.key}/{RESULT_FILE}"


def _run(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    reporter = PrefectReporter(plan.stage)
    try:
        path, built = execute_stage(config, plan, {k: Path(v) for k, v in upstream.items()}, reporter,
                                    holder=lock_holder(), on_takeover=mark_dead_holder_crashed)  # fmt: skip
    finally:
        reporter.close()
    reporter.log(f"{plan.stage}: {'built' if built else 'already complete'} at {path}")
    return str(path)


_COMMON: dict[str, Any] = dict(cache_policy=StageCachePolicy(), persist_result=True, result_serializer="json")

# Bad data or a broken model source will not fix themselves: no retries there. Training resumes from its last
# checkpoint, so a retry continues rather than restarts.


@task(name="data", retries=0, task_run_name="data-{plan.key}", **_COMMON)
def data_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """Validate, deduplicate and split the dataset."""
    return _run(config, plan, upstream)


@task(name="model", retries=2, retry_delay_seconds=[5, 15], task_run_name="model-{plan.key}", **_COMMON)
def model_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """Fetch the base model and make it an MLX 4-bit model."""
    return _run(config, plan, upstream)


@task(name="train", retries=1, retry_delay_seconds=5, task_run_name="train-{plan.key}", **_COMMON)
def train_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """Train LoRA adapters on the 4-bit base, resuming from the last checkpoint."""
    return _run(config, plan, upstream)


@task(name="validate", retries=1, task_run_name="validate-{plan.key}", **_COMMON)
def validate_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """Validation loss, perplexity and held-out answers, base vs tuned."""
    return _run(config, plan, upstream)


@task(name="benchmark", retries=1, task_run_name="benchmark-{plan.key}", **_COMMON)
def benchmark_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """LoRA vs QLoRA and base vs tuned: speed, memory, size, quality."""
    return _run(config, plan, upstream)


@task(name="export", retries=0, task_run_name="export-{plan.key}", **_COMMON)
def export_task(config: FarenseConfig, plan: StagePlan, upstream: dict[str, str]) -> str:
    """Write the mlx-lm adapter with metadata and publish it behind the quality gate."""
    return _run(config, plan, upstream)


STAGE_TASKS = {
    "data": data_task,
    "model": model_task,
    "train": train_task,
    "validate": validate_task,
    "benchmark": benchmark_task,
    "export": export_task,
}


def stage_task(stage: str, config: FarenseConfig, fresh: bool = False):  # noqa: ANN201 - a Prefect Task
    """The stage's task, storing its cached result under the artifacts folder of this config."""
    # A Path, not an unsaved LocalFileSystem block: Prefect refuses blocks that are not saved on the server.
    return STAGE_TASKS[stage].with_options(
        result_storage=Path(config.artifacts_dir),
        refresh_cache=fresh or None,
    )
