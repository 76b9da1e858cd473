"""Tiny random Llama models for fast tests: an MLX model folder and a GGUF file, both with a working chat tokenizer.

Everything is built here (a byte-level BPE trained in milliseconds on a few sentences, random weights), so tests
never download anything. The same seed gives the same bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_DIMS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
_CORPUS = [
    "O Sporting Clube Farense foi fundado em 1910 em Faro, no Algarve.",
    "O Farense joga no Estádio de São Luís. Pergunta: quando foi fundado o Farense? Resposta: em 1910.",
    "Assistente do Farense: responde em português, com frases curtas e claras.",
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog while the team trains in the sun.",
    "You are a helpful assistant. user assistant system 0123456789 ?!.,:;'\"()[]{}-_/",
]


def tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with ChatML special tokens at ids 0-2; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 8, trainer)
    return tokenizer


def write_tiny_mlx_model(
    dir: Path, *, quantized: bool = True, bits: int = 4, group_size: int = 64, seed: int = 0
) -> Path:
    """A tiny random MLX Llama folder (2 layers, hidden 64) that `mlx_lm.load` opens, with a chat tokenizer."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = _tiny_config(tokenizer.get_vocab_size(), rope_traditional=False)
    model = _random_model(config, seed)
    if quantized:
        model, config = quantize_model(model, config, group_size, bits)
    save_model(dir, model, donate_model=True)
    save_config(config, dir / "config.json")
    _write_tokenizer(tokenizer, dir)
    return dir


def write_tiny_gguf(path: Path, *, quantized: bool = True, tie_embeddings: bool = True, seed: int = 0) -> Path:
    """A tiny random Llama GGUF with llama.cpp's tensor names and tokenizer metadata.

    quantized: Q4_1 linears and a Q8_0 embedding, as in the embedded SmolLM2 file (mx.save_gguf writes float
    tensors only, so these are packed here); otherwise F16 weights written with mx.save_gguf. Norms are F32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = _tiny_config(tokenizer.get_vocab_size(), rope_traditional=True, tie_embeddings=tie_embeddings)
    weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(_random_model(config, seed).parameters())}
    tensors = {_gguf_name(k): v for k, v in weights.items()}
    metadata = _gguf_metadata(config, tokenizer, file_type=3 if quantized else 1)
    if not quantized:
        arrays = {k: mx.array(v if v.ndim == 1 else v.astype(np.float16)) for k, v in tensors.items()}
        mx.save_gguf(str(path), arrays, metadata)
        return path
    packed = {}
    for name, value in tensors.items():
        if value.ndim == 1:
            packed[name] = (_GGML_F32, value.shape, value.astype(np.float32).tobytes())
        elif name == "token_embd.weight":
            packed[name] = (_GGML_Q8_0, value.shape, _pack_q8_0(value))
        else:
            packed[name] = (_GGML_Q4_1, value.shape, _pack_q4_1(value))
    _write_gguf(path, metadata, packed)
    return path


# ---------------------------------------------------------------- model


def _tiny_config(vocab_size: int, *, rope_traditional: bool, tie_embeddings: bool = True) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **TINY_DIMS,
        "vocab_size": vocab_size,
        "rope_traditional": rope_traditional,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
    }


def _random_model(config: dict[str, Any], seed: int) -> llama.Model:
    """mlx-lm's Llama with its own random init, in float16 like converted checkpoints."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def _write_tokenizer(tokenizer: Tokenizer, dir: Path) -> None:
    tokenizer.save(str(dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": SPECIAL_TOKENS[0],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": TINY_DIMS["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# ---------------------------------------------------------------- GGUF

_GGML_F32, _GGML_F16, _GGML_Q4_1, _GGML_Q8_0 = 0, 1, 3, 8
_GGUF_ALIGNMENT = 32
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(mlx_name: str) -> str:
    module, leaf = mlx_name.rsplit(".", 1)
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{leaf}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_LAYER_NAMES[rest]}.{leaf}"


def _gguf_metadata(config: dict[str, Any], tokenizer: Tokenizer, file_type: int) -> dict[str, Any]:
    """llama.cpp's metadata keys, as values mx.save_gguf takes (0-d arrays carry the integer/float types)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    return {
        "general.architecture": "llama",
        "general.name": "farense tiny llama",
        "general.file_type": u32(file_type),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.rope.dimension_count": u32(config["hidden_size"] // config["num_attention_heads"]),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.vocab_size": u32(len(tokens)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in SPECIAL_TOKENS else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(vocab[BOS]),
        "tokenizer.ggml.eos_token_id": u32(vocab[EOS]),
        "tokenizer.ggml.padding_token_id": u32(vocab[EOS]),
        "tokenizer.ggml.unknown_token_id": u32(vocab[SPECIAL_TOKENS[0]]),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def _pack_q4_1(w: np.ndarray) -> bytes:
    """llama.cpp Q4_1 blocks of 32: fp16 scale, fp16 min, 16 bytes (element j low nibble, j+16 high nibble)."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    d = np.maximum((high - low) / 15, 1e-8)
    q = np.clip(np.round((blocks - low[:, None]) / d[:, None]), 0, 15).astype(np.uint8)
    packed = np.empty((len(blocks), 20), dtype=np.uint8)
    packed[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    packed[:, 2:4] = low.astype(np.float16).view(np.uint8).reshape(-1, 2)
    packed[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return packed.tobytes()


def _pack_q8_0(w: np.ndarray) -> bytes:
    """llama.cpp Q8_0 blocks of 32: fp16 scale, 32 int8."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.maximum(np.abs(blocks).max(axis=1) / 127, 1e-8)
    q = np.clip(np.round(blocks / d[:, None]), -127, 127).astype(np.int8)
    packed = np.empty((len(blocks), 34), dtype=np.uint8)
    packed[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    packed[:, 2:] = q.view(np.uint8)
    return packed.tobytes()


def _write_gguf(path: Path, metadata: dict[str, Any], tensors: dict[str, tuple[int, tuple[int, ...], bytes]]) -> None:
    """GGUF v3 with already-packed tensor data: header, metadata, tensor infos, aligned data."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _gguf_string(key) + _gguf_value(value)
    offset, data = 0, bytearray()
    for name, (ggml_type, shape, raw) in tensors.items():
        dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))  # ggml lists the innermost dimension first
        out += _gguf_string(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", ggml_type, offset)
        padded = raw + b"\0" * (-len(raw) % _GGUF_ALIGNMENT)
        data += padded
        offset += len(padded)
    out += b"\0" * (-len(out) % _GGUF_ALIGNMENT)
    path.write_bytes(bytes(out + data))


_GGUF_VALUE_TYPES = {mx.uint32: 4, mx.int32: 5, mx.float32: 6, mx.bool_: 7}
_STRUCT = {4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value: Any) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", _GGUF_STRING) + _gguf_string(value)
    if isinstance(value, list):
        body = b"".join(_gguf_string(v) for v in value)
        return struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(value)) + body
    kind = _GGUF_VALUE_TYPES[value.dtype]
    if value.ndim == 0:
        return struct.pack("<I", kind) + struct.pack(_STRUCT[kind], value.item())
    body = b"".join(struct.pack(_STRUCT[kind], v) for v in value.tolist())
    return struct.pack("<IIQ", _GGUF_ARRAY, kind, value.size) + body
