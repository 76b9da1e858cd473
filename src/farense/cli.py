"""`farense`: run the pipeline, inspect its stages, validate data. Thin: the work lives in the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from farense.config import STAGES, FarenseConfig, config_file_or_default, load_config, nested, parse_override
from farense.errors import FarenseError
from farense.monitor import monitor as follow
from farense.pipeline import make_plan, planned, stage_statuses
from farense.server import server_app
from farense.store import ArtifactStore

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
data_app = typer.Typer(no_args_is_help=True, help="Validate datasets.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the configuration.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(server_app, name="server")

err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config (default: ./farense.yaml when present)")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override one field: section.field=value (repeatable)")
]


def _config(config: Path | None, overrides: list[str] | None) -> FarenseConfig:
    return load_config(config_file_or_default(config), dict(parse_override(o) for o in overrides or []))


def _check_stage(name: str | None, option: str) -> None:
    if name is not None and name not in STAGES:
        raise typer.BadParameter(f"'{name}' is not a stage; choose from {', '.join(STAGES)}", param_hint=option)


def offline_prefect_defaults() -> None:
    """No telemetry, no update checks: this must work without internet."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_SHOW_PROMOTIONAL_CONTENT", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Heartbeats as often as worker runs send them: a server's crash automation then tells a killed run apart.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    until: Annotated[str, typer.Option(help="Last stage to run")] = "export",
    only: Annotated[Optional[str], typer.Option(help="Run this stage alone (upstream must be built)")] = None,
    fresh: Annotated[bool, typer.Option(help="Rebuild the selected stages even when cached")] = False,
) -> None:
    """Run the pipeline locally as a Prefect flow (no server needed); cached stages are not redone."""
    _check_stage(until, "--until")
    _check_stage(only, "--only")
    cfg = _config(config, set_)
    plans = make_plan(cfg, only or until)  # once: the flow run below gets it, and the statuses after it
    statuses = stage_statuses(cfg, only or until, plans)
    wanted = [s for s in statuses if only is None or s.stage == only]
    if not fresh and all(s.state == "done" for s in wanted):
        _print_statuses(statuses, title="Every stage is cached: nothing to do")
        _print_answer_quality(statuses)
        return
    offline_prefect_defaults()
    from flows.pipeline import farense  # Prefect: seconds to import, so only when something is to be built

    # The flow reads the same file and overrides itself (as deployment runs do), so the run records them.
    config_file = config_file_or_default(config)
    overrides = dict(parse_override(o) for o in set_ or [])
    with planned(cfg, only or until, plans):
        paths = farense(config_file=str(config_file) if config_file else None, config=nested(overrides),
                        until=until, only=only, fresh=fresh)  # fmt: skip
    statuses = stage_statuses(cfg, only or until, plans)
    _print_statuses(statuses, title="farense run finished")
    if paths:
        out.print_json(json.dumps(paths))
    _print_answer_quality(statuses)


def _print_answer_quality(statuses: list[Any]) -> None:
    """What users judge: base vs tuned on the sealed test set (n, 95% interval), the dev figure beside it, and
    where each answer is."""
    from farense.accuracy import headline

    validate = next((s for s in statuses if s.stage == "validate" and s.state == "done"), None)
    if validate is None or not (validate.path / "metrics.json").is_file():
        return
    metrics = json.loads((validate.path / "metrics.json").read_text())
    for label, prefix in (("sealed test set", "test_"), ("dev set", "")):
        out.print(f"[bold]{label}[/] ({metrics.get(prefix + 'questions') or 0} questions):", highlight=False)
        for name in ("base", "tuned"):
            out.print(f"  [bold]{name}[/]: {headline(metrics[name], prefix)}", highlight=False)
    out.print(f"per-question answers, pass/fail and why: {validate.path / 'answers.md'}", highlight=False)


