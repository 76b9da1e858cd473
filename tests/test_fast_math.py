"""farense.fast_math: its exp and swiglu give mlx's values and gradients, and swapping a model's MLPs for them
changes neither the model's outputs nor its LoRA training (loss and gradients)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import farense  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu
from mlx_lm.tuner.utils import linear_to_lora_layers

from farense import fast_math
from farense.compute import apply_compute_path
from farense.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_exp_matches_mx_exp_over_the_float32_range():
    x = mx.linspace(-87.0, 88.0, 200_001)
    ours, ref = fast_math.exp(x), mx.exp(x)
    assert (mx.abs(ours - ref) / ref).max().item() < 3e-7
    assert fast_math.exp(mx.array(0.0)).item() == 1.0


def test_exp_saturates_instead_of_wrapping():
    out = np.array(fast_math.exp(mx.array([-mx.inf, -1e30, -200.0, 200.0, 1e30, mx.inf])))
    assert (out[:3] < 1e-37).all() and (out[:3] >= 0).all()
    assert np.isposinf(out[3:]).all()  # as mx.exp


def test_exp_gradient_is_its_value():
    x = mx.array([-3.0, -0.5, 0.0, 0.7, 5.0])
    grad = mx.grad(lambda v: fast_math.exp(v).sum())(x)
    assert mx.allclose(grad, mx.exp(x), rtol=3e-7).item()


def test_swiglu_matches_mlx_lm_in_value_and_gradients():
    gate, x = mx.random.normal((3, 5, 64), key=mx.random.key(0)) * 4, mx.random.normal((3, 5, 64), key=mx.random.key(1))
    ct = mx.random.normal((3, 5, 64), key=mx.random.key(2))
    assert mx.allclose(fast_math.swiglu(gate, x), mlx_lm_swiglu(gate, x), rtol=1e-6, atol=1e-7).item()

    def grads(fn):
        return mx.grad(lambda g, v: (fn(g, v) * ct).sum(), argnums=(0, 1))(gate, x)

    for ours, ref in zip(grads(fast_math.swiglu), grads(mlx_lm_swiglu)):
        assert mx.allclose(ours, ref, rtol=1e-5, atol=1e-6).item()


def tiny_llama(seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=100)  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def with_lora(model: nn.Module) -> nn.Module:
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys})
    mx.random.seed(1)  # lora_b != 0, so every LoRA matrix gets a gradient
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def test_cross_entropy_matches_mlx_in_value_and_gradient():
    logits = mx.random.normal((37, 1000), key=mx.random.key(7)) * 6
    logits[3] += 80.0  # a row far from 0: the log-sum-exp must subtract its peak
    logits[4] -= 80.0
    targets = mx.random.randint(0, 1000, (37,), key=mx.random.key(8))
    weights = mx.random.uniform(shape=(37,), key=mx.random.key(9))

    def weighted(fn):  # noqa: ANN001, ANN202
        return lambda x: (fn(x, targets) * weights).sum()

    (want, want_grad), (got, grad) = (mx.value_and_grad(weighted(fn))(logits)
                                      for fn in (nn.losses.cross_entropy, fast_math.cross_entropy))  # fmt: skip
    assert abs(got.item() - want.item()) <= 2e-7 * abs(want.item())
    assert mx.allclose(grad, want_grad, rtol=1e-5, atol=1e-7).item()
    assert mx.allclose(fast_math.cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets),
                       rtol=1e-6, atol=1e-5).item()  # fmt: skip


def test_the_masked_head_loss_takes_it_with_the_fast_swiglu(monkeypatch):
    from farense import loss as loss_mod

    tokens = mx.random.randint(0, 100, (2, 17), key=mx.random.key(5))
    lengths = mx.array([[3, 17], [5, 12]])
    inputs = loss_mod.loss_inputs(tokens, lengths, True)
    calls = []
    real = fast_math.cross_entropy
    monkeypatch.setattr(fast_math, "cross_entropy", lambda *a: calls.append(1) or real(*a))
    plain, fast = tiny_llama(), tiny_llama()
    fast_math.use_fast_math(fast)
    want, got = (loss_mod.masked_head_loss(m, *inputs)[0] for m in (plain, fast))
    assert calls == [1], "only the fast-math model takes the fast cross-entropy"
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("shape", [(2, 9, 3, 17, 64), (1, 4, 4, 5, 8), (3, 8, 2, 33, 16)])
def test_causal_attention_matches_mlx_in_value_and_gradients(shape):
    b, heads, kv_heads, length, dim = shape
    q, k, v, ct = (mx.random.normal((b, h, length, dim), key=mx.random.key(i))
                   for i, h in enumerate((heads, kv_heads, kv_heads, heads)))  # fmt: skip

    def mlx_attention(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")

    results = [mx.value_and_grad(lambda *a: (fn(*a) * ct).sum(), argnums=(0, 1, 2))(q, k, v)
               for fn in (mlx_attention, fast_math.causal_attention)]  # fmt: skip
    (ref, ref_grads), (ours, our_grads) = results
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert mx.allclose(fast_math.causal_attention(q, k, v), mlx_attention(q, k, v), rtol=1e-5, atol=1e-5).item()
    for r, o in zip(ref_grads, our_grads):  # float32 rounding of sums of terms up to ~25: relative to the largest
        assert mx.abs(o - r).max().item() <= 1e-5 * mx.abs(r).max().item()
    # Causal: changing the last position's key and value leaves every earlier position's output as it was.
    k2, v2 = k.at[:, :, -1].add(5.0), v.at[:, :, -1].add(5.0)
    before, after = fast_math.causal_attention(q, k, v), fast_math.causal_attention(q, k2, v2)
    assert mx.array_equal(before[:, :, :-1], after[:, :, :-1]).item()
    assert not mx.allclose(before[:, :, -1], after[:, :, -1]).item()


def test_attention_takes_it_only_for_whole_causal_sequences(monkeypatch):
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_llama()
    tokens = mx.random.randint(0, 100, (2, 9), key=mx.random.key(4))
    before = model(tokens)
    cache = make_prompt_cache(model)
    cached_before = model(tokens[:1], cache=cache)
    assert fast_math.use_fast_attention(model) == 2 and fast_math.use_fast_attention(model) == 0
    assert fast_math.uses_fast_attention(model) == 2
    calls = []
    real = fast_math.causal_attention
    monkeypatch.setattr(fast_math, "causal_attention", lambda *a: calls.append(1) or real(*a))
    assert mx.allclose(model(tokens), before, rtol=1e-5, atol=1e-5).item() and len(calls) == 2
    # With a cache (answering) it is mlx-lm's own attention: the same logits, and it is not called.
    cache = make_prompt_cache(model)
    assert mx.array_equal(model(tokens[:1], cache=cache), cached_before).item() and len(calls) == 2


def test_use_fast_math_swaps_every_mlp_once_and_keeps_the_outputs():
    model = tiny_llama()
    tokens = mx.random.randint(0, 100, (2, 9), key=mx.random.key(3))
    before = model(tokens)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not fast_math.uses_fast_math(model)
    assert fast_math.use_fast_math(model) == 2
    assert fast_math.use_fast_math(model) == 0  # already swapped
    assert fast_math.uses_fast_math(model)
    assert all(type(layer.mlp).__name__ == "FastMathMLP" for layer in model.model.layers)
    assert all(type(layer.self_attn).__name__ == "FastMathAttention" for layer in model.model.layers)
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert mx.allclose(model(tokens), before, rtol=1e-5, atol=1e-5).item()


def test_lora_training_step_has_the_same_loss_and_gradients():
    tokens = mx.random.randint(0, 100, (2, 17), key=mx.random.key(5))

    def loss(model: nn.Module, t: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(t[:, :-1]), t[:, 1:]).mean()

    plain = with_lora(tiny_llama())
    fast = tiny_llama()
    fast_math.use_fast_math(fast)
    fast = with_lora(fast)
    (l1, g1), (l2, g2) = (nn.value_and_grad(m, loss)(m, tokens) for m in (plain, fast))
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l1.item())
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and any("mlp.gate_proj.lora_a" in k for k in g1)
    for k in g1:
        assert mx.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6).item(), k


def test_the_cpu_compute_path_applies_it_and_records_it():
    model = tiny_llama()
    nn.quantize(model, group_size=32, bits=4)
    info = apply_compute_path(model, "dequantized")
    assert info["fast_math_layers"] == info["fast_attention_layers"] == (2 if mx.default_device() == mx.cpu else 0)
    off = tiny_llama()
    nn.quantize(off, group_size=32, bits=4)
    assert apply_compute_path(off, "dequantized", fast_math=False)["fast_math_layers"] == 0
    assert not fast_math.uses_fast_math(off)
    quantized = tiny_llama()
    nn.quantize(quantized, group_size=32, bits=4)
    assert apply_compute_path(quantized, "quantized")["fast_math_layers"] == 0
    assert not fast_math.uses_fast_math(quantized)


def test_training_takes_it_unless_the_config_says_no(tiny_inputs):
    from farense.train import load_for_training

    assert TrainConfig().fast_math is True  # on by default: only the CPU's dequantized path has it
    cpu = mx.default_device() == mx.cpu
    for on in (False, True):
        tcfg = TrainConfig(fast_math=on, compute_path="dequantized")
        trained, _, info = load_for_training(tiny_inputs.model, tcfg)
        assert fast_math.uses_fast_math(trained) == (on and cpu)
        assert (info["fast_math_layers"] > 0) == (on and cpu)


def test_the_benchmark_prints_measured_op_costs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/fast_math.py"), "--only", "ops"],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    rows = {r.get("op"): r for r in map(json.loads, out.splitlines()) if r["measure"] == "op"}
    assert set(rows) == {"add", "mx.exp", "fast_math.exp", "mlx_lm swiglu", "fast_math.swiglu",
                         "mx.fast.scaled_dot_product_attention", "fast_math.causal_attention"}
    assert all(r.get("ns_per_element", 1) > 0 and r.get("forward_ms", 1) > 0 for r in rows.values())
