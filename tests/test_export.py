"""Export stage and publishing: stock mlx-lm loads the export, metadata, fused model, atomic `latest`, quality gate."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from farense.config import ExportConfig, load_config
from farense.export import (
    HISTORY,
    LATEST,
    DRAFT_CORPUS,
    METADATA_FILE,
    VERSIONS,
    publish,
    published_root,
    published_version,
    quality_gate,
    read_draft_corpus,
    read_published,
)
from test_evaluate import RecordingReporter, TinyProject, tiny_project

QUICK_BENCH = {
    "benchmark.train_steps": 1, "benchmark.warmup_steps": 0, "benchmark.native_train_steps": 0,
    "benchmark.native_generation": False, "benchmark.measure_dense_size": False,
    "benchmark.train_modes": ["qlora-recompute"],
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyProject, dict[str, Path], RecordingReporter]:
    project = tiny_project(tmp_path_factory.mktemp("export"), **QUICK_BENCH, **{"export.fuse": True})
    reporter = RecordingReporter()
    return project, project.run(reporter=reporter), reporter


def test_stock_mlx_lm_generate_loads_the_export(exported: tuple) -> None:
    project, paths, _ = exported
    args = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(paths["model"]),
            "--adapter-path", str(paths["export"]), "--prompt", "Onde joga o Farense?", "--max-tokens", "4"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generation:" in proc.stdout


def test_metadata_records_what_made_the_adapter(exported: tuple) -> None:
    project, paths, _ = exported
    meta = json.loads((paths["export"] / METADATA_FILE).read_text())
    assert meta["config"]["train"]["max_steps"] == project.cfg.train.max_steps
    assert meta["data"]["dataset_sha256"] and meta["data"]["valid_sha256"]
    assert meta["base_model"]["source"] == str(project.model_dir) and len(meta["base_model"]["weights_sha256"]) == 64
    assert meta["metrics"]["tuned"]["val_loss"] < meta["metrics"]["base"]["val_loss"]
    assert {"mlx", "mlx-lm", "farense"} <= set(meta["packages"])
    assert meta["compute_path"] in ("dequantized", "recompute", "quantized")
    assert meta["train"]["steps"] == project.cfg.train.max_steps
    assert meta["benchmark"]["training_tokens_per_s"]["qlora-recompute"] > 0
    assert meta["system_prompt"] == "Assistente do Farense."
    summary = json.loads((paths["export"] / "manifest.json").read_text())["summary"]
    assert summary["gate"]["publish"] is True and summary["fused"] is True


def test_fused_model_loads_and_generates(exported: tuple) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm import generate, load

    _, paths, _ = exported
    model, tokenizer = load(str(paths["export"] / "fused"))
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert names and not any("lora" in k for k in names)
    assert isinstance(generate(model, tokenizer, "Olá", max_tokens=3), str)


def test_fuse_dequantize_reaches_mlx_lm_fuse(exported: tuple, tmp_path: Path) -> None:
    from farense.export import fuse_model

    _, paths, _ = exported
    info = fuse_model(paths["model"], paths["export"], tmp_path / "dense", dequantize=True)
    assert info["dequantized"] is True
    assert "quantization" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_first_export_is_published_atomically(exported: tuple) -> None:
    project, paths, reporter = exported
    root = published_root(project.cfg.artifacts_dir)
    latest = root / LATEST
    assert latest.is_symlink() and not os.readlink(latest).startswith("/")  # relative: the tree can move
    version = published_version(project.cfg.artifacts_dir)
    assert version is not None and version.parent.name == VERSIONS
    assert {p.name for p in version.iterdir()} == {"adapters.safetensors", "adapter_config.json", METADATA_FILE,
                                                   DRAFT_CORPUS}  # fmt: skip
    # the draft corpus is the training split's distinct answers, each with its questions (for farense.answer_draft)
    train_rows = [json.loads(line) for line in (Path(paths["data"]) / "train.jsonl").read_text().splitlines()]
    answers = {m["content"] for r in train_rows for m in r.get("messages", []) if m["role"] == "assistant"}
    answers |= {r["completion"] for r in train_rows if "completion" in r}
    corpus = read_draft_corpus(version)
    assert set(corpus.answers) == answers and len(corpus.answers) == len(answers) > 0
    assert len(corpus.questions) == len(corpus.answers) and all(corpus.questions)
    row = next(r for r in train_rows if "messages" in r)
    asked = [m["content"] for m in row["messages"] if m["role"] == "user"][-1]
    said = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1]
    assert asked in corpus.questions[corpus.answers.index(said)]
    assert read_published(project.cfg.artifacts_dir)["published"]["export_dir"] == str(paths["export"])
    assert not [p for p in root.rglob(".tmp-*")] and not [p for p in root.glob(".latest-*")]
    history = [json.loads(line) for line in (root / HISTORY).read_text().splitlines()]
    assert history[-1]["publish"] is True and history[-1]["version"] == version.name
    assert "Published" in reporter.of("markdown")["publish-decision"]


def test_publishing_again_is_a_no_op(exported: tuple) -> None:
    project, paths, _ = exported
    before = published_version(project.cfg.artifacts_dir)
    decision = publish(project.cfg, paths["export"])
    assert decision["published"] is False and decision["reasons"] == ["already published"]
    assert published_version(project.cfg.artifacts_dir) == before


def test_a_worse_retrain_never_replaces_a_better_published_adapter(tmp_path: Path) -> None:
    project = tiny_project(tmp_path, **{"benchmark.enabled": False})
    good = project.run()
    published = published_version(project.cfg.artifacts_dir)
    assert published is not None and published.name.endswith(good["export"].name)
    # The nightly retrain: same data, a weaker run (fewer, smaller steps). It still beats the base model.
    worse_cfg = project.config(**{"train.max_steps": 1, "train.learning_rate": 1e-4})
    reporter = RecordingReporter()
    worse = project.run(worse_cfg, reporter=reporter)
    meta = json.loads((worse["export"] / METADATA_FILE).read_text())
    assert meta["metrics"]["tuned"]["val_loss"] < meta["metrics"]["base"]["val_loss"]
    assert published_version(project.cfg.artifacts_dir) == published  # kept
    history = [json.loads(line) for line in (published.parent.parent / HISTORY).read_text().splitlines()]
    assert history[-1]["publish"] is False and history[-1]["previous"] == published.name
    assert any("above" in r or "below" in r for r in history[-1]["reasons"])
    assert any(m.startswith("publish: keep the published adapter") for k, _, m in reporter.calls if k == "log")
    # A better retrain (more, gentler steps: lower loss and higher F1 here) does replace it.
    better = project.run(project.config(**{"train.max_steps": 12, "train.learning_rate": 1e-3}))
    assert published_version(project.cfg.artifacts_dir).name.endswith(better["export"].name)


def test_a_failed_publish_leaves_latest_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tiny_project(tmp_path, **{"benchmark.enabled": False, "export.publish": False})
    paths = project.run()
    assert read_published(project.cfg.artifacts_dir) is None  # export.publish=false reached publish()
    cfg = load_config(None, project.overrides | {"export.publish": True})
    import farense.export as export

    real = export.shutil.copyfile
    calls = []

    def failing_copy(src, dst, *a, **k):  # noqa: ANN001, ANN202
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(export.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        publish(cfg, paths["export"])
    root = published_root(cfg.artifacts_dir)
    assert not (root / LATEST).exists() and not list((root / VERSIONS).iterdir())
    monkeypatch.setattr(export.shutil, "copyfile", real)
    assert publish(cfg, paths["export"])["published"] is True


# ---------------------------------------------------------------- the gate, rule by rule


def meta(loss: float, f1: float, base_loss: float = 5.0, questions: str = "q1", valid: str = "v1",
         weights: str = "w1", sha: str = "a1") -> dict:  # fmt: skip
    return {
        "metrics": {"base": {"val_loss": base_loss, "qa_f1": 0.0}, "tuned": {"val_loss": loss, "qa_f1": f1},
                    "questions_sha256": questions, "valid_sha256": valid, "max_tokens": 64},
        "base_model": {"weights_sha256": weights},
        "adapter": {"sha256": sha},
        "published": {"version": "v-current"},
    }  # fmt: skip


GATE = ExportConfig()


def test_gate_requires_beating_the_base() -> None:
    d = quality_gate(meta(5.0, 0.5), None, GATE)
    assert not d.publish and "does not beat the base" in d.reasons[0]
    assert quality_gate(meta(4.0, 0.5), None, GATE).publish


def test_gate_compares_f1_and_loss_only_when_measured_on_the_same_sets() -> None:
    cur = meta(3.0, 0.40, sha="old")
    assert not quality_gate(meta(2.9, 0.39), cur, GATE).publish  # lower F1
    assert "Q&A F1 0.3900 is below v-current" in quality_gate(meta(2.9, 0.39), cur, GATE).reasons[0]
    assert not quality_gate(meta(3.1, 0.45), cur, GATE).publish  # higher loss on the same split
    assert quality_gate(meta(3.0, 0.40), cur, GATE).publish  # equal is not worse
    # Another validation split: the loss is not comparable, the F1 decides.
    assert quality_gate(meta(3.5, 0.41, valid="v2"), cur, GATE).publish
    # Another base model: same.
    assert quality_gate(meta(3.5, 0.41, weights="w2"), cur, GATE).publish
    # Nothing comparable: keep what is published.
    d = quality_gate(meta(2.0, 0.9, valid="v2", questions="q2"), cur, GATE)
    assert not d.publish and "nothing could be compared" in d.reasons[-1]


def test_gate_settings_reach_the_decision() -> None:
    cur = meta(3.0, 0.40, sha="old")
    assert quality_gate(meta(3.05, 0.38), cur, ExportConfig(gate_f1_tolerance=0.05, gate_loss_tolerance=0.1)).publish
    assert quality_gate(meta(9.0, 0.0), cur, ExportConfig(quality_gate=False)).publish
    off = copy.deepcopy(cur)
    off["metrics"]["max_tokens"] = 32
    assert "not comparable" in " ".join(quality_gate(meta(2.9, 0.1), off, GATE).reasons)


def fact_meta(loss: float, acc: float, base_acc: float = 0.0, **kw: str) -> dict:
    m = meta(loss, 0.3, **kw)
    m["metrics"]["tuned"]["fact_accuracy"], m["metrics"]["base"]["fact_accuracy"] = acc, base_acc
    return m


def test_gate_uses_fact_accuracy_when_the_questions_list_key_facts() -> None:
    cur = fact_meta(3.0, 0.90, sha="old")
    worse = quality_gate(fact_meta(2.5, 0.85, valid="v2"), cur, GATE)  # better loss, fewer facts right
    assert not worse.publish and "fact accuracy 0.8500 is below v-current's 0.9000" in worse.reasons[0]
    assert quality_gate(fact_meta(2.5, 0.85, valid="v2"), cur, ExportConfig(gate_fact_tolerance=0.05)).publish
    assert quality_gate(fact_meta(3.5, 0.92, valid="v2"), cur, GATE).publish
    # F1 does not decide once fact accuracy is there: lower F1, same facts right.
    same_facts = fact_meta(2.9, 0.90)
    same_facts["metrics"]["tuned"]["qa_f1"] = 0.01
    assert quality_gate(same_facts, cur, GATE).publish


def test_gate_refuses_a_tuned_model_that_knows_fewer_facts_than_its_base() -> None:
    d = quality_gate(fact_meta(2.0, 0.10, base_acc=0.20), None, GATE)
    assert not d.publish and "below the base's 0.2000" in d.reasons[-1]
