"""Compute paths: the dequantized and recompute paths give the native quantized path's logits, loss and LoRA
gradients, and leave adapters name-compatible with stock mlx-lm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import farense  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from farense.compute import (
    COMPUTE_PATHS,
    DeferredRMSNorm,
    RecomputeLoRALinear,
    RecomputeQuantizedEmbedding,
    RecomputeQuantizedLinear,
    apply_compute_path,
    lora_swiglu_down,
    recompute_mlp,
    recompute_swiglu,
    select_compute_path,
)

ROOT = Path(__file__).resolve().parents[1]
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
VOCAB = 100


def tiny_lora_model(
    path: str, *, tie: bool = True, group_size: int = 32, dropout: float = 0.0, low_memory: bool = False
) -> nn.Module:
    """A 2-layer llama, 4-bit, converted for `path`, with LoRA on every projection and non-zero lora_b."""
    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                           tie_word_embeddings=tie)  # fmt: skip
    model = llama.Model(args)
    nn.quantize(model, group_size=group_size, bits=4)
    mx.eval(model.parameters())
    apply_compute_path(model, path, low_memory=low_memory)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": dropout, "keys": LORA_KEYS})
    # Same adapter values on every path, and lora_b != 0 so lora_a gets a gradient too.
    mx.random.seed(1)
    model.update(tree_map(lambda p: 0.1 * mx.random.normal(p.shape), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def loss_fn(model: nn.Module, tokens: mx.array) -> mx.array:
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()


def run_step(model: nn.Module, tokens: mx.array):
    loss, grads = nn.value_and_grad(model, loss_fn)(model, tokens)
    logits = model(tokens)
    mx.eval(loss, grads, logits)
    return loss.item(), dict(tree_flatten(grads)), logits


@pytest.fixture(scope="module")
def tokens() -> mx.array:
    return mx.random.randint(0, VOCAB, (2, 17), key=mx.random.key(5))


def test_auto_is_dequantized_on_cpu():
    if mx.metal.is_available():
        pytest.skip("Apple GPU: auto is quantized there")
    assert select_compute_path("auto") == "dequantized"
    assert select_compute_path() == "dequantized"


def test_explicit_paths_pass_through_and_unknown_ones_fail():
    for path in COMPUTE_PATHS:
        assert select_compute_path(path) == path
    with pytest.raises(ValueError, match="compute path 'fast'"):
        select_compute_path("fast")
    with pytest.raises(ValueError):
        apply_compute_path(nn.Linear(4, 4), "bf16")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("path", ["dequantized", "recompute", "recompute-low-memory"])
def test_path_matches_native_quantized(path: str, group_size: int, tie: bool, tokens: mx.array):
    ref_loss, ref_grads, ref_logits = run_step(tiny_lora_model("quantized", tie=tie, group_size=group_size), tokens)
    model = tiny_lora_model(path.removesuffix("-low-memory"), tie=tie, group_size=group_size,
                            low_memory=path.endswith("-low-memory"))  # fmt: skip
    loss, grads, logits = run_step(model, tokens)
    assert abs(loss - ref_loss) < 1e-4
    assert mx.allclose(logits, ref_logits, atol=1e-4).item()
    assert sorted(grads) == sorted(ref_grads)
    assert len(grads) == 2 * 7 * 2  # lora_a and lora_b of 7 projections in 2 layers
    for name, ref in ref_grads.items():
        assert mx.abs(ref).max().item() > 0, name
        assert mx.allclose(grads[name], ref, atol=1e-4).item(), name


def test_adapter_names_are_stock_mlx_lm_names():
    names = {path: sorted(dict(tree_flatten(tiny_lora_model(path).trainable_parameters()))) for path in COMPUTE_PATHS}
    assert names["dequantized"] == names["quantized"] == names["recompute"]
    assert all(n.endswith((".lora_a", ".lora_b")) for n in names["quantized"])
    assert "model.layers.0.self_attn.q_proj.lora_a" in names["quantized"]


def test_layer_types_per_path():
    dense = tiny_lora_model("dequantized", tie=False)
    assert type(dense.layers[0].mlp.down_proj) is LoRALinear
    assert type(dense.layers[0].mlp.down_proj.linear) is nn.Linear
    assert dense.layers[0].mlp.down_proj.linear.weight.dtype == mx.float32
    assert type(dense.lm_head) is nn.Linear and type(dense.model.embed_tokens) is nn.Embedding

    rec = tiny_lora_model("recompute", tie=True)
    q_proj = rec.layers[0].self_attn.q_proj
    assert isinstance(q_proj, RecomputeLoRALinear) and isinstance(q_proj, LoRALinear)
    assert isinstance(q_proj.linear, RecomputeQuantizedLinear) and isinstance(q_proj.linear, nn.QuantizedLinear)
    assert isinstance(rec.model.embed_tokens, RecomputeQuantizedEmbedding)
    assert rec.model.embed_tokens.weight.dtype == mx.uint32  # still 4-bit in memory
    assert all(type(layer.mlp).swiglu is recompute_swiglu for layer in rec.layers)
    assert getattr(type(dense.layers[0].mlp), "swiglu", None) is not recompute_swiglu


def test_recompute_swiglu_is_mlx_lms_swiglu_with_the_same_gradients():
    gate, x, w = (mx.random.normal((2, 7, 48), key=mx.random.key(k)) * 3 for k in (1, 2, 3))
    outs, grads = [], []
    for fn in (llama.swiglu, recompute_swiglu):
        outs.append(fn(gate, x))
        grads.append(mx.grad(lambda g, v: (fn(g, v) * w).sum(), argnums=(0, 1))(gate, x))  # noqa: B023
    assert mx.allclose(outs[0], outs[1], atol=1e-6).item()
    for ref, new in zip(*grads, strict=True):
        assert mx.allclose(ref, new, rtol=1e-5, atol=1e-5).item()


def test_lora_swiglu_down_is_swiglu_then_lora_linear_with_the_same_gradients():
    """The fused MLP tail against mlx-lm's swiglu followed by stock LoRALinear on the dequantized weight."""
    base = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    mx.random.seed(3)
    dense = nn.Linear(64, 32, bias=False)
    dense.weight = mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=4)
    stock = LoRALinear.from_base(dense, r=4, scale=2.0)
    stock.lora_b = 0.1 * mx.random.normal(stock.lora_b.shape)
    gate, up, w = (mx.random.normal((2, 7, 64), key=mx.random.key(k)) * 2 for k in (1, 2, 3))
    w = w[..., :32]
    a, b = stock.lora_a, stock.lora_b

    def reference(gate, up, a, b):
        stock.lora_a, stock.lora_b = a, b
        return (stock(llama.swiglu(gate, up)) * w).sum()

    def fused(gate, up, a, b):
        return (lora_swiglu_down(gate, up, a, b, base.weight, base.scales, base.biases, 2.0, 32, 4, "affine") * w).sum()

    ref_value, ref_grads = mx.value_and_grad(reference, argnums=(0, 1, 2, 3))(gate, up, a, b)
    value, grads = mx.value_and_grad(fused, argnums=(0, 1, 2, 3))(gate, up, a, b)
    assert abs(value.item() - ref_value.item()) < 1e-3 * abs(ref_value.item())
    for name, ref, new in zip(("gate", "up", "lora_a", "lora_b"), ref_grads, grads, strict=True):
        assert mx.allclose(ref, new, rtol=1e-4, atol=1e-4).item(), name


