"""Load test of `farense serve` over loopback, as JSON: latency, errors, lost requests, tokens/s, and whether
every answer equals `farense ask`'s for the same prompt.

Starts the real server (`python -m farense.cli serve`) on a free port, gets the reference answers from
`farense ask --stdin` (one process, greedy), then sends --requests POST /ask requests from --clients concurrent
clients, cycling through the held-out questions, and stops the server.

    python benchmarks/serve_load.py --artifacts artifacts [--requests 200 --clients 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(path: Path) -> list[str]:
    return [json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ask_answers(artifacts: Path, prompts: list[str], max_tokens: int) -> dict[str, dict[str, Any]]:
    lines = "".join(json.dumps({"id": i, "prompt": p, "max_tokens": max_tokens}) + "\n" for i, p in enumerate(prompts))
    proc = subprocess.run([sys.executable, "-m", "farense.cli", "ask", "--stdin", "--artifacts", str(artifacts)],
                          input=lines, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1800)  # fmt: skip
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    if proc.returncode != 0 or len(replies) != len(prompts):
        sys.exit(f"farense ask failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    return {prompts[r["id"]]: r for r in replies}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--questions", type=Path, default=ROOT / "data/eval/questions.jsonl")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256, help="per answer (farense ask's default)")
    p.add_argument("--timeout", type=float, default=120, help="seconds a client waits for one answer")
    args = p.parse_args()
    prompts = questions(args.questions)
    expected = ask_answers(args.artifacts.resolve(), prompts, args.max_tokens)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "farense.cli", "serve", "--artifacts", str(args.artifacts.resolve()),
                               "--port", str(port), "--queue-size", str(args.clients)], env=ENV, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                sys.exit(f"farense serve exited: {server.stderr.read().decode()[-3000:]}")
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        startup = time.monotonic() - t0
        # One answer before the clock starts (first-call set-up), not counted.
        httpx.post(f"{url}/ask", json={"prompt": prompts[0], "max_tokens": args.max_tokens}, timeout=args.timeout)

        def one(i: int) -> dict[str, Any]:
            prompt = prompts[i % len(prompts)]
            start = time.perf_counter()
            try:
                r = client.post(f"{url}/ask", json={"prompt": prompt, "max_tokens": args.max_tokens})
            except httpx.HTTPError as e:
                return {"i": i, "lost": True, "error": repr(e), "seconds": time.perf_counter() - start}
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            exp = expected[prompt]
            return {"i": i, "lost": False, "status": r.status_code, "seconds": time.perf_counter() - start,
                    "tokens": body.get("tokens", 0), "server_ms": body.get("latency_ms"),
                    "equal": r.status_code == 200 and body.get("answer") == exp["answer"]
                             and body.get("tokens") == exp["tokens"] and body.get("adapter") == exp["adapter"]}  # fmt: skip

        with httpx.Client(timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients)) as client:
            wall0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - wall0
        final_health = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    ok = [r for r in results if not r["lost"] and r["status"] == 200]
    lat = [r["seconds"] for r in ok]
    gen = sum(r["server_ms"] for r in ok) / 1000
    tokens = sum(r["tokens"] for r in ok)
    print(json.dumps({
        "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "adapter": health["adapter"], "server_startup_seconds": round(startup, 2),
        "ok": len(ok), "errors": sum(1 for r in results if not r["lost"] and r["status"] != 200),
        "lost": sum(1 for r in results if r["lost"]),
        "latency_median_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(percentile(lat, 0.95), 3) if lat else None,
        "latency_max_s": round(max(lat), 3) if lat else None,
        "answer_tokens_mean": round(tokens / len(ok), 1) if ok else None,
        "throughput_tokens_per_s": round(tokens / wall, 1),
        "decode_tokens_per_s": round(tokens / gen, 1) if gen else None,
        "requests_per_s": round(len(ok) / wall, 2), "wall_seconds": round(wall, 1),
        "all_equal_farense_ask": bool(ok) and len(ok) == args.requests and all(r["equal"] for r in ok),
        "not_equal": sorted({prompts[r["i"] % len(prompts)] for r in ok if not r["equal"]}),
        "server_requests_served": final_health["requests_served"],
    }, indent=2, ensure_ascii=False))  # fmt: skip


if __name__ == "__main__":
    main()
