"""`farense serve`: a resident HTTP answer server on the published adapter (FastAPI + uvicorn).

- `POST /ask` returns the JSON object `farense ask` prints (the same function makes both answers);
- `POST /v1/chat/completions` is OpenAI's, with `"stream": true` as server-sent events: greedy by default, `stop`,
  `temperature`, `top_p` and `seed` honoured, any other OpenAI field that would change the answer refused with a
  4xx naming it (`CHAT_FIELDS_REFUSED`), fields OpenAI does not define ignored;
- `GET /v1/models` (and `/v1/models/{id}`) name the one model served: the base model and the live adapter;
- `GET /health` says the server is up; with the key (or when none is set) it names the model and adapter and
  counts uptime and requests.

MLX decodes one stream at a time, so every generation (and every adapter load) runs on one worker thread; up to
`queue_size` requests wait for it and the next one gets 503 with Retry-After at once. When `published/latest`
points somewhere new, the new adapter is loaded on that thread between answers and swapped in; requests already
accepted finish on the adapter they were accepted with. An API key, if `FARENSE_API_KEY` is set, is required on
the answering routes (Authorization: Bearer or X-API-Key); it is never logged. Clients that stall get deadlines
(farense.http_timeouts). Errors on /v1/* are OpenAI's shape ({"error": {"message", "type", "param", "code"}}),
on the others farense's ({"status": "error", "error", "field"}).
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import uvicorn
from mlx_lm.sample_utils import make_sampler

from farense.answer import DEFAULT_MAX_TOKENS, PublishedModel, answer, answer_object, load_published
from farense.http_timeouts import StallTimeouts, uvicorn_config
from farense.inference import InferenceModel

log = logging.getLogger("farense.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 8
MAX_TOKENS_LIMIT = 1024
API_KEY_ENV = "FARENSE_API_KEY"
# Characters per token is at least ~1 for any tokenizer: a text this long is over the context without tokenizing it.
CHARS_PER_TOKEN_BOUND = 8


class RequestError(Exception):
    """A bad request: HTTP status, the field at fault, and what to do."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers


# ---------------------------------------------------------------- request bodies


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class AskBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    max_tokens: StrictInt = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False  # usage comes in the last chunk whether asked or not


class ChatBody(BaseModel):
    """The OpenAI chat-completion fields honoured; the ones refused are in CHAT_FIELDS_REFUSED, others ignored."""

    model_config = ConfigDict(extra="allow")  # kept in model_extra, for refuse_unsupported to look at
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    model: Optional[StrictStr] = None  # any name: one model is served, and the reply's `model` says which
    stop: Union[StrictStr, list[StrictStr], None] = None
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2)  # None or 0: greedy, unlike OpenAI's default 1
    top_p: Optional[StrictFloat] = Field(None, ge=0, le=1)
    seed: Optional[StrictInt] = None


# OpenAI's fields that would change the answer in a way this server does not do: each is refused (422 naming it)
# unless it holds a value that asks for nothing (as JSON text), or null.
CHAT_FIELDS_REFUSED: dict[str, tuple[set[str], str]] = {
    "n": ({"1"}, "one choice per request: send n requests (with a seed each, to sample different answers)"),
    "response_format": ({'{"type": "text"}'}, 'answers are text: only {"type": "text"}'),
    "logprobs": ({"false"}, "log-probabilities are not returned"),
    "top_logprobs": ({"0"}, "log-probabilities are not returned"),
    "logit_bias": ({"{}"}, "logit_bias is not applied"),
    "frequency_penalty": ({"0", "0.0"}, "repetition penalties are not applied"),
    "presence_penalty": ({"0", "0.0"}, "repetition penalties are not applied"),
    "tools": ({"[]"}, "the model does not call tools"),
    "tool_choice": ({'"none"', '"auto"'}, "the model does not call tools"),
    "functions": ({"[]"}, "the model does not call functions"),
    "function_call": ({'"none"', '"auto"'}, "the model does not call functions"),
    "modalities": ({'["text"]'}, 'answers are text: only ["text"]'),
    "audio": (set(), "answers are text"),
    "reasoning_effort": (set(), "the model does not reason before answering"),
    "verbosity": ({'"medium"'}, "the answer's length is the model's own; use max_tokens to cap it"),
    "web_search_options": (set(), "the model does not search the web"),
}
MAX_STOP_STRINGS = 4  # OpenAI's limit


