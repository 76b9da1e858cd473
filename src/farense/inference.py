"""Fast greedy answers from a base model and a LoRA adapter: one loader and one generate loop, shared by
`farense ask` and `farense serve` (and meant for the validate stage).

What makes it faster than stock mlx-lm with `--adapter-path` on CPU (benchmarks/decode_speed.py measures each):
- The base's 4-bit weights are expanded once to float32 (farense.compute's "dequantized" path: CPU matmuls are
  fast only in float32), and the adapter is fused into them with mlx-lm's own `LoRALinear.fuse`: per token
  that is 210 fewer pairs of small matmuls (7 projections x 30 layers for SmolLM2) for the same weights read.
- The KV cache of the fixed prefix every prompt starts with (chat template + system prompt) is computed once and
  kept; each answer runs only its own tokens on top and then trims the cache back to the prefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

Messages = Sequence[dict[str, str]]
Prompt = Union[str, Sequence[int], Messages]


@dataclass
class Generation:
    """One greedy answer and what it cost."""

    text: str
    tokens: int
    prompt_tokens: int
    seconds: float
    finish_reason: str | None
    prompt_tokens_cached: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class InferenceModel:
    """A loaded base + adapter ready to answer; not thread-safe: one generation at a time."""

    model: nn.Module
    tokenizer: Any
    system_prompt: str | None
    context_length: int
    options: dict[str, Any] = field(default_factory=dict)
    _prefix: list[int] = field(default_factory=list)
    _cache: list[Any] | None = None

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids for a question (asked with the system prompt), a message list, or ids as given."""
        if isinstance(prompt, str):
            return chat_prompt(self.tokenizer, prompt, self.system_prompt)
        items = list(prompt)
        if items and isinstance(items[0], dict):
            messages = [dict(m) for m in items]
            if self.system_prompt and messages[0].get("role") != "system":
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return _apply_template(self.tokenizer, messages)
        return [int(t) for t in items]

    def generate(self, prompt: Prompt, max_tokens: int) -> Generation:
        """Greedy answer, stopping at the end-of-turn token or after max_tokens."""
        result = None
        for piece in self.stream(prompt, max_tokens):
            if isinstance(piece, Generation):
                result = piece
        assert result is not None
        return result

    def stream(self, prompt: Prompt, max_tokens: int) -> Iterator[str | Generation]:
        """Yield the answer's text pieces as they are decoded, then one Generation (text stripped, as `generate`)."""
        from mlx_lm.generate import stream_generate

        ids = self.prompt_ids(prompt)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        start = time.perf_counter()
        cached = self._reusable_prefix(ids)
        cache = self._cache if cached else None
        pieces: list[str] = []
        last = None
        try:
            for response in stream_generate(
                self.model, self.tokenizer, ids[cached:], max_tokens=max_tokens, prompt_cache=cache
            ):
                last = response
                if response.text:
                    pieces.append(response.text)
                    yield response.text
        finally:
            if cached:
                from mlx_lm.models.cache import trim_prompt_cache

                trim_prompt_cache(self._cache, self._cache[0].offset - cached)
        seconds = time.perf_counter() - start
        if last is None:
            yield Generation("", 0, len(ids), seconds, None, cached)
            return
        yield Generation("".join(pieces).strip(), last.generation_tokens, len(ids), seconds, last.finish_reason, cached)

    def _reusable_prefix(self, ids: list[int]) -> int:
        n = len(self._prefix)
        # At least one token must run through the model to give the first answer token's logits.
        return n if n and len(ids) > n and ids[:n] == self._prefix else 0

    def cache_prefix(self, prefix: list[int]) -> None:
        """Compute and keep the KV cache of `prefix`; later prompts that start with it skip those tokens."""
        from mlx_lm.models.cache import make_prompt_cache

        self._prefix, self._cache = [], None
        if not prefix:
            return
        cache = make_prompt_cache(self.model)
        self.model(mx.array(prefix)[None], cache=cache)
        mx.eval([c.state for c in cache])
        self._prefix, self._cache = list(prefix), cache


def load(
    base_dir: Path,
    adapter_dir: Path | None = None,
    *,
    system_prompt: str | None = None,
    fuse: bool = True,
    prefix_cache: bool = True,
    compute_path: str = "auto",
    dtype: str | None = None,
) -> InferenceModel:
    """Load the base (compute path applied), add the adapter and fuse it; cache the system prompt's prefix."""
    from mlx_lm.utils import load as mlx_load

    from farense.compute import apply_compute_path, select_compute_path

    start = time.perf_counter()
    model, tokenizer = mlx_load(str(base_dir))
    path = select_compute_path(compute_path)
    dense_dtype = getattr(mx, dtype) if dtype else None
    info = apply_compute_path(model, path, dense_dtype)
    if adapter_dir is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, str(adapter_dir))
        if fuse:
            fuse_adapters(model)
    model.eval()
    mx.eval(model.parameters())
    im = InferenceModel(model, tokenizer, system_prompt, context_length(Path(base_dir)))
    if prefix_cache:
        im.cache_prefix(system_prefix(tokenizer, system_prompt))
    im.options = {"fuse": fuse and adapter_dir is not None, "prefix_cache": bool(im._prefix),
                  "prefix_tokens": len(im._prefix), "compute": info,
                  "load_seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    return im


def context_length(base_dir: Path, default: int = 2048) -> int:
    """The model's trained context (config.json's max_position_embeddings), the limit for prompt + answer."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or default)


def fuse_adapters(model: nn.Module) -> int:
    """Fold every LoRA layer into its base weight (mlx-lm's `LoRALinear.fuse`, as `mlx_lm fuse` does)."""
    fused = [(name, m.fuse(dequantize=False)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def chat_prompt(tokenizer: Any, question: str, system_prompt: str | None) -> list[int]:
    """Token ids of the question in the chat template, ending where the assistant's answer starts."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}
    ]
    if getattr(tokenizer, "has_chat_template", False):
        return _apply_template(tokenizer, messages)
    text = (f"{system_prompt}\n\n" if system_prompt else "") + question + "\n"
    return list(tokenizer.encode(text))


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def system_prefix(tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The token ids every question's prompt starts with: the common prefix of two different questions."""
    a = chat_prompt(tokenizer, "a", system_prompt)
    b = chat_prompt(tokenizer, "Quem?", system_prompt)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
