"""Many processes compiling MLX's CUDA kernels into one cache folder at once: how many fail (a benchmark).

    python benchmarks/kernel_cache_race.py --procs 24 --rounds 2

Each round starts `--procs` processes together on a fresh cache folder, spread over the host's GPUs, each running
`qlora_step.py --shape tiny --path recompute` (the kernels of a QLoRA step). Mode `mlx`: every process points
MLX_PTX_CACHE_DIR at the same folder, as farense did before; MLX writes each cached module in place, so a process
can load another's half-written file. Mode `farense`: each process calls `farense.kernel_cache.use_kernel_cache`
(its own folder, seeded from the shared one, published with atomic renames at exit). One JSON line per round:
processes that failed, the first error, the modules in the shared folder, seconds; then one process on the
filled `farense` cache, which should compile nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import os, runpy, sys
sys.path[:0] = [{src!r}, {bench!r}]
mode, folder = sys.argv[1], sys.argv[2]
if mode == "farense":
    from farense.kernel_cache import use_kernel_cache
    use_kernel_cache(folder)
else:
    import mlx.core as mx
    os.environ["MLX_PTX_CACHE_DIR"] = os.path.join(folder, "mlx-" + mx.__version__)
sys.argv = [{step!r}, "--shape", "tiny", "--path", "recompute", "--steps", "3"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gpus() -> int:
    if not shutil.which("nvidia-smi"):
        return 1
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return max(1, len(out.stdout.splitlines()))


def round_(mode: str, procs: int, folder: Path) -> dict:
    code = CHILD.format(src=str(ROOT / "src"), bench=str(ROOT / "benchmarks"), step=str(ROOT / "benchmarks" / "qlora_step.py"))
    n, start = gpus(), time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", code, mode, str(folder)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ,
                                "CUDA_VISIBLE_DEVICES": str(i % n)})  # fmt: skip
               for i in range(procs)]
    errors = []
    for p in running:
        out, err = p.communicate()
        if p.returncode != 0 or not any(line.startswith("{") for line in out.splitlines()):
            errors.append((err.strip().splitlines() or ["?"])[-1][:300])
    modules = sum(1 for p in folder.rglob("*.ptx") if ".proc" not in p.parts)
    return {"mode": mode, "procs": procs, "failed": len(errors), "first_error": errors[0] if errors else None,
            "shared_modules": modules, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for r in range(args.rounds):
        for mode in ("mlx", "farense"):
            folder = Path(tempfile.mkdtemp(prefix=f"kc-{mode}-"))
            print(json.dumps({"round": r, **round_(mode, args.procs, folder)}), flush=True)
            if mode == "farense" and r == args.rounds - 1:
                print(json.dumps({"round": r, "then": "one process on the filled cache", **round_(mode, 1, folder)}),
                      flush=True)  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
