"""Real processes, as users run them: `farense server up` (Prefect server, pool, deployments, worker) in a temporary
PREFECT_HOME on a free loopback port, then `prefect deployment run farense/full-pipeline` on a tiny model and data:
a first run, a cached rerun, a run created by the nightly schedule, a failing run; the flow run page in headless
Chromium; the same server on PostgreSQL. Every process is stopped at the end, also when a test fails."""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from farense.config import STAGES
from farense.crash_detection import AUTOMATION_NAME
from farense.server import OFFLINE_ENV, ServerFiles, down

pytestmark = pytest.mark.e2e

# The last stage these runs reach: "export" is the whole pipeline. Set an earlier stage while later ones are being
# written; every assertion below follows it.
UNTIL = "export"
RUN_STAGES = STAGES[: STAGES.index(UNTIL) + 1]

ROOT = Path(__file__).resolve().parents[1]
SCREENS = ROOT / "artifacts" / "test-screens"
REPORT = ROOT / "artifacts" / "test-reports" / "prefect-e2e.json"
RUN_TIMEOUT_S = 240
TIMINGS: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """A running `farense server up`: its API address and environment, and the API calls the tests make."""

    url: str
    env: dict[str, str]
    files: ServerFiles

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings(updates={PREFECT_API_URL: self.url}), get_client(sync_client=True) as client:
            yield client

    def prefect(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def run_deployment(self, name: str, parameters: dict[str, Any]) -> UUID:
        """`prefect deployment run NAME --params JSON`, the command users type; returns the flow run id."""
        proc = self.prefect("deployment", "run", name, "--params", json.dumps(parameters))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return UUID(re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1))

    def wait(self, run_id: UUID, timeout: float = RUN_TIMEOUT_S) -> FlowRun:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    return run
                assert time.monotonic() < deadline, f"flow run {run_id} still {run.state_name} after {timeout} s"
                time.sleep(0.5)

    def task_states(self, run_id: UUID, expected: int, timeout: float = 30.0) -> dict[str, str]:
        """Stage -> state name of the run's task runs (recorded from events, so poll until all are there)."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
                states = {r.name.split("-")[0]: r.state_name for r in runs if r.state and r.state.is_final()}
                if len(states) >= expected or time.monotonic() > deadline:
                    return states
                time.sleep(0.3)

    def artifacts(self, run_id: UUID) -> list[Any]:
        with self.client() as client:
            return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))

    def server_errors(self) -> str:
        """The server log's error lines (its services, such as the scheduler, report only there)."""
        text = self.files.log("server").read_text(errors="replace")
        return "\n".join(line for line in text.splitlines() if "ERROR" in line or "Error" in line)[-3000:]

    def logs(self, run_id: UUID) -> str:
        with self.client() as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        return "\n".join(log.message for log in logs)


