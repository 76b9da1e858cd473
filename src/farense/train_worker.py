"""One rank of data-parallel training: `python -m farense.train_worker JOB.json`, started by
`farense.distributed.launch_train` (or `mlx.launch`), one process per rank.

It runs the train stage on the job's config and folders; rank 0 reports progress as prefixed JSON lines on stdout
(replayed by the launching process into its reporter) and writes the stage summary where the job says.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from farense.config import FarenseConfig
from farense.distributed import REPORT_PREFIX
from farense.kernel_cache import use_kernel_cache
from farense.progress import NullReporter
from farense.stage_context import StageContext
from farense.train import train_stage


class LineReporter:
    """A worker's reporter: each call becomes a prefixed JSON line for the launching process."""

    def _emit(self, method: str, *args: Any) -> None:
        print(REPORT_PREFIX + json.dumps({"method": method, "args": list(args)}, default=str), flush=True)

    def progress(self, description: str, fraction: float) -> None:
        self._emit("progress", description, fraction)

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        self._emit("table", key, rows, description)

    def markdown(self, key: str, text: str, description: str) -> None:
        self._emit("markdown", key, text, description)

    def image(self, key: str, path: str, description: str) -> None:
        self._emit("image", key, path, description)

    def log(self, message: str) -> None:
        self._emit("log", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Worker: `python -m farense.train_worker JOB.json`, one per rank."""
    args = list(sys.argv[1:] if argv is None else argv)
    job = json.loads(Path(args[0]).read_text())
    cfg = FarenseConfig.model_validate(job["config"])
    use_kernel_cache(cfg.artifacts_dir / "cache" / "kernels")  # this rank's own folder, before any GPU work
    group = mx.distributed.init(strict=True)
    rank = group.rank()
    ctx = StageContext(
        upstream={k: Path(v) for k, v in job["upstream"].items()},
        out_dir=Path(job["out_dir"]),
        work_dir=Path(job["work_dir"]),
        reporter=LineReporter() if rank == 0 else NullReporter(),
    )
    error_file = Path(job["work_dir"]) / f"rank-{rank}.error"
    error_file.unlink(missing_ok=True)
    try:
        summary = train_stage(cfg, ctx)
    except BaseException as e:  # noqa: BLE001  (the launcher reads it; mlx.launch keeps no exit codes)
        error_file.write_text(f"rank {rank}: {e.__class__.__name__}: {e}")
        raise
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