@app.command()
def status(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Show each stage: done / stale / missing, its key and artifact path."""
    _print_statuses(stage_statuses(_config(config, set_)), title="farense stages")


def _print_statuses(statuses: list[Any], title: str) -> None:
    table = Table(title=title)
    for col in ("stage", "state", "key", "path"):
        table.add_column(col)
    colors = {"done": "green", "stale": "yellow", "missing": "red"}
    for s in statuses:
        table.add_row(s.stage, f"[{colors[s.state]}]{s.state}[/]", s.key, str(s.path))
    out.print(table)


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="A JSONL file or a folder of JSONL files")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    max_line_bytes: Annotated[int, typer.Option(help="Longer lines are rejected")] = 1_000_000,
) -> None:
    """Validate a dataset without writing anything. Exit 0 if any example is valid, 1 if none, 2 if unreadable."""
    from farense.data import validate_source

    if not path.exists():
        err.print(f"[red]error:[/] {path}: no such file or folder")
        raise typer.Exit(2)
    _, report = validate_source(path, max_line_bytes=max_line_bytes)
    if as_json:
        payload = {
            "valid": report.valid,
            "rejected": [{"file": r.file, "line": r.line, "reason": r.reason} for r in report.rejected],
            "duplicates": report.duplicates,
            "format": report.format,
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        for r in report.rejected:
            err.print(f"{r.file}:{r.line}: {r.reason}", markup=False, highlight=False)
        out.print(
            f"{report.valid} valid ({report.format}: {report.per_format}), {len(report.rejected)} rejected, "
            f"{report.duplicates} duplicates removed"
        )
    if "text" in report.per_format and len(report.per_format) > 1:
        err.print(
            "[yellow]warning:[/] text rows are mixed with chat/completions rows; mlx-lm trains one format per file, "
            "so the data stage will refuse this mix: split them into separate datasets"
        )
    raise typer.Exit(0 if report.valid > 0 else 1)


@app.command()
def ask(
    prompt: Annotated[Optional[str], typer.Argument(help="The question")] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help='Answer stdin lines ({"prompt": ...}, a JSON string or text), one JSON line each')
    ] = False,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer")] = 256,
    artifacts: Annotated[Optional[Path], typer.Option(help="Artifacts root (default: the config's artifacts_dir)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer with the published adapter; stdout carries only JSON (what the chatbot backend spawns)."""
    from farense.answer import ask_command

    raise typer.Exit(ask_command(prompt, stdin, max_tokens, artifacts, config))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; other hosts need FARENSE_API_KEY set")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    artifacts: Annotated[Optional[Path], typer.Option(help="Artifacts root (default: the config's artifacts_dir)")] = None,
    config: ConfigOpt = None,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503")] = 8,
    watch_seconds: Annotated[float, typer.Option(help="How often to look for a newly published adapter (0: never)")] = 2.0,
) -> None:
    """Answer over HTTP with the published adapter, loaded once: POST /ask, POST /v1/chat/completions,
    GET /v1/models, GET /health (docs/serving.md)."""
    from farense.answer import resolve_artifacts
    from farense.answer_server import serve_command

    raise typer.Exit(serve_command(host, port, resolve_artifacts(artifacts, config), queue_size, watch_seconds))


@app.command()
def monitor(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    key: Annotated[Optional[str], typer.Option(help="Train stage key (default: this config's, else the latest)")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print the current state and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: one object (--once) or one line per update")] = False,
) -> None:
    """Follow the training in progress (started by `farense run` or a worker) from its metrics file."""
    cfg = _config(config, set_)
    if key is None:
        try:
            key = make_plan(cfg, "train")["train"].key
        except FarenseError:
            key = None  # e.g. the dataset moved: fall back to the training that changed last
    raise typer.Exit(follow(ArtifactStore(cfg.artifacts_dir), key, once, as_json))


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None, schema: bool = False) -> None:
    """Print the effective configuration (or its JSON schema with --schema)."""
    if schema:
        print(json.dumps(FarenseConfig.model_json_schema(), indent=2))
        return
    print(_config(config, set_).model_dump_json(indent=2))


def main() -> None:
    try:
        app()
    except FarenseError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