def test_recompute_mlp_fuses_only_a_lora_down_proj(monkeypatch: pytest.MonkeyPatch, tokens: mx.array):
    import farense.compute as compute

    calls = []
    real = compute.lora_swiglu_down
    monkeypatch.setattr(compute, "lora_swiglu_down", lambda *a: calls.append(1) or real(*a))
    model = tiny_lora_model("recompute", low_memory=True)
    assert type(model.layers[0].mlp).__call__ is recompute_mlp
    run_step(model, tokens)
    assert calls  # both layers' down_proj went through the fused function
    calls.clear()
    model.eval()
    for layer in model.layers:
        layer.mlp.down_proj = layer.mlp.down_proj.linear  # no LoRA on down_proj: plain swiglu then the layer
    run_step(model, tokens)
    assert not calls


def test_recompute_projections_normalize_their_own_input(tokens: mx.array):
    model = tiny_lora_model("recompute", low_memory=True)
    for layer in model.layers:
        assert type(layer.input_layernorm) is type(layer.post_attention_layernorm) is DeferredRMSNorm
        assert layer.self_attn.q_proj.linear.input_norm.module is layer.input_layernorm
        assert layer.mlp.up_proj.linear.input_norm.module is layer.post_attention_layernorm
        assert layer.self_attn.o_proj.linear.input_norm is None and layer.mlp.down_proj.linear.input_norm is None
    # The norm weights stay where mlx-lm has them, once: no parameter moved or doubled.
    names = [n for n, _ in tree_flatten(model.parameters()) if "norm" in n]
    assert names == [n for n, _ in tree_flatten(tiny_lora_model("quantized").parameters()) if "norm" in n]
    # LoRALinear's own forward (the dropout fallback) normalizes once, for the base and the adapter alike.
    x = mx.random.normal((2, 5, 64), key=mx.random.key(7)) * 3
    for layer in model.layers:
        for proj in (layer.self_attn.k_proj, layer.mlp.gate_proj):
            assert mx.allclose(proj._stock_call(x), proj(x), atol=1e-4).item()
            assert proj.linear.input_norm is not None  # put back after the stock call
    # A changed norm weight is read at call time.
    before = model(tokens)
    model.layers[0].input_layernorm.weight = model.layers[0].input_layernorm.weight * 2
    assert not mx.allclose(model(tokens), before, atol=1e-3).item()


