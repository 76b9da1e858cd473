"""The training loss, computed only where it counts.

mlx-lm's `default_loss` projects every position onto the vocabulary (49152 wide for SmolLM2) and then masks the
prompt and padding out. With prompt masking most positions are masked, so here the final hidden states are
gathered at the target positions first and only those are projected: the same loss (to float rounding) for a
fraction of the lm_head's matmuls. The positions are computed on the host from the batch's (offset, length) pairs
and padded to a multiple of POSITION_BUCKET (with weight 0) so that compiled steps see few distinct shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from farense import fast_math

POSITION_BUCKET = 64
# mlx-lm model types whose Model.__call__ is `lm_head(model(inputs))` (or the tied embedding) and nothing more:
# no logit soft-capping or scaling that gathering before projecting would skip.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports_masked_head(model: nn.Module) -> bool:
    args = getattr(model, "args", None)
    return getattr(args, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and hasattr(model, "model")


def target_positions(lengths: mx.array, targets_width: int, bucket: int = POSITION_BUCKET) -> tuple[mx.array, mx.array]:
    """Flat indices into the (batch x targets_width) targets where default_loss's mask is on, and their weights
    (1, then 0 for the bucket padding). Row j's targets t count when offset_j <= t + 1 <= length_j."""
    pairs = np.array(lengths, dtype=np.int64).reshape(-1, 2)
    rows = []
    for j, (offset, length) in enumerate(pairs):
        first, last = max(int(offset) - 1, 0), min(int(length), targets_width) - 1
        if last >= first:
            rows.append(j * targets_width + np.arange(first, last + 1))
    flat = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    size = max(bucket, -(-len(flat) // bucket) * bucket)
    positions = np.zeros(size, np.int32)
    positions[: len(flat)] = flat
    weights = np.zeros(size, np.float32)
    weights[: len(flat)] = 1.0
    return mx.array(positions), mx.array(weights)


def project(model: nn.Module, hidden: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def training_cross_entropy(model: nn.Module) -> Callable[[mx.array, mx.array], mx.array]:
    """The cross-entropy the masked-head loss takes: farense.fast_math's for a model with its SwiGLU (the same to
    float rounding), mlx's otherwise."""
    return fast_math.cross_entropy if fast_math.uses_fast_math(model) else nn.losses.cross_entropy


def masked_head_loss(
    model: nn.Module, batch: mx.array, positions: mx.array, weights: mx.array
) -> tuple[mx.array, mx.array]:
    """default_loss's (mean cross-entropy, token count), projecting only the hidden states at `positions`. A model
    with farense.fast_math's SwiGLU also takes its cross-entropy (the same to float rounding)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model.model(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
    ce = training_cross_entropy(model)(project(model, hidden), targets.reshape(-1)[positions]) * weights
    ntoks = weights.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


# ---------------------------------------------------------------- the loss a training run uses


def loss_fn(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    from mlx_lm.tuner.trainer import default_loss

    return default_loss(model, batch, lengths)


def use_masked_head(model: nn.Module, requested: bool = True) -> bool:
    """The masked-head loss where the model allows it, else mlx-lm's default_loss."""
    return requested and supports_masked_head(model)


def loss_inputs(batch: mx.array, lengths: mx.array, masked_head: bool) -> tuple[mx.array, ...]:
    """The arrays the chosen loss takes after the model: (batch, positions, weights) or (batch, lengths)."""
    if masked_head:
        return (batch, *target_positions(lengths, batch.shape[1] - 1))
    return batch, lengths


def chosen_loss(masked_head: bool):  # noqa: ANN201
    return masked_head_loss if masked_head else loss_fn
