"""Validation stage on a tiny model: scoring, system prompt, metrics and answer files, mlx-lm adapter format.

Also holds the tiny project the export, answer and benchmark tests share (`tiny_project`): a dataset, held-out
questions and a small config over one tiny model per session, run through the real pipeline runner.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import farense  # noqa: F401
import pytest

from farense.config import FarenseConfig, load_config
from farense.evaluate import (
    load_questions,
    most_common_system_prompt,
    normalize_words,
    token_f1,
    validate_stage,
)
from farense.errors import DataError
from farense.progress import NullReporter
from farense.stages import StageContext, run_local
from tiny import write_tiny_mlx_model

SYSTEM = "Assistente do Farense."


def chat_row(i: int, system: str | None = SYSTEM) -> dict[str, Any]:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [
        {"role": "user", "content": f"Pergunta {i}: onde joga o Farense?"},
        {"role": "assistant", "content": "No Estádio de São Luís, em Faro."},
    ]}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TINY_TRAIN = {
    "train.max_steps": 4,
    "train.batch_size": 2,
    "train.grad_accumulation": 1,
    "train.max_seq_length": 128,
    "train.warmup_steps": 1,
    "train.learning_rate": 3e-3,
    "train.eval_every": 2,
    "train.save_every": 2,
    "eval.max_tokens": 6,
    "benchmark.train_steps": 2,
    "benchmark.warmup_steps": 1,
    "benchmark.generation_tokens": 4,
}


class RecordingReporter(NullReporter):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        self.calls.append(("table", key, rows))

    def markdown(self, key: str, text: str, description: str) -> None:
        self.calls.append(("markdown", key, text))

    def image(self, key: str, path: str, description: str) -> None:
        self.calls.append(("image", key, path))

    def log(self, message: str) -> None:
        self.calls.append(("log", "", message))

    def of(self, kind: str) -> dict[str, Any]:
        return {k: v for c, k, v in self.calls if c == kind}


class TinyProject:
    """A data folder, a tiny model and held-out questions under `root`, and a small config over them."""

    def __init__(self, root: Path, model_dir: Path, **overrides: Any) -> None:
        self.root = root
        self.model_dir = model_dir
        data = root / "dataset"
        write_jsonl(data / "qa.jsonl", [chat_row(i) for i in range(20)])
        questions = write_jsonl(root / "questions.jsonl", [
            {"question": "Onde joga o Farense?", "reference": "No Estádio de São Luís, em Faro.",
             "must": [r"S[ãa]o Lu[íi]s"]},
            {"question": "Quando foi fundado o Farense?", "reference": "Em 1910."},
        ])  # fmt: skip
        sealed = write_jsonl(root / "test.jsonl", [
            {"id": "t1", "category": "fact", "facts": ["stadium"], "asks": ["stadium.name"],
             "question": "Para que recinto vou ver o Farense em casa?", "reference": "No Estádio de São Luís."},
            {"id": "t2", "category": "live", "question": "Quanto custa o bilhete de domingo?",
             "reference": "Não tenho informação atualizada sobre bilhetes."},
        ])  # fmt: skip
        self.overrides = {
            "artifacts_dir": str(root / "artifacts"),
            "data.path": str(data),
            "data.dev_questions": str(questions),
            "data.test_questions": str(sealed),
            "model.source": str(model_dir),
            **TINY_TRAIN,
            **overrides,
        }
        self.cfg = load_config(None, self.overrides)

    def config(self, **more: Any) -> FarenseConfig:
        return load_config(None, self.overrides | more)

    def run(self, cfg: FarenseConfig | None = None, until: str = "export", reporter: Any = None) -> dict[str, Path]:
        """The real pipeline runner (data and model stages included); returns each stage's artifact folder."""
        results = run_local(cfg or self.cfg, until=until, reporter=reporter)
        return {stage: Path(r["path"]) for stage, r in results.items()}


_SHARED: dict[str, Any] = {}


def shared_tiny_model() -> Path:
    """One tiny model per test session (the model, not the artifacts, is what is slow to make)."""
    if "model" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="farense-tiny-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED["model"] = write_tiny_mlx_model(root / "model")
    return _SHARED["model"]


def tiny_project(root: Path, **overrides: Any) -> TinyProject:
    return TinyProject(root, shared_tiny_model(), **overrides)


# ---------------------------------------------------------------- scoring


