#!/usr/bin/env bash
# OpenBLAS for MLX's CPU matmuls on Linux (the mlx-cpu wheel bundles a ~30x slower reference BLAS).
# Installs it when we may (root with apt-get); otherwise prints the exact fix and carries on.
set -u
[ "$(uname -s)" = Linux ] || exit 0
for f in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib64/libopenblas.so.0; do
  [ -e "$f" ] && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing libopenblas0-pthread (fast CPU matmuls for MLX)"
  apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null; }
else
  echo "warning: OpenBLAS not found; CPU training will be ~25x slower. Fix: sudo apt-get install libopenblas0-pthread" >&2
fi
exit 0
