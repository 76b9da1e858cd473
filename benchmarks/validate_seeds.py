"""A recipe's validate-stage figures over several seeds, one JSON line per seed (a benchmark, not a test).

    python benchmarks/validate_seeds.py --name default [overrides...] --seeds 100 101 102
    python benchmarks/validate_seeds.py --config configs/cpu-quality.yaml --name cpu-quality --seeds 100 101

(The overrides come before --seeds, which takes every number after it.)

Runs the pipeline's own stages up to validate (data, model, train, validate) for each seed, one after the other,
and prints the validate stage's metrics for base and tuned: every scalar of metrics.json, the dev figures and the
sealed test set's alike. This reports recipes already chosen on the dev questions (benchmarks/recipe_sweep.py); it
chooses nothing. On a CUDA host several of these run at once, one per seed list (benchmarks/recipe_sweep_gpus.sh
does the same for sweeps).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from farense.config import load_config, parse_override  # noqa: E402
from farense.stages import run_local  # noqa: E402


def scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "farense.yaml")
    ap.add_argument("--name", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=None, help="copy each seed's answers.jsonl to OUT/NAME/")
    ap.add_argument("--cache-limit-gb", type=float, default=None,
                    help="mx.set_cache_limit: several runs sharing one GPU (15 at once on an H100 ran out of memory)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.path=extra/data")
    # Intermixed: recipe_sweep_gpus.sh puts its own overrides before a run line's options and overrides; plain
    # parse_args stops collecting overrides at the first option (what cost a device call on 2026-12-07).
    args = ap.parse_intermixed_args()
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.cache_limit_gb is not None:
        mx.set_cache_limit(int(args.cache_limit_gb * 2**30))
    for seed in args.seeds:
        cfg = load_config(args.config, overrides | {"train.seed": seed}, root=ROOT)
        start = time.perf_counter()
        paths = run_local(cfg, until="validate")
        validated = Path(paths["validate"]["path"])
        metrics = json.loads((validated / "metrics.json").read_text())
        if args.out:
            (args.out / args.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(validated / "answers.jsonl", args.out / args.name / f"answers-seed-{seed}.jsonl")
        row = {"name": args.name, "seed": seed, "overrides": overrides, "seconds": round(time.perf_counter() - start, 1),
               "base": scalars(metrics["base"]), "tuned": scalars(metrics["tuned"]), "scorer": metrics.get("scorer"),
               "machine": platform.machine(), "device": str(mx.default_device()), "mlx": mx.__version__}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
