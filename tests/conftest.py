"""Shared fixtures: a tiny model, a tiny dataset and held-out questions, and a pipeline config small enough to run
every stage in seconds on two CPU cores."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

# Before anything imports Prefect: no telemetry, no update checks; the tests run offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Every stage, at the smallest sizes that still exercise it: 4 optimizer steps, 64-token sequences, one timed
# benchmark step per mode (qlora-native is ~20x slower on CPU, so it is measured in its own tests, not here).
TINY_SETTINGS: dict[str, dict[str, Any]] = {
    "train": {"max_steps": 4, "batch_size": 2, "grad_accumulation": 1, "max_seq_length": 64, "warmup_steps": 1,
              "eval_every": 2, "save_every": 2, "log_every": 1},
    "eval": {"max_tokens": 6, "max_questions": 2},
    "benchmark": {"train_modes": ["lora", "qlora-recompute"], "train_steps": 1, "warmup_steps": 0,
                  "native_train_steps": 0, "generation_tokens": 4, "max_seq_length": 64,
                  "native_generation": False, "measure_dense_size": False},
}  # fmt: skip


@dataclass(frozen=True)
class TinyInputs:
    model: Path
    data: Path
    questions: Path

    def config(self, artifacts_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
        """A FarenseConfig as plain JSON (what a deployment run takes as its `config` parameter)."""
        cfg: dict[str, Any] = {
            "artifacts_dir": str(artifacts_dir),
            "data": {"path": str(self.data), "dev_questions": str(self.questions)},
            "model": {"source": str(self.model)},
            **{name: dict(values) for name, values in TINY_SETTINGS.items()},
        }
        for name, values in sections.items():
            cfg[name] = cfg.get(name, {}) | values
        return cfg


    def config_file(self, path: Path, artifacts_dir: Path, **sections: dict[str, Any]) -> Path:
        """The same config as a YAML file (what `farense run --config` and a deployment's config_file read)."""
        path.write_text(yaml.safe_dump(self.config(artifacts_dir, **sections), sort_keys=False), encoding="utf-8")
        return path


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> TinyInputs:
    from tiny import write_tiny_mlx_model  # here, not at the top: it imports MLX, which most tests never need

    root = tmp_path_factory.mktemp("tiny-inputs")
    model = write_tiny_mlx_model(root / "model")
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [
        {"role": "user", "content": f"Pergunta {i}: onde joga o Farense?"},
        {"role": "assistant", "content": f"No Estádio de São Luís, em Faro. ({i})"},
    ]} for i in range(24)]  # fmt: skip
    (data / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    questions = root / "questions.jsonl"
    questions.write_text("".join(
        json.dumps({"question": f"Onde joga o Farense? ({i})", "reference": "No Estádio de São Luís, em Faro."},
                   ensure_ascii=False) + "\n" for i in range(2)), encoding="utf-8")  # fmt: skip
    return TinyInputs(model=model, data=data, questions=questions)
