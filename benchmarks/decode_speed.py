"""Greedy decoding speed of the published adapter on this machine, one option at a time, as JSON.

Each option loads the base + adapter its own way, answers the held-out questions (one warm-up answer first) and
reports decode tokens/s, mean latency per answer and whether every answer equals the reference path's: the
validate stage's own load_base + attach_adapter + generate_answer (unfused LoRA on the dense float32 base, what
`farense ask` ran before farense.inference). tokens_per_second counts the whole answer (prompt included), as a
user waits for it. Options that are slow on CPU answer only --slow-questions questions, one option at a time.

    python benchmarks/decode_speed.py --artifacts artifacts [--questions data/eval/questions.jsonl]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (preloads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from farense import inference  # noqa: E402
from farense.evaluate import attach_adapter, generate_answer, load_base  # noqa: E402
from farense.export import METADATA_FILE, published_version, read_draft_corpus  # noqa: E402

Answerer = Callable[[str], tuple[str, int, float]]  # question -> (text, tokens, seconds)


def reference(base: Path, adapter: Path, system: str | None) -> Answerer:
    model, tokenizer, _ = load_base(base)
    model = attach_adapter(model, adapter)

    def ask(q: str) -> tuple[str, int, float]:
        a = generate_answer(model, tokenizer, inference.chat_prompt(tokenizer, q, system), MAX_TOKENS)
        return a.text, a.tokens, a.seconds

    return ask


def engine(**options: Any) -> Callable[[Path, Path, str | None], Answerer]:
    quantize_bits = options.pop("quantize_bits", None)

    def build(base: Path, adapter: Path, system: str | None) -> Answerer:
        im = inference.load(base, adapter, system_prompt=system, draft_corpus=read_draft_corpus(adapter), **options)
        if quantize_bits:
            # MLX's own quantized matmul on the fused dense weights (the embedding/lm_head included).
            nn.quantize(im.model, group_size=64, bits=quantize_bits)
            mx.eval(im.model.parameters())
            im.cache_prefix(im._prefix)

        def ask(q: str) -> tuple[str, int, float]:
            g = im.generate(q, MAX_TOKENS)
            return g.text, g.tokens, g.seconds

        return ask

    return build


OPTIONS: dict[str, tuple[Callable[..., Answerer], bool]] = {  # name -> (builder, slow on CPU)
    "reference: unfused LoRA, float32 (validate stage path)": (reference, False),
    "fused, float32": (engine(prefix_cache=False, draft_tokens=0), False),
    "unfused, float32, system-prefix KV cache": (engine(fuse=False, draft_tokens=0), False),
    "fused, float32, system-prefix KV cache": (engine(draft_tokens=0), False),
    "fused, float32, prefix cache, drafts from the training answers, 8 a pass": (engine(draft_tokens=8), False),
    "fused, float32, prefix cache, drafts from the training answers, 16 a pass": (engine(draft_tokens=16), False),
    "fused, float32, prefix cache, drafts from the training answers, 32 a pass": (engine(draft_tokens=32), False),
    "fused, float32, prefix cache, drafts from the training answers, 48 a pass (farense.inference default)": (
        engine(), False),
    "fused, bfloat16, system-prefix KV cache": (engine(dtype="bfloat16", draft_tokens=0), True),
    "fused, float16, system-prefix KV cache": (engine(dtype="float16", draft_tokens=0), True),
    "fused, 8-bit MLX quantized, system-prefix KV cache": (engine(quantize_bits=8, draft_tokens=0), True),
}
MAX_TOKENS = 48


def summary(name: str, qs: list[str], answers: list[tuple[str, int, float]], load_s: float,
            expected: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    tokens, seconds = sum(a[1] for a in answers), sum(a[2] for a in answers)
    row = {
        "option": name, "answers": len(qs), "load_seconds": round(load_s, 2), "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1), "mean_answer_seconds": round(seconds / len(qs), 3),
        "answers_equal_reference": all(expected.get(q) == a[0] for q, a in zip(qs, answers)),
        "differing": sorted({q for q, a in zip(qs, answers) if expected.get(q) != a[0]}),
    }  # fmt: skip
    print(json.dumps(row, ensure_ascii=False), file=sys.stderr)
    return row


def main() -> None:
    global MAX_TOKENS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--questions", type=Path, default=ROOT / "data/eval/questions.jsonl")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--slow-questions", type=int, default=2, help="questions for the options slow on CPU (0: skip)")
    p.add_argument("--rounds", type=int, default=1, help="times each option answers every question")
    p.add_argument("--only", action="append", help="run only options whose name contains this (repeatable)")
    args = p.parse_args()
    MAX_TOKENS = args.max_tokens
    version = published_version(args.artifacts)
    if version is None:
        sys.exit(f"no published adapter under {args.artifacts}; run `farense run` first")
    meta = json.loads((version / METADATA_FILE).read_text())
    base, system = Path(meta["base_model"]["path"]), meta.get("system_prompt")
    lines = args.questions.read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines if line.strip()]

    selected = {n: v for n, v in OPTIONS.items() if not args.only or any(s in n for s in args.only)}
    fast = {n: b for n, (b, slow) in selected.items() if not slow}
    slow = {n: b for n, (b, slow) in selected.items() if slow} if args.slow_questions > 0 else {}
    # All options stay loaded and take turns question by question (rotating which goes first), so that the
    # load other jobs put on a shared machine falls on every option alike.
    loaded: dict[str, tuple[Answerer, float]] = {}
    for name, build in fast.items():
        t0 = time.perf_counter()
        ask = build(base, version, system)
        loaded[name] = (ask, time.perf_counter() - t0)
        ask(questions[0])  # warm-up
    answers: dict[str, list[tuple[str, int, float]]] = {n: [] for n in loaded}
    names = list(loaded)
    for i, q in enumerate(questions * args.rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            answers[name].append(loaded[name][0](q))
    expected = dict(zip(questions, (a[0] for a in answers[names[0]]))) if names else {}
    results = [summary(n, questions * args.rounds, answers[n], loaded[n][1], expected) for n in names]
    for name, build in slow.items():  # one at a time: each holds another copy of the model
        loaded.clear()
        gc.collect()
        mx.clear_cache()
        t0 = time.perf_counter()
        ask = build(base, version, system)
        load_s = time.perf_counter() - t0
        qs = questions[: args.slow_questions]
        ask(qs[0])
        results.append(summary(name, qs, [ask(q) for q in qs], load_s, expected))
        del ask
    print(json.dumps({"machine": f"{platform.machine()} {platform.processor()}".strip(), "adapter": version.name,
                      "max_tokens": MAX_TOKENS, "results": results}, indent=2, ensure_ascii=False))  # fmt: skip


if __name__ == "__main__":
    main()
