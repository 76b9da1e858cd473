"""Stage build locks: a second builder of the same stage waits (and is told whose lock it waits on), then takes
the result; builders of different stages or keys proceed side by side; a lock left by a SIGKILLed process is
detected and taken over. Real processes, real flocks, a real (tiny) training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from farense.store import ArtifactStore, describe_holder

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(ROOT / "tests")])}

# Holds the lock of data/k1 as "flow run night-1" until killed.
HOLD = """
import sys, time
from farense.store import ArtifactStore
with ArtifactStore(sys.argv[1]).lock("data", "k1", {"flow_run_id": "f-1", "flow_run_name": "night-1"}):
    print("locked", flush=True)
    time.sleep(600)
"""

# run_local up to train, printing what each stage did and every log line (the waiting / take-over messages).
RUN = """
import json, sys
from farense.config import load_config
from farense.progress import NullReporter
from farense.stages import run_local

class Log(NullReporter):
    def log(self, message):
        print("LOG", message, flush=True)

cfg = load_config(__import__("pathlib").Path(sys.argv[1]))
print("RESULT", json.dumps(run_local(cfg, until="train", reporter=Log())), flush=True)
"""


def start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[dict[str, Any], str]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    result = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(result.removeprefix("RESULT ")), out


def wait_for(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_second_holder_waits_and_is_told_whose_lock(tmp_path: Path) -> None:
    holder = start(HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        waited: list[dict[str, Any]] = []
        took_over: list[dict[str, Any]] = []
        store = ArtifactStore(tmp_path)
        start_wait = time.monotonic()
        killer = subprocess.Popen(["sh", "-c", f"sleep 1.5; kill -TERM {holder.pid}"])
        with store.lock("data", "k1", {"flow_run_id": "f-2"}, on_wait=waited.append, on_takeover=took_over.append):
            assert time.monotonic() - start_wait >= 1.0, "the lock was free while its holder still ran"
            assert store.holder("data", "k1")["flow_run_id"] == "f-2"
        killer.wait()
    finally:
        holder.kill()
        holder.wait()
    (other,) = waited
    assert (other["pid"], other["flow_run_name"]) == (holder.pid, "night-1")
    assert f"pid {holder.pid} on " in describe_holder(other) and "(flow run 'night-1' f-1) since 20" in describe_holder(other)
    # SIGTERM ends the holder without running its `finally`: it, too, left its name behind.
    assert [h["pid"] for h in took_over] == [holder.pid]
    assert store.holder("data", "k1") is None, "released cleanly: the lock file names nobody"


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path: Path) -> None:
    holder = start(HOLD, str(tmp_path))
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    store = ArtifactStore(tmp_path)
    assert store.holder("data", "k1")["pid"] == holder.pid, "a killed holder leaves its name in the lock file"
    waited: list[dict[str, Any]] = []
    took_over: list[dict[str, Any]] = []
    start_time = time.monotonic()
    with store.lock("data", "k1", on_wait=waited.append, on_takeover=took_over.append):
        pass
    assert time.monotonic() - start_time < 2, "the kernel frees a dead process's flock: no waiting"
    assert waited == [] and [h["flow_run_id"] for h in took_over] == ["f-1"]


def test_different_keys_do_not_wait(tmp_path: Path) -> None:
    holder = start(HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        waited: list[dict[str, Any]] = []
        store = ArtifactStore(tmp_path)
        with store.lock("data", "k2", on_wait=waited.append), store.lock("train", "k1", on_wait=waited.append):
            pass
        assert waited == []
    finally:
        holder.kill()
        holder.wait()


def long_training(tiny_inputs: Any, tmp_path: Path, name: str, **train: Any) -> Path:
    """A config whose training lasts several seconds (150 steps of the tiny model), in a shared artifacts folder."""
    settings = {"max_steps": 150, "save_every": 10, "eval_every": 50, "log_every": 5} | train
    return tiny_inputs.config_file(tmp_path / f"{name}.yaml", tmp_path / "artifacts", train=settings)


@pytest.mark.e2e
def test_two_concurrent_runs_of_one_config_train_once(tiny_inputs: Any, tmp_path: Path) -> None:
    config = long_training(tiny_inputs, tmp_path, "same")
    first = start(RUN, str(config))
    second = None
    try:  # the second starts while the first is training (held stopped, so a fast machine cannot finish first)
        wait_for(lambda: any((tmp_path / "artifacts" / "train").glob(".work-*/metrics.csv")), "the first training")
        os.kill(first.pid, signal.SIGSTOP)
        second = start(RUN, str(config))
        second_lines: list[str] = []
        reader = threading.Thread(target=lambda: second_lines.extend(second.stdout), daemon=True)
        reader.start()
        wait_for(lambda: any("waiting" in line for line in second_lines), "the second run to wait for the lock")
        os.kill(first.pid, signal.SIGCONT)
        first_result, first_out = finish(first)
        reader.join(timeout=300)
        assert second.wait(timeout=60) == 0, "".join(second_lines)[-4000:]
        second_out = "".join(second_lines)
        second_result = json.loads(next(x for x in second_lines if x.startswith("RESULT ")).removeprefix("RESULT "))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
    assert first_result["train"]["built"] is True
    assert second_result["train"]["built"] is False, "the second run trained the same stage again"
    assert first_result["train"]["path"] == second_result["train"]["path"]
    waiting = [line for line in second_out.splitlines() if "waiting" in line]
    assert waiting and f"is being built by pid {first.pid} on " in waiting[0], second_out[-2000:]
    assert "Traceback" not in first_out + second_out


@pytest.mark.e2e
def test_two_runs_of_different_configs_both_train(tiny_inputs: Any, tmp_path: Path) -> None:
    configs = [long_training(tiny_inputs, tmp_path, f"seed{seed}", seed=seed) for seed in (1, 2)]
    first = start(RUN, str(configs[0]))
    try:
        wait_for(lambda: any((tmp_path / "artifacts" / "train").glob(".work-*/metrics.csv")), "the first training")
        second = start(RUN, str(configs[1]))
        (first_result, _), (second_result, second_out) = finish(first), finish(second)
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first_result["train"]["built"] and second_result["train"]["built"]
    assert first_result["train"]["key"] != second_result["train"]["key"]
    assert "waiting" not in second_out, "runs of different configs must not wait on each other's training"
