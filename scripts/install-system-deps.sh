#!/usr/bin/env bash
# System packages farense uses, installed when we may (root with apt-get); otherwise the exact fix is printed and
# we carry on (the tests that need a missing piece skip, naming it).
#   scripts/install-system-deps.sh          OpenBLAS, for MLX's CPU matmuls (the mlx-cpu wheel bundles a ~30x
#                                           slower reference BLAS)
#   scripts/install-system-deps.sh --test   also what `make test` needs: Chromium (the Prefect UI check), the
#                                           PostgreSQL server (the multi-host server test) and Node with npm (the
#                                           Express example that tests/test_serve_clients.py runs)
set -u
[ "$(uname -s)" = Linux ] || exit 0
missing=()
have_openblas=no
for f in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib64/libopenblas.so.0; do
  [ -e "$f" ] && have_openblas=yes
done
[ $have_openblas = yes ] || missing+=(libopenblas0-pthread)
if [ "${1:-}" = --test ]; then
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || missing+=(postgresql)
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } \
    || echo "warning: could not install ${missing[*]}" >&2
else
  echo "warning: missing ${missing[*]}; fix: sudo apt-get install ${missing[*]}" >&2
  [ $have_openblas = yes ] || echo "  (without OpenBLAS CPU training is ~25x slower)" >&2
fi
exit 0
