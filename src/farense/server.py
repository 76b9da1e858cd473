"""`farense server up|down|status`: Prefect's own server, the work pools of prefect.yaml, its deployments and a
worker, brought up in one step on this machine and stopped again.

Everything here calls Prefect (`prefect server start`, `prefect deploy --all`, `prefect worker start`, the client
API); this module only starts them in order, waits until each is ready, and remembers the process ids.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from farense.crash_detection import ensure_crash_automation, heartbeat_env
from farense.errors import FarenseError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
WILDCARD_HOSTS = ("0.0.0.0", "::")
POOL_CONCURRENCY = 1  # one GPU (or one CPU box): runs queue rather than compete

# No telemetry, no update checks, no marketing banners: the server, the UI and the worker work offline.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "DO_NOT_TRACK": "1",
}

server_app = typer.Typer(no_args_is_help=True, help="A local Prefect server, worker and the farense deployments.")


class ServerError(FarenseError):
    """The Prefect server or worker did not come up; the message names the log to read."""


@dataclass(frozen=True)
class ServerFiles:
    """Pid file and logs of the processes `up` started, under PREFECT_HOME (next to the server's database)."""

    state_dir: Path

    @classmethod
    def for_prefect_home(cls, home: Path | None = None) -> "ServerFiles":
        if home is None:
            from prefect.settings import PREFECT_HOME

            home = Path(PREFECT_HOME.value())
        return cls(Path(home).expanduser() / "farense-server")

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "processes.json"

    def log(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"


def api_url(host: str, port: int) -> str:
    """The API address for this machine's clients (a server on every interface is reached on loopback)."""
    return f"http://{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}/api"


def public_api_url(host: str, port: int) -> str:
    """The API address the UI and workers on other hosts use (PREFECT_UI_API_URL when set, e.g. behind a proxy)."""
    if os.environ.get("PREFECT_UI_API_URL"):
        return os.environ["PREFECT_UI_API_URL"]
    return f"http://{socket.gethostname() if host in WILDCARD_HOSTS else host}:{port}/api"


def prefect_env(url: str) -> dict[str, str]:
    """Environment of the processes we start: this one's, offline, pointed at our server."""
    # Heartbeats every 30 s (unless set): the crash automation `up` creates expects them.
    return heartbeat_env() | os.environ | OFFLINE_ENV | {"PREFECT_API_URL": url}


def work_pools(project_root: Path = PROJECT_ROOT) -> list[str]:
    """The pools prefect.yaml's deployments use (one source of truth for their names)."""
    config = _prefect_yaml(project_root)
    return sorted({d["work_pool"]["name"] for d in config.get("deployments", [])})


def _prefect_yaml(project_root: Path) -> dict[str, Any]:
    path = project_root / "prefect.yaml"
    if not path.is_file():
        raise ServerError(f"{path}: not found; run from a checkout of farense (pip install -e .) or pass --project")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- processes -----------------------------------------------------------------------------------------------


def _spawn(name: str, args: list[str], env: dict[str, str], files: ServerFiles, cwd: Path) -> dict[str, Any]:
    """Start a process in its own session (so `down` can signal its whole group), its output to `<name>.log`."""
    files.state_dir.mkdir(parents=True, exist_ok=True)
    with open(files.log(name), "ab") as log:
        proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return {"pid": proc.pid, "started": _create_time(proc.pid), "args": args, "log": str(files.log(name))}


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(entry: dict[str, Any]) -> bool:
    """The recorded process still runs (same pid and start time: not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        return proc.create_time() == entry["started"] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_state(files: ServerFiles) -> dict[str, Any]:
    try:
        return json.loads(files.pidfile.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(files: ServerFiles, state: dict[str, Any]) -> None:
    files.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = files.pidfile.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, files.pidfile)


def stop_process(entry: dict[str, Any], timeout: float = 20.0) -> None:
    """SIGTERM the process, its group and its descendants (flow runs a worker started), then SIGKILL stragglers."""
    import psutil

    if not _alive(entry):
        return
    pid = entry["pid"]
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # the session leader's group: started with start_new_session
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, family = psutil.wait_procs(family, timeout=timeout if sig == signal.SIGTERM else 5)
        if not family:
            return


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- readiness -----------------------------------------------------------------------------------------------


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:  # noqa: S310 - our loopback URL
            return r.status == 200 and r.read().strip() == b"true"
    except (urllib.error.URLError, OSError):
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(check: Any, what: str, timeout: float, entry: dict[str, Any], interval: float = 0.5) -> float:
    """Poll `check()` until true; fail early, with the log's tail, if the process died. Returns seconds waited."""
    start = time.monotonic()
    while not check():
        if not _alive(entry):
            log = Path(entry["log"])
            raise ServerError(f"{what}: the process exited; its log {log} ends with:\n{_log_tail(log)}")
        if time.monotonic() - start > timeout:
            raise ServerError(f"{what}: not ready after {timeout:.0f} s; see {entry['log']}")
        time.sleep(interval)
    return time.monotonic() - start


def ensure_work_pool(url: str, name: str, concurrency_limit: int = POOL_CONCURRENCY) -> None:
    """Create the process pool (Prefect's default process job template), or set its concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    concurrency_limit=concurrency_limit,
                )
            )
            return
        if pool.type != ProcessWorker.type:
            raise ServerError(f"work pool '{name}' exists with type '{pool.type}'; farense needs a process pool")
        if pool.concurrency_limit != concurrency_limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def worker_online(url: str, pool: str, name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return any(w.name == name and w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool))


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def deploy(url: str, project_root: Path = PROJECT_ROOT, names: list[str] | None = None) -> None:
    """`prefect deploy --all` (or `--name` each of `names`) from the project root: its path is what the
    deployments' pull step records."""
    which = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    proc = subprocess.run(
        [*_prefect_cli(), "--no-prompt", "deploy", *which],
        cwd=project_root, env=prefect_env(url), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ServerError(f"prefect deploy failed in {project_root}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


@dataclass(frozen=True)
class UpReport:
    url: str
    public_url: str
    server_seconds: float
    deploy_seconds: float
    worker_seconds: float
    reused_server: bool


def up(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    project_root: Path = PROJECT_ROOT,
    files: ServerFiles | None = None,
    timeout: float = 180.0,
    deployments: list[str] | None = None,
) -> UpReport:
    """Server (reused when ours is already running), pools, deployments, one worker per pool."""
    files = files or ServerFiles.for_prefect_home()
    url = api_url(host, port)
    pools = work_pools(project_root)
    state = read_state(files)
    env = prefect_env(url)

    started = time.monotonic()
    server = state.get("server")
    reused = bool(server and _alive(server) and server.get("url") == url and healthy(url))
    if not reused:
        down(files)
        if port_in_use(host, port):
            raise ServerError(f"{host}:{port} is already in use by another program; pass --port")
        # host/port through the environment too: the UI reads its API address from these settings.
        server_env = env | {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port),
                            "PREFECT_UI_API_URL": public_api_url(host, port)}  # fmt: skip
        server = _spawn("server", [*_prefect_cli(), "--no-prompt", "server", "start", "--host", host,
                                   "--port", str(port)], server_env, files, project_root)  # fmt: skip
        server["url"] = url
        state = {"server": server}
        _write_state(files, state)
        wait_until(lambda: healthy(url), f"Prefect server at {url}", timeout, server)
    server_seconds = time.monotonic() - started

    for pool in pools:
        ensure_work_pool(url, pool)
    ensure_crash_automation(url)  # its window follows the heartbeat interval our processes use
    started = time.monotonic()
    deploy(url, project_root, deployments)
    deploy_seconds = time.monotonic() - started

    started = time.monotonic()
    workers = state.setdefault("workers", {})
    for pool in pools:
        entry = workers.get(pool)
        if entry and _alive(entry):
            continue
        name = f"farense-{socket.gethostname()}-{pool}"
        entry = _spawn(f"worker-{pool}", [*_prefect_cli(), "--no-prompt", "worker", "start", "--pool", pool,
                                          "--type", "process", "--name", name], env, files, project_root)  # fmt: skip
        entry["name"] = name
        workers[pool] = entry
        _write_state(files, state)
        ready = functools.partial(worker_online, url, pool, name)
        wait_until(ready, f"worker for pool '{pool}'", timeout, entry, interval=1.0)
    return UpReport(url, public_api_url(host, port), server_seconds, deploy_seconds, time.monotonic() - started, reused)


def down(files: ServerFiles | None = None) -> list[str]:
    """Stop the workers (and their flow runs), then the server. Returns what was stopped."""
    files = files or ServerFiles.for_prefect_home()
    state = read_state(files)
    stopped = []
    for pool, entry in state.get("workers", {}).items():
        if _alive(entry):
            stop_process(entry)
            stopped.append(f"worker {pool} (pid {entry['pid']})")
    if state.get("server") and _alive(state["server"]):
        stop_process(state["server"])
        stopped.append(f"server {state['server']['url']} (pid {state['server']['pid']})")
    files.pidfile.unlink(missing_ok=True)
    return stopped


# --- command line --------------------------------------------------------------------------------------------

HostOpt = Annotated[str, typer.Option(help="Loopback by default; 0.0.0.0 lets workers on other hosts connect")]
PortOpt = Annotated[int, typer.Option(help="Port of the API and the UI")]


@server_app.command("up")
def up_command(
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    project: Annotated[Optional[Path], typer.Option(help="Folder holding prefect.yaml")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each process to be ready")] = 180.0,
    deployment: Annotated[
        Optional[list[str]],
        typer.Option("--deployment", "-d", help="Deploy only this prefect.yaml deployment (e.g. data; repeatable)"),
    ] = None,
) -> None:
    """Start the Prefect server, create the work pool, deploy every flow, start a worker: one step."""
    root = (project or PROJECT_ROOT).resolve()
    report = up(host, port, root, timeout=timeout, deployments=deployment)
    files = ServerFiles.for_prefect_home()
    server = "already running" if report.reused_server else f"started in {report.server_seconds:.1f} s"
    typer.echo(f"server   {report.url} ({server}); logs in {files.state_dir}")
    typer.echo(f"deployed {', '.join(deployment or ['prefect.yaml'])} from {root} in {report.deploy_seconds:.1f} s")
    typer.echo(f"worker   on {', '.join(work_pools(root))} (ready in {report.worker_seconds:.1f} s)")
    typer.echo(f"UI       {report.public_url.removesuffix('/api')}")
    typer.echo("In other shells (and on worker hosts), point Prefect at this server:")
    typer.echo(f"  export PREFECT_API_URL={report.url if report.url == report.public_url else report.public_url}")
    typer.echo("  prefect deployment run farense/full-pipeline")


@server_app.command("down")
def down_command() -> None:
    """Stop the worker (and any flow run it started) and the server that `up` started."""
    stopped = down()
    typer.echo("stopped " + "; ".join(stopped) if stopped else "nothing was running")


@server_app.command("status")
def status_command() -> None:
    """Show the processes `up` started and whether the server answers."""
    files = ServerFiles.for_prefect_home()
    state = read_state(files)
    if not state:
        typer.echo("not running (no farense server started from this PREFECT_HOME)")
        raise typer.Exit(1)
    server = state.get("server", {})
    answers = bool(server) and healthy(server["url"])
    typer.echo(f"server {server.get('url')} pid {server.get('pid')}: {'healthy' if answers else 'not answering'}")
    for pool, entry in state.get("workers", {}).items():
        typer.echo(f"worker {pool} pid {entry['pid']}: {'running' if _alive(entry) else 'stopped'}")
    raise typer.Exit(0 if answers else 1)
