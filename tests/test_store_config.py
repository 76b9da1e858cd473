"""The artifact store's atomicity and the typed config's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from farense.config import FarenseConfig, load_config, parse_override
from farense.errors import ConfigError
from farense.store import ArtifactStore, hash_path, stage_key


def write_one(store: ArtifactStore, key: str, payload: str = "x") -> Path:
    with store.write("data", key, inputs={"a": "1"}, config={"c": 1}, code_version="v", summary={"n": 1}) as tmp:
        (tmp / "out.txt").write_text(payload)
    return store.path("data", key)


def test_written_stage_has_manifest_and_config(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    path = write_one(store, "k1")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["inputs"] == {"a": "1"} and manifest["summary"] == {"n": 1}
    assert set(manifest["files"]) == {"out.txt", "farense_config.json"}
    assert json.loads((path / "farense_config.json").read_text()) == {"c": 1}
    assert store.get("data", "k1") is not None


def test_failure_inside_write_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.write("data", "k2", inputs={}, config={}, code_version="v") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert store.get("data", "k2") is None
    assert list((tmp_path / "data").iterdir()) == []


def test_sigkill_inside_write_is_never_read_and_is_swept(tmp_path: Path) -> None:
    code = (
        "import sys, os, signal\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1] / 'src')!r})\n"
        "from farense.store import ArtifactStore\n"
        f"s = ArtifactStore({str(tmp_path)!r})\n"
        "with s.write('data', 'k3', inputs={}, config={}, code_version='v') as tmp:\n"
        "    (tmp / 'half.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    leftovers = list((tmp_path / "data").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-k3-")
    store = ArtifactStore(tmp_path)
    assert store.get("data", "k3") is None
    write_one(store, "k3")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["k3"]


def test_folder_without_manifest_is_not_done_and_is_replaced(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    (tmp_path / "data" / "k4").mkdir(parents=True)
    (tmp_path / "data" / "k4" / "junk").write_text("partial")
    assert store.get("data", "k4") is None
    path = write_one(store, "k4")
    assert not (path / "junk").exists()


def test_keys_follow_content_not_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x.jsonl").write_text('{"text": "ola"}\n')
    assert hash_path(a) == hash_path(b)
    (b / "x.jsonl").write_text('{"text": "ole"}\n')
    assert hash_path(a) != hash_path(b)
    assert stage_key("data", {"d": "1"}, {"x": 1}, "v1") != stage_key("data", {"d": "1"}, {"x": 1}, "v2")
    assert stage_key("data", {"d": "1"}, {"x": 1}, "v1") != stage_key("data", {"d": "1"}, {"x": 2}, "v1")


def test_defaults_are_the_users_m1_settings() -> None:
    t = FarenseConfig().train
    assert (t.batch_size, t.grad_accumulation, t.learning_rate, t.epochs, t.warmup_steps) == (4, 2, 2e-4, 3, 100)
    assert (t.max_seq_length, t.lora_rank, t.lora_scale, t.lora_dropout) == (512, 8, 16.0, 0.0)
    assert t.lora_targets == ["q", "k", "v", "o", "gate", "up", "down"]
    assert (t.save_every, t.eval_every, t.log_every) == (200, 200, 10)
    m = FarenseConfig().model
    assert (m.bits, m.group_size) == (4, 64)


def test_cpu_quality_profile_is_the_default_recipe_for_4_epochs() -> None:
    """configs/cpu-quality.yaml copies farense.yaml (the YAML has no includes): only the epochs and the step counts
    that follow them may differ, so a change to the default recipe cannot leave the 4-epoch profile behind."""
    root = Path(__file__).resolve().parents[1]
    default = load_config(root / "farense.yaml", root=root).model_dump()
    quality = load_config(root / "configs/cpu-quality.yaml", root=root).model_dump()
    assert (quality["train"]["epochs"], default["train"]["epochs"]) == (4, 2)
    assert quality["train"]["eval_every"] == 2 * default["train"]["eval_every"]  # 664: validations at 0 and the end
    assert quality["train"]["save_every"] == 2 * default["train"]["save_every"]
    for field in ("epochs", "eval_every", "save_every"):
        quality["train"].pop(field), default["train"].pop(field)
    assert quality == default


def test_grounded_profile_is_the_default_recipe_with_the_facts() -> None:
    """configs/grounded.yaml is farense.yaml plus the facts file and the sequence length its longer rows need."""
    root = Path(__file__).resolve().parents[1]
    default = load_config(root / "farense.yaml", root=root).model_dump()
    grounded = load_config(root / "configs/grounded.yaml", root=root).model_dump()
    assert grounded["data"].pop("facts") == root / "data/facts.txt" and default["data"].pop("facts") is None
    assert (grounded["train"].pop("max_seq_length"), default["train"].pop("max_seq_length")) == (512, 256)
    assert grounded == default


def test_unknown_and_invalid_fields_name_the_field(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'train.epochz': unknown field"):
        load_config(f)
    f.write_text("train:\n  batch_size: -1\n")
    with pytest.raises(ConfigError, match=r"field 'train.batch_size': Input should be greater than or equal to 1"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"field 'model.bits'"):
        load_config(None, {"model.bits": 7})
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_override("train.epochs")


def test_yaml_then_overrides_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 2\ndata:\n  path: mydata\n")
    cfg = load_config(f, dict([parse_override("train.lora_targets=[q, v]")]))
    assert cfg.train.epochs == 2 and cfg.train.lora_targets == ["q", "v"]
    assert cfg.data.path == (tmp_path.parent / "mydata").resolve(), "relative to where farense runs"
    assert cfg.artifacts_dir == (tmp_path.parent / "artifacts").resolve()


def test_cli_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trian: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "farense.cli", "config", "show", "--config", str(f)],
        capture_output=True, text=True, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "field 'trian': unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr
