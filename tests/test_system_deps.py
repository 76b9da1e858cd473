"""`make test` brings what its tests need: as root it installs Chromium and PostgreSQL with OpenBLAS (here they
are present, so it installs nothing); otherwise it names what is missing and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-system-deps.sh"


def test_make_test_installs_the_test_dependencies_first() -> None:
    plan = subprocess.run(["make", "-n", "test", f"STAMP={os.devnull}"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    lines = plan.splitlines()
    deps = next(i for i, line in enumerate(lines) if "install-system-deps.sh --test" in line)
    tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert deps < tests, plan


def test_everything_the_tests_need_is_here_after_the_script() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--test"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert shutil.which("chromium") or shutil.which("chromium-browser"), proc.stdout + proc.stderr
    assert shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as an unprivileged user")
def test_without_root_it_names_what_is_missing_and_the_fix() -> None:
    # A PATH with the script's tools but no chromium; not under pytest's root-only tmp folders.
    bin_dir = Path(tempfile.mkdtemp(prefix="farense-path-"))
    bin_dir.chmod(0o755)
    for tool in ("uname", "id", "ls"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    # A copy the unprivileged user can read wherever the checkout lies (a clone in a 0700 folder is unreadable).
    script = bin_dir / SCRIPT.name
    shutil.copyfile(SCRIPT, script)
    script.chmod(0o755)
    proc = subprocess.run(["/bin/bash", str(script), "--test"], env={"PATH": str(bin_dir)}, user="nobody",
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    shutil.rmtree(bin_dir)
    assert proc.returncode == 0
    assert "missing chromium" in proc.stderr and "sudo apt-get install chromium" in proc.stderr, proc.stderr
