"""What farense.fast_math buys on this machine, as JSON lines: the cost per element of mx.exp and of ours, of
mlx-lm's swiglu and ours, of mlx's attention and causal_attention (forward, and forward + backward), then a training
step of the embedded model (without it, with it, with it but mlx's attention) and greedy answers of the published
adapter, each with and without it.

The step and answer comparisons load both models in one process and alternate between them, round by round, so a
slow spell of the machine hits both alike (on this VM two runs of one command differ by up to 15%).

    python benchmarks/fast_math.py [--rounds 10] [--batch 4] [--artifacts artifacts] [--questions N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu  # noqa: E402

from benchmarks.step_profile import median_seconds  # noqa: E402
from farense import fast_math  # noqa: E402


def emit(**row: Any) -> None:
    print(json.dumps(row), flush=True)


def ops() -> None:
    x = mx.random.normal((800 * 1536,), key=mx.random.key(0)) * 4
    mx.eval(x)
    for name, fn in (("add", lambda: x + x), ("mx.exp", lambda: mx.exp(x)), ("fast_math.exp", lambda: fast_math.exp(x))):
        emit(measure="op", op=name, ns_per_element=round(1e9 * median_seconds(fn, 20) / x.size, 2))
    gate, up = (mx.random.normal((4, 127, 1536), key=mx.random.key(k)) for k in (1, 2))
    mx.eval(gate, up)
    for name, fn in (("mlx_lm swiglu", mlx_lm_swiglu), ("fast_math.swiglu", fast_math.swiglu)):
        grad = mx.compile(mx.grad(lambda g, u, fn=fn: (fn(g, u) * u).sum(), argnums=(0, 1)))
        emit(measure="op", op=name, shape=[4, 127, 1536],
             forward_ms=round(1000 * median_seconds(lambda fn=fn: fn(gate, up), 20), 3),
             forward_backward_ms=round(1000 * median_seconds(lambda grad=grad: grad(gate, up), 20), 3))  # fmt: skip
    # One SmolLM2 attention at 4 x 128: 9 query heads over 3 key/value heads of 64.
    q, k, v = (mx.random.normal((4, h, 128, 64), key=mx.random.key(3 + i)) for i, h in enumerate((9, 3, 3)))
    mx.eval(q, k, v)
    for name, fn in (("mx.fast.scaled_dot_product_attention", lambda q, k, v: mx.fast.scaled_dot_product_attention(
            q, k, v, scale=1.0, mask="causal")), ("fast_math.causal_attention", fast_math.causal_attention)):
        grad = mx.compile(mx.grad(lambda q, k, v, fn=fn: (fn(q, k, v) * q).sum(), argnums=(0, 1, 2)))
        forward = mx.compile(fn)
        emit(measure="op", op=name, shape=[4, 9, 128, 64],
             forward_ms=round(1000 * median_seconds(lambda f=forward: f(q, k, v), 20), 3),
             forward_backward_ms=round(1000 * median_seconds(lambda grad=grad: grad(q, k, v), 20), 3))  # fmt: skip


def load_both(load: Callable[[], Any]) -> dict[str, Any]:
    """The same model loaded twice: once as farense.compute leaves it on this machine, once without fast_math."""
    swap = fast_math.use_fast_math
    try:
        fast_math.use_fast_math = lambda model: 0
        plain = load()
    finally:
        fast_math.use_fast_math = swap
    return {"plain": plain, "fast_math": load()}


def train_step(model_dir: Path, batch: int, rounds: int) -> None:
    from farense.batching import collate
    from farense.config import load_config
    from farense.loss import masked_head_loss
    from farense.train import load_for_training, loss_inputs

    tcfg = load_config(None, root=ROOT).train  # train.fast_math on for one model, off for the other
    rng = random.Random(0)
    examples = [([rng.randrange(100, 40000) for _ in range(128)], 0) for _ in range(batch)]
    inputs = loss_inputs(*collate(examples, list(range(batch)), 128), True)
    models = {name: load_for_training(model_dir, tcfg.model_copy(update={"fast_math": on}))[0]
              for name, on in (("plain", False), ("fast_math", True))}  # fmt: skip
    swap = fast_math.use_fast_attention
    try:  # fast_math's SwiGLU and cross-entropy, mlx's attention: what causal_attention adds
        fast_math.use_fast_attention = lambda model: 0
        models["fast_math_mlx_attention"] = load_for_training(model_dir, tcfg.model_copy(update={"fast_math": True}))[0]
    finally:
        fast_math.use_fast_attention = swap
    steps = {}
    for name, model in models.items():
        value_and_grad = nn.value_and_grad(model, masked_head_loss)
        steps[name] = mx.compile(lambda vg=value_and_grad, m=model: vg(m, *inputs))
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses = {}
    for _ in range(rounds + 1):  # the first round compiles
        for name, step in steps.items():
            t0 = time.perf_counter()
            (loss, _), _ = out = step()
            mx.eval(out)
            times[name].append(time.perf_counter() - t0)
            losses.setdefault(name, loss.item())
    for name, ts in times.items():
        s = statistics.median(ts[1:])
        emit(measure="train_step", model=name, batch=batch, seq=127, rounds=rounds, step_s=round(s, 3),
             tokens_per_s=round(batch * 127 / s, 1), first_loss=losses[name])  # fmt: skip


def answers(artifacts: Path, questions: int) -> None:
    from farense.answer import load_published

    qs = [json.loads(line)["question"] for line in (ROOT / "data/eval/questions.jsonl").read_text().splitlines()]
    qs = qs[:questions] if questions > 0 else qs
    engines = {name: pm.engine for name, pm in load_both(lambda: load_published(artifacts)).items()}
    for engine in engines.values():
        engine.generate(qs[0], 256)  # first-call set-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {name: [] for name in engines}
    for q in qs:
        for name, engine in engines.items():
            engine.draft.forget()  # each engine drafts every question from the training answers alone
            t0 = time.perf_counter()
            texts[name].append(engine.generate(q, 256).text)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        emit(measure="answers", model=name, questions=len(qs), mean_s=round(statistics.mean(ts), 4),
             median_s=round(statistics.median(ts), 4), all_equal_plain=texts[name] == texts["plain"])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--questions", type=int, default=0, help="held-out questions to answer (0: all)")
    p.add_argument("--only", choices=["ops", "train_step", "answers"], action="append")
    args = p.parse_args()
    only = set(args.only or ["ops", "train_step", "answers"])
    emit(measure="device", device=str(mx.default_device()), mlx=mx.__version__)
    if "ops" in only:
        ops()
    if "train_step" in only:
        from farense.config import load_config
        from farense.stages import run_local

        built = run_local(load_config(None, root=ROOT), until="model")
        train_step(Path(built["model"]["path"]), args.batch, args.rounds)
    if "answers" in only:
        from farense.export import published_version

        if published_version(args.artifacts) is None:
            emit(measure="answers", skipped=f"no published adapter under {args.artifacts}")
        else:
            answers(args.artifacts, args.questions)


if __name__ == "__main__":
    main()
