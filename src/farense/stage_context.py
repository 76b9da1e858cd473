"""What every stage function receives besides the config: where its inputs are, where to write, and a reporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from farense.progress import NullReporter, Reporter


@dataclass
class StageContext:
    upstream: dict[str, Path]  # upstream stage -> its artifact folder
    out_dir: Path  # the temp folder the stage writes its artifact into
    work_dir: Path  # persistent scratch space kept across retries (training checkpoints)
    reporter: Reporter = field(default_factory=NullReporter)
