"""The benchmark stage's pictures: training loss curves and the comparison bar charts (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "Training and validation loss") -> Path:
    """Train and validation loss against the optimizer step, from the trainer's metrics.csv rows."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for kind, style in (("train", "-"), ("valid", "o-")):
        pts = [(r["step"], r["loss"]) for r in rows if r["kind"] == kind and r["loss"] != ""]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{kind} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _bars(ax: Any, labels: Sequence[str], values: Sequence[float | None], title: str, unit: str) -> None:
    shown = [(lab, v) for lab, v in zip(labels, values) if v is not None]
    if not shown:
        ax.set_visible(False)
        return
    names, nums = zip(*shown)
    bars = ax.bar(range(len(nums)), nums, color=[f"C{i}" for i in range(len(nums))])
    ax.set_xticks(range(len(nums)), names, rotation=15, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit, fontsize=8)
    for b, v in zip(bars, nums):
        ax.annotate(_short(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _short(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def plot_comparison(results: dict[str, Any], path: Path) -> Path:
    """Bar charts of everything `comparison_results.json` measured: training speed and memory per mode,
    generation speed and memory base vs tuned, size on disk, validation loss and Q&A score."""
    train = results["training"]
    gen = results["generation"]
    disk = results["disk"]
    quality = results["quality"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=110)
    t_labels = [f"{r['mode']}\n{r['batch_size']}x{r['max_seq_length']}" for r in train]  # the run's batch shape
    _bars(axes[0, 0], t_labels, [r["tokens_per_s"] for r in train], "Training throughput", "tokens/s")
    _bars(axes[0, 1], t_labels, [r["peak_gb"] for r in train], "Training peak memory", "GB")
    g_labels = [r["label"] for r in gen]
    ax = axes[0, 2]
    if gen:
        x = range(len(gen))
        w = 0.4
        ax.bar([i - w / 2 for i in x], [r["prompt_tps"] for r in gen], w, label="prompt")
        ax.bar([i + w / 2 for i in x], [r["generation_tps"] for r in gen], w, label="generation")
        ax.set_xticks(list(x), g_labels, rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title("Generation throughput", fontsize=10)
        ax.set_ylabel("tokens/s (log)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.set_visible(False)
    d_labels = [d["label"] for d in disk]
    ax = axes[1, 0]
    _bars(ax, d_labels, [d["bytes"] / 1e6 for d in disk], "Size on disk", "MB")
    if disk:
        ax.set_yscale("log")
    _bars(axes[1, 1], ["base", "tuned"], [quality["base"]["val_loss"], quality["tuned"]["val_loss"]],
          "Validation loss (lower is better)", "nats/token")  # fmt: skip
    if quality["tuned"].get("fact_accuracy") is not None:
        n = quality["tuned"].get("fact_accuracy_n")
        _bars(axes[1, 2], ["base", "tuned"], [quality["base"]["fact_accuracy"], quality["tuned"]["fact_accuracy"]],
              f"Dev fact accuracy, 95% interval (n={n})", "share right")  # fmt: skip
        if all(quality[m].get("fact_accuracy_low") is not None for m in ("base", "tuned")):
            values = [quality[m]["fact_accuracy"] for m in ("base", "tuned")]
            low = [v - quality[m]["fact_accuracy_low"] for v, m in zip(values, ("base", "tuned"))]
            high = [quality[m]["fact_accuracy_high"] - v for v, m in zip(values, ("base", "tuned"))]
            axes[1, 2].errorbar(range(2), values, yerr=[low, high], fmt="none", ecolor="black", capsize=4)
    else:
        _bars(axes[1, 2], ["base", "tuned"], [quality["base"]["qa_f1"], quality["tuned"]["qa_f1"]],
              "Held-out Q&A token F1 (higher is better)", "F1")  # fmt: skip
    fig.suptitle(results.get("title", "LoRA vs QLoRA, base vs tuned"), fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
