"""Trainer behaviour on a tiny random model: exact resume, faults, config reaching the loop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import farense  # noqa: F401
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from farense.checkpoint import find_resumable, list_checkpoints
from farense.config import load_config
from farense.errors import TrainingError, TrainingInterrupted
from farense.evaluate import attach_adapter, load_base
from farense.progress import NullReporter
from farense.stages import StageContext
from farense.train import fit_batch, read_metrics, train_stage
from tiny import write_tiny_mlx_model

ROOT = Path(__file__).resolve().parents[1]


def write_split(path: Path, n: int, offset: int = 0) -> None:
    rows = []
    for i in range(offset, offset + n):
        answer = f"O Farense foi fundado em 1910 em Faro. Resposta {i}." * (1 + i % 3)
        rows.append({"messages": [
            {"role": "system", "content": "Assistente do Farense."},
            {"role": "user", "content": f"Pergunta {i}: quando foi fundado o Farense?"},
            {"role": "assistant", "content": answer},
        ]})  # fmt: skip
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-inputs")
    model = write_tiny_mlx_model(root / "model")
    data = root / "data"
    data.mkdir()
    write_split(data / "train.jsonl", 24)
    write_split(data / "valid.jsonl", 4, offset=100)
    return {"model": model, "data": data}


TINY = {
    "train.max_steps": 8,
    "train.batch_size": 2,
    "train.grad_accumulation": 2,
    "train.save_every": 3,
    "train.eval_every": 4,
    "train.log_every": 2,
    "train.warmup_steps": 2,
    "train.max_seq_length": 256,
    "train.lora_dropout": 0.1,  # exercises the RNG on resume
    "train.learning_rate": 1e-3,
}


def run_train(inputs: dict[str, Path], out: Path, reporter=None, **overrides):  # noqa: ANN001, ANN201
    cfg = load_config(None, TINY | overrides)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(
        upstream={"data": inputs["data"], "model": inputs["model"]},
        out_dir=out,
        work_dir=out.parent / f"{out.name}.work",
        reporter=reporter or NullReporter(),
    )
    return train_stage(cfg, ctx), ctx


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = mx.load(str(a)), mx.load(str(b))
    assert wa.keys() == wb.keys()
    return max(mx.abs(wa[k] - wb[k]).max().item() for k in wa)


def metric_rows(path: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r["loss"], r["learning_rate"]) for r in read_metrics(path)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    summary, _ = run_train(tiny_inputs, out)
    assert summary["steps"] == 8 and summary["resumed_from_step"] is None
    return out


def test_validation_loss_goes_down(uninterrupted: Path) -> None:
    valid = [r["loss"] for r in read_metrics(uninterrupted / "metrics.csv") if r["kind"] == "valid"]
    assert [r for r in read_metrics(uninterrupted / "metrics.csv") if r["kind"] == "valid"][0]["step"] == 0
    assert valid[-1] < valid[0]


def test_sigkill_then_rerun_gives_the_same_adapter(
    tiny_inputs: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, json
        sys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT / 'tests')!r}]
        from pathlib import Path
        from test_train import run_train
        inputs = {{k: Path(v) for k, v in json.loads(sys.argv[1]).items()}}
        summary, _ = run_train(inputs, Path(sys.argv[2]))
        print(json.dumps(summary))
    """)
    args = [sys.executable, "-c", script, json.dumps({k: str(v) for k, v in tiny_inputs.items()}), str(out)]
    ckpts = tmp_path / "out.work" / "checkpoints"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (ckpts / "step-000006" / "manifest.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint at step 6 in time"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapters.safetensors").exists(), "killed run must not have finished"

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed_from_step"] in (6, 7)
    assert max_abs_diff(out / "adapters.safetensors", uninterrupted / "adapters.safetensors") <= 1e-6
    assert metric_rows(out / "metrics.csv") == metric_rows(uninterrupted / "metrics.csv")


def test_corrupt_latest_checkpoint_is_reported_and_previous_used(
    tiny_inputs: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    class StopAt6(NullReporter):
        def progress(self, description: str, fraction: float) -> None:
            if description.startswith("train: step 6/"):
                raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted, match="step 6/8"):
        run_train(tiny_inputs, out, reporter=StopAt6())
    ckpts = tmp_path / "out.work" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-000006", "step-000003"]
    adapters = ckpts / "step-000006" / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:100])  # truncated

    path, problems = find_resumable(ckpts)
    assert path is not None and path.name == "step-000003"
    assert problems == [
        "checkpoint step-000006 is unusable: adapters.safetensors checksum mismatch (truncated or corrupt); "
        "falling back to an earlier one"
    ]

    logged: list[str] = []

    class Log(NullReporter):
        def log(self, message: str) -> None:
            logged.append(message)

    summary, _ = run_train(tiny_inputs, out, reporter=Log())
    assert summary["resumed_from_step"] == 3
    assert any("step-000006 is unusable" in m for m in logged)
    assert max_abs_diff(out / "adapters.safetensors", uninterrupted / "adapters.safetensors") <= 1e-6


