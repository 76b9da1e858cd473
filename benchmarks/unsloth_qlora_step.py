"""Unsloth QLoRA training step on a random-weight Mistral-7B-shaped model, for comparison with qlora_step.py.

    python benchmarks/unsloth_qlora_step.py --make-model /root/m7b          # random HF folder, built on the GPU
    python benchmarks/unsloth_qlora_step.py --model /root/m7b --checkpointing none
    python benchmarks/unsloth_qlora_step.py --model /root/m7b --checkpointing unsloth

Same workload as qlora_step.py and torch_qlora_step.py: batch 4 x 512 random tokens, LoRA rank 8, alpha 128
(scale 16), dropout 0 on q,k,v,o,gate,up,down of every layer, AdamW (lr 2e-4, weight decay 0.01), a plain loop
(no trainer), 2 warm-up steps then timed steps. Unsloth's FastLanguageModel loads the folder in 4-bit
(bitsandbytes NF4, as Unsloth does) with its Triton kernels. Nothing is downloaded: set UNSLOTH_DISABLE_STATISTICS=1
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, train_flops_per_token  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make-model", type=Path, help="write a random-weight HF folder of --shape here and exit")
    p.add_argument("--model", type=Path, help="the HF folder to train on")
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--checkpointing", default="none", choices=["none", "unsloth", "true"],
                   help="Unsloth's use_gradient_checkpointing: none (False), unsloth (its offloaded variant), true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also append the JSON line to this file")
    return p.parse_args(argv)


def make_model(path: Path, shape: dict) -> dict:
    """A random-weight MistralForCausalLM in bf16 (built on the GPU, saved as safetensors) and a WordLevel tokenizer
    of the shape's vocabulary, so from_pretrained(local_files_only=True) finds everything it reads."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tic = time.perf_counter()
    config = MistralConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
        rope_theta=shape.get("rope_theta", 10000.0), tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=4096, sliding_window=None, rms_norm_eps=1e-5, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MistralForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"t{i}" for i in range(shape["vocab_size"] - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")  # fmt: skip
    fast.save_pretrained(path)
    return {"made": str(path), "seconds": round(time.perf_counter() - tic, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    if args.make_model:
        print(json.dumps(make_model(args.make_model, shape)), flush=True)
        return 0
    for k in ("UNSLOTH_DISABLE_STATISTICS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel
    import torch

    torch.manual_seed(args.seed)
    load_tic = time.perf_counter()
    model, _tokenizer = FastLanguageModel.from_pretrained(
        str(args.model), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True,
    )  # fmt: skip
    gc = {"none": False, "unsloth": "unsloth", "true": True}[args.checkpointing]
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=int(args.lora_scale * args.rank), lora_dropout=0.0, bias="none",
        target_modules=LORA_TARGETS, use_gradient_checkpointing=gc, random_state=args.seed,
        max_seq_length=args.seq,
    )  # fmt: skip
    load_s = time.perf_counter() - load_tic
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

    first_loss, first_step_s = None, None
    for _ in range(args.warmup):
        loss = step()
        first_loss = first_loss if first_loss is not None else loss.item()
        first_step_s = first_step_s or time.time() - _START
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    flops = train_flops_per_token(shape, args.seq)
    import bitsandbytes
    import peft
    import transformers

    result = {
        "path": f"unsloth-{args.checkpointing}", "shape": args.shape, "batch": args.batch, "seq": args.seq,
        "tokens_per_s": round(tokens_per_s, 1), "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "tflops": round(tokens_per_s * flops / 1e12, 1), "flops_per_token": flops,
        "loss": loss.item(), "first_loss": first_loss, "steps": args.steps, "step_s": round(seconds / args.steps, 4),
        "load_s": round(load_s, 1), "process_to_first_step_s": round(first_step_s, 1),
        "device": torch.cuda.get_device_name(), "unsloth_version": unsloth.__version__,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "peft_version": peft.__version__, "bitsandbytes_version": bitsandbytes.__version__,
        "trainable_params": sum(p.numel() for p in params),
    }  # fmt: skip
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
