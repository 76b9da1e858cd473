"""benchmarks/recipe_sweep.py end to end on a tiny model: one JSON line per checkpoint, scored like validate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from farense.config import nested
from test_evaluate import TinyProject, shared_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_every_checkpoint_is_scored_on_the_held_out_questions(tmp_path: Path) -> None:
    project = TinyProject(tmp_path, shared_tiny_model())
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(nested(project.overrides | {"train.save_every": 2, "train.max_steps": 4})))
    out = tmp_path / "sweeps"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recipe_sweep.py"), "--config", str(cfg), "--name", "tiny",
         "--out", str(out), "--base", "train.learning_rate=0.002"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert all(r["name"] == "tiny" and r["overrides"] == {"train.learning_rate": 0.002} for r in lines)
    train = [r for r in lines if r.get("measure") == "train"]
    assert len(train) == 1 and train[0]["steps"] == 4 and train[0]["tokens_per_s"] > 0
    scored = [r for r in lines if "fact_accuracy" in r]
    assert [r["step"] for r in scored] == [0, 2, 4], "the base, then every checkpoint in order"
    # One of the two dev questions lists what a right answer states (the other counts for F1 only).
    assert all(r["questions"] == 2 and 0.0 <= r["fact_accuracy"] <= 1.0 and r["scorer"] == 2 for r in scored)
    assert scored[2]["epochs"] > scored[1]["epochs"] > 0 and scored[2]["val_loss"] is not None
    for step in (2, 4):
        answers = [json.loads(x) for x in (out / "tiny" / f"answers-step-{step:06d}.jsonl").read_text().splitlines()]
        assert [a["question"] for a in answers] == ["Onde joga o Farense?", "Quando foi fundado o Farense?"]
        assert all(isinstance(a["passed"], bool) and "why" in a for a in answers)
