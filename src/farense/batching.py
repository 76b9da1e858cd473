"""Training examples to batches: tokenization with mlx-lm's chat/text processing, length-sorted batches in an order
that is a pure function of (seed, epoch), and padding to a small multiple."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from farense.errors import TrainingError


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, mask_prompt: bool) -> list[tuple[list[int], int]]:
    """(tokens, prompt_offset) per row, with mlx-lm's own chat/text processing."""
    from mlx_lm.tuner.datasets import ChatDataset, TextDataset

    chat = ChatDataset([], tokenizer, mask_prompt=mask_prompt)
    text = TextDataset([], tokenizer)
    return [chat.process(r) if "messages" in r else text.process(r) for r in rows]


def drop_unlearnable(
    examples: list[tuple[list[int], int]], max_seq_length: int
) -> tuple[list[tuple[list[int], int]], int]:
    """Drop examples whose answer starts beyond the truncation point: they would give a 0/0 loss."""
    kept = [e for e in examples if e[1] < min(len(e[0]), max_seq_length) - 1]
    return kept, len(examples) - len(kept)


class BatchOrder:
    """Fixed batches of similar length (as mlx-lm groups them); their order is a permutation seeded by
    (seed, epoch), so any micro-batch index maps to the same batch in every run, interrupted or not."""

    def __init__(self, examples: Sequence[tuple[list[int], int]], batch_size: int, seed: int) -> None:
        if len(examples) < batch_size:
            raise TrainingError(
                f"the training split has {len(examples)} examples, fewer than train.batch_size={batch_size}; "
                "lower train.batch_size or add data"
            )
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def batch_at(self, micro_index: int) -> tuple[int, int, list[int]]:
        epoch, offset = divmod(micro_index, len(self.batches))
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))}
        return epoch, offset, self.batches[int(self._perm_cache[epoch][offset])]


# mlx-lm pads to a multiple of 32: 14% of the tokens on the sample chat split at 256 (length-sorted batches of 4),
# 5% at 8. Each new width costs one trace of the compiled step, measured at well under a step's time on CPU.
PAD_MULTIPLE = 8


def collate(
    examples: Sequence[tuple[list[int], int]], indices: Sequence[int], max_seq_length: int
) -> tuple[mx.array, mx.array]:
    """Token ids padded with 0, and each row's (prompt offset, length) for the loss mask, which is mlx-lm's:
    targets t with offset <= t + 1 <= length count, so an example shorter than max_seq_length also learns the pad
    (token 0) after its last token, and one of max_seq_length tokens or more (cut there; its length is then
    max_seq_length - 1) does not: mlx-lm's batches have no room for that pad.

    The model's inputs (every column but the last) are padded to a multiple of PAD_MULTIPLE: an example cut at 512
    gives 512-wide inputs, where mlx-lm's batches give 511; on an H200 a 7B step at 4 x 511 ran 20% slower than at
    4 x 512 (benchmarks/results/GPU_RESULTS.md, 2026-11-28). The targets counted are the same either way."""
    seqs = [examples[i][0] for i in indices]
    offsets = [examples[i][1] for i in indices]
    kept = [min(len(s), max_seq_length) for s in seqs]
    lengths = [n - 1 if len(s) >= max_seq_length else n for s, n in zip(seqs, kept)]
    width = 1 + PAD_MULTIPLE * -(-max(lengths) // PAD_MULTIPLE)
    arr = np.zeros((len(seqs), width), np.int32)
    for j, s in enumerate(seqs):
        arr[j, : kept[j]] = s[: kept[j]]
    return mx.array(arr), mx.array(list(zip(offsets, lengths)))
