"""Fast greedy answers from a base model and a LoRA adapter: one loader and one generate loop, shared by
`farense ask` and `farense serve` (and meant for the validate stage).

What makes it faster than stock mlx-lm with `--adapter-path` on CPU (benchmarks/decode_speed.py measures each):
- The base's 4-bit weights are expanded once to float32 (farense.compute's "dequantized" path: CPU matmuls are
  fast only in float32), and the adapter is fused into them with mlx-lm's own `LoRALinear.fuse`: per token
  that is 210 fewer pairs of small matmuls (7 projections x 30 layers for SmolLM2) for the same weights read.
- The KV cache of the fixed prefix every prompt starts with (chat template + system prompt) is computed once and
  kept; each answer runs only its own tokens on top and then trims the cache back to the prefix.
- Speculative decoding with mlx-lm's own loop, with a draft that costs nothing: prompt lookup. The next tokens are
  guessed from where the last few tokens occurred before (in this prompt and answer, or in earlier answers), and
  the model checks several guesses in one forward pass. Decoding on CPU is bound by reading the weights, so
  checking 4 tokens costs about as much as producing 1. Only tokens the model itself picks greedily are kept.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

Messages = Sequence[dict[str, str]]
DRAFT_TOKENS = 8  # guesses checked per forward pass (benchmarks/decode_speed.py compares 0, 2, 4, 8)
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
    draft: "PromptLookupDraft | None" = None
    draft_tokens: int = 0

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
        speculative: dict[str, Any] = {}
        # With no earlier answer to draft from, wrong guesses would only add work: decode plainly.
        if self.draft is not None and self.draft.has_memory:
            history = self.draft.start(ids[:cached])
            cache = (cache or _fresh_cache(self.model)) + [history]
            speculative = {"draft_model": self.draft, "num_draft_tokens": self.draft_tokens}
        pieces: list[str] = []
        answer: list[int] = []
        last = None
        responses = stream_generate(
            self.model, self.tokenizer, ids[cached:], max_tokens=max_tokens, prompt_cache=cache, **speculative
        )
        try:
            for response in responses:
                last = response
                answer.append(response.token)
                if response.text:
                    pieces.append(response.text)
                    yield response.text
        finally:
            responses.close()  # mlx-lm rewinds its caches on close: let it do so before we trim to the prefix
            if cached:
                from mlx_lm.models.cache import trim_prompt_cache

                trim_prompt_cache(self._cache, self._cache[0].offset - cached)
            if self.draft is not None:
                self.draft.remember(answer)
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
    draft_tokens: int = DRAFT_TOKENS,
    dense_copy: Path | None = None,
    draft_corpus: Sequence[str] = (),
) -> InferenceModel:
    """Load the base (compute path applied), add the adapter and fuse it; cache the system prompt's prefix.

    `dense_copy`: a folder for the fused dense model. Loading it back skips dequantizing and fusing (the slow part
    of a cold start on CPU); it is written on the first load, and read when it exists (the caller keys it by
    adapter version, which never changes once published).
    `draft_corpus`: texts the prompt-lookup draft may guess from before it has answered anything (the answers the
    adapter was trained on): a new process's first answer is drafted too. Guesses never change the answer.
    """
    from mlx_lm.utils import load as mlx_load

    from farense.compute import apply_compute_path, select_compute_path

    start = time.perf_counter()
    from_copy = dense_copy is not None and (Path(dense_copy) / DENSE_COMPLETE).is_file()
    model, tokenizer = mlx_load(str(dense_copy if from_copy else base_dir))
    path = select_compute_path(compute_path)
    dense_dtype = getattr(mx, dtype) if dtype else None
    info = apply_compute_path(model, path, dense_dtype)
    if adapter_dir is not None and not from_copy:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, str(adapter_dir))
        if fuse:
            fuse_adapters(model)
    model.eval()
    mx.eval(model.parameters())
    if dense_copy is not None and not from_copy and fuse and info["layers_converted"] > 0:
        try:
            save_dense_copy(model, Path(base_dir), Path(dense_copy))
        except OSError as e:  # a full or read-only disk costs speed, not the answer
            print(f"farense: could not write the float32 copy {dense_copy}: {e}", file=sys.stderr)
    im = InferenceModel(model, tokenizer, system_prompt, context_length(Path(base_dir)))
    if prefix_cache:
        im.cache_prefix(system_prefix(tokenizer, system_prompt))
    if draft_tokens > 0:
        im.draft, im.draft_tokens = PromptLookupDraft(), draft_tokens
        im.draft._vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or tokenizer.vocab_size)
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        im.draft.seed([tokenizer.encode(t, add_special_tokens=False) + end for t in draft_corpus])
    im.options = {"fuse": fuse and adapter_dir is not None, "prefix_cache": bool(im._prefix),
                  "prefix_tokens": len(im._prefix), "prompt_lookup_draft_tokens": draft_tokens,
                  "draft_corpus_texts": len(draft_corpus), "compute": info, "from_dense_copy": from_copy,
                  "load_seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    return im


DENSE_COMPLETE = "farense-dense-complete"


def save_dense_copy(model: nn.Module, base_dir: Path, dest: Path) -> None:
    """Write the loaded (fused, dense) model as an mlx-lm model folder, atomically: a temp folder renamed."""
    import shutil

    from mlx_lm.utils import save_config, save_model

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    save_config(config, tmp / "config.json")
    for f in base_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, tmp / f.name)
    (tmp / DENSE_COMPLETE).write_text(str(base_dir) + "\n", encoding="utf-8")
    try:
        tmp.rename(dest)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


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


def _fresh_cache(model: nn.Module) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def draft_corpus(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The distinct answers of training rows (assistant turns, completions), the most frequent last (it wins a
    tie in the draft's index)."""
    counts: dict[str, int] = {}
    for row in rows:
        texts = [m.get("content") for m in row.get("messages", []) if m.get("role") == "assistant"]
        texts.append(row.get("completion"))
        for t in texts:
            if isinstance(t, str) and t.strip():
                counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: counts[t])


