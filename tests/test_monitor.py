"""`farense monitor` on a real (tiny-model) training: a snapshot while it runs, the live view until it ends, and a
training whose process was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_stage_lock import ENV, ROOT, RUN, finish, long_training, start, wait_for

from farense.config import load_config
from farense.pipeline import make_plan

pytestmark = pytest.mark.e2e


def monitor(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farense.cli", "monitor", "--config", str(config), *args],
                          env=ENV | {"COLUMNS": "160"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def steps_logged(work: Path) -> int:
    lines = (work / "metrics.csv").read_text().splitlines()[1:] if (work / "metrics.csv").is_file() else []
    return max((int(line.split(",")[1]) for line in lines), default=0)


def test_monitor_follows_a_training_from_start_to_end(tiny_inputs: Any, tmp_path: Path) -> None:
    config = long_training(tiny_inputs, tmp_path, "watched")
    key = make_plan(load_config(config), "train")["train"].key
    work = tmp_path / "artifacts" / "train" / f".work-{key}"
    proc = start(RUN, str(config))
    try:
        wait_for(lambda: steps_logged(work) >= 20, "20 training steps")
        # Paused while the snapshot is taken: on a loaded machine the tiny training could otherwise finish first.
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            snap = monitor(config, "--once", "--json")
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        assert snap.returncode == 0, snap.stderr
        now = json.loads(snap.stdout)
        assert (now["key"], now["state"], now["total_steps"]) == (key, "running", 150)
        assert 20 <= now["step"] < 150 and now["metrics_file"] == str(work / "metrics.csv")
        assert now["loss"] > 0 and now["val_loss"] > 0 and now["tokens_per_s"] > 0 and now["rss_gb"] > 0
        assert 0 < now["eta_s"] < 600 and now["trained_tokens"] > 0
        assert now["holder"].startswith(f"pid {proc.pid} on ")
        live = monitor(config, timeout=300)  # the live view: returns when the training ends
        result, _ = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["train"]["built"] is True
    assert live.returncode == 0, live.stderr
    assert f"train {key}: finished" in live.stdout and "150/150" in live.stdout and "tokens/s" in live.stdout
    done = json.loads(monitor(config, "--once", "--json").stdout)
    assert (done["state"], done["step"], done["eta_s"]) == ("finished", 150, 0.0)
    assert done["best_val_loss"] <= done["val_loss"]


def test_monitor_reports_a_killed_training_as_stopped(tiny_inputs: Any, tmp_path: Path) -> None:
    config = long_training(tiny_inputs, tmp_path, "killed")
    key = make_plan(load_config(config), "train")["train"].key
    proc = start(RUN, str(config))
    try:
        wait_for(lambda: steps_logged(tmp_path / "artifacts" / "train" / f".work-{key}") >= 10, "10 steps")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    snap = json.loads(monitor(config, "--once", "--json").stdout)
    assert (snap["state"], snap["holder"], snap["eta_s"]) == ("stopped", None, None)
    view = monitor(config, "--once")
    assert "stopped" in view.stdout and "a rerun resumes it" in view.stdout


def test_monitor_without_a_training_says_so(tmp_path: Path, tiny_inputs: Any) -> None:
    proc = monitor(tiny_inputs.config_file(tmp_path / "none.yaml", tmp_path / "artifacts"), "--once")
    assert proc.returncode == 1 and "no training found under" in proc.stderr
