"""The flows under Prefect's test harness: task states Cached on a rerun, a deleted artifact rebuilt, fresh=True
rebuilding; prefect.yaml matching the flows; the parameter schema the server enforces."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, validate

from farense.config import STAGES, FarenseConfig, load_config
from farense.server import work_pools
from flows import pipeline
from flows.pipeline import STAGE_FLOWS, farense

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def harness() -> Any:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_states(flow_run_id: UUID, expected: int, timeout: float = 30.0) -> dict[str, str]:
    """Stage -> state name of a flow run's task runs (written asynchronously from events: poll until all arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name.split("-")[0]: r.state.name for r in runs if r.state and r.state.is_final()}
        if len(states) >= expected or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def config_file_of(cfg: FarenseConfig) -> str:
    """The YAML file the `tiny_config` fixture wrote: flows take a file (plus overrides), as deployments do."""
    return str(cfg.artifacts_dir.parent / "farense.yaml")


def run_flow(cfg: FarenseConfig, until: str, fresh: bool = False) -> dict[str, str]:
    state = farense(config_file=config_file_of(cfg), until=until, fresh=fresh, return_state=True)
    assert state.is_completed(), state.message
    return task_states(state.state_details.flow_run_id, STAGES.index(until) + 1)


def manifest_times(cfg: FarenseConfig, stages: list[str]) -> dict[str, float]:
    return {
        s: json.loads(next((cfg.artifacts_dir / s).glob("*/manifest.json")).read_text())["created_at"]
        for s in stages
    }


@pytest.fixture()
def tiny_config(tiny_inputs: Any, tmp_path: Path) -> FarenseConfig:
    return load_config(tiny_inputs.config_file(tmp_path / "farense.yaml", tmp_path / "artifacts"))


def test_rerun_is_a_prefect_cache_hit(harness: Any, tiny_config: FarenseConfig) -> None:
    assert run_flow(tiny_config, "model") == {"data": "Completed", "model": "Completed"}
    # The cache record lives inside the stage artifact folder, keyed by the stage's content key.
    for stage in ("data", "model"):
        assert list((tiny_config.artifacts_dir / stage).glob("*/prefect-result.json"))
    assert run_flow(tiny_config, "model") == {"data": "Cached", "model": "Cached"}


def test_deleted_artifact_is_rebuilt_and_not_cached(harness: Any, tiny_config: FarenseConfig) -> None:
    run_flow(tiny_config, "model")
    before = manifest_times(tiny_config, ["data"])
    shutil.rmtree(next((tiny_config.artifacts_dir / "model").glob("*/manifest.json")).parent)
    assert run_flow(tiny_config, "model") == {"data": "Cached", "model": "Completed"}
    assert manifest_times(tiny_config, ["data"]) == before
    assert list((tiny_config.artifacts_dir / "model").glob("*/manifest.json"))


def test_a_moved_artifacts_tree_is_still_a_cache_hit_at_its_new_place(
    harness: Any, tiny_inputs: Any, tiny_config: FarenseConfig, tmp_path: Path
) -> None:
    run_flow(tiny_config, "model")
    moved = tmp_path / "elsewhere" / "artifacts"
    shutil.move(tiny_config.artifacts_dir, moved)
    config_file = tiny_inputs.config_file(tmp_path / "elsewhere" / "farense.yaml", moved)
    state = farense(config_file=str(config_file), until="model", return_state=True)
    assert task_states(state.state_details.flow_run_id, 2) == {"data": "Cached", "model": "Cached"}
    paths = state.result()
    assert {s: Path(p) for s, p in paths.items()} == {s: moved / s / Path(p).name for s, p in paths.items()}
    assert all(Path(p).is_dir() for p in paths.values())


def test_fresh_rebuilds_every_selected_stage(harness: Any, tiny_config: FarenseConfig) -> None:
    run_flow(tiny_config, "model")
    before = manifest_times(tiny_config, ["data", "model"])
    assert run_flow(tiny_config, "model", fresh=True) == {"data": "Completed", "model": "Completed"}
    after = manifest_times(tiny_config, ["data", "model"])
    assert all(after[s] > before[s] for s in before), "fresh=True must rebuild the artifacts, not just rerun tasks"
    assert run_flow(tiny_config, "model") == {"data": "Cached", "model": "Cached"}


def test_stage_flow_reuses_the_pipeline_cache(harness: Any, tiny_config: FarenseConfig) -> None:
    run_flow(tiny_config, "data")
    state = STAGE_FLOWS["data"](config_file=config_file_of(tiny_config), return_state=True)
    assert state.is_completed()
    assert task_states(state.state_details.flow_run_id, 1) == {"data": "Cached"}


