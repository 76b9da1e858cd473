"""keep_freed_host_memory: freed host buffers are reused, not mapped afresh (page faults counted)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Allocates and frees a 64 MB buffer 6 times; prints the minor page faults of the last 5.
SCRIPT = textwrap.dedent(f"""
    import resource, sys
    sys.path.insert(0, {str(SRC)!r})
    import farense, mlx.core as mx
    from farense.memory import keep_freed_host_memory
    if sys.argv[1] == "kept":
        assert keep_freed_host_memory()
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = mx.ones((16 << 20,)); mx.eval(x); del x
    before = faults()
    for _ in range(5):
        x = mx.ones((16 << 20,)) * 2; mx.eval(x); del x
    print(faults() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_kept_host_memory_is_reused_instead_of_faulted_in_again() -> None:
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    default, kept = faults("default"), faults("kept")
    # 64 MB is 16,384 pages: the default maps (and the kernel zeroes) a fresh buffer each time.
    assert default >= 5 * 16384 * 0.9
    assert kept < default / 3