def refuse_unsupported(body: ChatBody) -> None:
    """A 422 naming the first field asked for that this server cannot honour."""
    for name, value in (body.model_extra or {}).items():
        if name in CHAT_FIELDS_REFUSED and value is not None:
            allowed, why = CHAT_FIELDS_REFUSED[name]
            if json.dumps(value) not in allowed:
                raise RequestError(422, name, f"{name}={json.dumps(value)[:80]} is not supported: {why}")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise RequestError(422, "stop", f"stop: give 1 to {MAX_STOP_STRINGS} non-empty strings")


@dataclass(frozen=True)
class Decoding:
    """How a chat request is decoded: greedy and speculative unless it asks for sampling (temperature > 0), then
    with mlx-lm's sampler, seeded as mlx_lm.server does when a seed is given."""

    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def of(cls, body: ChatBody) -> "Decoding":
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        top_p = 1.0 if body.top_p is None else body.top_p
        return cls(stop, body.temperature or 0.0, top_p, body.seed)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0 and self.top_p > 0  # top_p 0 keeps only the likeliest token: greedy

    def stream(self, engine: InferenceModel, ids: list[int], max_tokens: int) -> Any:
        """Call on the generation thread (the seed is mlx's global one): the engine's stream, set up."""
        sampler = None
        if self.sampling:
            if self.seed is not None:
                mx.random.seed(self.seed)
            sampler = make_sampler(self.temperature, top_p=self.top_p)
        return engine.stream(ids, max_tokens, stop=self.stop, sampler=sampler)

    def generate(self, engine: InferenceModel, ids: list[int], max_tokens: int) -> Any:
        result = None
        for piece in self.stream(engine, ids, max_tokens):
            result = piece
        return result


# ---------------------------------------------------------------- the one generation thread


@dataclass
class ServerStats:
    started: float
    served: int = 0
    rejected_busy: int = 0
    failed: int = 0
    swaps: int = 0
    answer_seconds: float = 0.0


