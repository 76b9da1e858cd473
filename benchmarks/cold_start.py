"""Where a fresh process's time to its first optimizer step goes: imports, model build, LoRA, first and second step.

    python benchmarks/cold_start.py --shape mistral-7b --path recompute     # prints one JSON line of phase seconds
"""
import sys
import time

T0 = time.time()
import json  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_step  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402

marks = {"imports": time.time() - T0}


def mark(name):
    mx.synchronize()
    marks[name] = round(time.time() - T0 - sum(v for v in marks.values()), 2)


args = qlora_step.parse_args(sys.argv[1:])
shape = qlora_step.model_shape(args)
mx.random.seed(0)
model = qlora_step.build_model(shape, mx.bfloat16, True, 64, 4)
mark("build_model")
qlora_step.apply_path(model, args.path, mx.bfloat16)
qlora_step.add_lora(model, args.rank, args.lora_scale)
mx.eval(model.parameters())
mark("lora")
opt = optim.AdamW(learning_rate=2e-4)
lvg = nn.value_and_grad(model, default_loss)
state = [model.state, opt.state, mx.random.state]


def step(b, l):
    (loss, _), g = lvg(model, b, l)
    opt.update(model, g)
    return loss


step = mx.compile(step, inputs=state, outputs=state)
batch = mx.random.randint(0, shape["vocab_size"], (args.batch, args.seq + 1))
lengths = mx.array([[0, args.seq]] * args.batch)
for name in ("first_step", "second_step", "third_step"):
    mx.eval(step(batch, lengths), state)
    mark(name)
marks["imports"] = round(marks["imports"], 2)
print(json.dumps({"bench": "cold_start", "path": args.path, "process_to_first_step_s": round(sum(
    marks[k] for k in ("imports", "build_model", "lora", "first_step")), 2), **marks}), flush=True)
