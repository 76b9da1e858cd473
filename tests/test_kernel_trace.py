"""benchmarks/kernel_trace.py's pure parts: kernel names to categories, and per-step sums of a trace's events."""

from __future__ import annotations

import pytest

from benchmarks import kernel_trace


@pytest.mark.parametrize(("name", "category"), [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "gemm"),
    ("custom_kernel_farense_affine4_dequantize", "dequantize"),
    ("void mlx::core::cu::affine_dequantize<__nv_bfloat16, 64, 4>(...)", "dequantize"),
    ("void mlx::core::cu::qmm_t<__nv_bfloat16, 64, 4>(...)", "quantized_matmul"),
    ("void mlx::core::cu::softmax<__nv_bfloat16, float, 256, 4, true>(...)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_kernel0_0", "attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(...)", "attention"),
    ("void mlx::core::cu::rms_norm<__nv_bfloat16, 256, 8>(...)", "norm_rope"),
    ("void mlx::core::cu::rope_single<__nv_bfloat16, false, false>(...)", "norm_rope"),
    ("void mlx::core::cu::row_reduce_simple<float, float, Sum, 4>(...)", "reduce"),
    ("void mlx::core::cu::copy_gg<__nv_bfloat16, __nv_bfloat16, int>(...)", "copy_gather"),
    ("void mlx::core::cu::binary_vv<Multiply, __nv_bfloat16, __nv_bfloat16, 8>(...)", "elementwise"),
    ("mlx::core::cu::SigmoidMultiplyMultiply_contiguous_uint32_t_bfloat16", "elementwise"),
])  # fmt: skip
def test_kernel_names_fall_in_their_category(name: str, category: str) -> None:
    assert kernel_trace.kernel_category(name) == category


def test_busy_time_counts_overlapping_kernels_once() -> None:
    assert kernel_trace.busy_seconds([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert kernel_trace.busy_seconds([]) == 0


def test_summary_is_per_step_and_ranks_kernels_by_time() -> None:
    kernels = []
    for step in range(2):  # steps 105 us apart: a 60 us gemm, a 25 us dequantize, 2 x 5 us elementwise
        t = step * 105.0
        kernels += [{"name": "nvjet_hsh_gemm", "ts": t, "dur": 60}, {"name": "farense_dequantize", "ts": t + 60,
                     "dur": 25}, {"name": "binary_vv<Add>", "ts": t + 85, "dur": 5},
                    {"name": "binary_vv<Add>", "ts": t + 90, "dur": 5}]
    s = kernel_trace.summarize_kernels(kernels, steps=2, top=2)
    assert s["kernels_per_step"] == 4 and s["kernel_ms_per_step"] == 0.095 and s["busy_ms_per_step"] == 0.095
    assert s["span_ms_per_step"] == 0.1  # the last kernel ends at 200 us: the 10 us gap between steps counts here
    assert s["ms_per_step"] == {"gemm": 0.06, "dequantize": 0.025, "elementwise": 0.01}
    assert [k["name"] for k in s["top"]] == ["nvjet_hsh_gemm", "farense_dequantize"]
    assert s["top"][0]["calls_per_step"] == 1 and s["top"][1]["category"] == "dequantize"


def test_idle_gaps_are_charged_to_the_kernel_the_gpu_waited_for() -> None:
    kernels = [{"name": "gemm_a", "ts": 0, "dur": 10}, {"name": "small_add", "ts": 4, "dur": 2},
               {"name": "cast", "ts": 15, "dur": 1}, {"name": "small_add", "ts": 20, "dur": 1},
               {"name": "gemm_a", "ts": 21, "dur": 9}]  # fmt: skip
    s = kernel_trace.summarize_kernels(kernels, steps=1)
    assert s["idle_ms_per_step"] == 0.009  # 10-15 and 16-20: span 30 us, busy 21 us
    assert s["idle_before"] == [{"name": "cast", "idle_ms_per_step": 0.005, "gaps_per_step": 1.0},
                                {"name": "small_add", "idle_ms_per_step": 0.004, "gaps_per_step": 1.0}]
    assert s["calls_per_step"] == {"elementwise": 3.0, "gemm": 2.0}
