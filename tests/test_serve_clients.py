"""`farense serve` as real clients meet it: the CLI in its own process with an API key, asked through the official
`openai` Python package, through examples/express (Express, and the Node `openai` package for streaming), and by
raw sockets that stall; and one question answered the same by every route (`farense ask`, `/ask`,
`/v1/chat/completions`, the validate stage).

`make test` installs what this needs: the `openai` package (pyproject's [test] extra), Node and npm
(scripts/install-system-deps.sh --test) and the example's node_modules (the Makefile's test-deps).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from farense.answer import PublishedModel, answer, load_published
from farense.export import published_version
from farense.http_timeouts import StallTimeouts
from test_answer_server import QUESTIONS, free_port, without_latency
from test_evaluate import tiny_project

ROOT = Path(__file__).resolve().parents[1]
EXPRESS = ROOT / "examples" / "express"
KEY = "test-key-for-clients"
EVAL_TOKENS = 24  # the validate stage's eval.max_tokens here: long enough to show a whole (random) answer


@dataclass
class Served:
    url: str
    artifacts: Path
    validate_dir: Path
    pm: PublishedModel  # the same published adapter loaded in this process: the direct answers


def env_for_children() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def stop(proc: subprocess.Popen[Any]) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=10)[0].decode(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    project = tiny_project(tmp_path_factory.mktemp("clients"), **{"benchmark.enabled": False,
                                                                   "eval.max_tokens": EVAL_TOKENS})  # fmt: skip
    stages = project.run()
    artifacts = project.cfg.artifacts_dir
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "farense.cli", "serve", "--artifacts", str(artifacts), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env_for_children() | {"FARENSE_API_KEY": KEY}, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "farense serve did not start within 60 s"
                time.sleep(0.3)
        yield Served(url, artifacts, stages["validate"], load_published(artifacts))
    finally:
        out = stop(proc)
    assert KEY not in out


@pytest.fixture()
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


# ---------------------------------------------------------------- the openai Python package


def test_openai_python_lists_the_model_and_answers_like_farense(served: Served, client: openai.OpenAI) -> None:
    version = published_version(served.artifacts).name
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model" and models[0].id.endswith(f"+{version}")
    assert client.models.retrieve(models[0].id).id == models[0].id  # the id holds '/' and '+': percent-encoded
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"

    expected = answer(served.pm, QUESTIONS[0], 12)
    reply = client.chat.completions.create(model="any-name", messages=user(QUESTIONS[0]), max_tokens=12)
    assert reply.choices[0].message.content == expected["answer"] and reply.model == models[0].id
    assert reply.usage.completion_tokens == expected["tokens"] and len(reply.choices) == 1

    cut = expected["answer"][2:5]  # a stop string inside the answer (inside a token, as it happens)
    stopped = client.chat.completions.create(model="m", messages=user(QUESTIONS[0]), max_tokens=12, stop=[cut])
    assert stopped.choices[0].message.content == expected["answer"][: expected["answer"].index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model="m", messages=user(QUESTIONS[0]), max_tokens=12,
                                              temperature=1.5, top_p=0.95, seed=11).choices[0].message.content
               for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1] != expected["answer"]  # the seed repeats a sampled answer

    history = [*user(QUESTIONS[0]), {"role": "assistant", "content": "Em Faro."}, *user(QUESTIONS[1])]
    multi = client.chat.completions.create(model="m", messages=history, max_tokens=10)  # type: ignore[arg-type]
    assert multi.choices[0].message.content == answer(served.pm, QUESTIONS[1], 10, history[:2])["answer"]


def test_openai_python_streams_the_same_answer(served: Served, client: openai.OpenAI) -> None:
    expected = answer(served.pm, QUESTIONS[1], 16)
    chunks = list(client.chat.completions.create(model="m", messages=user(QUESTIONS[1]), max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected["answer"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == expected["tokens"]

    cut = expected["answer"][3:6]
    with client.chat.completions.create(model="m", messages=user(QUESTIONS[1]), max_tokens=16, stream=True,
                                        stop=cut) as stream:  # fmt: skip
        pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream if c.choices]
    assert "".join(p for p, _ in pieces).strip() == expected["answer"][: expected["answer"].index(cut)].strip()
    assert pieces[-1][1] == "stop"


def test_openai_python_errors_name_the_parameter(served: Served, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.chat.completions.create(model="m", messages=user("x"), max_tokens=2)
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    refused = {"n": {"n": 2}, "response_format": {"response_format": {"type": "json_object"}},
               "logprobs": {"logprobs": True}, "tools": {"tools": [{"type": "function", "function": {"name": "f"}}]},
               "max_tokens": {"max_tokens": 5000}, "temperature": {"temperature": 3.0}}  # fmt: skip
    for param, extra in refused.items():
        for stream in (False, True):
            with pytest.raises(openai.UnprocessableEntityError) as e:
                client.chat.completions.create(model="m", messages=user("x"), stream=stream, **extra)
            assert e.value.status_code == 422 and e.value.param == param and param in e.value.message
    with pytest.raises(openai.APIStatusError) as too_long:
        client.chat.completions.create(model="m", messages=user("Farense " * 2000), max_tokens=4)
    assert too_long.value.status_code == 413 and too_long.value.param == "messages"
    with pytest.raises(openai.UnprocessableEntityError) as role:
        client.chat.completions.create(model="m", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert role.value.param == "messages.0.role"

    # Fields OpenAI does not define (extra_body), and OpenAI's that ask for nothing more, change nothing.
    ok = client.chat.completions.create(model="m", messages=user(QUESTIONS[2]), max_tokens=8, n=1, user="u-1",
                                        metadata={"chat": "7"}, store=False, response_format={"type": "text"},
                                        extra_body={"not_an_openai_field": [1, 2]})  # fmt: skip
    assert ok.choices[0].message.content == answer(served.pm, QUESTIONS[2], 8)["answer"]


# ---------------------------------------------------------------- the Express example, with Node's openai package


@pytest.fixture(scope="module")
def express(served: Served) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (EXPRESS / "node_modules" / "express").is_dir():
        pytest.skip(f"needs Node and {EXPRESS / 'node_modules'}: run `make test-deps` (installs them)")
    proc = subprocess.Popen([node, "server.js"], cwd=EXPRESS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "FARENSE_URL": served.url, "FARENSE_API_KEY": KEY, "PORT": "0"},
                            start_new_session=True)  # fmt: skip
    try:
        line = proc.stdout.readline().decode()  # "listening on http://127.0.0.1:<port> ..."; "" if node exited
        assert line.startswith("listening on "), line + proc.stdout.read().decode()[-3000:]
        yield line.split()[2]
    finally:
        stop(proc)


def sse_events(url: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        if not r.headers["content-type"].startswith("text/event-stream"):
            return r.status_code, [json.loads(r.read())]
        return r.status_code, [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_express_example_answers_through_farense_serve(served: Served, express: str) -> None:
    expected = answer(served.pm, QUESTIONS[0], 256)  # the example asks for 256 tokens
    asked = httpx.post(f"{express}/api/ask", json={"prompt": QUESTIONS[0]}, timeout=60)
    assert asked.status_code == 200 and without_latency(asked.json()) == without_latency(expected)

    status, events = sse_events(f"{express}/api/chat", {"prompt": QUESTIONS[0]})
    assert status == 200 and len(events) > 2  # streamed in pieces by Node's openai package
    assert "".join(e.get("text", "") for e in events).strip() == expected["answer"]
    assert events[-1]["finish_reason"] in ("stop", "length") and events[-1]["tokens"] == expected["tokens"]

    history = [*user(QUESTIONS[0]), {"role": "assistant", "content": "Em Faro."}]
    status, events = sse_events(f"{express}/api/chat", {"prompt": QUESTIONS[1], "history": history})
    assert "".join(e.get("text", "") for e in events).strip() == answer(served.pm, QUESTIONS[1], 256, history)["answer"]

    model = httpx.get(f"{express}/api/model", timeout=30).json()
    assert model["adapter"] == published_version(served.artifacts).name and model["id"].endswith(model["adapter"])

    empty = httpx.post(f"{express}/api/ask", json={"prompt": " "}, timeout=30)
    assert empty.status_code == 422 and empty.json()["field"] == "prompt"
    status, events = sse_events(f"{express}/api/chat", {"prompt": "x", "history": [{"role": "robot", "content": "y"}]})
    assert status == 422 and events[0]["field"] == "messages.0.role"


# ---------------------------------------------------------------- clients that stall


def stalled_for(port: int, first: bytes, then: bytes = b"", every: float = 1.0) -> tuple[float, bytes]:
    """Send `first`, then `then` a byte at a time; return the seconds until the server closed and what it sent."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.monotonic()
        s.sendall(first)

        def dribble() -> None:
            for byte in then:
                time.sleep(every)
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=dribble, daemon=True).start()
        s.settimeout(120)
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:  # closed while our own bytes were still arriving: the kernel sends a reset
            pass
        return time.monotonic() - start, received