def test_norms_are_deferred_only_on_the_low_memory_recompute_path():
    model = tiny_lora_model("recompute", low_memory=True)
    assert apply_compute_path(model, "recompute", low_memory=True)["deferred_norms"] == 0  # done: nothing more
    fast = tiny_lora_model("recompute")
    assert not any(isinstance(m, DeferredRMSNorm) for _, m in fast.named_modules())
    assert type(fast.layers[0].mlp).__call__ is not recompute_mlp
    assert fast.layers[0].self_attn.q_proj.linear.input_norm is None
    fresh = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                        rms_norm_eps=1e-5, vocab_size=VOCAB))  # fmt: skip
    nn.quantize(fresh, group_size=32, bits=4)
    fresh.layers[1].self_attn.k_proj = nn.Linear(64, 32, bias=False)  # a dense projection reads that norm too
    assert apply_compute_path(fresh, "recompute", low_memory=True)["deferred_norms"] == 3
    assert type(fresh.layers[1].input_layernorm) is nn.RMSNorm
    dense = tiny_lora_model("dequantized")
    assert not any(isinstance(m, DeferredRMSNorm) for _, m in dense.named_modules())


def test_recompute_layer_works_with_stock_lora_and_fuse():
    base = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    model = nn.Sequential(base)
    apply_compute_path(model, "recompute")
    layer = model.layers[0]
    lora = LoRALinear.from_base(layer, r=4, scale=2.0)
    assert (lora.lora_a.shape, lora.lora_b.shape) == ((64, 4), (4, 32))
    lora.lora_b = 0.1 * mx.random.normal(lora.lora_b.shape)
    x = mx.random.normal((3, 64))
    fused = lora.fuse()
    assert isinstance(fused, nn.QuantizedLinear)
    dense = lora.fuse(dequantize=True)
    assert mx.allclose(dense(x), lora(x), atol=1e-4).item()
    own = layer.to_lora(r=4, scale=2.0, dropout=0.0)
    own.update(lora.trainable_parameters())
    assert mx.allclose(own(x), lora(x), atol=1e-5).item()


def test_dropout_falls_back_to_stock_lora(tokens: mx.array):
    model = tiny_lora_model("recompute", dropout=0.5)
    model.train()
    loss, grads, _ = run_step(model, tokens)
    assert loss == loss and len(grads) == 28


def test_compiled_step_matches_eager(tokens: mx.array):
    import mlx.optimizers as optim

    def losses(compiled: bool) -> list[float]:
        model = tiny_lora_model("recompute")
        opt = optim.AdamW(learning_rate=1e-2)
        state = [model.state, opt.state]
        value_and_grad = nn.value_and_grad(model, loss_fn)

        def step(x):
            loss, grads = value_and_grad(model, x)
            opt.update(model, grads)
            return loss

        if compiled:
            step = mx.compile(step, inputs=state, outputs=state)
        out = []
        for _ in range(3):
            loss = step(tokens)
            mx.eval(loss, state)
            out.append(loss.item())
        return out

    assert losses(True) == pytest.approx(losses(False), abs=1e-4)


