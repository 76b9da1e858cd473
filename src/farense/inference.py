"""Fast greedy answers from a base model and a LoRA adapter: one loader and one generate loop, shared by
`farense ask` and `farense serve` (and meant for the validate stage).

What makes it faster than stock mlx-lm with `--adapter-path` on CPU (benchmarks/decode_speed.py measures each):
- The base's 4-bit weights are expanded once to float32 (farense.compute's "dequantized" path: CPU matmuls are
  fast only in float32), and the adapter is fused into them with mlx-lm's own `LoRALinear.fuse`: per token
  that is 210 fewer pairs of small matmuls (7 projections x 30 layers for SmolLM2) for the same weights read.
- The KV cache of the fixed prefix every prompt starts with (chat template + system prompt) is computed once and
  kept; each answer runs only its own tokens on top and then trims the cache back to the prefix.
- Speculative decoding with a draft that costs nothing: the training answers (farense.answer_draft). The
  fine-tuned model mostly answers with a training answer word for word, so the draft proposes the rest of the
  training answer whose question is closest to the one asked, and the model checks all of it in one forward pass.
  Decoding on CPU is bound by reading the weights: checking 32 tokens costs about three single-token steps. Only
  tokens the model itself picks greedily are kept, so the draft changes the speed, never the answer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from farense.answer_draft import AnswerDraft, DraftCorpus
from farense.prompting import chat_prompt, template_ids

Messages = Sequence[dict[str, str]]
DRAFT_TOKENS = 48  # most guesses checked per forward pass (benchmarks/decode_speed.py compares 0-48)
Prompt = Union[str, Sequence[int], Messages]
Sampler = Callable[[mx.array], mx.array]  # mlx_lm.sample_utils.make_sampler's: log-probabilities -> tokens


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
    draft: AnswerDraft | None = None
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
            return template_ids(self.tokenizer, messages)
        return [int(t) for t in items]

    def generate(self, prompt: Prompt, max_tokens: int, *, stop: Sequence[str] = (),
                 sampler: Sampler | None = None) -> Generation:  # fmt: skip
        """The answer (greedy unless a sampler is given), stopping at the end-of-turn token, a stop string or after
        max_tokens."""
        result = None
        for piece in self.stream(prompt, max_tokens, stop=stop, sampler=sampler):
            if isinstance(piece, Generation):
                result = piece
        assert result is not None
        return result

    def stream(self, prompt: Prompt, max_tokens: int, *, stop: Sequence[str] = (),
               sampler: Sampler | None = None) -> Iterator[str | Generation]:  # fmt: skip
        """Yield the answer's text pieces as they are decoded, then one Generation (text stripped, as `generate`).

        `stop`: strings that end the answer, left out of it (OpenAI's `stop`). `sampler`: one of mlx-lm's
        (`make_sampler`), decoded plainly; without one the answer is greedy, decoded speculatively."""
        from mlx_lm.generate import stream_generate

        ids = self.prompt_ids(prompt)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        start = time.perf_counter()
        cached = self._reusable_prefix(ids)
        cache = self._cache if cached else None
        question = _question(prompt)
        responses = None
        # With nothing to draft from (no training answers, no earlier answer), guesses would only add work.
        if sampler is None and self.draft is not None and self.draft_tokens > 0 and self.draft.has_memory:
            tokens = self._speculative(ids, cached, cache or _fresh_cache(self.model), question, max_tokens)
        else:
            responses = stream_generate(self.model, self.tokenizer, ids[cached:], max_tokens=max_tokens,
                                        prompt_cache=cache, sampler=sampler)  # fmt: skip
            tokens = (r.token for r in responses)
        detokenizer = self.tokenizer.detokenizer
        eos = set(self.tokenizer.eos_token_ids)
        stops = StopStrings(stop)
        pieces: list[str] = []
        answer: list[int] = []
        try:
            for token in tokens:
                answer.append(token)
                if token in eos:
                    break
                detokenizer.add_token(token)
                if len(answer) == max_tokens:
                    break
                piece = stops.feed(detokenizer.last_segment)
                if piece:
                    pieces.append(piece)
                    yield piece
                if stops.hit:
                    break
        finally:
            tokens.close()
            if responses is not None:
                responses.close()  # mlx-lm rewinds its caches on close: let it do so before we trim to the prefix
            if cached:
                from mlx_lm.models.cache import trim_prompt_cache

                trim_prompt_cache(self._cache, self._cache[0].offset - cached)
            if self.draft is not None and sampler is None:  # a sampled answer is no guess of the greedy one
                self.draft.remember(answer, question)
        detokenizer.finalize()
        piece = stops.feed(detokenizer.last_segment) + stops.flush()  # reading last_segment consumes it
        if piece:
            pieces.append(piece)
            yield piece
        seconds = time.perf_counter() - start
        finish = None if not answer else "stop" if answer[-1] in eos or stops.hit else "length"
        yield Generation("".join(pieces).strip(), len(answer), len(ids), seconds, finish, cached)

    def _speculative(
        self, ids: list[int], cached: int, cache: list[Any], question: str | None, max_tokens: int
    ) -> Iterator[int]:
        """Greedy tokens, several per forward pass: the draft's guesses ride along with the input, and the model's
        own greedy picks decide how many are kept (decoding on CPU is bound by reading the weights, so checking
        32 guesses costs about three single-token steps). The first pass also runs the prompt's own tokens.

        mlx-lm's speculative loop asks a draft model for a fixed number of tokens, one call each; here the draft
        proposes as many as it has (a whole training answer at once, or none), which halves the passes."""
        from mlx_lm.models.cache import trim_prompt_cache

        assert self.draft is not None
        state = self.draft.begin(ids, question)
        inputs, answer = ids[cached:], []
        start_offset = cache[0].offset
        try:
            while len(answer) < max_tokens:
                room = min(max_tokens - len(answer) - 1, self.context_length - len(ids) - len(answer) - 1)
                guesses = self.draft.propose(state, answer, min(self.draft_tokens, room))
                logits = self.model(mx.array(inputs + guesses)[None], cache=cache)
                picks = mx.argmax(logits[0, len(inputs) - 1 :], axis=-1).tolist()
                kept = 0
                while kept < len(guesses) and picks[kept] == guesses[kept]:
                    kept += 1
                trim_prompt_cache(cache, len(guesses) - kept)
                for token in picks[: kept + 1]:
                    answer.append(token)
                    yield token
                inputs = [picks[kept]]
        finally:  # leave the cache as it was before this answer, whatever the caller did with it
            trim_prompt_cache(cache, cache[0].offset - start_offset)

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


class StopStrings:
    """Strings that end an answer (OpenAI's `stop`), found in the decoded text, not in token ids: mlx-lm's
    TextStateMachine holds back text that may be the start of one, and the answer ends before the first found."""

    def __init__(self, stop: Sequence[str]) -> None:
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine
        self._state = TextStateMachine({"normal": [(s, None) for s in stop]}).make_state() if stop else None
        self.hit = False

    def feed(self, text: str) -> str:
        """The part of `text` that is surely answer; none once a stop string was found."""
        if self.hit or self._state is None:
            return "" if self.hit else text
        self._state, segments = self._machine.split(self._state, text)
        self.hit = self._state[0] is None
        return "".join(t for _, t in segments)

    def flush(self) -> str:
        """What was held back, at the end of an answer that no stop string ended."""
        if self._state is None or self.hit:
            return ""
        self._state, rest, _ = self._machine.flush(self._state)
        return rest


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
    draft_corpus: DraftCorpus | Sequence[str] = (),
) -> InferenceModel:
    """Load the base (compute path applied), add the adapter and fuse it; cache the system prompt's prefix.

    `dense_copy`: a folder for the fused dense model. Loading it back skips dequantizing and fusing (the slow part
    of a cold start on CPU); it is written on the first load, and read when it exists (the caller keys it by
    adapter version, which never changes once published).
    `draft_corpus`: the answers the adapter was trained on (with their questions, or plain texts), for the draft
    to guess from before it has answered anything: a new process's first answer is drafted too. Guesses never
    change the answer.
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
    corpus = draft_corpus if isinstance(draft_corpus, DraftCorpus) else DraftCorpus(list(draft_corpus))
    if draft_tokens > 0:
        im.draft, im.draft_tokens = AnswerDraft(), draft_tokens
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        im.draft.seed([tokenizer.encode(t, add_special_tokens=False) + end for t in corpus.answers], corpus.questions)
    im.options = {"fuse": fuse and adapter_dir is not None, "prefix_cache": bool(im._prefix),
                  "prefix_tokens": len(im._prefix), "draft_tokens": draft_tokens,
                  "draft_corpus_texts": len(corpus.answers), "compute": info, "from_dense_copy": from_copy,
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


def system_prefix(tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The token ids every question's prompt starts with: the common prefix of two different questions."""
    a = chat_prompt(tokenizer, "a", system_prompt)
    b = chat_prompt(tokenizer, "Quem?", system_prompt)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _question(prompt: Prompt) -> str | None:
    """What the user asked: the question, or the last user turn of a conversation (None for token ids)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def _fresh_cache(model: nn.Module) -> list[Any]:
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)