def test_nan_weights_stop_with_the_step_and_keep_the_last_good_checkpoint(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import farense.train as train_mod

    loaded = {}
    real_load = train_mod.load_for_training

    def keep_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loaded["model"], tokenizer, compute = real_load(*args, **kwargs)
        return loaded["model"], tokenizer, compute

    class PoisonAtStep4(NullReporter):  # as an overflowing update would
        def progress(self, description: str, fraction: float) -> None:
            if description.startswith("train: step 4/"):
                model = loaded["model"]
                name, value = tree_flatten(model.trainable_parameters())[0]
                model.update(tree_unflatten([(name, value * float("nan"))]))

    monkeypatch.setattr(train_mod, "load_for_training", keep_model)
    with pytest.raises(TrainingError, match=r"adapter weights became NaN or inf at step 4;") as e:
        run_train(tiny_inputs, tmp_path / "out", reporter=PoisonAtStep4(),
                  **{"train.save_every": 1, "train.eval_every": 100, "train.log_every": 1})  # fmt: skip
    assert "Lower train.learning_rate" in str(e.value)
    names = [p.name for p in list_checkpoints(tmp_path / "out.work" / "checkpoints")]
    assert names[0] == "step-000003", "the last good checkpoint is the step before the NaN"
    restored = mx.load(str(tmp_path / "out.work" / "checkpoints" / names[0] / "adapters.safetensors"))
    assert all(mx.isfinite(v).all().item() for v in restored.values())
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_fit_batch_keeps_the_effective_batch() -> None:
    b, a, msg = fit_batch(lambda batch: batch * 10, batch=8, accum=2, budget=25)
    assert (b, a) == (2, 8)
    assert "effective batch 16, was 16" in msg
    assert fit_batch(lambda batch: batch, batch=4, accum=2, budget=100) == (4, 2, None)


def test_auto_fit_lowers_batch_when_memory_is_short(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import farense.train as train_mod

    monkeypatch.setattr(train_mod, "memory_budget_bytes", lambda: 1)  # nothing fits: down to batch 1
    logged: list[str] = []

    class Log(NullReporter):
        def log(self, message: str) -> None:
            logged.append(message)

    summary, _ = run_train(tiny_inputs, tmp_path / "out", reporter=Log(), **{"train.max_steps": 1})
    assert (summary["batch_size"], summary["grad_accumulation"]) == (1, 4)
    assert "training with batch 1 x accumulation 4 (effective batch 4, was 4)" in summary["memory_adjustment"]
    assert any("accumulation 4" in m for m in logged)


@pytest.mark.parametrize(
    ("field", "value", "observe"),
    [
        ("train.batch_size", 3, lambda s, st, cfgj: st["batch_size"] == 3),
        ("train.grad_accumulation", 1, lambda s, st, cfgj: st["grad_accumulation"] == 1),
        ("train.max_steps", 3, lambda s, st, cfgj: s["steps"] == 3),
        ("train.lora_rank", 4, lambda s, st, cfgj: cfgj["lora_parameters"]["rank"] == 4),
        ("train.lora_scale", 2.0, lambda s, st, cfgj: cfgj["lora_parameters"]["scale"] == 2.0),
        ("train.lora_targets", ["q", "v"], lambda s, st, cfgj: cfgj["lora_parameters"]["keys"]
         == ["self_attn.q_proj", "self_attn.v_proj"]),
        ("train.compute_path", "quantized", lambda s, st, cfgj: s["compute_path"] == "quantized"),
        ("train.masked_lm_head", False, lambda s, st, cfgj: s["loss"] == "default"),
        ("train.masked_lm_head", True, lambda s, st, cfgj: s["loss"] == "masked-head"),
        ("train.fast_math", True,
         lambda s, st, cfgj: s["cross_entropy"] == ("fast_math" if s["device"] == "Device(cpu, 0)" else "mlx")),
        ("train.fast_math", False, lambda s, st, cfgj: s["cross_entropy"] == "mlx"),
    ],
)
def test_config_fields_reach_the_trainer(
    tiny_inputs: dict[str, Path], tmp_path: Path, field: str, value: object, observe
) -> None:  # noqa: ANN001
    summary, _ = run_train(tiny_inputs, tmp_path / "out", **{"train.max_steps": 3, field: value})
    state = json.loads((tmp_path / "out" / "training_state.json").read_text())
    cfgj = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert observe(summary, state, cfgj)


def test_lora_shape_layers_lr_and_logging_follow_the_config(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_train(
        tiny_inputs, out,
        **{"train.lora_rank": 4, "train.lora_layers": 1, "train.lora_targets": ["q"], "train.log_every": 1,
           "train.eval_every": 2, "train.warmup_steps": 4, "train.learning_rate": 5e-3, "train.max_steps": 4,
           "train.keep_checkpoints": 1, "train.save_every": 1},
    )  # fmt: skip
    weights = mx.load(str(out / "adapters.safetensors"))
    assert sorted(weights) == ["model.layers.1.self_attn.q_proj.lora_a", "model.layers.1.self_attn.q_proj.lora_b"]
    assert weights["model.layers.1.self_attn.q_proj.lora_a"].shape[1] == 4
    rows = read_metrics(out / "metrics.csv")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [0, 2, 4]
    lrs = [r["learning_rate"] for r in train_rows]
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] <= 5e-3 * 1.0001, "linear warm-up over 4 steps"


def test_schedule_steps_stops_the_run_partway_down_the_cosine(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    common = {"train.max_steps": 4, "train.warmup_steps": 0, "train.learning_rate": 1e-3, "train.log_every": 1}
    run_train(tiny_inputs, tmp_path / "run", **common)
    run_train(tiny_inputs, tmp_path / "longer", **common, **{"train.schedule_steps": 8})
    lrs = {name: [r["learning_rate"] for r in read_metrics(tmp_path / name / "metrics.csv") if r["kind"] == "train"]
           for name in ("run", "longer")}  # fmt: skip
    assert len(lrs["run"]) == len(lrs["longer"]) == 4, "the run still takes max_steps steps"
    # step k (counted from 1) takes the schedule's value after k - 1 updates: a tenth of the peak plus the cosine
    cosine = lambda k, length: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (k - 1) / length))  # noqa: E731
    assert lrs["run"] == pytest.approx([cosine(k, 4) for k in range(1, 5)], rel=1e-3)
    assert lrs["longer"] == pytest.approx([cosine(k, 8) for k in range(1, 5)], rel=1e-3)
    assert lrs["longer"][-1] > 2 * lrs["run"][-1]


def test_linear_decay_to_zero_follows_the_config(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    run_train(tiny_inputs, tmp_path / "run", **{"train.max_steps": 4, "train.warmup_steps": 0, "train.log_every": 1,
                                                "train.learning_rate": 1e-3, "train.lr_decay": "linear",
                                                "train.final_lr_fraction": 0.0})  # fmt: skip
    lrs = [r["learning_rate"] for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["kind"] == "train"]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], rel=1e-3)  # step k takes the value after k - 1 updates