def start_stack(home: Path, deployments: list[str] | None = None, project: Path = ROOT, port: int | None = None,
                **extra_env: str) -> Stack:  # fmt: skip
    """`farense server up` on a free port, with a fresh PREFECT_HOME; fast polling so the tests wait less."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | OFFLINE_ENV | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        **extra_env,
    }  # fmt: skip
    args = [sys.executable, "-m", "farense.cli", "server", "up", "--port", str(port), "--project", str(project)]
    for name in deployments or []:
        args += ["--deployment", name]
    start = time.monotonic()
    proc = subprocess.run(args, env=env, cwd=project, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"farense server up failed:\n{proc.stdout}\n{proc.stderr}"
    TIMINGS.setdefault("server_up_s", round(time.monotonic() - start, 1))
    match = re.search(r"started in ([0-9.]+) s", proc.stdout)
    TIMINGS.setdefault("server_start_s", float(match.group(1)) if match else -1)
    return Stack(url, env, ServerFiles(home / "farense-server"))


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(TIMINGS, indent=2) + "\n")
        print(f"\nprefect e2e timings (s): {TIMINGS}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("prefect-home")
    try:
        yield start_stack(home)
    finally:
        down(ServerFiles(home / "farense-server"))


@dataclass
class Run:
    id: UUID
    parameters: dict[str, Any]
    artifacts_dir: Path
    files: dict[str, Any] = field(default_factory=dict)


def snapshot(folder: Path) -> dict[str, Any]:
    """Every file and link under `folder` with its mtime (links: their target): equal snapshots, nothing rewritten."""
    out: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(folder))] = os.readlink(p) if p.is_symlink() else (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def first_run(stack: Stack, tiny_inputs: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    artifacts = tmp_path_factory.mktemp("e2e") / "artifacts"
    config_file = tiny_inputs.config_file(artifacts.parent / "farense.yaml", artifacts)
    parameters = {"config_file": str(config_file), "until": UNTIL}
    start = time.monotonic()
    run_id = stack.run_deployment("farense/full-pipeline", parameters)
    run = stack.wait(run_id)
    TIMINGS["first_run_s"] = round(time.monotonic() - start, 1)
    assert run.state_name == "Completed", f"{run.state_name}: {run.state.message}\n{stack.logs(run_id)[-4000:]}"
    return Run(run_id, parameters, artifacts, snapshot(artifacts))


def test_deployments_are_what_prefect_yaml_declares(stack: Stack) -> None:
    with stack.client() as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        full = client.read_deployment_by_name("farense/full-pipeline")
        pool = client.read_work_pool("farense-local")
    assert names == {"farense/full-pipeline"} | {f"farense-{s}/{s}" for s in STAGES}
    assert (pool.type, pool.concurrency_limit) == ("process", 1)
    assert full.work_pool_name == "farense-local" and full.enforce_parameter_schema
    assert full.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    (schedule,) = full.schedules
    assert schedule.active and (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "Europe/Lisbon")
    assert "FarenseConfig" in json.dumps(full.parameter_openapi_schema)  # the UI's typed form
    assert full.parameters == {}, "no parameters: runs read ./farense.yaml, as `farense run` does"
    assert full.job_variables == {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}}
    with stack.client() as client:
        (automation,) = client.read_automations_by_name(AUTOMATION_NAME)
    assert automation.enabled and automation.actions[0].type == "change-flow-run-state"


def test_full_pipeline_run_completes_every_stage(stack: Stack, first_run: Run) -> None:
    assert stack.task_states(first_run.id, len(RUN_STAGES)) == {s: "Completed" for s in RUN_STAGES}
    artifacts = stack.artifacts(first_run.id)
    kinds = {"table", "progress"} | ({"markdown"} if "validate" in RUN_STAGES else set())
    assert kinds <= {a.type for a in artifacts}
    assert {"data-stats", "model-progress"} <= {a.key for a in artifacts}
    assert all(a.data == 100 for a in artifacts if a.type == "progress"), "every progress artifact reached 100%"
    for stage in RUN_STAGES:
        (manifest,) = (first_run.artifacts_dir / stage).glob("*/manifest.json")
        assert (manifest.parent / "prefect-result.json").is_file(), f"{stage}: Prefect's cache record"
    if UNTIL == "export":
        assert (first_run.artifacts_dir / "published" / "latest").is_dir()


def test_second_run_is_cached_nothing_rebuilt_or_republished(stack: Stack, first_run: Run) -> None:
    start = time.monotonic()
    run_id = stack.run_deployment("farense/full-pipeline", first_run.parameters)
    assert stack.wait(run_id).state_name == "Completed"
    TIMINGS["cached_run_s"] = round(time.monotonic() - start, 1)
    assert stack.task_states(run_id, len(RUN_STAGES)) == {s: "Cached" for s in RUN_STAGES}
    assert snapshot(first_run.artifacts_dir) == first_run.files, "a cached run must not write any stage file"
    assert stack.artifacts(run_id) == [], "a cached run publishes no new artifacts"


def test_nightly_schedule_runs_cached(stack: Stack, first_run: Run) -> None:
    """The scheduler's own next 03:00 Lisbon run, moved to now: with no data change every stage is cached."""
    with stack.client() as client:
        deployment = client.read_deployment_by_name("farense/full-pipeline")
        # The nightly runs use the deployment's parameters; point them at the tiny inputs. The scheduler then
        # replaces its future runs with ones carrying these parameters.
        client.update_deployment(deployment.id, DeploymentUpdate(parameters=first_run.parameters))
        deadline = time.monotonic() + 60
        while True:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )  # fmt: skip
            scheduled = [r for r in scheduled if r.auto_scheduled and r.parameters == first_run.parameters]
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert scheduled, f"the scheduler created no run from the cron schedule; server log:\n{stack.server_errors()}"
        nightly = min(scheduled, key=lambda r: r.expected_start_time)
        lisbon = nightly.expected_start_time.astimezone(ZoneInfo("Europe/Lisbon"))
        assert (lisbon.hour, lisbon.minute) == (3, 0), lisbon
        client.set_flow_run_state(nightly.id, Scheduled(scheduled_time=datetime.now(timezone.utc)), force=True)
    start = time.monotonic()
    assert stack.wait(nightly.id).state_name == "Completed"
    TIMINGS["nightly_cached_run_s"] = round(time.monotonic() - start, 1)
    assert stack.task_states(nightly.id, len(RUN_STAGES)) == {s: "Cached" for s in RUN_STAGES}
    assert snapshot(first_run.artifacts_dir) == first_run.files