class AnswerWorker:
    """The published model, the single thread that uses it, and the bounded count of requests waiting for it."""

    def __init__(self, artifacts_dir: Path, queue_size: int, loader: Callable[..., PublishedModel] = load_published):
        self.artifacts_dir = Path(artifacts_dir)
        self.capacity = queue_size + 1  # waiting + the one generating
        self.loader = loader
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="farense-generate")
        self._lock = threading.Lock()
        self._admitted = 0
        self.stats = ServerStats(started=time.time())
        self.current: PublishedModel = self.executor.submit(loader, self.artifacts_dir).result()
        self._failed_version: Path | None = None

    def admit(self) -> None:
        with self._lock:
            if self._admitted >= self.capacity:
                self.stats.rejected_busy += 1
                mean = self.stats.answer_seconds / self.stats.served if self.stats.served else 1.0
                retry = max(1, round(mean * self._admitted))
                raise RequestError(503, None, f"the server is busy ({self._admitted} requests ahead); retry in "
                                   f"{retry} s", headers={"Retry-After": str(retry)})  # fmt: skip
            self._admitted += 1

    def release(self, seconds: float, ok: bool) -> None:
        with self._lock:
            self._admitted -= 1
            if ok:
                self.stats.served += 1
                self.stats.answer_seconds += seconds
            else:
                self.stats.failed += 1

    @property
    def waiting(self) -> int:
        return self._admitted

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the generation thread; the caller has been admitted and is released here."""
        start = time.perf_counter()
        ok = False
        try:
            result = await asyncio.wrap_future(self.executor.submit(fn, *args))
            ok = True
            return result
        finally:
            self.release(time.perf_counter() - start, ok)

    def check_for_new_version(self) -> None:
        """Called on the generation thread: load and switch to `published/latest` if it moved."""
        from farense.export import published_version

        version = published_version(self.artifacts_dir)
        if version is None or version == self.current.version_dir or version == self._failed_version:
            return
        old = self.current.adapter
        start = time.perf_counter()
        try:
            new = self.loader(self.artifacts_dir, version=version)
        except Exception as e:  # noqa: BLE001 - keep serving the adapter we have
            self._failed_version = version
            log.error("serve: published/latest moved to %s but it does not load (%s); still serving %s",
                      version.name, e, old)  # fmt: skip
            return
        self.current = new
        self.stats.swaps += 1
        log.info("serve: switched adapter %s -> %s (loaded in %.1f s)", old, new.adapter, time.perf_counter() - start)

    async def watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.wrap_future(self.executor.submit(self.check_for_new_version))
            except Exception:  # noqa: BLE001
                log.exception("serve: checking published/latest failed")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the app


def create_app(
    artifacts_dir: Path,
    *,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    watch_seconds: float = 2.0,
    api_key: str | None = None,
    loader: Callable[..., PublishedModel] = load_published,
) -> FastAPI:
    """The answer server's ASGI app; loads the published adapter now (raises AskError when there is none)."""
    worker = AnswerWorker(artifacts_dir, queue_size, loader)
    log.info("serve: loaded %s on %s (%s)", worker.current.adapter, worker.current.name, worker.current.engine.options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(worker.watch(watch_seconds)) if watch_seconds > 0 else None
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
            worker.close()

    app = FastAPI(title="farense answer server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.field, request.url.path, e.status), status_code=e.status,
                            headers=e.headers)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        field, message = describe_validation_error(e.errors())
        status = 400 if field == "body" else 422
        return JSONResponse(error_body(message, field, request.url.path, status), status_code=status)

    def key_ok(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), api_key.encode())

    def require_key(request: Request) -> None:
        if not key_ok(request):
            raise RequestError(401, "authorization", f"missing or wrong API key (send Authorization: Bearer <{API_KEY_ENV}>)")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not key_ok(request):  # a load balancer's check needs no key, and learns nothing but that we are up
            return {"status": "ok"}
        pm, s = worker.current, worker.stats
        return {"status": "ok", "model": pm.name, "adapter": pm.adapter, "uptime_s": round(time.time() - s.started, 1),
                "requests_served": s.served, "requests_failed": s.failed, "rejected_busy": s.rejected_busy,
                "adapter_swaps": s.swaps, "queue": {"in_flight": worker.waiting, "capacity": worker.capacity},
                "context_length": pm.engine.context_length}  # fmt: skip

    @app.post("/ask", dependencies=[Depends(require_key)])
    async def ask(body: AskBody) -> dict[str, Any]:
        pm = worker.current
        history: list[dict[str, str]] = [m.model_dump() for m in body.messages or []]
        prompt = body.prompt
        if prompt is None:
            if not history or history[-1]["role"] != "user":
                raise RequestError(422, "prompt", 'give "prompt" (or "messages" ending with a user message)')
            prompt = history.pop()["content"]
        if not prompt.strip():
            raise RequestError(422, "prompt", '"prompt" is empty')
        field = "messages" if history else "prompt"
        check_length(pm, [*history, {"role": "user", "content": prompt}], body.max_tokens, field)
        worker.admit()
        return await worker.run(answer, pm, prompt, body.max_tokens, history)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(worker.current)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(require_key)])
    async def model_by_id(name: str) -> dict[str, Any]:
        card = model_card(worker.current)
        if name != card["id"]:
            raise RequestError(404, "model", f"no model '{name}' here; GET /v1/models lists the one served")
        return card

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatBody) -> Any:
        refuse_unsupported(body)
        pm = worker.current
        messages = [m.model_dump() for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        ids = check_length(pm, messages, max_tokens, "messages", field)
        decoding = Decoding.of(body)
        worker.admit()
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id(pm)
        if not body.stream:
            g = await worker.run(decoding.generate, pm.engine, ids, max_tokens)
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason}],
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.tokens,
                          "total_tokens": g.prompt_tokens + g.tokens},
            }  # fmt: skip
        return EventSourceResponse(stream_chat(worker, pm, decoding, ids, max_tokens, cid, created, model))

    return app


def model_id(pm: PublishedModel) -> str:
    """The served model's name in OpenAI's `model` fields: the base model and the adapter version."""
    return f"{pm.name}+{pm.adapter}"


