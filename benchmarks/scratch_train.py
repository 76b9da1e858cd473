"""The pipeline's train stage run in a temporary folder, for benchmarks that time it or read its checkpoints."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from farense.config import FarenseConfig
from farense.progress import NullReporter
from farense.stages import StageContext
from farense.train import train_stage


@contextmanager
def train_stage_in_scratch(cfg: FarenseConfig, data_dir: Path, model_dir: Path) -> Iterator[tuple[dict[str, Any], StageContext, float]]:
    """Yield the train stage's summary, its context (out_dir, and work_dir with the checkpoints) and its wall
    seconds; the folders are removed when the block ends."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(upstream={"data": data_dir, "model": model_dir}, out_dir=Path(tmp) / "out",
                           work_dir=Path(tmp) / "work", reporter=NullReporter())  # fmt: skip
        ctx.out_dir.mkdir()
        start = time.perf_counter()
        summary = train_stage(cfg, ctx)
        yield summary, ctx, time.perf_counter() - start
