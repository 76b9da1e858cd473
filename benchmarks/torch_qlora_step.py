"""PyTorch + PEFT + bitsandbytes NF4 QLoRA training step on a random-weight llama, for comparison with qlora_step.py.

    python benchmarks/torch_qlora_step.py --shape mistral-7b --mode nf4 --batch 4 --seq 512

Same shapes, LoRA (rank 8, scale 16 = alpha 128 / rank, q,k,v,o,gate,up,down), AdamW and batch as qlora_step.py;
prints one JSON line. Decoder linears are NF4 (double-quantized, bf16 compute) as transformers' BitsAndBytesConfig
makes them; embeddings and lm_head stay bf16 as they do there. Runs only where torch, peft and bitsandbytes are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shapes import SHAPES  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="nf4", choices=["nf4", "bf16"], help="base weights: bitsandbytes NF4 or bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-checkpoint", action="store_true", help="transformers' gradient checkpointing")
    p.add_argument("--out", type=Path, help="also append the JSON line to this file")
    return p.parse_args(argv)


def build_model(shape: dict, mode: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, rms_norm_eps=1e-5, max_position_embeddings=4096, use_cache=False,
                         attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if mode == "nf4":
        _to_nf4(model)
    return model


def _to_nf4(model) -> None:
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(parent, name, q.to("cuda"))
                del linear
    torch.cuda.empty_cache()


def _bitsandbytes_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def main(argv=None) -> int:
    args = parse_args(argv)
    import peft
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    shape = SHAPES[args.shape]
    model = build_model(shape, args.mode)
    lora = LoraConfig(r=args.rank, lora_alpha=args.lora_scale * args.rank, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    batch = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device="cuda")

    def step() -> torch.Tensor:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = None
    for _ in range(args.warmup):
        loss = step()
        first_loss = first_loss if first_loss is not None else loss.item()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    result = {
        "path": f"torch-peft-{args.mode}" + ("-gc" if args.grad_checkpoint else ""),
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": round(args.batch * args.seq * args.steps / seconds, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "loss": loss.item(),
        "first_loss": first_loss,
        "steps": args.steps,
        "step_s": round(seconds / args.steps, 4),
        "device": torch.cuda.get_device_name(),
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "bitsandbytes_version": _bitsandbytes_version() if args.mode == "nf4" else None,
        "trainable_params": sum(p.numel() for p in params),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
