"""A Reporter that shows stage progress on the terminal (rich) and in the Prefect UI (artifacts)."""

from __future__ import annotations

import re
import time
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from farense.progress import ConsoleReporter

_UPDATE_EVERY_S = 1.0


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


class PrefectReporter(ConsoleReporter):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage
        self._artifacts: dict[str, UUID] = {}
        self._last_update: dict[str, float] = {}

    def progress(self, description: str, fraction: float) -> None:
        super().progress(description, fraction)
        head = description.split(":")[0]
        percent = round(min(max(fraction, 0.0), 1.0) * 100, 1)
        now = time.monotonic()
        if head not in self._artifacts:
            self._artifacts[head] = create_progress_artifact(
                progress=percent, key=artifact_key(f"{self.stage}-progress"), description=head
            )
            self._last_update[head] = now
        elif percent >= 100 or now - self._last_update[head] >= _UPDATE_EVERY_S:
            update_progress_artifact(self._artifacts[head], progress=percent, description=description)
            self._last_update[head] = now

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        create_table_artifact(table=rows, key=artifact_key(key), description=description)

    def markdown(self, key: str, text: str, description: str) -> None:
        create_markdown_artifact(markdown=text, key=artifact_key(key), description=description)

    def image(self, key: str, path: str, description: str) -> None:
        create_markdown_artifact(
            markdown=f"![{description}]({path})\n\n`{path}`", key=artifact_key(key), description=description
        )

    def log(self, message: str) -> None:
        get_run_logger().info(message)