def model_card(pm: PublishedModel) -> dict[str, Any]:
    """OpenAI's model object for the published adapter on its base (`created`: when it was published)."""
    try:
        created = calendar.timegm(time.strptime(str(pm.metadata.get("created_at")), "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        created = int(pm.version_dir.stat().st_mtime)
    return {"id": model_id(pm), "object": "model", "created": created, "owned_by": "farense",
            "base_model": pm.name, "adapter": pm.adapter, "context_length": pm.engine.context_length}  # fmt: skip


def check_length(pm: PublishedModel, messages: list[dict[str, str]], max_tokens: int, prompt_field: str,
                 max_tokens_field: str = "max_tokens") -> list[int]:  # fmt: skip
    """The prompt's token ids, or a 4xx naming the field when prompt + answer cannot fit in the context."""
    context = pm.engine.context_length
    if sum(len(m["content"]) for m in messages) > context * CHARS_PER_TOKEN_BOUND:
        raise RequestError(413, prompt_field, f"the {prompt_field} is far longer than the context ({context} tokens)")
    ids = pm.engine.prompt_ids(messages)
    if len(ids) >= context:
        raise RequestError(413, prompt_field, f"the {prompt_field} is {len(ids)} tokens; the context is {context}")
    if len(ids) + max_tokens > context:
        raise RequestError(422, max_tokens_field, f"{max_tokens_field}={max_tokens} does not fit: the prompt takes "
                           f"{len(ids)} of the {context} context tokens; ask for at most {context - len(ids)}")  # fmt: skip
    return ids


async def stream_chat(worker: AnswerWorker, pm: PublishedModel, decoding: Decoding, ids: list[int],
                      max_tokens: int, cid: str, created: int, model: str) -> AsyncIterator[bytes]:  # fmt: skip
    """OpenAI chat.completion.chunk events; the generation thread hands pieces over through an asyncio queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def generate() -> Any:
        result = None
        started = False
        try:
            for piece in decoding.stream(pm.engine, ids, max_tokens):
                if cancelled.is_set():
                    break  # the client went away: closing the generator frees the thread
                if isinstance(piece, str):
                    piece = piece if started else piece.lstrip()  # as `generate` strips the answer
                    started = started or bool(piece)
                    if piece:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                else:
                    result = piece
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)
        return result

    def chunk(delta: dict[str, str], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        if usage:
            obj["usage"] = usage
        return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False))

    job = asyncio.ensure_future(worker.run(generate))
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await queue.get()) is not None:
            yield chunk({"content": piece})
        g = await job
        if g is not None:
            usage = {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.tokens,
                     "total_tokens": g.prompt_tokens + g.tokens}  # fmt: skip
            yield chunk({}, g.finish_reason, usage)
        yield format_sse_event(data_str="[DONE]")
    finally:
        cancelled.set()


def error_body(message: str, field: str | None, path: str = "", status: int = 400) -> dict[str, Any]:
    """farense's error object, or OpenAI's on /v1/* (its SDKs read `error.message` and `error.param`)."""
    if path.startswith("/v1/"):
        code = {401: "invalid_api_key", 404: "model_not_found", 503: "server_busy"}.get(status)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": field, "code": code}}
    return {"status": "error", "error": message, **({"field": field} if field else {})}


def describe_validation_error(errors: Any) -> tuple[str, str]:
    """(field, message) for the first problem pydantic found in a request body."""
    e = list(errors)[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return "body", f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
    if not loc:
        return "body", f"the request body must be a JSON object ({e.get('msg')})"
    field = ".".join(loc)
    if e.get("type") == "missing":
        return field, f"field '{field}' is required"
    return field, f"field '{field}': {e.get('msg')} (got {json.dumps(e.get('input'), default=str)[:80]})"


# ---------------------------------------------------------------- the command


def serve_command(host: str, port: int, artifacts_dir: Path, queue_size: int, watch_seconds: float,
                  timeouts: StallTimeouts = StallTimeouts()) -> int:  # fmt: skip
    """Load the published adapter and serve until interrupted; returns the exit code."""
    from farense.answer import AskError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_key = os.environ.get(API_KEY_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serve: listening on %s without an API key: anyone who reaches this port can ask; set %s",
                    host, API_KEY_ENV)  # fmt: skip
    try:
        app = create_app(artifacts_dir, queue_size=queue_size, watch_seconds=watch_seconds, api_key=api_key)
    except AskError as e:
        log.error("serve: %s", e)
        return 1
    log.info("serve: http://%s:%d  (API key %s)", host, port, "required" if api_key else "off")
    log.info("serve: deadlines: headers %g s, body %g s, idle keep-alive %d s", timeouts.headers_s, timeouts.body_s,
             timeouts.keep_alive_s)  # fmt: skip
    uvicorn.Server(uvicorn_config(app, host, port, timeouts, log_level="info", access_log=False)).run()
    return 0
