"""GGUF (llama.cpp) Llama checkpoints to MLX model folders that `mlx_lm.load` opens.

mlx reads GGUF itself (`mx.load`): Q4_0/Q4_1/Q4_K/Q8_0 tensors come back as MLX affine-quantized triples
(weight, scales, biases; group 32) and the other types as float16. This module renames the tensors to mlx-lm's
Llama names, builds config.json from the `llama.*` metadata and a byte-level BPE tokenizer from `tokenizer.ggml.*`.
llama.cpp stores Q and K permuted for interleaved RoPE; keeping them so and setting `rope_traditional` is exact.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import infer_quant_config, save_config, save_model

from farense.errors import ModelSourceError

# GGUF tensor name (without .weight/.scales/.biases) -> mlx-lm Llama module path.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases)")
_GLOBAL = re.compile(r"(\w+)\.(weight|scales|biases)")

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> the split regex of the HF tokenizer they came from.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRETOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe")

# GGUF token types (llama.cpp): control tokens are special; user-defined ones are added but not special.
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

Progress = Callable[[str, float], None]


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata as mlx reads them; an unreadable file is a ModelSourceError."""
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ModelSourceError(
            f"{path}: mlx cannot read this GGUF ({e}); mlx reads F32, F16, Q4_0, Q4_1, Q4_K and Q8_0 tensors "
            "(other K-quants only where gguflib can expand them): use a GGUF with those types"
        ) from None
    return weights, metadata


def convert_gguf(path: Path, out_dir: Path, bits: int, group_size: int, progress: Progress) -> dict[str, Any]:
    """Write an MLX Llama model folder from a GGUF file; return what was kept, quantized and written."""
    progress("model: read GGUF", 0.0)
    gguf_weights, metadata = read_gguf(path)
    arch = _text(metadata, "general.architecture")
    if arch != "llama":
        raise ModelSourceError(
            f"{path}: GGUF architecture '{arch}' is not supported; farense converts Llama-architecture GGUFs "
            "(general.architecture = llama): use an MLX or HF folder for other architectures"
        )
    weights = rename_tensors(gguf_weights, path)
    config = llama_config(metadata, weights, path)
    progress("model: quantize", 0.3)
    model, quant = build_model(config, weights, bits, group_size)
    config["quantization"] = quant["config"]
    progress("model: write weights", 0.6)
    save_model(out_dir, model, donate_model=True)
    save_config(config, out_dir / "config.json")
    progress("model: tokenizer", 0.85)
    pretokenizer = write_tokenizer(metadata, out_dir, path)
    progress("model: tokenizer", 0.9)
    return {
        "architecture": arch,
        "gguf_file_type": _int(metadata, "general.file_type"),
        "rope_traditional": True,
        "tied_embeddings": config["tie_word_embeddings"],
        "kept_quantized": quant["kept"],
        "quantized_from_float": quant["quantized"],
        "kept_float": quant["float"],
        "pretokenizer": pretokenizer,
    }


