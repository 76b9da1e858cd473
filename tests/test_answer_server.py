"""`farense serve` over real HTTP: a tiny random model published into a temporary artifacts folder, uvicorn in a
subprocess (the CLI) or in a thread, and httpx requests: good, bad, a full queue, streaming, an adapter swap."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from safetensors.numpy import load_file, save_file

from farense.answer import answer, load_published
from farense.answer_server import create_app
from farense.export import LATEST, published_root, published_version
from test_evaluate import tiny_project

ROOT = Path(__file__).resolve().parents[1]
ASK_KEYS = {"prompt", "answer", "model", "adapter", "tokens", "latency_ms", "status"}
QUESTIONS = ["Onde joga o Farense?", "Quando foi fundado o Farense?", "Quais são as cores?"]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tiny_project(tmp_path_factory.mktemp("serve"), **{"benchmark.enabled": False})
    project.run()
    assert published_version(project.cfg.artifacts_dir) is not None
    return project.cfg.artifacts_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct(artifacts: Path, version: Path | None = None) -> Any:
    """The non-server path: what `farense ask` runs in-process."""
    return load_published(artifacts, version=version)


def without_latency(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "latency_ms"}


class ThreadServer:
    """uvicorn serving create_app(...) in a thread of this process, so a test can reach the worker."""

    def __init__(self, artifacts: Path, **options: Any) -> None:
        self.app = create_app(artifacts, **options)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(published: Path) -> Iterator[ThreadServer]:
    with ThreadServer(published, queue_size=2, watch_seconds=0) as s:
        yield s


# ---------------------------------------------------------------- the command, in its own process


def test_farense_serve_answers_like_farense_ask(published: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop("FARENSE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "farense.cli", "serve", "--artifacts", str(published), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "farense serve did not start within 60 s"
                time.sleep(0.3)
        assert health["adapter"] == published_version(published).name and health["requests_served"] == 0
        reply = httpx.post(f"http://127.0.0.1:{port}/ask", json={"prompt": QUESTIONS[0], "max_tokens": 8}, timeout=60)
        assert reply.status_code == 200, reply.text
        cli = subprocess.run([sys.executable, "-m", "farense.cli", "ask", QUESTIONS[0], "--artifacts", str(published),
                              "--max-tokens", "8"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert set(reply.json()) == ASK_KEYS
        assert without_latency(reply.json()) == without_latency(json.loads(cli.stdout))
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["requests_served"] == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert "loaded" in out and "0.0.0.0" not in out


# ---------------------------------------------------------------- good requests


def test_ask_and_chat_completions_equal_the_direct_answers(server: ThreadServer, published: Path) -> None:
    pm = direct(published)
    for q in QUESTIONS:
        expected = without_latency(answer(pm, q, 12))
        got = httpx.post(f"{server.url}/ask", json={"prompt": q, "max_tokens": 12}, timeout=60)
        assert got.status_code == 200 and without_latency(got.json()) == expected
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0})
        body = chat.json()
        assert chat.status_code == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected["answer"]}
        assert body["usage"]["completion_tokens"] == expected["tokens"]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "Em Faro."}]
    multi = httpx.post(f"{server.url}/ask", json={"prompt": QUESTIONS[1], "messages": history, "max_tokens": 10})
    assert without_latency(multi.json()) == without_latency(answer(pm, QUESTIONS[1], 10, history))


def test_streaming_sends_the_same_answer_as_server_sent_events(server: ThreadServer, published: Path) -> None:
    expected = answer(direct(published), QUESTIONS[1], 16)
    body = {"messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 16, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == expected["answer"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] == expected["tokens"]


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize(("body", "status", "field", "words"), [
    (b"{not json", 400, "body", "not valid JSON"),
    (b"[1, 2]", 400, "body", "JSON object"),
    (b"{}", 422, "prompt", "prompt"),
    (b'{"max_tokens": 5}', 422, "prompt", "prompt"),
    (b'{"prompt": 42}', 422, "prompt", "string"),
    (b'{"prompt": "   "}', 422, "prompt", "empty"),
    (b'{"prompt": "ok", "max_tokens": "9"}', 422, "max_tokens", "integer"),
    (b'{"prompt": "ok", "max_tokens": 0}', 422, "max_tokens", "greater than or equal to 1"),
    (b'{"prompt": "ok", "max_tokens": 100000}', 422, "max_tokens", "less than or equal"),
    (b'{"prompt": "ok", "max_tokens": 1024}', 422, "max_tokens", "does not fit"),
    (b'{"messages": [{"role": "user", "content": 3}]}', 422, "messages.0.content", "string"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 422, "messages.0.role", "robot"),
])  # fmt: skip
def test_bad_ask_requests_get_json_errors_naming_the_field(server: ThreadServer, body: bytes, status: int,
                                                           field: str, words: str) -> None:  # fmt: skip
    r = httpx.post(f"{server.url}/ask", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["status"] == "error" and err["field"] == field and words in err["error"], err


def test_prompts_over_the_context_are_refused(server: ThreadServer) -> None:
    context = server.app.state.worker.current.engine.context_length
    words = " ".join(["Farense"] * context)  # over `context` tokens, under the character bound
    r = httpx.post(f"{server.url}/ask", json={"prompt": words, "max_tokens": 4})
    assert r.status_code == 413 and r.json()["field"] == "prompt" and f"the context is {context}" in r.json()["error"]
    huge = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 10**6}]})
    assert huge.status_code == 413 and huge.json()["error"]["param"] == "messages"  # OpenAI's error shape on /v1
    no_messages = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert no_messages.status_code == 422 and no_messages.json()["error"]["param"] == "messages"
    bad_stream = httpx.post(f"{server.url}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "x"}], "stream": "yes"})
    assert bad_stream.status_code == 422 and bad_stream.json()["error"]["param"] == "stream"
    assert bad_stream.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- load


def test_a_full_queue_gets_503_with_retry_after_and_the_queued_requests_finish(server: ThreadServer,
                                                                                published: Path) -> None:  # fmt: skip
    worker = server.app.state.worker
    expected = without_latency(answer(direct(published), QUESTIONS[2], 6))
    gate = threading.Event()
    worker.admit()  # the model is busy with a generation that waits for `gate`
    blocker = worker.executor.submit(gate.wait, 30)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            queued = [pool.submit(httpx.post, f"{server.url}/ask", json={"prompt": QUESTIONS[2], "max_tokens": 6},
                                  timeout=60) for _ in range(2)]  # fmt: skip
            deadline = time.monotonic() + 10
            while worker.waiting < worker.capacity:  # both are admitted and wait for the model
                assert time.monotonic() < deadline
                time.sleep(0.02)
            start = time.monotonic()
            busy = httpx.post(f"{server.url}/ask", json={"prompt": QUESTIONS[2]}, timeout=10)
            assert time.monotonic() - start < 5  # answered at once, not queued
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["status"] == "error" and "busy" in busy.json()["error"]
            streamed = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                                  json={"messages": [{"role": "user", "content": "x"}], "stream": True})
            assert streamed.status_code == 503 and "Retry-After" in streamed.headers
            gate.set()
            results = [f.result() for f in queued]
    finally:
        gate.set()
        blocker.result()
        worker.release(0.0, True)
    assert [r.status_code for r in results] == [200, 200]
    assert all(without_latency(r.json()) == expected for r in results)
    assert httpx.get(f"{server.url}/health").json()["rejected_busy"] >= 2


def test_concurrent_clients_all_get_their_own_answer(server: ThreadServer, published: Path) -> None:
    pm = direct(published)
    expected = {q: without_latency(answer(pm, q, 8)) for q in QUESTIONS}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda q: (q, httpx.post(f"{server.url}/ask", json={"prompt": q, "max_tokens": 8},
                                                         timeout=60)), QUESTIONS))  # fmt: skip
    for q, r in replies:
        assert r.status_code == 200 and without_latency(r.json()) == expected[q]


# ---------------------------------------------------------------- auth and swap


def test_api_key_is_required_when_set(published: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = "s3cret-key-for-test"
    with ThreadServer(published, watch_seconds=0, api_key=key) as s:
        assert httpx.post(f"{s.url}/ask", json={"prompt": "x", "max_tokens": 2}).status_code == 401
        wrong = httpx.post(f"{s.url}/ask", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["field"] == "authorization"
        ok = httpx.post(f"{s.url}/ask", json={"prompt": "x", "max_tokens": 2}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert httpx.post(f"{s.url}/ask", json={"prompt": "x", "max_tokens": 2}, headers={"X-API-Key": key}).status_code == 200
        assert httpx.get(f"{s.url}/health").json() == {"status": "ok"}  # up, and nothing else without the key
        detailed = httpx.get(f"{s.url}/health", headers={"Authorization": f"Bearer {key}"}).json()
        assert detailed["adapter"] == published_version(published).name and "model" in detailed
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
    assert key not in caplog.text


def publish_changed_copy(artifacts: Path) -> Path:
    """A new version with other adapter weights, and `latest` switched to it the way export.publish does."""
    root = published_root(artifacts)
    old = published_version(artifacts)
    new = root / "versions" / f"{old.name}-swapped"
    shutil.copytree(old, new)
    weights = load_file(str(new / "adapters.safetensors"))
    save_file({k: (v * 3 + 0.05).astype(v.dtype) for k, v in weights.items()}, str(new / "adapters.safetensors"))
    tmp = root / "latest.tmp"
    tmp.symlink_to(Path("versions") / new.name)
    os.replace(tmp, root / LATEST)
    return new


def test_a_newly_published_adapter_is_swapped_in_without_dropping_requests(
    published: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(published, artifacts, symlinks=True)
    old = published_version(artifacts)
    before = without_latency(answer(direct(artifacts), QUESTIONS[0], 24))
    caplog.set_level("INFO", logger="farense.serve")
    with ThreadServer(artifacts, queue_size=16, watch_seconds=0.2) as s:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            inflight = [pool.submit(httpx.post, f"{s.url}/ask", json={"prompt": QUESTIONS[0], "max_tokens": 24},
                                    timeout=120) for _ in range(6)]  # fmt: skip
            new = publish_changed_copy(artifacts)
            replies = [f.result() for f in inflight]
        assert all(r.status_code == 200 for r in replies)  # none dropped by the swap
        assert all(r.json()["adapter"] in (old.name, new.name) for r in replies)
        deadline = time.monotonic() + 60
        while httpx.get(f"{s.url}/health").json()["adapter"] != new.name:
            assert time.monotonic() < deadline, "the server did not switch to the new adapter"
            time.sleep(0.1)
        after = httpx.post(f"{s.url}/ask", json={"prompt": QUESTIONS[0], "max_tokens": 24}, timeout=60).json()
    expected = without_latency(answer(direct(artifacts, new), QUESTIONS[0], 24))
    assert without_latency(after) == expected and after["adapter"] == new.name
    assert before["adapter"] == old.name
    assert f"switched adapter {old.name} -> {new.name}" in caplog.text


def test_without_room_for_the_float32_copy_it_still_serves(published: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(published, artifacts, symlinks=True, ignore=shutil.ignore_patterns("serving"))
    (artifacts / "serving").write_text("not a folder")  # as a read-only or full disk would, mkdir fails
    with ThreadServer(artifacts, watch_seconds=0) as s:
        r = httpx.post(f"{s.url}/ask", json={"prompt": QUESTIONS[0], "max_tokens": 6}, timeout=60)
        assert r.status_code == 200
        assert without_latency(r.json()) == without_latency(answer(direct(published), QUESTIONS[0], 6))
        assert not s.app.state.worker.current.engine.options["from_dense_copy"]
