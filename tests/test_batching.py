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
        for row, i in enumerate((0, 3, 5)):
            n = min(len(exs[i][0]), max_seq)
            assert np.array(batch[row, :n]).tolist() == exs[i][0][:n]
            assert np.all(np.array(batch[row, n:]) == 0)
            assert np.array(lengths[row]).tolist() == [2, n if len(exs[i][0]) < max_seq else n - 1]
        # the model's inputs (all but the last column) are a multiple of PAD_MULTIPLE wide, with the fewest pads
        longest = int(np.array(lengths)[:, 1].max())
        assert (batch.shape[1] - 1) % PAD_MULTIPLE == 0 and longest <= batch.shape[1] - 1 < longest + PAD_MULTIPLE


def mask(lengths: np.ndarray, targets_width: int) -> np.ndarray:
    """mlx-lm's default_loss mask: target t counts when offset <= t + 1 <= length."""
    steps = np.arange(1, targets_width + 1)
    return (steps >= lengths[:, :1]) & (steps <= lengths[:, 1:])


def old_collate(exs, indices, max_seq):  # noqa: ANN001, ANN202  (before the inputs were padded to the multiple)
    lengths = [min(len(exs[i][0]), max_seq) for i in indices]
    width = min(1 + PAD_MULTIPLE * -(-max(lengths) // PAD_MULTIPLE), max_seq)
    arr = np.zeros((len(indices), width), np.int32)
    for j, i in enumerate(indices):
        arr[j, : lengths[j]] = exs[i][0][: lengths[j]]
    return arr, np.array([[exs[i][1], n] for i, n in zip(indices, lengths)])


def test_the_trained_targets_are_mlx_lms_whatever_the_padding() -> None:
    # Every (row, target position, target token) the loss counts is the one mlx-lm's batching counts: a shorter
    # example also learns the pad after its end, one cut at the limit does not learn a pad it never had.
    rng = np.random.default_rng(5)
    for max_seq in (64, 65, 128):
        exs = [(rng.integers(3, 100, int(k)).tolist(), int(rng.integers(1, 8))) for k in rng.integers(9, 150, 40)]
        for start in range(0, 40, 4):
            idx = list(range(start, start + 4))
            new_b, new_l = collate(exs, idx, max_seq)
            old_b, old_l = old_collate(exs, idx, max_seq)
            new_b, new_l = np.array(new_b), np.array(new_l)
            counted = lambda b, l: {(j, t, int(b[j, t + 1])) for j, t in zip(*np.nonzero(mask(l, b.shape[1] - 1)))}  # noqa: E731
            assert counted(new_b, new_l) == counted(old_b, old_l)
            assert (new_b.shape[1] - 1) % PAD_MULTIPLE == 0


def test_examples_cut_at_the_limit_give_inputs_of_the_limit() -> None:
    # 600-token examples cut at 512: inputs 512 wide (mlx-lm's batches give 511; a 7B step ran 20% slower there)
    exs = [(list(range(3, 603)), 10)] * 2
    batch, lengths = collate(exs, [0, 1], 512)
    assert batch.shape == (2, 513) and np.array(batch[0, :512]).tolist() == list(range(3, 515))
    assert np.array(lengths).tolist() == [[10, 511], [10, 511]]  # the last kept token is only a target
    assert not mask(np.array(lengths), 512)[:, 511].any()  # and the pad column is never one
