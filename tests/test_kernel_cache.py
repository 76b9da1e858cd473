"""Compiled CUDA kernels kept with the artifacts (MLX_PTX_CACHE_DIR), so a fresh GPU worker skips compilation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

from farense.compute import use_kernel_cache
from farense.config import load_config
from farense.stages import run_local


def test_kernel_cache_folder_is_versioned_and_an_explicit_setting_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    got = use_kernel_cache(tmp_path / "kernels")
    assert got == str(tmp_path / "kernels" / f"mlx-{mx.__version__}")
    assert use_kernel_cache(tmp_path / "elsewhere") == got  # set once per process: MLX reads it once
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/opt/my-cache")
    assert use_kernel_cache(tmp_path / "kernels") == "/opt/my-cache"


def test_running_a_stage_points_mlx_at_the_artifacts_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    data = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": "Sim."}]}
            for i in range(12)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, {"artifacts_dir": str(tmp_path / "artifacts"), "data.path": str(data)})
    run_local(cfg, only=None, until="data")
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "artifacts" / "cache" / "kernels" / f"mlx-{mx.__version__}")
