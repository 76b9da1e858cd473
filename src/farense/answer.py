"""`farense ask`: answer with the published adapter, as JSON on stdout, for a backend that spawns this command.

Stdout carries only JSON: one object per answer (one line each with `--stdin`). Everything else any library
prints, from Python or from C, is sent to stderr by pointing file descriptor 1 at stderr while we work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

DEFAULT_MAX_TOKENS = 256
SERVING_DIR = "serving"  # artifacts/serving/<version>: the fused float32 model, made on the first load


@dataclass
class PublishedModel:
    engine: Any  # farense.inference.InferenceModel: the base with the adapter fused in
    metadata: dict[str, Any]
    version_dir: Path

    @property
    def name(self) -> str:
        return str(self.metadata.get("base_model", {}).get("source", "?"))

    @property
    def adapter(self) -> str:
        return self.version_dir.name


class AskError(Exception):
    """A problem the caller can act on; its message goes into the JSON error object."""


def resolve_artifacts(artifacts: Path | None, config: Path | None) -> Path:
    if artifacts is not None:
        return Path(artifacts).resolve()
    from farense.config import config_file_or_default, load_config

    return load_config(config_file_or_default(config)).artifacts_dir


def load_published(artifacts_dir: Path, compute_path: str = "auto", version: Path | None = None) -> PublishedModel:
    """The adapter `published/latest` points to (resolved once, or the given version folder), on its base model."""
    from farense.export import METADATA_FILE, published_root, published_version, read_draft_corpus
    from farense.inference import load

    version = version or published_version(artifacts_dir)
    if version is None:
        raise AskError(f"no published adapter under {published_root(artifacts_dir)}; run `farense run` first")
    meta = json.loads((version / METADATA_FILE).read_text(encoding="utf-8"))
    base = Path(meta["base_model"]["path"])
    if not base.is_dir():
        raise AskError(
            f"the base model of {version.name} is missing at {base}; rebuild it with `farense run --until model`"
        )
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    if meta["base_model"].get("weights_bytes") not in (None, size):
        raise AskError(f"the base model at {base} is not the one {version.name} was trained on (weights changed)")
    engine = load(base, version, system_prompt=meta.get("system_prompt"), compute_path=compute_path,
                  dense_copy=dense_copy_dir(artifacts_dir, version),
                  draft_corpus=read_draft_corpus(version))  # fmt: skip
    return PublishedModel(engine, meta, version)


def dense_copy_dir(artifacts_dir: Path, version: Path) -> Path | None:
    """Where the fused float32 model of a published version is kept for fast loads; copies of other versions are
    removed (a version never changes, so its name is the key). None when the artifacts folder is read-only."""
    import shutil

    root = Path(artifacts_dir) / SERVING_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.iterdir():
            if old.is_dir() and old.name != version.name and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        print(f"farense: no float32 copy under {root} ({e}); loading the 4-bit base each time", file=sys.stderr)
        return None
    return root / version.name


def answer(pm: PublishedModel, prompt: str, max_tokens: int, history: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Greedy answer in the chat template with the system prompt the adapter was validated with; `history` holds
    earlier turns ({"role", "content"}) for a multi-turn chat, the prompt is the new user message."""
    if not prompt.strip():
        raise AskError("the prompt is empty")
    start = time.perf_counter()
    g = pm.engine.generate([*history, {"role": "user", "content": prompt}] if history else prompt, max_tokens)
    return answer_object(pm, prompt, g.text, g.tokens, time.perf_counter() - start)


def answer_object(pm: PublishedModel, prompt: str, text: str, tokens: int, seconds: float) -> dict[str, Any]:
    """The JSON object `farense ask` prints and `POST /ask` returns."""
    return {
        "prompt": prompt,
        "answer": text,
        "model": pm.name,
        "adapter": pm.adapter,
        "tokens": tokens,
        "latency_ms": round(seconds * 1000, 1),
        "status": "ok",
    }


def error_object(error: BaseException | str, **extra: Any) -> dict[str, Any]:
    text = error if isinstance(error, str) else (str(error) or error.__class__.__name__)
    if isinstance(error, BaseException) and not isinstance(error, (AskError, OSError, ValueError)):
        text = f"{error.__class__.__name__}: {text}"
    return {**extra, "status": "error", "error": text}


@contextlib.contextmanager
def json_stdout() -> Iterator[IO[str]]:
    """Yield a writer on the real stdout, and point fd 1 (Python's and C's stdout) at stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    writer = os.fdopen(os.dup(saved), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield writer
    finally:
        writer.flush()
        writer.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _emit(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    out.flush()


BAD_LINE = 'each line must be {"prompt": "..."} (optionally "id" and "max_tokens"), a JSON string or text'


def parse_request(line: str) -> tuple[str | None, dict[str, Any]]:
    """A `--stdin` line: {"prompt": ..., "id"?: ..., "max_tokens"?: n}, a JSON string, or plain text.
    Returns (prompt, {"id", "max_tokens"} given); prompt is None when the line is not a request."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return line, {}
    if isinstance(obj, str):
        return obj, {}
    if isinstance(obj, dict):
        prompt = obj.get("prompt")
        return (prompt if isinstance(prompt, str) else None), {k: obj[k] for k in ("id", "max_tokens") if k in obj}
    return None, {}


def ask_command(
    prompt: str | None,
    use_stdin: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    artifacts: Path | None = None,
    config: Path | None = None,
    stdin: IO[str] | None = None,
) -> int:
    """Run `farense ask`; return the exit code (0 ok, 1 a failed answer or load, 2 a usage error)."""
    with json_stdout() as out:
        if (prompt is None) == (not use_stdin):
            _emit(out, error_object("give either a prompt argument or --stdin, not both or neither"))
            return 2
        if max_tokens < 1:
            _emit(out, error_object(f"--max-tokens must be at least 1, got {max_tokens}"))
            return 2
        try:
            import farense  # noqa: F401  (preloads OpenBLAS before mlx)

            start = time.perf_counter()
            pm = load_published(resolve_artifacts(artifacts, config))
            print(f"farense ask: loaded {pm.adapter} on {pm.name} in {time.perf_counter() - start:.1f}s",
                  file=sys.stderr)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error for the caller
            _emit(out, error_object(e))
            return 1
        if not use_stdin:
            try:
                _emit(out, answer(pm, prompt or "", max_tokens))
                return 0
            except Exception as e:  # noqa: BLE001
                _emit(out, error_object(e, prompt=prompt))
                return 1
        failed = 0
        for line in stdin or sys.stdin:
            if not line.strip():
                continue
            extra: dict[str, Any] = {}
            try:
                text, extra = parse_request(line.rstrip("\n"))
                if text is None:
                    raise AskError(BAD_LINE)
                n = extra.get("max_tokens", max_tokens)
                if not isinstance(n, int) or n < 1:
                    raise AskError(f'"max_tokens" must be a positive integer, got {n!r}')
                result = answer(pm, text, n)
                _emit(out, ({"id": extra["id"]} if "id" in extra else {}) | result)
            except Exception as e:  # noqa: BLE001 - one bad line must not stop the batch
                failed += 1
                _emit(out, error_object(e, **({"id": extra["id"]} if "id" in extra else {})))
        return 1 if failed else 0