def test_metadata():
    infos = {}
    for path in COMPUTE_PATHS:
        model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1,
                                            intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                            rms_norm_eps=1e-5, vocab_size=VOCAB))  # fmt: skip
        nn.quantize(model, group_size=64, bits=4)
        infos[path] = apply_compute_path(model, path)
    assert infos["quantized"]["layers_converted"] == 0
    assert infos["dequantized"]["layers_converted"] == infos["recompute"]["layers_converted"] == 8
    assert infos["dequantized"]["dtype"] == "float32"
    assert infos["recompute"]["base_weight_bytes"] == infos["quantized"]["base_weight_bytes"]
    assert infos["dequantized"]["base_weight_bytes"] > 4 * infos["quantized"]["base_weight_bytes"]
    assert {info["path"] for info in infos.values()} == set(COMPUTE_PATHS)
    assert [infos[p]["recompute_swiglu_layers"] for p in ("quantized", "dequantized", "recompute")] == [0, 0, 1]
    assert not any(info["low_memory"] or info["deferred_norms"] for info in infos.values())


def test_training_takes_low_memory_from_the_config(tiny_inputs):
    from farense.config import TrainConfig
    from farense.train import load_for_training

    assert TrainConfig().low_memory is False  # the faster recompute path unless asked
    for low in (False, True):
        model, _, info = load_for_training(tiny_inputs.model, TrainConfig(compute_path="recompute", low_memory=low))
        assert info["low_memory"] is low and (info["deferred_norms"] > 0) == low
        assert (type(model.layers[0].mlp).__call__ is recompute_mlp) == low
    _, _, info = load_for_training(tiny_inputs.model, TrainConfig(compute_path="dequantized", low_memory=True))
    assert info["low_memory"] is False and info["deferred_norms"] == 0  # only the recompute path has it


def test_benchmark_script_runs_tiny_shape():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "qlora_step.py"), "--shape", "tiny", "--steps", "2",
         "--warmup", "1", "--seq", "32", "--path", "recompute", "--check-loss"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("path", "shape", "batch", "seq", "tokens_per_s", "peak_gb", "loss", "steps", "device", "mlx_version"):
        assert key in result, key
    assert result["path"] == "recompute" and result["shape"] == "tiny" and result["steps"] == 2
    assert result["tokens_per_s"] > 0 and result["loss"] == result["loss"]
    assert result["loss_diff"] < 1e-2


def test_prebuilt_steps_train_exactly_like_the_plain_loop():
    """--prebuild builds step n+1's graph in a second thread while step n runs, and defers each step's update into
    the next graph: the losses must not change by a bit."""
    losses = {}
    for flags in ([], ["--prebuild"]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "qlora_step.py"), "--shape", "tiny", "--layers", "4",
             "--steps", "4", "--warmup", "1", "--seq", "32", "--path", "recompute", *flags],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["prebuild"] is bool(flags) and len(result["losses"]) == 4
        losses[bool(flags)] = result["losses"]
    assert losses[True] == losses[False]
    assert losses[False][-1] < losses[False][0]  # it trains: not four copies of one loss


def test_torch_benchmark_uses_the_same_shapes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import qlora_step
        import torch_qlora_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert torch_qlora_step.SHAPES == qlora_step.SHAPES
    assert torch_qlora_step.LORA_TARGETS == [k.split(".")[1] for k in qlora_step.LORA_KEYS]


def test_dequantized_dtype_choices():
    from farense import compute

    model = nn.Sequential(nn.QuantizedLinear(64, 32, bias=True, group_size=64, bits=4))
    info = apply_compute_path(model, "dequantized", mx.bfloat16)
    assert info["dtype"] == "bfloat16"
    assert model.layers[0].weight.dtype == model.layers[0].bias.dtype == mx.bfloat16
    # dtype None (the GPU default) keeps the scales' dtype; it once failed comparing None with a Dtype.
    q = nn.QuantizedLinear(64, 32, bias=False, group_size=64, bits=4)
    w = compute._dequantize(q.weight, q.scales, q.biases, 64, 4, "affine", None)
    assert w.dtype == q.scales.dtype and w.shape == (32, 64)