def test_a_run_without_parameters_reads_farense_yaml_and_overrides_win(
    harness: Any, tiny_inputs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a deployment with `parameters: {}` (and the nightly schedule) does: ./farense.yaml of the folder the
    run starts in, as `farense run` reads it; a field set in the `config` parameter overrides only that field."""
    tiny_inputs.config_file(tmp_path / "farense.yaml", Path("artifacts"), data={"seed": 7, "valid_fraction": 0.25})
    monkeypatch.chdir(tmp_path)
    state = STAGE_FLOWS["data"](return_state=True)
    assert state.is_completed(), state.message
    (used,) = (tmp_path / "artifacts" / "data").glob("*/farense_config.json")
    assert json.loads(used.read_text())["data"] | {"path": None} == {
        "path": None, "valid_fraction": 0.25, "seed": 7, "max_line_bytes": 1_000_000,
        "dev_questions": str(tiny_inputs.questions), "test_questions": str(tmp_path / "data/eval/test.jsonl"),
        "facts": None}  # fmt: skip
    state = STAGE_FLOWS["data"](config={"data": {"valid_fraction": 0.5}}, return_state=True)
    assert state.is_completed(), state.message
    configs = [json.loads(p.read_text())["data"] for p in (tmp_path / "artifacts" / "data").glob("*/farense_config.json")]
    assert sorted((c["valid_fraction"], c["seed"]) for c in configs) == [(0.25, 7), (0.5, 7)]


def test_farense_run_plans_once_and_hands_the_plan_to_its_flow_run(
    harness: Any, tiny_config: FarenseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`farense run` plans to decide whether to start Prefect; the flow run it starts and the table it prints after
    use that plan, so the inputs (a 4 GB base model file, say) are looked at once per run, not three times."""
    from typer.testing import CliRunner

    from farense import pipeline
    from farense.cli import app

    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT", "DO_NOT_TRACK",
                 "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)  # `farense run` sets them; put back after the test
    planned: list[str] = []
    real = pipeline.source_inputs
    monkeypatch.setattr(pipeline, "source_inputs", 
                        lambda cfg, stage, *a: planned.append(stage) or real(cfg, stage, *a))
    args = ["run", "--config", config_file_of(tiny_config), "--until", "model"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "farense run finished" in result.output
    assert list((tiny_config.artifacts_dir / "model").glob("*/manifest.json"))
    assert planned == ["data", "model"]
    planned.clear()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "Every stage is cached: nothing to do" in result.output
    assert planned == ["data", "model"]


def test_config_file_errors_name_the_file(harness: Any, tmp_path: Path) -> None:
    state = STAGE_FLOWS["data"](config_file=str(tmp_path / "missing.yaml"), return_state=True)
    assert state.is_failed() and f"{tmp_path / 'missing.yaml'}: config file not found" in state.message


# --- prefect.yaml --------------------------------------------------------------------------------------------


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_deploys_every_flow() -> None:
    deps = deployments()
    assert deps["full-pipeline"]["entrypoint"] == "flows/pipeline.py:farense"
    for stage, flow in STAGE_FLOWS.items():
        module, name = deps[stage]["entrypoint"].split(":")
        assert module == "flows/pipeline.py" and getattr(pipeline, name) is flow
        assert flow.name == f"farense-{stage}"
    assert all(d["enforce_parameter_schema"] is True for d in deps.values())
    assert work_pools(ROOT) == ["farense-local"]
    (schedule,) = deps["full-pipeline"]["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == ("0 3 * * *", "Europe/Lisbon")


def test_parameter_schema_accepts_a_partial_config_and_refuses_a_wrong_type(tiny_inputs: Any, tmp_path: Path) -> None:
    """What the server checks with enforce_parameter_schema before a run is created (the UI form uses it too)."""
    schema = parameter_schema(farense).model_dump_for_openapi()
    validate({"config": tiny_inputs.config(tmp_path), "until": "model"}, schema, raise_on_error=True)
    validate({"config": {"train": {"epochs": 1}}}, schema, raise_on_error=True)
    validate({"config_file": "configs/m1-16gb.yaml"}, schema, raise_on_error=True)
    validate({}, schema, raise_on_error=True)  # the deployments' parameters: ./farense.yaml, nothing overridden
    with pytest.raises(ValidationError, match="epochs"):
        validate({"config": {"train": {"epochs": 0}}}, schema, raise_on_error=True)  # bounds are kept
    with pytest.raises(ValidationError, match="max_steps"):
        validate({"config": {"train": {"max_steps": "four"}}}, schema, raise_on_error=True)
    with pytest.raises(ValidationError, match="until"):
        validate({"until": "deploy"}, schema, raise_on_error=True)
