"""The train stage itself (farense.train.train_stage) on a random-weight 4-bit Mistral-7B-shaped MLX folder.

    python benchmarks/train_stage_7b.py --make /root/m7b-mlx                     # folder + chat data, then exit
    python benchmarks/train_stage_7b.py --model /root/m7b-mlx --work /root/ts --steps 60 [--devices 2]

The folder has mlx-lm's layout (4-bit affine, group 64, bf16) with the tiny test tokenizer (tests/tiny.py), and
the data are chat rows of about 600 tokens, so every example is cut at train.max_seq_length=512 like the step
benchmark's batch (4 x 512, recompute path, LoRA r8 on q,k,v,o,gate,up,down, AdamW). Prints one JSON line: the
stage's own summary (tokens/s over the whole run, validation excluded) and its steady-state windows from
metrics.csv (the first window holds compilation). Needs farense's imports: mlx, mlx-lm, pydantic, pyyaml, psutil.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
import farense  # noqa: E402,F401
from farense import compute  # noqa: E402,F401  (before mlx: the CUDA graph size)


def make(folder: Path, shape_name: str, rows: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model
    from shapes import SHAPES
    from tiny import BOS, EOS, SPECIAL_TOKENS, _write_tokenizer, tiny_tokenizer

    tic = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES[shape_name],
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_traditional": False,
              "bos_token_id": SPECIAL_TOKENS.index(BOS), "eos_token_id": SPECIAL_TOKENS.index(EOS)}  # fmt: skip
    config["vocab_size"] = max(config["vocab_size"], 512)  # the test tokenizer's (the tiny shape has 256)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    for layer in model.layers:
        mx.eval(layer.parameters())
    model, config = quantize_model(model, config, 64, 4)
    mx.eval(model.parameters())
    save_model(folder, model, donate_model=True)
    save_config(config, folder / "config.json")
    _write_tokenizer(tiny_tokenizer(), folder)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    words = "O Farense joga no Estadio de Sao Luis em Faro e foi fundado em 1910 no Algarve".split()
    for split, n in (("train", rows), ("valid", 8)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                answer = " ".join(words[(i + j) % len(words)] for j in range(400))
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Pergunta {i}: fala do Farense."},
                                                 {"role": "assistant", "content": answer}]}) + "\n")  # fmt: skip
    return {"made": str(folder), "seconds": round(time.perf_counter() - tic, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make", type=Path)
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--model", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/train-stage"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4, help="global batch (each of --devices processes takes its share)")
    p.add_argument("--devices", default="1")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override on top of the benchmark's, e.g. train.masked_lm_head=false")
    args = p.parse_args(argv)
    if args.make:
        print(json.dumps(make(args.make, args.shape, args.rows)), flush=True)
        return 0

    from farense.config import load_config, parse_override
    from farense.progress import NullReporter
    from farense.stages import StageContext
    from farense.train import read_metrics, train_stage

    devices = args.devices if args.devices == "auto" else int(args.devices)
    cfg = load_config(None, {
        "train.max_steps": args.steps, "train.batch_size": args.batch, "train.grad_accumulation": 1,
        "train.max_seq_length": 512, "train.compute_path": "recompute", "train.log_every": args.log_every,
        "train.eval_every": 10_000, "train.save_every": 10_000, "train.warmup_steps": 5,
        "train.max_eval_batches": 1, "train.devices": devices, "train.auto_fit_memory": False,
    } | dict(parse_override(text) for text in args.set))  # fmt: skip
    out = args.work / "out"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(upstream={"data": args.model / "data", "model": args.model}, out_dir=out,
                       work_dir=args.work / "work", reporter=NullReporter())  # fmt: skip
    tic = time.perf_counter()
    summary = train_stage(cfg, ctx)
    seconds = time.perf_counter() - tic
    windows = [r["tokens_per_s"] for r in read_metrics(out / "metrics.csv") if r["kind"] == "train"]
    steady = windows[1:] or windows
    print(json.dumps({
        "bench": "train_stage_7b", "devices": devices, "processes": summary.get("processes"),
        "steps": summary["steps"], "batch": args.batch, "stage_tokens_per_s": summary["tokens_per_s"],
        "steady_tokens_per_s": round(sum(steady) / len(steady), 1), "windows_tokens_per_s": windows,
        "peak_gb": summary["peak_gb"], "stage_seconds": round(seconds, 1), "trained_tokens": summary["trained_tokens"],
        "tokens_per_step": summary["trained_tokens"] / max(summary["steps"], 1), "device": summary.get("device"),
        "compute_path": summary.get("compute_path"), "overrides": args.set,
    }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
