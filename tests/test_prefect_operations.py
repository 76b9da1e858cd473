"""Operations as a user meets them, on `farense server up` from a copy of this checkout whose ./farense.yaml is the
tiny config: `farense run` then the deployment (no parameters) is all cached; a worker-run flow killed with
SIGKILL (worker included) is marked Crashed by the heartbeat automation and the next run resumes its training; a
killed `farense run` is marked Crashed by the next run of its stage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.schemas.objects import StateType
from test_prefect_e2e import ROOT, TIMINGS, Stack, free_port, start_stack

from farense.config import load_config
from farense.pipeline import make_plan
from farense.server import ServerFiles, down, read_state
from farense.store import ArtifactStore

pytestmark = pytest.mark.e2e

# Long enough to be killed mid-way (about 45 ms a step on two cores), short enough to finish after resuming.
LONG_TRAIN = {"max_steps": 600, "save_every": 10, "log_every": 5, "eval_every": 200}


REPORT = ROOT / "artifacts" / "test-reports" / "prefect-operations.json"


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    TIMINGS.clear()
    yield
    if TIMINGS:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(TIMINGS, indent=2) + "\n")
        print(f"\nprefect operations timings (s): {TIMINGS}")


@pytest.fixture(scope="module")
def project(tiny_inputs: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user's checkout holds for Prefect: prefect.yaml, flows/, tasks/, and its ./farense.yaml."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(ROOT / "prefect.yaml", root)
    for package in ("flows", "tasks"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    tiny_inputs.config_file(root / "farense.yaml", Path("artifacts"))
    return root


@pytest.fixture(scope="module")
def ops(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("prefect-home-ops")
    try:
        yield start_stack(home, project=project)
    finally:
        down(ServerFiles(home / "farense-server"))


def farense_cli(stack: Stack, project: Path, *args: str) -> subprocess.Popen[str]:
    """`farense ...` in the checkout, reporting to the stack's server (as with `prefect config set PREFECT_API_URL`)."""
    return subprocess.Popen([sys.executable, "-m", "farense.cli", *args], cwd=project, env=stack.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def train_key(project: Path, overrides: dict[str, Any]) -> str:
    return make_plan(load_config(project / "farense.yaml", overrides, root=project), "train")["train"].key


def wait_for_training(store: ArtifactStore, key: str, min_step: int, timeout: float = 240) -> dict[str, Any]:
    """Wait until the training of `key` logged `min_step` steps and saved a checkpoint; return its lock holder."""
    work = store.work_dir("train", key)
    deadline = time.monotonic() + timeout
    while True:
        lines = (work / "metrics.csv").read_text().splitlines()[1:] if (work / "metrics.csv").is_file() else []
        step = max((int(line.split(",")[1]) for line in lines), default=0)
        holder = store.holder("train", key)
        if step >= min_step and list(work.glob("checkpoints/step-*")) and holder and holder.get("flow_run_id"):
            return holder
        assert time.monotonic() < deadline, f"training {key} did not reach step {min_step}"
        time.sleep(0.2)


def test_farense_run_then_the_deployment_is_all_cached(ops: Stack, project: Path) -> None:
    """`make run` (farense run, ./farense.yaml), then the deployment with the parameters prefect.yaml gives it."""
    cli = farense_cli(ops, project, "run")
    out, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, out[-4000:]
    start = time.monotonic()
    run_id = ops.run_deployment("farense/full-pipeline", {})
    run = ops.wait(run_id)
    TIMINGS["deployment_after_farense_run_s"] = round(time.monotonic() - start, 1)
    assert run.state_name == "Completed", ops.logs(run_id)[-3000:]
    stages = ("data", "model", "train", "validate", "benchmark", "export")
    assert ops.task_states(run_id, len(stages)) == {s: "Cached" for s in stages}
    assert time.monotonic() - start <= 30, f"a fully cached deployment run took {time.monotonic() - start:.0f} s"
    deadline = time.monotonic() + 30
    while f"config: {project / 'farense.yaml'}" not in (logs := ops.logs(run_id)):
        assert time.monotonic() < deadline, logs[-3000:]  # logs are shipped in batches, after the state
        time.sleep(0.5)


def wait_for_logs(stack: Stack, run_id: UUID, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (logs := stack.logs(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return logs


def test_killed_worker_run_is_marked_crashed_and_the_next_run_resumes(ops: Stack, project: Path) -> None:
    store = ArtifactStore(project / "artifacts")
    parameters = {"config": {"train": LONG_TRAIN | {"seed": 11}}}
    key = train_key(project, {f"train.{k}": v for k, v in parameters["config"]["train"].items()})
    run_id = ops.run_deployment("farense-train/train", parameters)
    holder = wait_for_training(store, key, min_step=20)
    assert holder["flow_run_id"] == str(run_id)
    worker = read_state(ops.files)["workers"]["farense-local"]
    # The machine "dies": worker and flow run process both, with no chance to report anything.
    os.killpg(worker["pid"], signal.SIGKILL)
    os.kill(holder["pid"], signal.SIGKILL)
    killed = time.monotonic()
    with ops.client() as client:
        while (run := client.read_flow_run(run_id)).state_type != StateType.CRASHED:
            assert run.state_type == StateType.RUNNING, run.state_name
            assert time.monotonic() - killed < 90, "the killed run still shows Running after 90 s"
            time.sleep(1)
    TIMINGS["killed_run_marked_crashed_s"] = round(time.monotonic() - killed, 1)
    assert "No heartbeat" in run.state.message

    start_stack(ops.files.state_dir.parent, project=project, port=int(ops.url.split(":")[-1].split("/")[0]))
    rerun = ops.run_deployment("farense-train/train", parameters)
    finished = ops.wait(rerun, timeout=400)
    logs = wait_for_logs(ops, rerun, "train: resuming from step-")
    assert finished.state_name == "Completed", logs[-3000:]
    assert "train: resuming from step-" in logs, logs[-3000:]
    assert store.get("train", key) is not None


def test_killed_local_run_is_marked_crashed_by_the_next_run_of_its_stage(ops: Stack, project: Path) -> None:
    store = ArtifactStore(project / "artifacts")
    sets = [f"train.{k}={v}" for k, v in (LONG_TRAIN | {"seed": 12}).items()]
    key = train_key(project, {s.split("=")[0]: int(s.split("=")[1]) for s in sets})
    args = ["run", "--until", "train", *[a for s in sets for a in ("--set", s)]]
    first = farense_cli(ops, project, *args)
    try:
        holder = wait_for_training(store, key, min_step=20)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    second = farense_cli(ops, project, *args)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out[-4000:]
    assert f"taking over the lock of train/{key} left by pid {holder['pid']}" in out, out[-3000:]
    assert "train: resuming from step-" in out
    with ops.client() as client:
        dead = client.read_flow_run(UUID(holder["flow_run_id"]))
    assert dead.state_type == StateType.CRASHED, dead.state_name
    assert "a later run took over" in dead.state.message