def test_bad_dataset_path_fails_with_a_clear_error_and_keeps_artifacts(stack: Stack, first_run: Run) -> None:
    missing = first_run.artifacts_dir.parent / "no-such-dataset"
    parameters = first_run.parameters | {"config": {"data": {"path": str(missing)}}}  # an override of the file
    run_id = stack.run_deployment("farense/full-pipeline", parameters)
    run = stack.wait(run_id)
    assert run.state_type == StateType.FAILED, run.state_name
    expected = f"{missing}: dataset not found (set data.path to a JSONL file or a folder)"
    deadline = time.monotonic() + 30
    while expected not in (logs := stack.logs(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)  # logs are shipped in batches; the run may be final before the last batch lands
    assert expected in logs, logs[-3000:]
    assert snapshot(first_run.artifacts_dir) == first_run.files, "a failed run must leave earlier artifacts intact"


def test_parameters_of_the_wrong_type_are_refused_before_any_run(stack: Stack) -> None:
    proc = stack.prefect("deployment", "run", "farense/full-pipeline", "--params",
                         json.dumps({"config": {"train": {"max_steps": "four"}}}))  # fmt: skip
    assert proc.returncode != 0
    assert "max_steps" in proc.stdout + proc.stderr


# --- the UI in a real browser --------------------------------------------------------------------------------


class DevTools:
    """Just enough of the Chrome DevTools protocol: open a page, read its text, take a screenshot, list requests."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1400,1300", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.requests: list[str] = []
        self._id = 0
        self.call("Network.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("method") == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])
            if msg.get("id") == self._id:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def text(self) -> str:
        expr = "document.body ? document.body.innerText : ''"
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value", "")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, element_id: str) -> None:
        self.wait_for(lambda _: self.call("Runtime.evaluate", returnByValue=True, expression=(
            f"(e => e ? (e.click(), true) : false)(document.getElementById({json.dumps(element_id)}))"
        ))["result"]["value"], f"an element with id {element_id}")  # fmt: skip

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not ready(text := self.text()):
            assert time.monotonic() < deadline, f"the page never showed {what}; it shows:\n{text[:2000]}"
            time.sleep(0.25)
        return text

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[DevTools]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed: `sudo make test` installs it (or: sudo apt-get install chromium)")
    devtools = DevTools(binary, tmp_path / "chromium-profile")
    try:
        yield devtools
    finally:
        devtools.close()


def test_ui_shows_the_run_task_runs_and_artifacts(stack: Stack, first_run: Run, browser: DevTools) -> None:
    page = f"{stack.url.removesuffix('/api')}/runs/flow-run/{first_run.id}"
    with stack.client() as client:
        task_runs = [r.name for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first_run.id])))]  # fmt: skip
    artifact_keys = sorted({a.key for a in stack.artifacts(first_run.id)})
    assert len(task_runs) == len(RUN_STAGES)

    browser.open(page)
    browser.click("task-runs")  # the run page's tabs: Logs, Task Runs, Subflow Runs, Artifacts, ...
    text = browser.wait_for(lambda t: all(name in t for name in task_runs), f"the task runs {task_runs}")
    assert f"{len(RUN_STAGES)} Task runs" in text and "full-pipeline" in text and "farense-local" in text
    assert text.count("Completed") >= len(RUN_STAGES)
    time.sleep(1.0)  # the run graph is a canvas, not in the DOM: let it finish drawing for the screenshot
    browser.screenshot(SCREENS / "flow-run.png")

    browser.click("artifacts")
    browser.wait_for(lambda t: all(key in t for key in artifact_keys), f"the artifacts {artifact_keys}")
    browser.screenshot(SCREENS / "flow-run-artifacts.png")

    # The UI loaded with no internet: every request went to our server (or stayed inside the page).
    outside = {u[:80] for u in browser.requests if urlsplit(u).scheme not in ("data", "blob")
               and urlsplit(u).hostname != "127.0.0.1"}  # fmt: skip
    assert not outside, f"the UI reached beyond the local server: {sorted(outside)}"


# --- beyond one machine: the same deployments on a PostgreSQL-backed server ------------------------------------


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port (as the `postgres` user when we are root)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (pg_ctl) not found: `sudo make test` installs them "
                    "(or: sudo apt-get install postgresql)")
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        run_as = {"user": user.pw_uid, "group": user.pw_gid}
    # Not under pytest's tmp_path: its root-only parent folders would keep the postgres user out.
    base = Path(tempfile.mkdtemp(prefix="farense-pg-"))
    if run_as:
        os.chown(base, run_as["user"], run_as["group"])
    port = free_port()
    proc = None
    try:
        subprocess.run([bindir / "initdb", "-D", base / "data", "-U", "farense", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, timeout=120, **run_as)  # fmt: skip
        proc = subprocess.Popen(
            [bindir / "postgres", "-D", base / "data", "-p", str(port), "-k", str(base),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=open(base / "postgres.log", "wb"), start_new_session=True, **run_as,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while subprocess.run([bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:  # fmt: skip
            assert proc.poll() is None, (base / "postgres.log").read_text()
            assert time.monotonic() < deadline, "postgres did not accept connections in 60 s"
            time.sleep(0.3)
        yield f"postgresql+asyncpg://farense@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGINT)  # fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_data_stage_deployment_on_a_postgres_backed_server(
    tiny_inputs: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("prefect-home-pg")
    with postgres_server() as database_url:
        try:
            start = time.monotonic()
            pg = start_stack(home, deployments=["data"],
                             PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url)  # fmt: skip
            TIMINGS["postgres_server_up_s"] = round(time.monotonic() - start, 1)
            artifacts = tmp_path_factory.mktemp("e2e-pg") / "artifacts"
            config_file = tiny_inputs.config_file(artifacts.parent / "farense.yaml", artifacts)
            run_id = pg.run_deployment("farense-data/data", {"config_file": str(config_file)})
            run = pg.wait(run_id)
            assert run.state_name == "Completed", pg.logs(run_id)[-3000:]
            assert pg.task_states(run_id, 1) == {"data": "Completed"}
            assert list((artifacts / "data").glob("*/manifest.json"))
            assert "data-stats" in {a.key for a in pg.artifacts(run_id)}
        finally:
            down(ServerFiles(home / "farense-server"))
