"""`farense ask` as the chatbot backend spawns it (JSON only on stdout), and mlx_lm.server on the published adapter."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from farense.answer import ask_command, parse_request
from farense.export import LATEST, published_root, published_version
from test_evaluate import tiny_project

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"prompt", "answer", "model", "adapter", "tokens", "latency_ms", "status"}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tiny_project(tmp_path_factory.mktemp("answer"), **{"benchmark.enabled": False})
    project.run()
    assert published_version(project.cfg.artifacts_dir) is not None
    return project.cfg.artifacts_dir


def farense_ask(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farense.cli", "ask", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd)  # fmt: skip


def test_ask_prints_exactly_one_json_object(published: Path) -> None:
    proc = farense_ask("Quem foi Hassan Nader?", "--artifacts", str(published), "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert set(obj) == KEYS and obj["status"] == "ok" and obj["prompt"] == "Quem foi Hassan Nader?"
    assert 1 <= obj["tokens"] <= 5 and obj["latency_ms"] > 0 and isinstance(obj["answer"], str)
    assert obj["adapter"] == published_version(published).name
    assert "loaded" in proc.stderr


def test_errors_are_json_with_a_non_zero_exit(tmp_path: Path, published: Path) -> None:
    proc = farense_ask("Olá", "--artifacts", str(tmp_path / "nothing"))
    assert proc.returncode == 1
    obj = json.loads(proc.stdout)
    assert obj["status"] == "error" and "no published adapter" in obj["error"] and "farense run" in obj["error"]
    proc = farense_ask("--artifacts", str(published))  # neither a prompt nor --stdin
    assert proc.returncode == 2 and json.loads(proc.stdout)["status"] == "error"


def test_the_config_names_the_artifacts_root(published: Path, tmp_path: Path) -> None:
    (tmp_path / "farense.yaml").write_text(f"artifacts_dir: {published}\n")
    proc = farense_ask("Olá", "--max-tokens", "2", cwd=tmp_path)  # ./farense.yaml, as the other commands read it
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert json.loads(proc.stdout)["status"] == "ok"


def test_stdin_batch_loads_once_and_answers_each_line(published: Path) -> None:
    lines = [
        json.dumps({"id": "a1", "prompt": "Onde joga o Farense?", "max_tokens": 3}),
        "Quando foi fundado o Farense?",
        json.dumps("Quais são as cores?"),
        json.dumps({"question": "wrong field", "id": 7}),
        "",
        json.dumps({"prompt": "x", "max_tokens": 0}),
    ]
    proc = farense_ask("--stdin", "--artifacts", str(published), "--max-tokens", "4", stdin="\n".join(lines) + "\n")
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["status"] for o in out] == ["ok", "ok", "ok", "error", "error"]
    assert out[0]["id"] == "a1" and out[0]["tokens"] <= 3 and out[2]["prompt"] == "Quais são as cores?"
    assert "prompt" in out[3]["error"] and out[3]["id"] == 7 and "max_tokens" in out[4]["error"]
    assert proc.returncode == 1  # one line failed
    assert proc.stderr.count("farense ask: loaded") == 1


def test_library_output_never_reaches_stdout(published: Path, capfd: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import farense.answer as answer_mod

    real = answer_mod.answer

    def noisy(pm, prompt, max_tokens):  # noqa: ANN001, ANN202
        print("a library print")
        os.write(1, b"a C-level write\n")
        return real(pm, prompt, max_tokens)

    monkeypatch.setattr(answer_mod, "answer", noisy)
    code = ask_command(None, True, 2, published, None, stdin=io.StringIO('{"prompt": "Olá"}\n'))
    out, err = capfd.readouterr()
    assert code == 0
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["ok"]
    assert "a library print" in err and "a C-level write" in err


def test_request_lines() -> None:
    assert parse_request('{"prompt": "x", "id": 3, "max_tokens": 9, "other": 1}') == ("x", {"id": 3, "max_tokens": 9})
    assert parse_request('"x"') == ("x", {})
    assert parse_request("texto simples") == ("texto simples", {})
    assert parse_request('{"question": "x", "id": 1}') == (None, {"id": 1})
    assert parse_request("[1, 2]") == (None, {})


# ---------------------------------------------------------------- serving over HTTP (docs/serving.md)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_mlx_lm_server_serves_the_published_adapter(published: Path) -> None:
    meta = json.loads((published_version(published) / "metadata.json").read_text())
    port = free_port()
    args = [sys.executable, "-m", "mlx_lm", "server", "--model", meta["base_model"]["path"],
            "--adapter-path", str(published_root(published) / LATEST), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                http_json(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "mlx_lm.server did not start within 60 s"
                time.sleep(0.3)
        reply = http_json(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "messages": [{"role": "system", "content": meta["system_prompt"]},
                         {"role": "user", "content": "Onde joga o Farense?"}],
            "max_tokens": 4, "temperature": 0,
        }, timeout=60)  # fmt: skip
        assert reply["object"] == "chat.completion"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["usage"]["completion_tokens"] <= 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