def test_normalization_ignores_case_accents_punctuation_and_articles() -> None:
    assert normalize_words("O Estádio de São Luís, em FARO!") == ["estadio", "de", "sao", "luis", "em", "faro"]
    assert token_f1("estadio sao luis", "No Estádio São Luís.")["recall"] == pytest.approx(0.75)
    assert token_f1("Em 1910.", "em 1910")["exact"] == 1.0
    assert token_f1("", "Em 1910.")["f1"] == 0.0
    f = token_f1("Faro, em 1910", "Fundado em 1910 em Faro")
    assert f["precision"] == 1.0 and 0 < f["recall"] < 1 and 0 < f["f1"] < 1


def test_system_prompt_is_the_most_common_one_in_the_training_data() -> None:
    rows = [chat_row(1), chat_row(2), chat_row(3, "Outro."), chat_row(4, None), {"text": "sem chat"}]
    assert most_common_system_prompt(rows) == SYSTEM
    assert most_common_system_prompt([{"text": "x"}]) is None


def test_questions_file_errors_name_the_line_and_field(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "reference": "b"}, {"question": "c"}])
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'reference'"):
        load_questions(bad)
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "reference": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_questions(tmp_path / "broken.jsonl")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"question": f"q{i}", "reference": "r"} for i in range(5)])
    assert len(load_questions(ok, limit=3)) == 3


# ---------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyProject, dict[str, Path], RecordingReporter]:
    project = tiny_project(tmp_path_factory.mktemp("validate"))
    reporter = RecordingReporter()
    return project, project.run(until="validate", reporter=reporter), reporter


def test_validate_writes_metrics_answers_and_artifacts(validated: tuple) -> None:
    project, paths, reporter = validated
    out = paths["validate"]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("base", "tuned"):
        assert metrics[name]["val_loss"] > 0 and metrics[name]["perplexity"] > 1
        assert 0 <= metrics[name]["qa_f1"] <= 1
    # The tiny model learns the one answer of its training data: the validation loss must drop.
    assert metrics["tuned"]["val_loss"] < metrics["base"]["val_loss"]
    assert metrics["tuned_beats_base"] is True
    assert metrics["system_prompt"] == SYSTEM
    assert metrics["questions"] == 2 and metrics["max_tokens"] == 6
    assert metrics["compute"]["compute_path"] in ("dequantized", "quantized", "recompute")
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    dev = [a for a in answers if a["set"] == "dev"]
    assert [a["reference"] for a in dev] == ["No Estádio de São Luís, em Faro.", "Em 1910."]
    # The sealed test set is answered and reported beside the dev set, under its own names.
    assert [a["id"] for a in answers if a["set"] == "test"] == ["t1", "t2"] and metrics["test_questions"] == 2
    for name in ("base", "tuned"):
        assert metrics[name]["test_fact_accuracy_n"] == 1 and metrics[name]["test_live_declined_n"] == 1
        low, high = metrics[name]["test_fact_accuracy_low"], metrics[name]["test_fact_accuracy_high"]
        assert 0 <= low <= metrics[name]["test_fact_accuracy"] <= high <= 1
    assert all(a["base_tokens"] <= 6 and a["tuned_tokens"] <= 6 for a in answers)
    # Answers stopped by eval.max_tokens rather than by the model are counted, and said so where they fail.
    for name in ("base", "tuned"):
        cut = [a for a in dev if a[f"{name}_tokens"] == 6]  # batched answering: max_tokens long means cut
        assert metrics[name]["answers_cut"] == len(cut)
        assert all("cut at 6 tokens" in a[f"{name}_why"] for a in cut if not a[f"{name}_passed"])
    cut_logged = any("cut at eval.max_tokens=6" in m for k, _, m in reporter.calls if k == "log")
    assert cut_logged == (metrics["tuned"]["answers_cut"] + metrics["tuned"]["test_answers_cut"] > 0)
    md = (out / "answers.md").read_text()
    assert "| id | category | wording | question | tuned answer | tuned | why |" in md and "Quando foi fundado" in md
    assert md.index("## Sealed test set (2 questions)") < md.index("## Dev set (2 questions)")
    assert "Quando foi fundado" in reporter.of("markdown")["validate-answers"]
    assert {r["metric"] for r in reporter.of("table")["validate-metrics"]} >= {
        "val_loss", "qa_f1", "Dev set: fact_accuracy", "Sealed test set: fact_accuracy"}
    # The first question lists a key fact, so it is scored; the second has only a reference (F1 only).
    for name in ("base", "tuned"):
        assert metrics[name]["fact_accuracy_n"] == 1 and metrics[name]["fact_accuracy"] in (0.0, 1.0)
    first = dev[0]
    assert first["tuned_passed"] == bool(re.search("S[ãa]o Lu[íi]s", first["tuned_answer"], re.I))
    assert first["tuned_why"] and ("pass" if first["tuned_passed"] else "**fail**") in md
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["tuned_val_loss"] == metrics["tuned"]["val_loss"] and summary["seconds"] > 0


