"""OpenAI's chat-completion parameters on `farense serve`, over real HTTP with a tiny random model: each one honoured
(stop, temperature, top_p, seed) gives what the engine gives decoding the same way directly; each one refused gets
a 422 naming it; fields OpenAI does not define are ignored; docs/serving.md's table names them all."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import farense  # noqa: F401  (preloads OpenBLAS before mlx)
import httpx
import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

from farense.answer import load_published
from farense.answer_server import CHAT_FIELDS_REFUSED, ChatBody
from farense.inference import InferenceModel
from test_answer_server import QUESTIONS, ThreadServer, published  # noqa: F401  (published: the fixture)

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": QUESTIONS[0]}]
TOKENS = 24


@pytest.fixture(scope="module")
def server(published: Path) -> Iterator[ThreadServer]:  # noqa: F811
    with ThreadServer(published, watch_seconds=0) as s:
        yield s


@pytest.fixture(scope="module")
def engine(published: Path) -> InferenceModel:  # noqa: F811
    return load_published(published).engine


def chat(server: ThreadServer, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": TOKENS, **body},
                      timeout=60)  # fmt: skip


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed(server: ThreadServer, **body: Any) -> tuple[str, str]:
    """The streamed answer's text and finish_reason."""
    payload = {"messages": MESSAGES, "max_tokens": TOKENS, "stream": True, **body}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


def sampled(engine: InferenceModel, temperature: float, top_p: float, seed: int) -> str:
    """mlx-lm's sampler, seeded as mlx_lm.server seeds it, on the engine directly."""
    mx.random.seed(seed)
    return engine.generate(MESSAGES, TOKENS, sampler=make_sampler(temperature, top_p=top_p)).text


# ---------------------------------------------------------------- honoured


def test_stop_ends_the_answer_before_the_first_stop_string(server: ThreadServer, engine: InferenceModel) -> None:
    full = engine.generate(MESSAGES, TOKENS)
    assert full.finish_reason == "length" and len(full.text) > 8
    inside = full.text[3:6]  # text-level: found inside a token as well as across tokens
    expected = full.text[: full.text.index(inside)].strip()  # answers are stripped, as `farense ask`'s
    for stop in (inside, [inside], ["never-in-it", inside]):
        r = chat(server, stop=stop)
        assert content(r) == expected and r.json()["choices"][0]["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] < full.tokens
        text, finish = streamed(server, stop=stop)
        assert (text.strip(), finish) == (expected, "stop")  # nothing after the stop string is sent
    assert content(chat(server, stop="\u2603")) == full.text  # absent: the whole answer
    assert streamed(server, stop="\u2603")[0].strip() == full.text
    direct = engine.generate(MESSAGES, TOKENS, stop=[inside])
    assert (direct.text, direct.finish_reason) == (expected, "stop")


def test_temperature_top_p_and_seed_sample_with_mlx_lm(server: ThreadServer, engine: InferenceModel) -> None:
    greedy = engine.generate(MESSAGES, TOKENS).text
    assert content(chat(server)) == greedy  # greedy stays the default
    assert content(chat(server, temperature=0, seed=5)) == greedy
    hot = content(chat(server, temperature=1.5, seed=7))
    assert hot != greedy  # temperature is honoured
    assert hot == content(chat(server, temperature=1.5, seed=7)) == sampled(engine, 1.5, 1.0, 7)  # and the seed
    assert content(chat(server, temperature=1.5, seed=8)) != hot
    assert streamed(server, temperature=1.5, seed=7)[0] == hot
    nucleus = content(chat(server, temperature=1.5, top_p=0.5, seed=7))
    assert nucleus == sampled(engine, 1.5, 0.5, 7)  # top_p is honoured
    assert content(chat(server, temperature=1.5, top_p=1e-6, seed=7)) == greedy  # only the likeliest token left
    assert content(chat(server)) == greedy  # sampling left the speculative greedy path as it was


def test_fields_openai_does_not_define_and_no_op_values_change_nothing(server: ThreadServer,
                                                                        engine: InferenceModel) -> None:  # fmt: skip
    greedy = engine.generate(MESSAGES, TOKENS).text
    noise = {"model": "gpt-4o", "n": 1, "response_format": {"type": "text"}, "logprobs": False, "top_logprobs": 0,
             "logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0.0, "tools": [], "tool_choice": "none",
             "modalities": ["text"], "verbosity": "medium", "user": "u-1", "metadata": {"chat": "7"}, "store": False,
             "service_tier": "auto", "parallel_tool_calls": True, "prediction": None, "audio": None,
             "stream_options": {"include_usage": True}, "not_an_openai_field": {"x": [1]}}  # fmt: skip
    assert content(chat(server, **noise)) == greedy


# ---------------------------------------------------------------- refused


REFUSED: list[tuple[str, Any]] = [
    ("n", 2), ("n", 0),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}),
    ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"17": 5}),
    ("frequency_penalty", 0.5), ("presence_penalty", -1),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("reasoning_effort", "low"), ("verbosity", "low"), ("web_search_options", {}),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", ""), ("stop", 7),
    ("temperature", 2.5), ("temperature", "hot"), ("top_p", 1.5), ("seed", "1"), ("stream_options", "yes"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_what_cannot_be_honoured_is_refused_naming_the_field(server: ThreadServer, field: str, value: Any) -> None:
    for stream in (False, True):
        r = chat(server, stream=stream, **{field: value})
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", r.text
        error = r.json()["error"]
        assert error["param"].split(".")[0] == field and field in error["message"]
        assert error["type"] == "invalid_request_error"


def test_every_refused_field_is_tested() -> None:
    assert set(CHAT_FIELDS_REFUSED) <= {field for field, _ in REFUSED}


def test_docs_table_names_every_field() -> None:
    docs = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    table = "\n".join(line for line in docs.splitlines() if line.startswith("| `"))
    named = set(re.findall(r"`([a-z_]+)`", table))
    assert set(CHAT_FIELDS_REFUSED) | set(ChatBody.model_fields) <= named
