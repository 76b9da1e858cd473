"""`farense monitor`: follow a training from its metrics file, whoever started it (`farense run` or a worker).

The trainer appends a row to `artifacts/train/.work-<key>/metrics.csv` every `train.log_every` steps and after
each validation; the stage lock `artifacts/train/.lock-<key>` names the process building it. Reading those two
files is all this does: it needs no Prefect server and never touches the training.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from farense.store import ArtifactStore, describe_holder

METRICS = "metrics.csv"


@dataclass(frozen=True)
class TrainingProgress:
    """Where one training stands, from its metrics file."""

    key: str
    metrics_file: str
    state: str  # running | stopped (no live process holds it; a rerun resumes) | finished
    holder: str | None
    step: int
    total_steps: int | None
    epoch: int | None
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float | None
    trained_tokens: int | None
    rss_gb: float | None
    peak_gb: float | None
    elapsed_s: float | None  # in the current (or last) process: a resumed run starts its clock again
    eta_s: float | None
    updated_s_ago: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _num(row: dict[str, str], key: str) -> float | None:
    value = row.get(key) or ""
    try:
        return float(value)
    except ValueError:
        return None


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") not in (None, socket.gethostname()):
        return True  # another machine: we cannot check; trust the lock
    try:
        os.kill(int(holder["pid"]), 0)
    except (KeyError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def progress_of(store: ArtifactStore, key: str) -> TrainingProgress | None:
    """The training of `key`: in progress (its work folder) or finished (its artifact), else None."""
    finished = store.get("train", key)
    path = (finished.path if finished else store.work_dir("train", key)) / METRICS
    if not path.is_file():
        return None
    rows = read_rows(path)
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    last = train[-1] if train else {}
    step = max((int(_num(r, "step") or 0) for r in rows), default=0)
    total = next((int(t) for r in reversed(rows) if (t := _num(r, "total_steps"))), None)
    holder = store.holder("train", key)
    if finished:
        state = "finished"
    elif holder and _holder_alive(holder):
        state = "running"
    else:
        state = "stopped"
    val_losses = [v for r in valid if (v := _num(r, "loss")) is not None]
    return TrainingProgress(
        key=key,
        metrics_file=str(path),
        state=state,
        holder=describe_holder(holder) if holder and state == "running" else None,
        step=step,
        total_steps=total,
        epoch=int(e) if (e := _num(last, "epoch")) is not None else None,
        loss=_num(last, "loss"),
        val_loss=val_losses[-1] if val_losses else None,
        best_val_loss=min(val_losses) if val_losses else None,
        tokens_per_s=_num(last, "tokens_per_s"),
        trained_tokens=int(t) if (t := _num(last, "trained_tokens")) is not None else None,
        rss_gb=_num(last, "rss_gb"),
        peak_gb=_num(last, "peak_gb"),
        elapsed_s=_num(last, "seconds"),
        eta_s=_eta(train, total) if state == "running" else (0.0 if state == "finished" else None),
        updated_s_ago=round(time.time() - path.stat().st_mtime, 1),
    )


def _eta(train: list[dict[str, str]], total: int | None) -> float | None:
    """Seconds left at the pace of the current process (its rows since the clock last restarted)."""
    if not train or total is None:
        return None
    session = [train[-1]]
    for row in reversed(train[:-1]):  # a resumed run restarts `seconds`: keep only this process's rows
        if (_num(row, "seconds") or 0) > (_num(session[0], "seconds") or 0):
            break
        session.insert(0, row)
    step, seconds = _num(session[-1], "step") or 0, _num(session[-1], "seconds") or 0
    if len(session) >= 2:
        first_step, first_seconds = _num(session[0], "step") or 0, _num(session[0], "seconds") or 0
    elif len(train) == 1:  # the first report of a fresh run: its clock started at step 0
        first_step, first_seconds = 0.0, 0.0
    else:
        return None
    if step <= first_step or seconds <= first_seconds:
        return None
    per_step = (seconds - first_seconds) / (step - first_step)
    return round(max(total - step, 0) * per_step, 1)


def find_training(store: ArtifactStore, key: str | None = None) -> TrainingProgress | None:
    """The training of `key` if given and found; else the one whose metrics file changed last."""
    if key is not None:
        found = progress_of(store, key)
        if found is not None:
            return found
    candidates = sorted(
        store.stage_dir("train").glob(f"*/{METRICS}"), key=lambda p: p.stat().st_mtime, reverse=True
    ) if store.stage_dir("train").is_dir() else []  # fmt: skip
    for path in candidates:
        name = path.parent.name
        found = progress_of(store, name.removeprefix(".work-"))
        if found is not None:
            return found
    return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def render(p: TrainingProgress) -> Any:
    """A rich table of the latest numbers, with a progress bar."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    colors = {"running": "green", "stopped": "yellow", "finished": "cyan"}
    table = Table(title=f"train {p.key}: [{colors[p.state]}]{p.state}[/]", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    total = p.total_steps or 0
    table.add_row("step", f"{p.step}/{total or '?'}" + (f" (epoch {p.epoch})" if p.epoch is not None else ""))
    bar = ProgressBar(total=max(total, 1), completed=min(p.step, total) if total else 0, width=50)
    table.add_row("progress", bar if total else "-")
    table.add_row("loss", _fmt(p.loss, ".4f"))
    table.add_row("validation loss", f"{_fmt(p.val_loss, '.4f')} (best {_fmt(p.best_val_loss, '.4f')})")
    table.add_row("tokens/s", _fmt(p.tokens_per_s, ".0f"))
    table.add_row("elapsed / ETA", f"{_duration(p.elapsed_s)} / {_duration(p.eta_s)}")
    table.add_row("memory", f"rss {_fmt(p.rss_gb, '.2f', ' GB')}, peak {_fmt(p.peak_gb, '.2f', ' GB')}")
    table.add_row("built by", p.holder or ("-" if p.state != "stopped" else "nobody: a rerun resumes it"))
    table.add_row("metrics", f"{p.metrics_file} (updated {p.updated_s_ago:.0f} s ago)")
    return table


def monitor(store: ArtifactStore, key: str | None, once: bool, as_json: bool, interval: float = 2.0) -> int:
    """Show the training (once, or live until it ends or Ctrl-C). Exit code 1 when there is none to show."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    found = find_training(store, key)
    if found is None:
        Console(stderr=True).print(f"no training found under {store.stage_dir('train')} (no metrics.csv yet)")
        return 1
    if once:
        if as_json:
            print(json.dumps(found.to_json()))
        else:
            console.print(render(found))
        return 0
    key = found.key
    if as_json:  # one JSON line per update, for scripts that follow along
        while True:
            print(json.dumps(found.to_json()), flush=True)
            if found.state != "running":
                return 0
            time.sleep(interval)
            found = progress_of(store, key) or found
    with Live(render(found), console=console, refresh_per_second=2) as live:
        while found.state == "running":
            time.sleep(interval)
            found = progress_of(store, key) or found
            live.update(render(found))
    return 0