def test_validated_adapter_is_the_best_checkpoint_in_mlx_lm_format(validated: tuple) -> None:
    from mlx_lm.utils import load

    project, paths, _ = validated
    metrics = json.loads((paths["validate"] / "metrics.json").read_text())
    assert metrics["adapter"]["file"] == "best_adapters.safetensors"
    model, _ = load(str(paths["model"]), adapter_path=str(paths["validate"] / "adapter"))
    assert any(k.endswith("lora_a") for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))


def test_validation_losses_come_from_the_train_stage_when_they_are_the_same_measurement(validated: tuple) -> None:
    from farense.evaluate import attach_adapter, load_base, losses_from_training, validation_loss
    from farense.jsonl import read_jsonl

    project, paths, _ = validated
    metrics = json.loads((paths["validate"] / "metrics.json").read_text())
    state = json.loads((paths["train"] / "training_state.json").read_text())
    assert metrics["base"]["measured_by"] == "train stage, step 0"
    assert metrics["tuned"]["measured_by"] == f"train stage, step {state['best_step']}"
    # Measured again here, on the validate stage's own model and adapter: the same losses.
    model, tokenizer, _ = load_base(paths["model"], project.cfg.train.compute_path)
    rows = read_jsonl(paths["data"] / "valid.jsonl")
    base = validation_loss(model, tokenizer, rows, project.cfg)
    tuned = validation_loss(attach_adapter(model, paths["validate"] / "adapter"), tokenizer, rows, project.cfg)
    assert base["measured_by"] == tuned["measured_by"] == "validate stage"
    assert base["val_loss"] == pytest.approx(metrics["base"]["val_loss"], rel=1e-5)
    assert tuned["val_loss"] == pytest.approx(metrics["tuned"]["val_loss"], rel=1e-5)
    assert base["examples"] == metrics["base"]["examples"]
    # Other validation batches than the trainer's, or an adapter from a step it did not validate: measured here.
    other = project.config(**{"eval.max_batches": 1})
    assert losses_from_training(paths["train"], other, "best_adapters.safetensors") == {}
    final_step = state["step"]
    found = losses_from_training(paths["train"], project.cfg, "adapters.safetensors")
    assert found["base"][1] == "train stage, step 0" and found["tuned"][1] == f"train stage, step {final_step}"


def test_without_questions_only_the_loss_is_measured(tmp_path: Path) -> None:
    project = tiny_project(tmp_path, **{"data.dev_questions": str(tmp_path / "missing.jsonl"),
                                        "data.test_questions": str(tmp_path / "missing-too.jsonl"), "eval.adapter": "final"})
    paths = project.run(until="train")
    out = tmp_path / "validate-out"
    out.mkdir()
    reporter = RecordingReporter()
    summary = validate_stage(project.cfg, StageContext(upstream=paths, out_dir=out, work_dir=tmp_path / "w",
                                                       reporter=reporter))  # fmt: skip
    assert summary["questions"] == 0 and summary["tuned_qa_f1"] is None
    assert summary["adapter_file"] == "adapters.safetensors"
    assert (out / "answers.jsonl").read_text() == ""
    assert any("no dev questions" in m for k, _, m in reporter.calls if k == "log")
    assert any("no test questions" in m for k, _, m in reporter.calls if k == "log")


def test_eval_settings_reach_the_stage(validated: tuple, tmp_path: Path) -> None:
    project, paths, _ = validated
    cfg = project.config(**{"eval.max_questions": 1, "eval.max_batches": 1, "eval.max_tokens": 2})
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(upstream={s: paths[s] for s in ("data", "model", "train")}, out_dir=out, work_dir=tmp_path / "w")
    summary = validate_stage(cfg, ctx)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["questions"] == 1 and metrics["max_tokens"] == 2
    assert metrics["base"]["batches"] == 1 and metrics["tuned"]["answer_tokens"] <= 2
    assert metrics["base"]["measured_by"] == metrics["tuned"]["measured_by"] == "validate stage"