def test_stalled_clients_are_cut_off(served: Served) -> None:
    t = StallTimeouts()  # the figures docs/serving.md gives
    port = int(served.url.rsplit(":", 1)[1])
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = {
        "connects, sends nothing": (b"", b"", t.headers_s, b""),
        "half the headers": (post, b"", t.headers_s, b"headers did not arrive"),
        "headers a byte a second": (b"P", b"OST /ask HTTP/1.1\r\nHost: " + b"x" * 40, t.headers_s,
                                    b"headers did not arrive"),
        "headers, never the body": (post + b"Content-Length: 64\r\n\r\n", b"", t.body_s, b"body did not arrive"),
        "half the body": (post + b'Content-Length: 64\r\n\r\n{"messages": ', b"", t.body_s, b"body did not arrive"),
        "idle after a response": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"", t.keep_alive_s, b'{"status":"ok"}'),
    }  # fmt: skip
    results: dict[str, tuple[float, bytes]] = {}
    threads = [threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, stalled_for(port, c[0], c[1])))
               for n, c in cases.items()]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for name, (_, _, limit, says) in cases.items():
        seconds, received = results[name]
        assert limit - 0.2 <= seconds <= limit + 3, f"{name}: closed after {seconds:.1f} s, expected {limit} s"
        assert says in received, f"{name}: got {received[:300]!r}"
        if says.startswith(b"head") or says.startswith(b"body"):
            assert received.startswith(b"HTTP/1.1 408 ")
    assert httpx.get(f"{served.url}/health", timeout=10).json() == {"status": "ok"}  # still serving; no key, no details


