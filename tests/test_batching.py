"""Batches: the order is a function of (seed, epoch) only, each example is seen once an epoch, padding stays small."""

from __future__ import annotations

import numpy as np

from farense.batching import PAD_MULTIPLE, BatchOrder, collate


def examples(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 100, int(k)).tolist(), 2) for k in rng.integers(5, 200, n)]


def test_each_example_once_per_epoch_and_order_is_a_function_of_seed_and_position() -> None:
    exs = examples(23)
    a, b = BatchOrder(exs, 4, seed=7), BatchOrder(exs, 4, seed=7)
    n = len(a)
    assert n == 23 // 4
    for epoch in range(3):
        seen = [i for k in range(n) for i in a.batch_at(epoch * n + k)[2]]
        assert len(seen) == len(set(seen)) == 4 * n  # once each; the 23 % 4 left over sit out every epoch
    # Random access (as a resumed run does) gives the same batches as walking from the start.
    assert [b.batch_at(m) for m in (9, 2, 14)] == [a.batch_at(m) for m in (9, 2, 14)]
    assert [a.batch_at(m)[2] for m in range(n)] != [a.batch_at(n + m)[2] for m in range(n)]


def test_collate_pads_to_the_multiple_and_keeps_tokens_and_lengths() -> None:
    exs = examples(8, seed=3)
    for max_seq in (64, 512):
        batch, lengths = collate(exs, [0, 3, 5], max_seq)
        longest = max(min(len(exs[i][0]), max_seq) for i in (0, 3, 5))
        # the model's inputs (all but the last column) are a multiple of PAD_MULTIPLE wide, with the fewest pads
        assert (batch.shape[1] - 1) % PAD_MULTIPLE == 0
        assert longest <= batch.shape[1] < longest + PAD_MULTIPLE
        for row, i in enumerate((0, 3, 5)):
            n = min(len(exs[i][0]), max_seq)
            assert np.array(batch[row, :n]).tolist() == exs[i][0][:n]
            assert np.all(np.array(batch[row, n:]) == 0)
            assert np.array(lengths[row]).tolist() == [2, n]


def test_examples_cut_at_the_limit_give_inputs_of_the_limit() -> None:
    # 600-token examples cut at 512: inputs 512 wide (mlx-lm's batches give 511; a 7B step ran 20% slower there)
    exs = [(list(range(3, 603)), 10)] * 2
    batch, lengths = collate(exs, [0, 1], 512)
    assert batch.shape == (2, 513) and np.array(lengths).tolist() == [[10, 512], [10, 512]]
    assert np.all(np.array(batch[:, 512]) == 0)  # one pad column: the 512 tokens kept are the same
