"""The masked-head loss gives mlx-lm's default_loss value and gradients on the same batches."""

from __future__ import annotations

from pathlib import Path

import farense  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from farense.config import TrainConfig
from farense.loss import masked_head_loss, supports_masked_head, target_positions
from farense.train import collate, load_for_training, loss_fn, loss_inputs
from tiny import write_tiny_mlx_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    path = write_tiny_mlx_model(tmp_path_factory.mktemp("loss") / "model")
    mx.random.seed(0)
    m, _, _ = load_for_training(Path(path), TrainConfig(compute_path="dequantized"))
    # Non-zero adapters, so the LoRA path takes part in the gradients compared below.
    m.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05, m.trainable_parameters()))
    return m


def examples(vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(1)
    # (length, prompt offset): prompt-masked, unmasked (offset 0), truncated past max_seq_length, 2-token answer.
    shapes = [(40, 25), (17, 0), (90, 30), (6, 4)]
    return [(rng.integers(3, vocab, n).tolist(), off) for n, off in shapes]


def default_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    steps = np.arange(1, width + 1)
    return (steps >= lengths[:, :1]) & (steps <= lengths[:, 1:])


@pytest.mark.parametrize("max_seq", [64, 256])
def test_positions_are_exactly_default_losss_mask(max_seq: int) -> None:
    exs = examples(500)
    batch, lengths = collate(exs, [0, 1, 2, 3], max_seq)
    width = batch.shape[1] - 1
    positions, weights = target_positions(lengths, width, bucket=32)
    n = int(weights.sum().item())
    expected = np.flatnonzero(default_mask(np.array(lengths), width))
    assert np.array_equal(np.array(positions)[:n], expected)
    assert positions.shape[0] % 32 == 0 and np.all(np.array(weights)[n:] == 0)


def test_empty_mask_gives_nan_like_default(model: nn.Module) -> None:
    batch, lengths = collate(examples(model.args.vocab_size), [0, 1], 64)
    zero = mx.zeros_like(lengths)
    loss, ntoks = masked_head_loss(model, batch, *target_positions(zero, batch.shape[1] - 1))
    assert ntoks.item() == 0 and np.isnan(loss.item())
    assert np.isnan(loss_fn(model, batch, zero)[0].item())


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [1], [2, 3]])
def test_loss_and_gradients_match_default_loss(model: nn.Module, indices: list[int]) -> None:
    assert supports_masked_head(model)
    batch, lengths = collate(examples(model.args.vocab_size), indices, 64)
    (ref, ref_n), ref_grad = nn.value_and_grad(model, loss_fn)(model, batch, lengths)
    (new, new_n), new_grad = nn.value_and_grad(model, masked_head_loss)(model, *loss_inputs(batch, lengths, True))
    assert abs(ref.item() - new.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert int(ref_n.item()) == int(new_n.item())
    ref_g, new_g = dict(tree_flatten(ref_grad)), dict(tree_flatten(new_grad))
    assert ref_g.keys() == new_g.keys() and ref_g
    for k, g in ref_g.items():
        scale = max(float(mx.abs(g).max().item()), 1e-6)
        assert float(mx.abs(g - new_g[k]).max().item()) <= 1e-4 * scale, k