def test_adam_bias_correction_and_beta2_set_the_first_update() -> None:
    """mlx's AdamW leaves its moments uncorrected by default: the first update is 0.1 g / sqrt(0.001 g^2), about
    3.16 x the learning rate; corrected it is the learning rate; with beta2 0.99 uncorrected, 0.1 / 0.1 = 1x."""
    import mlx.nn as nn

    from farense.config import TrainConfig
    from farense.train import build_optimizer

    def first_update(**over: object) -> float:
        tcfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, final_lr_fraction=1.0, **over)
        layer = nn.Linear(4, 1, bias=False)
        layer.weight = mx.ones((1, 4))
        build_optimizer(tcfg, 10).update(layer, {"weight": mx.full((1, 4), 0.5)})
        return float(1.0 - layer.weight[0, 0].item())

    assert first_update() == pytest.approx(1e-3 * 0.1 / math.sqrt(0.001), rel=1e-4)
    assert first_update(adam_bias_correction=True) == pytest.approx(1e-3, rel=1e-4)
    assert first_update(adam_beta2=0.99) == pytest.approx(1e-3, rel=1e-4)


def test_weight_decay_seed_and_adam_correction_change_the_result(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    base = {"train.max_steps": 2}
    run_train(tiny_inputs, tmp_path / "a", **base)
    run_train(tiny_inputs, tmp_path / "b", **base, **{"train.seed": 1})
    run_train(tiny_inputs, tmp_path / "c", **base, **{"train.weight_decay": 0.5})
    run_train(tiny_inputs, tmp_path / "d", **base)
    run_train(tiny_inputs, tmp_path / "e", **base, **{"train.adam_bias_correction": True})
    a = tmp_path / "a" / "adapters.safetensors"
    assert max_abs_diff(a, tmp_path / "d" / "adapters.safetensors") == 0.0, "same config, same result"
    assert max_abs_diff(a, tmp_path / "b" / "adapters.safetensors") > 0
    assert max_abs_diff(a, tmp_path / "c" / "adapters.safetensors") > 0
    assert max_abs_diff(a, tmp_path / "e" / "adapters.safetensors") > 0, "the compiled step sees the knob"


def test_nan_loss_stops_naming_the_step(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import farense.train as train_mod

    real_collate = train_mod.collate
    calls = {"n": 0}

    def nan_lengths_after_3_steps(examples, indices, max_seq_length):  # noqa: ANN001, ANN202
        batch, lengths = real_collate(examples, indices, max_seq_length)
        calls["n"] += 1
        if calls["n"] > 2 + 6:  # 2 validation batches, then steps 1-3; an empty mask gives 0/0 = NaN
            lengths = mx.zeros_like(lengths)
        return batch, lengths

    monkeypatch.setattr(train_mod, "collate", nan_lengths_after_3_steps)
    with pytest.raises(TrainingError, match=r"loss became nan at step 4 \(epoch 0, batch 6\)"):
        run_train(tiny_inputs, tmp_path / "out", **{"train.save_every": 1, "train.eval_every": 100})
    names = [p.name for p in list_checkpoints(tmp_path / "out.work" / "checkpoints")]
    assert names[0] == "step-000003"


def test_masked_head_trains_to_the_same_adapter_as_default_loss(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    settings = {"train.max_steps": 4, "train.lora_dropout": 0.0}
    masked, _ = run_train(tiny_inputs, tmp_path / "masked", **settings)
    default, _ = run_train(tiny_inputs, tmp_path / "default", **settings, **{"train.masked_lm_head": False})
    assert (masked["loss"], default["loss"]) == ("masked-head", "default")
    diff = max_abs_diff(tmp_path / "masked" / "adapters.safetensors", tmp_path / "default" / "adapters.safetensors")
    assert diff < 1e-4
    assert abs(masked["best_val_loss"] - default["best_val_loss"]) < 1e-4


def test_gradient_clipping_bounds_the_step_and_is_inert_above_the_norm(
    tiny_inputs: dict[str, Path], tmp_path: Path
) -> None:
    base = {"train.max_steps": 3, "train.lora_dropout": 0.0}
    run_train(tiny_inputs, tmp_path / "none", **base)
    run_train(tiny_inputs, tmp_path / "loose", **base, **{"train.max_grad_norm": 1e6})
    run_train(tiny_inputs, tmp_path / "tight", **base, **{"train.max_grad_norm": 1e-10})
    none = tmp_path / "none" / "adapters.safetensors"
    assert max_abs_diff(none, tmp_path / "loose" / "adapters.safetensors") == 0.0, "a bound above the norm clips nothing"
    # lora_b starts at zero, so its size is what training moved it. A gradient clipped far below Adam's epsilon
    # (1e-8) barely moves it.
    moved = lambda p: max(mx.abs(v).max().item() for k, v in mx.load(str(p)).items() if k.endswith("lora_b"))  # noqa: E731
    assert moved(none) > 0
    assert moved(tmp_path / "tight" / "adapters.safetensors") < 0.05 * moved(none)


def test_the_one_graph_step_trains_as_the_two_graph_step(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import farense.train as train_mod

    settings = {"train.max_steps": 4, "train.lora_dropout": 0.0, "train.grad_accumulation": 1}
    one, _ = run_train(tiny_inputs, tmp_path / "one", **settings)
    monkeypatch.setattr(train_mod, "ONE_GRAPH_STEP", False)
    two, _ = run_train(tiny_inputs, tmp_path / "two", **settings)
    assert one["grad_accumulation"] == two["grad_accumulation"] == 1
    diff = max_abs_diff(tmp_path / "one" / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert diff < 1e-5
    assert abs(one["best_val_loss"] - two["best_val_loss"]) < 1e-5
    moved = max(mx.abs(v).max().item() for k, v in mx.load(str(tmp_path / "one" / "adapters.safetensors")).items()
                if k.endswith("lora_b"))  # fmt: skip
    assert moved > 0  # it trained


def test_ctrl_c_while_a_step_is_in_flight_saves_that_step_exactly(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C is delivered when the main thread wakes from waiting on the device, after the step's update is
    already in the model but before the loop has counted it: the checkpoint must still say which step it holds."""
    import farense.train as train_mod

    one_graph = {"train.grad_accumulation": 1, "train.batch_size": 4}
    straight, _ = run_train(tiny_inputs, tmp_path / "straight", **one_graph)
    real_sum, calls = train_mod.distributed.sum_across, []

    def interrupted_at_step_5(value, group):  # noqa: ANN001, ANN202 - called once a step, after the loss is read
        calls.append(value)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_sum(value, group)

    monkeypatch.setattr(train_mod.distributed, "sum_across", interrupted_at_step_5)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted, match="step 5/8"):
        run_train(tiny_inputs, out, **one_graph)
    monkeypatch.setattr(train_mod.distributed, "sum_across", real_sum)
    summary, _ = run_train(tiny_inputs, out, **one_graph)
    assert summary["resumed_from_step"] == 5
    assert max_abs_diff(out / "adapters.safetensors", tmp_path / "straight" / "adapters.safetensors") <= 1e-6


def test_full_fine_tuning_trains_and_saves_every_weight_that_validate_loads(
    tiny_inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_train(tiny_inputs, out, **{"train.fine_tune_type": "full", "train.max_steps": 3})
    cfgj = json.loads((out / "adapter_config.json").read_text())
    assert cfgj["fine_tune_type"] == "full"
    saved = mx.load(str(out / "adapters.safetensors"))
    assert not any("lora" in k for k in saved)
    base, _, _ = load_base(tiny_inputs["model"])
    base_weights = dict(tree_flatten(base.parameters()))
    assert saved.keys() == base_weights.keys(), "every weight of the dense base is trained and saved"
    moved = [k for k in saved if mx.abs(saved[k] - base_weights[k]).max().item() > 0]
    assert any(k.endswith("q_proj.weight") for k in moved) and any("embed_tokens" in k for k in moved)
    tuned = attach_adapter(base, out)  # what the validate stage does: mlx-lm's load_adapters over the dense base
    loaded = dict(tree_flatten(tuned.parameters()))
    assert all(mx.array_equal(loaded[k], saved[k]).item() for k in saved)


def test_full_fine_tuning_on_the_quantized_path_says_what_to_set(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="compute_path=dequantized"):
        run_train(tiny_inputs, tmp_path / "out",
                  **{"train.fine_tune_type": "full", "train.compute_path": "quantized", "train.max_steps": 1})