def rename_tensors(gguf_weights: dict[str, mx.array], path: Path) -> dict[str, mx.array]:
    """GGUF tensor names to mlx-lm Llama parameter names; an unknown tensor is an error, not silently dropped."""
    renamed, unknown = {}, []
    for name, value in gguf_weights.items():
        if (m := _BLOCK.fullmatch(name)) and m.group(2) in _BLOCK_NAMES:
            renamed[f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"] = value
        elif (m := _GLOBAL.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
            renamed[f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"] = value
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ModelSourceError(
            f"{path}: GGUF tensors with no Llama counterpart: {shown} (e.g. rope_freqs of Llama 3.1 rope "
            "scaling); convert the original HF checkpoint instead"
        )
    return renamed


def llama_config(metadata: dict[str, Any], weights: dict[str, mx.array], path: Path) -> dict[str, Any]:
    """HF-style Llama config.json for mlx-lm from the `llama.*` metadata."""

    def need(key: str) -> Any:
        if key not in metadata:
            raise ModelSourceError(f"{path}: GGUF metadata has no '{key}'; the file looks incomplete")
        return metadata[key]

    hidden = _scalar(need("llama.embedding_length"))
    heads = _scalar(need("llama.attention.head_count"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _scalar(need("llama.block_count")),
        "intermediate_size": _scalar(need("llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(metadata, "llama.attention.head_count_kv", heads),
        "head_dim": _int(metadata, "llama.attention.key_length", hidden // heads),
        "rms_norm_eps": _float(metadata, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _float(metadata, "llama.rope.freq_base", 10000.0),
        "rope_traditional": True,
        "max_position_embeddings": _int(metadata, "llama.context_length", 2048),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if _text(metadata, "llama.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _float(metadata, "llama.rope.scaling.factor", 1.0)}
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if name in metadata:
            config[key] = _scalar(metadata[name])
    return config


def build_model(
    config: dict[str, Any], weights: dict[str, mx.array], bits: int, group_size: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The mlx-lm Llama holding the GGUF weights.

    Quantized tensors keep their stored packing. Float Linear/Embedding weights are quantized to `bits`/`group_size`
    where mlx-lm's own quantize_model would (input width a multiple of the group); other floats (norms) stay float
    in the quantized tensors' scale dtype, so activations keep one dtype.
    """
    model = llama.Model(llama.ModelArgs.from_dict(config))
    modules = dict(model.named_modules())
    stored: dict[str, dict[str, Any]] = {}
    from_float: dict[str, dict[str, Any]] = {}
    for name in weights:
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        module = modules[path]
        if f"{path}.scales" in weights:
            stored[path] = {k: v for k, v in infer_quant_config(path, module, weights).items() if k != "mode"}
        elif hasattr(module, "to_quantized") and weights[name].shape[-1] % group_size == 0:
            from_float[path] = {"group_size": group_size, "bits": bits}

    scale_dtypes = {weights[f"{p}.scales"].dtype for p in stored}
    float_dtype = scale_dtypes.pop() if len(scale_dtypes) == 1 else mx.float16
    floats = {k: v.astype(float_dtype) for k, v in weights.items() if k.rsplit(".", 1)[0] not in stored}
    model.load_weights([(k, v) for k, v in floats.items() if k.removesuffix(".weight") in from_float], strict=False)
    plan = stored | from_float
    nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))
    quantized_now = {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[0] in from_float}
    final = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] in stored}
    final |= {k: v for k, v in floats.items() if k.rsplit(".", 1)[0] not in plan}
    final |= quantized_now
    model.load_weights(list(final.items()), strict=True)
    mx.eval(model.parameters())
    return model, {
        "config": quantization_config(model, plan, (group_size, bits)),
        "kept": len(stored),
        "quantized": len(from_float),
        "float": sum(1 for k in final if k.rsplit(".", 1)[0] not in plan),
    }


def quantization_config(
    model: nn.Module, plan: dict[str, dict[str, Any]], default: tuple[int, int]
) -> dict[str, Any]:
    """mlx-lm's `quantization` entry: the most common (by weights) setting, plus per-layer entries that differ."""
    modules = dict(model.named_modules())
    weight_count: Counter[tuple[int, int]] = Counter({default: 0})
    for path, params in plan.items():
        weight_count[(params["group_size"], params["bits"])] += modules[path].weight.size * 32 // params["bits"]
    (group_size, bits), _ = weight_count.most_common(1)[0]
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, params in sorted(plan.items()):
        if (params["group_size"], params["bits"]) != (group_size, bits):
            config[path] = {"group_size": params["group_size"], "bits": params["bits"], "mode": "affine"}
    return config


def build_tokenizer(metadata: dict[str, Any], path: Path) -> tuple[Any, str]:
    """A `tokenizers` byte-level BPE tokenizer from `tokenizer.ggml.*`, and the pre-tokenizer it was given."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _text(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelSourceError(
            f"{path}: GGUF tokenizer model '{kind}' is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's HF or MLX folder instead"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a few GGUFs repeat a token; the first id is the one text encodes to
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))

    pre = _text(metadata, "tokenizer.ggml.pre") or "default"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, no_regex])
    else:  # "default", "gpt2" and names we do not know split text the GPT-2 way
        tokenizer.pre_tokenizer = byte_level
        if pre not in PRETOKENIZERS:
            pre = f"gpt2 (GGUF names '{pre}', not known to farense)"
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if _bool(metadata, "tokenizer.ggml.add_bos_token", False) and "tokenizer.ggml.bos_token_id" in metadata:
        bos = tokens[_scalar(metadata["tokenizer.ggml.bos_token_id"])]
        prepend_bos = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
        tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), prepend_bos])

    types = metadata["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in metadata else []
    control = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_CONTROL]
    user_defined = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tokenizer, pre


def write_tokenizer(metadata: dict[str, Any], out_dir: Path, path: Path) -> str:
    """Write tokenizer.json and tokenizer_config.json (chat template, special tokens); return the pre-tokenizer."""
    tokenizer, pre = build_tokenizer(metadata, path)
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        name = f"tokenizer.ggml.{key}_token_id"
        return tokens[_scalar(metadata[name])] if name in metadata else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": _bool(metadata, "tokenizer.ggml.add_bos_token", False),
        "add_eos_token": _bool(metadata, "tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": _int(metadata, "llama.context_length", 2048),
    }
    if (template := _text(metadata, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return pre


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, mx.array) else value


def _int(metadata: dict[str, Any], key: str, default: int | None = None) -> int | None:
    return int(_scalar(metadata[key])) if key in metadata else default


def _float(metadata: dict[str, Any], key: str, default: float) -> float:
    # GGUF keeps float32; round-trip through its shortest repr so 1e-5 is written as 1e-05, not 9.99999974e-06.
    return float(f"{float(_scalar(metadata[key])):.7g}") if key in metadata else default


def _bool(metadata: dict[str, Any], key: str, default: bool) -> bool:
    return bool(_scalar(metadata[key])) if key in metadata else default


def _text(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) else None
