"""The whole pipeline without Prefect, timed per stage, as one JSON line (a benchmark, not a test).

    python benchmarks/pipeline_run.py [--config farense.yaml] [--set model.source=/path/model.gguf ...]

Runs data -> model -> train -> validate -> benchmark -> export with `farense.stages.run_local` (the runner that needs
no Prefect server: for hosts where Prefect is not installed, such as a rented GPU), into the config's artifacts
folder, then prints each stage's wall seconds and key, the device MLX ran on, and the headline figures the stages
wrote: training tokens/s and steps, fact accuracy base vs tuned, live-information declines, validation loss, and
the export gate's decision.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from farense.config import STAGES, load_config, parse_override  # noqa: E402
from farense.progress import NullReporter  # noqa: E402
from farense.stages import run_local  # noqa: E402
from farense.store import ArtifactStore  # noqa: E402


class LogToStderr(NullReporter):
    """Prints each stage's log lines to stderr (progress for a person watching)."""

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args()
    cfg = load_config(args.config, dict(parse_override(t) for t in args.set), root=ROOT)
    seconds: dict[str, float] = {}
    results: dict[str, dict] = {}
    for stage in STAGES:  # one stage at a time, so each gets its own wall time
        start = time.perf_counter()
        built = run_local(cfg, until=stage, reporter=LogToStderr())
        if stage in built:  # a disabled stage (benchmark.enabled: false) is not in the plan
            results[stage] = built[stage]
            seconds[stage] = round(time.perf_counter() - start, 2)
    store = ArtifactStore(cfg.artifacts_dir)
    summary = {s: (store.get(s, results[s]["key"]).manifest.get("summary") or {}) for s in results}
    metrics = json.loads((Path(results["validate"]["path"]) / "metrics.json").read_text())
    train, gate = summary.get("train", {}), summary.get("export", {}).get("gate", {})
    print(json.dumps({
        "measure": "pipeline", "device": str(mx.default_device()), "machine": platform.machine(),
        "mlx": mx.__version__, "seconds": seconds, "total_seconds": round(sum(seconds.values()), 2),
        "keys": {s: r["key"] for s, r in results.items()}, "built": {s: r["built"] for s, r in results.items()},
        "train_steps": train.get("steps"), "train_tokens_per_s": train.get("tokens_per_s"),
        "compute_path": train.get("compute_path"),
        "fact_accuracy": {m: metrics[m].get("fact_accuracy") for m in ("base", "tuned")},
        "live_decline_rate": metrics["tuned"].get("live_decline_rate"),
        "facts_declined": metrics["tuned"].get("facts_declined"),
        "val_loss": {m: metrics[m].get("val_loss") for m in ("base", "tuned")},
        "export_gate": {"publish": gate.get("publish"), "reasons": gate.get("reasons")},
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
