"""benchmarks/train_speed.py runs every measurement on a tiny model and prints one JSON line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_speed_rows(tiny_inputs, tmp_path: Path, *args: str) -> list[dict]:  # noqa: ANN001
    """train_speed.py on the tiny model at 2 x 64, 2 steps; its JSON lines."""
    config = tiny_inputs.config_file(tmp_path / "farense.yaml", tmp_path / "artifacts")
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_speed.py", "--config", str(config), *args,
         "--steps", "2", "--batch", "2", "--seq", "64"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_train_speed_prints_windows_loop_and_stage(tiny_inputs, tmp_path: Path):
    rows = train_speed_rows(tiny_inputs, tmp_path, "--paths", "dequantized")
    assert [r["measure"] for r in rows] == ["windows", "loop", "stage"]
    windows, loop, stage = rows
    assert windows["compute_path"] == "dequantized" and windows["padding_share"] < 0.05  # fixed full windows
    assert windows["batch"] == 2 and windows["seq"] == 64 and windows["tokens_per_s"] > 0
    assert 0.0 <= loop["padding_share"] < 1.0 and loop["tokens_per_s"] > 0
    assert stage["steps"] == 3 and len(stage["step_tokens_per_s"]) == 3  # a rate for every step
    assert stage["steady_tokens_per_s"] > 0 and stage["tokens_per_s"] > 0


def test_train_speed_profile_times_each_part(tiny_inputs, tmp_path: Path):
    (row,) = train_speed_rows(tiny_inputs, tmp_path, "--only", "profile")
    parts = row["parts"]
    assert {"embedding", "attention", "mlp", "lm_head_loss"} <= set(parts)
    assert all(parts[p]["forward_s"] > 0 and parts[p]["backward_s"] > 0 for p in ("attention", "mlp", "lm_head_loss"))
    assert row["compiled_step_s"] > 0


def test_train_speed_runs_the_bare_loop_as_the_stages_processes(tiny_inputs, tmp_path: Path):
    # --processes 2: two data-parallel ranks over loopback, as the train stage starts them on a CPU; one line
    # (rank 0's), whose tokens/s counts both ranks' tokens.
    rows = train_speed_rows(tiny_inputs, tmp_path, "--only", "windows", "--paths", "dequantized", "--processes", "2")
    (row,) = rows
    assert row["measure"] == "windows" and row["processes"] == 2
    assert row["openblas_threads"] == os.environ.get("OPENBLAS_NUM_THREADS", "1")  # one a rank, unless set
    assert row["batch"] == 2 and row["tokens_per_s"] > 0
    (one,) = train_speed_rows(tiny_inputs, tmp_path, "--only", "windows", "--paths", "dequantized", "--processes", "1")
    assert one["processes"] == 1
