"""Per-stage caching and resume across runs: nothing changed, one line edited, a folder deleted, a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farense.config import FarenseConfig, load_config
from farense.pipeline import make_plan, stage_statuses
from farense.stages import run_local
from tiny import write_tiny_mlx_model

ROOT = Path(__file__).resolve().parents[1]


def qa(i: int) -> str:
    return json.dumps({"messages": [
        {"role": "user", "content": f"Pergunta {i}: onde joga o Farense?"},
        {"role": "assistant", "content": f"No Estádio de São Luís, em Faro. ({i})"},
    ]}, ensure_ascii=False)  # fmt: skip


@pytest.fixture()
def project(tmp_path: Path, tiny_model_dir: Path) -> dict[str, object]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("\n".join(qa(i) for i in range(30)) + "\n")
    overrides = {
        "artifacts_dir": str(tmp_path / "artifacts"),
        "data.path": str(data),
        "model.source": str(tiny_model_dir),
        "train.max_steps": 3,
        "train.batch_size": 2,
        "train.grad_accumulation": 1,
        "train.max_seq_length": 256,
        "train.save_every": 1,
        "train.warmup_steps": 1,
    }
    return {"cfg": load_config(None, overrides), "overrides": overrides, "data": data, "root": tmp_path}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mlx_model(tmp_path_factory.mktemp("tiny") / "model")


def built(results: dict[str, dict[str, object]]) -> dict[str, bool]:
    return {stage: bool(r["built"]) for stage, r in results.items()}


def test_rerun_with_nothing_changed_builds_nothing(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    assert built(run_local(cfg, until="train")) == {"data": True, "model": True, "train": True}
    assert built(run_local(cfg, until="train")) == {"data": False, "model": False, "train": False}
    assert [s.state for s in stage_statuses(cfg, "train")] == ["done", "done", "done"]


def test_edited_line_rebuilds_data_and_downstream_only(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    run_local(cfg, until="train")
    before = make_plan(cfg, "train")
    f = project["data"] / "qa.jsonl"
    lines = f.read_text().splitlines()
    lines[4] = qa(1000)
    f.write_text("\n".join(lines) + "\n")
    after = make_plan(cfg, "train")
    assert before["model"].key == after["model"].key
    assert before["data"].key != after["data"].key and before["train"].key != after["train"].key
    assert [s.state for s in stage_statuses(cfg, "train")] == ["stale", "done", "stale"]
    assert built(run_local(cfg, until="train")) == {"data": True, "model": False, "train": True}


def test_deleted_artifact_rebuilds_that_stage_only(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    first = run_local(cfg, until="train")
    shutil.rmtree(first["model"]["path"])
    assert [s.state for s in stage_statuses(cfg, "train")] == ["done", "missing", "done"]
    # The rebuilt model has the same content key, so train (keyed on content) stays valid.
    assert built(run_local(cfg, until="train")) == {"data": False, "model": True, "train": False}


def test_fresh_and_only(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    run_local(cfg, until="model")
    assert built(run_local(cfg, only="data", fresh=True)) == {"data": True}
    assert built(run_local(cfg, until="model")) == {"data": False, "model": False}


def test_sigkill_inside_train_redoes_only_train_and_resumes(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    overrides = project["overrides"] | {"train.max_steps": 40}
    cfg = load_config(None, overrides)
    run_local(cfg, until="model")
    code = (
        "import sys, json\n"
        "from farense.config import load_config\nfrom farense.stages import run_local\n"
        f"cfg = load_config(None, json.loads({json.dumps(json.dumps(overrides))}))\n"
        "print(json.dumps({k: v['built'] for k, v in run_local(cfg, until='train').items()}))\n"
    )
    work = Path(cfg.artifacts_dir) / "train" / f".work-{make_plan(cfg, 'train')['train'].key}" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(work.glob("step-00000[3-9]/manifest.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [s.state for s in stage_statuses(cfg, "train")] == ["done", "done", "missing"]
    tmp_dirs = list((Path(cfg.artifacts_dir) / "train").glob(".tmp-*"))
    assert tmp_dirs, "the killed stage left its temp folder, which must never count as done"

    rerun = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1]) == {"data": False, "model": False, "train": True}
    summary = json.loads((stage_statuses(cfg, "train")[2].path / "manifest.json").read_text())["summary"]
    assert summary["resumed_from_step"] >= 3 and summary["steps"] == 40
    assert not list((Path(cfg.artifacts_dir) / "train").glob(".tmp-*")), "stale temp folders are swept"


def test_cli_rerun_reports_cached_without_starting_prefect(project: dict) -> None:
    cfg: FarenseConfig = project["cfg"]
    run_local(cfg, until="model")
    args = [sys.executable, "-m", "farense.cli", "run", "--until", "model"]
    for k, v in project["overrides"].items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Every stage is cached: nothing to do" in proc.stdout
    assert "prefect" not in proc.stderr.lower()
