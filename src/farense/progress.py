"""How long work reports itself: a small protocol the stages call, implemented for the terminal and for Prefect."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def progress(self, description: str, fraction: float) -> None: ...

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None: ...

    def markdown(self, key: str, text: str, description: str) -> None: ...

    def image(self, key: str, path: str, description: str) -> None: ...

    def log(self, message: str) -> None: ...


class NullReporter:
    """Reports nothing; for tests and library use."""

    def progress(self, description: str, fraction: float) -> None:
        pass

    def table(self, key: str, rows: list[dict[str, Any]], description: str) -> None:
        pass

    def markdown(self, key: str, text: str, description: str) -> None:
        pass

    def image(self, key: str, path: str, description: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class ConsoleReporter(NullReporter):
    """Rich progress bars on the terminal, one task per description."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._started = False

    def progress(self, description: str, fraction: float) -> None:
        head = description.split(":")[0]
        if not self._started:
            self._progress.start()
            self._started = True
        if head not in self._tasks:
            self._tasks[head] = self._progress.add_task(description, total=1.0)
        self._progress.update(self._tasks[head], completed=min(max(fraction, 0.0), 1.0), description=description)

    def log(self, message: str) -> None:
        self.console.print(message)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False