# ---------------------------------------------------------------- one question, every route


def test_every_route_gives_the_validate_stage_s_answer(served: Served, client: openai.OpenAI) -> None:
    rows = [json.loads(line) for line in (served.validate_dir / "answers.jsonl").read_text().splitlines()]
    assert rows and all(r["tuned_answer"] for r in rows)
    for row in rows:
        q, validated = row["question"], row["tuned_answer"]
        cli = subprocess.run([sys.executable, "-m", "farense.cli", "ask", q, "--artifacts", str(served.artifacts),
                              "--max-tokens", str(EVAL_TOKENS)], capture_output=True, text=True, timeout=120,
                             env=env_for_children())  # fmt: skip
        assert cli.returncode == 0, cli.stderr[-2000:]
        ask = httpx.post(f"{served.url}/ask", json={"prompt": q, "max_tokens": EVAL_TOKENS}, timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        chat = client.chat.completions.create(model="m", messages=user(q), max_tokens=EVAL_TOKENS)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=user(q), max_tokens=EVAL_TOKENS, stream=True) if c.choices).strip()  # fmt: skip
        routes = {"validate stage": validated, "farense ask": json.loads(cli.stdout)["answer"],
                  "/ask": ask.json()["answer"], "/v1/chat/completions": chat.choices[0].message.content,
                  "/v1/chat/completions stream": streamed}  # fmt: skip
        assert len(set(routes.values())) == 1, f"{q!r}: {json.dumps(routes, ensure_ascii=False, indent=1)}"
