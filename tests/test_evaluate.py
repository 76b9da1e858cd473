"""Validation stage on a tiny model: scoring, system prompt, metrics and answer files, mlx-lm adapter format.

Also holds the tiny pipeline the export, answer and benchmark tests share (`tiny_pipeline`): real stage code and
real manifests from the train stage on, built once per test session.
"""

from __future__ import annotations

import json
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
from farense.pipeline import StagePlan, _section_for_key, build_stage, code_version
from farense.progress import NullReporter
from farense.stages import StageContext, execute_stage
from farense.store import ArtifactStore, hash_path, stage_key

try:
    from tiny import write_tiny_mlx_model
except ImportError:  # until tests/tiny.py lands

    def write_tiny_mlx_model(out: Path) -> Path:
        import json as _json

        import mlx.core as mx
        import mlx.nn as nn
        from mlx_lm.models import llama
        from mlx_lm.utils import save_config, save_model
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(["O Farense foi fundado em 1910 em Faro.", "Estádio de São Luís", "preto e branco"] * 10, trainer)
        tok.save(str(out / "tokenizer.json"))
        template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        (out / "tokenizer_config.json").write_text(_json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|im_end|>",
            "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>",
        }))  # fmt: skip
        cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                   vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, rope_theta=10000.0)  # fmt: skip
        mx.random.seed(0)
        model = llama.Model(llama.ModelArgs(**cfg))
        nn.quantize(model, group_size=32, bits=4)
        cfg["quantization"] = {"group_size": 32, "bits": 4}
        save_model(out, model)
        save_config(cfg, out / "config.json")
        return out


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
    """A data folder, a tiny model and questions under `root`, and the stage plans for a config over them."""

    def __init__(self, root: Path, model_dir: Path, **overrides: Any) -> None:
        self.root = root
        self.model_dir = model_dir
        data = root / "dataset"
        write_jsonl(data / "qa.jsonl", [chat_row(i) for i in range(20)])
        questions = write_jsonl(root / "questions.jsonl", [
            {"question": "Onde joga o Farense?", "reference": "No Estádio de São Luís, em Faro."},
            {"question": "Quando foi fundado o Farense?", "reference": "Em 1910."},
        ])  # fmt: skip
        self.overrides = {
            "artifacts_dir": str(root / "artifacts"),
            "data.path": str(data),
            "data.eval_questions": str(questions),
            "model.source": str(model_dir),
            **TINY_TRAIN,
            **overrides,
        }
        self.cfg = load_config(None, self.overrides)

    def config(self, **more: Any) -> FarenseConfig:
        return load_config(None, self.overrides | more)

    def plans(self, cfg: FarenseConfig) -> dict[str, StagePlan]:
        """make_plan's keys, with this fixture's data and model stages standing in for the real ones."""
        from farense.pipeline import UPSTREAM, source_inputs

        plans: dict[str, StagePlan] = {}
        for stage in ("data", "model", "train", "validate", "benchmark", "export"):
            if stage == "benchmark" and not cfg.benchmark.enabled:
                continue
            if stage == "data":
                inputs = {"dataset": hash_path(cfg.data.path)}
            elif stage == "model":
                inputs = {"source": "tiny:" + hash_path(self.model_dir)}
            else:
                inputs = source_inputs(cfg, stage)
            inputs |= {u: plans[u].key for u in UPSTREAM[stage] if u in plans}
            section = _section_for_key(cfg, stage)
            version = code_version(stage)
            plans[stage] = StagePlan(stage, stage_key(stage, inputs, section, version), inputs, section, version,
                                     tuple(u for u in UPSTREAM[stage] if u in plans))  # fmt: skip
        return plans

    def run(self, cfg: FarenseConfig | None = None, until: str = "export", reporter: Any = None) -> dict[str, Path]:
        cfg = cfg or self.cfg
        store = ArtifactStore(cfg.artifacts_dir)
        paths: dict[str, Path] = {}
        for stage, sp in self.plans(cfg).items():
            if stage == "data":
                paths[stage] = build_stage(store, sp, cfg, self._data)[0].path
            elif stage == "model":
                # The store writes its own config.json into stage folders, which would clobber the model's.
                paths[stage] = self.model_dir
            else:
                paths[stage], _ = execute_stage(cfg, sp, {u: paths[u] for u in sp.upstream}, reporter)
            if stage == until:
                break
        return paths

    def _data(self, out: Path) -> dict[str, Any]:
        rows = [json.loads(line) for line in (Path(self.overrides["data.path"]) / "qa.jsonl").read_text().splitlines()]
        write_jsonl(out / "train.jsonl", rows[:16])
        write_jsonl(out / "valid.jsonl", rows[16:])
        return {"train": 16, "valid": len(rows) - 16}



_SHARED: dict[str, Any] = {}


def shared_tiny_model() -> Path:
    """One tiny model per test session (the model, not the artifacts, is what is slow to make)."""
    if "model" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="farense-tiny-"))
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
    with pytest.raises(DataError, match=r"q.jsonl: question 2: field 'reference'"):
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
    assert [a["reference"] for a in answers] == ["No Estádio de São Luís, em Faro.", "Em 1910."]
    assert all(a["base_tokens"] <= 6 and a["tuned_tokens"] <= 6 for a in answers)
    md = (out / "answers.md").read_text()
    assert "| # | question | reference | base answer | tuned answer |" in md and "Quando foi fundado" in md
    assert "Quando foi fundado" in reporter.of("markdown")["validate-answers"]
    assert {r["metric"] for r in reporter.of("table")["validate-metrics"]} >= {"val_loss", "qa_f1"}
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["tuned_val_loss"] == metrics["tuned"]["val_loss"] and summary["seconds"] > 0


def test_validated_adapter_is_the_best_checkpoint_in_mlx_lm_format(validated: tuple) -> None:
    from mlx_lm.utils import load

    project, paths, _ = validated
    metrics = json.loads((paths["validate"] / "metrics.json").read_text())
    assert metrics["adapter"]["file"] == "best_adapters.safetensors"
    model, _ = load(str(paths["model"]), adapter_path=str(paths["validate"] / "adapter"))
    assert any(k.endswith("lora_a") for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))


def test_without_questions_only_the_loss_is_measured(tmp_path: Path) -> None:
    project = tiny_project(tmp_path, **{"data.eval_questions": str(tmp_path / "missing.jsonl"), "eval.adapter": "final"})
    paths = project.run(until="train")
    out = tmp_path / "validate-out"
    out.mkdir()
    reporter = RecordingReporter()
    summary = validate_stage(project.cfg, StageContext(upstream=paths, out_dir=out, work_dir=tmp_path / "w",
                                                       reporter=reporter))  # fmt: skip
    assert summary["questions"] == 0 and summary["tuned_qa_f1"] is None
    assert summary["adapter_file"] == "adapters.safetensors"
    assert (out / "answers.jsonl").read_text() == ""
    assert any("no held-out questions" in m for k, _, m in reporter.calls if k == "log")