class TokenHistory:
    """The draft's "KV cache": the token ids it has seen, trimmed by mlx-lm when guesses are rejected."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)

    @property
    def state(self) -> mx.array:
        return mx.array(self.tokens[-1:], mx.uint32)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, len(self.tokens))
        del self.tokens[len(self.tokens) - n :]
        return n


class PromptLookupDraft(nn.Module):
    """A draft "model" for mlx-lm's speculative_generate_step that guesses by prompt lookup: the token that
    followed the longest recent match (up to `max_ngram` tokens) of the sequence's tail, searched in the sequence
    itself, then in the last `memory` answers, then in a seeded corpus (the training answers). Its logits are
    one-hot; mlx-lm keeps a guess only where the real model's greedy token is the same, so the answer does not
    depend on how good the guesses are."""

    def __init__(self, max_ngram: int = 4, memory: int = 64) -> None:
        super().__init__()
        self.layers: list[Any] = []  # mlx-lm splits prompt caches by len(model.layers)
        self.max_ngram, self.memory = max_ngram, memory
        self._answers: list[list[int]] = []
        self._index: dict[tuple[int, ...], int] = {}
        self._corpus_index: dict[tuple[int, ...], int] = {}
        self._vocab = 0

    def make_cache(self) -> list[Any]:
        return [TokenHistory([])]

    @property
    def has_memory(self) -> bool:
        return bool(self._answers or self._corpus_index)

    def seed(self, corpus: Sequence[Sequence[int]]) -> None:
        """Index fixed texts (the answers the adapter was trained on) to guess from when no recent answer has the
        tail: a new process drafts from its first question on. Recent answers win over the corpus."""
        self._corpus_index = self._ngram_index(corpus)

    def start(self, prefix: list[int]) -> TokenHistory:
        return TokenHistory(prefix)

    def remember(self, answer: list[int]) -> None:
        """Index a finished answer's n-grams for later guesses (the most recent answer wins a tie)."""
        if not answer:
            return
        self._answers = [*self._answers, list(answer)][-self.memory :]
        self._index = self._ngram_index(self._answers)

    def _ngram_index(self, texts: Sequence[Sequence[int]]) -> dict[tuple[int, ...], int]:
        index: dict[tuple[int, ...], int] = {}
        for a in texts:  # a later text wins a tie
            for n in range(1, self.max_ngram + 1):
                for i in range(len(a) - n):
                    index[tuple(a[i : i + n])] = a[i + n]
        return index

    def guess(self, seq: list[int]) -> int:
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # latest earlier occurrence in this sequence
                if seq[i : i + n] == tail:
                    return seq[i + n]
            key = tuple(tail)
            hit = self._index.get(key, self._corpus_index.get(key))
            if hit is not None:
                return hit
        return seq[-1]

    def __call__(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        history: TokenHistory = cache[0]
        history.tokens.extend(int(t) for t in inputs.reshape(-1).tolist())
        if not self._vocab:
            raise RuntimeError("PromptLookupDraft.vocab_size must be set before use")
        nxt = self.guess(history.tokens)
        row = mx.where(mx.arange(self._vocab) == nxt, 0.0, -1e9)
        return mx.broadcast_to(row, (1, inputs.shape[-1], self._vocab))
