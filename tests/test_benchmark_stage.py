"""Benchmark stage on a tiny model: every mode measured, results file, pictures, table, config reaching the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farense.benchmark import COMPARISON_PNG, LOSS_PNG, RESULTS_FILE, ctx_key, table_rows
from test_evaluate import RecordingReporter, tiny_project

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], RecordingReporter]:
    project = tiny_project(tmp_path_factory.mktemp("bench"), **{"benchmark.train_steps": 3,
                                                                  "benchmark.native_generation": True})
    reporter = RecordingReporter()
    return project.run(until="benchmark", reporter=reporter), reporter


def test_results_cover_every_mode_and_comparison(benchmarked: tuple) -> None:
    paths, _ = benchmarked
    results = json.loads((paths["benchmark"] / RESULTS_FILE).read_text())
    modes = {r["mode"]: r for r in results["training"]}
    assert set(modes) == {"lora", "qlora-recompute", "qlora-native"}
    assert {r["compute_path"] for r in modes.values()} == {"dequantized", "recompute", "quantized"}
    assert modes["lora"]["timed_steps"] == 3 and modes["lora"]["batch_size"] == 2
    assert modes["qlora-native"]["timed_steps"] == 1 and modes["qlora-native"]["batch_size"] == 1
    assert modes["qlora-native"]["max_seq_length"] == 64 and modes["qlora-native"]["weights_dtype"] == "float32"
    for r in modes.values():
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_gb"] > 0
    # Dense weights are bigger than the 4-bit ones the qlora modes keep.
    assert modes["lora"]["weight_bytes"] > modes["qlora-recompute"]["weight_bytes"]
    # Same first batch, same adapter init: every mode computes the same loss up to rounding.
    assert modes["lora"]["first_loss"] == pytest.approx(modes["qlora-recompute"]["first_loss"], rel=1e-3)
    gen = {r["label"]: r for r in results["generation"]}
    dtype = next(r["dtype"] for r in gen.values() if r["compute_path"] == "quantized")
    assert {"base", "tuned", f"base (quantized, {dtype})", f"tuned (quantized, {dtype})"} == set(gen)
    for r in gen.values():
        assert r["generation_tokens"] == 4 and r["prompt_tps"] > 0 and r["generation_tps"] > 0
    disk = {d["label"]: d["bytes"] for d in results["disk"]}
    dense = next(v for k, v in disk.items() if k.startswith("base dense"))
    assert dense > disk["base 4-bit"] > 0 and disk["adapter"] > 0
    validate = json.loads((paths["validate"] / "metrics.json").read_text())
    assert results["quality"]["tuned"]["val_loss"] == validate["tuned"]["val_loss"]


def test_pictures_table_and_summary(benchmarked: tuple) -> None:
    paths, reporter = benchmarked
    for name in (LOSS_PNG, COMPARISON_PNG):
        assert (paths["benchmark"] / name).read_bytes()[:8] == PNG_MAGIC
    images = reporter.of("image")
    assert images["benchmark-comparison-chart"] == str(paths["benchmark"] / COMPARISON_PNG)
    rows = reporter.of("table")["benchmark-comparison"]
    assert {r["comparison"] for r in rows} == {"training", "generation", "size on disk", "quality"}
    summary = json.loads((paths["benchmark"] / "manifest.json").read_text())["summary"]
    assert set(summary["training_tokens_per_s"]) == {"lora", "qlora-recompute", "qlora-native"}
    assert summary["seconds"] > 0


def test_modes_and_sizes_follow_the_config(tmp_path: Path) -> None:
    project = tiny_project(tmp_path, **{
        "benchmark.train_modes": ["qlora-recompute", "qlora-native"], "benchmark.native_train_steps": 0,
        "benchmark.native_generation": False, "benchmark.measure_dense_size": False,
        "benchmark.train_steps": 1, "benchmark.warmup_steps": 0, "benchmark.generation_tokens": 3,
        "benchmark.max_seq_length": 48,
    })  # fmt: skip
    results = json.loads((project.run(until="benchmark")["benchmark"] / RESULTS_FILE).read_text())
    assert [r["mode"] for r in results["training"]] == ["qlora-recompute"]
    row = results["training"][0]
    assert (row["timed_steps"], row["warmup_steps"], row["max_seq_length"]) == (1, 0, 48)
    assert [r["label"] for r in results["generation"]] == ["base", "tuned"]
    assert results["generation"][0]["generation_tokens"] == 3
    assert [d["label"] for d in results["disk"]] == ["base 4-bit", "adapter"]
    assert table_rows(results)


def test_artifact_links_point_at_the_final_folder() -> None:
    assert ctx_key(Path("/a/benchmark/.tmp-0123456789abcdef-42-99")) == "0123456789abcdef"
    assert ctx_key(Path("/a/benchmark/0123456789abcdef")) == "0123456789abcdef"


def test_native_mode_runs_short_on_cpu_and_warms_up_like_the_others_on_a_gpu() -> None:
    from farense.benchmark import training_run_shape
    from farense.config import BenchmarkConfig

    b = BenchmarkConfig(train_steps=6, warmup_steps=2, batch_size=2, max_seq_length=256,
                        native_train_steps=1, native_max_seq_length=64)  # fmt: skip
    assert training_run_shape(b, "qlora-native", on_cpu=True) == (1, 0, 1, 64)
    # On a GPU the first steps compile CUDA kernels: they are warm-up, never timed.
    assert training_run_shape(b, "qlora-native", on_cpu=False) == (6, 2, 2, 256)
    for mode in ("lora", "qlora-recompute"):
        assert training_run_shape(b, mode, on_cpu=True) == training_run_shape(b, mode, on_cpu=False) == (6, 2, 2, 256)
