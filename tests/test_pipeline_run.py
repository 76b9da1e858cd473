"""benchmarks/pipeline_run.py on a tiny model: every stage built once, without Prefect, and its figures printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from farense.config import STAGES, nested
from test_evaluate import TinyProject, shared_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_whole_pipeline_runs_without_prefect_and_reports_each_stage(tmp_path: Path) -> None:
    project = TinyProject(tmp_path, shared_tiny_model())
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(nested(project.overrides | {"train.max_steps": 2, "benchmark.enabled": False})))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_run.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(row["seconds"]) == [s for s in STAGES if s != "benchmark"]  # benchmark.enabled: false
    assert all(s >= 0 for s in row["seconds"].values())
    assert all(row["built"].values()), "a fresh artifacts folder: every stage is built by this run"
    assert row["train_steps"] == 2 and row["train_tokens_per_s"] > 0
    assert set(row["fact_accuracy"]) == {"base", "tuned"} and row["val_loss"]["tuned"] is not None
    assert row["export_gate"]["publish"] in (True, False) and row["export_gate"]["reasons"]
    assert (project.cfg.artifacts_dir / "published").is_dir() == bool(row["export_gate"]["publish"])
