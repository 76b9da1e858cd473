"""Does the tuned model give its own training answers back? One JSON line (a benchmark, not a test).

    python benchmarks/train_recall.py                      # the newest train stage under artifacts/, its inputs
    python benchmarks/train_recall.py --sample 300 --artifacts /tmp/clone/artifacts

Answers a random sample of the data stage's single-exchange training questions with the train stage's adapter,
greedily and in one batch as the validate stage does, and counts: answers equal to the training answer, answers
that decline (`fact_scoring.is_decline`) where the training answer does not, and the reverse. The held-out score
says how the model does on new wordings; this says whether it has learnt the questions it was trained on.
`--show N` prints N of the differing answers to stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import farense  # noqa: E402,F401  (OpenBLAS before mlx)

from farense.evaluate import answer_batch, attach_adapter, chat_prompt, load_base  # noqa: E402
from farense.fact_scoring import is_decline  # noqa: E402
from farense.store import ArtifactStore  # noqa: E402


def newest_train_and_inputs(artifacts: Path) -> tuple[Path, Path, Path]:
    """The newest finished train stage and the data and model stages it was trained from (its manifest's inputs)."""
    store = ArtifactStore(artifacts)
    trained = store.others("train", key="")  # every finished train stage, newest first
    if not trained:
        raise SystemExit(f"no finished train stage under {store.stage_dir('train')}: run `farense run` first")
    inputs = trained[0].manifest["inputs"]
    data, model = (store.get(stage, inputs[stage]) for stage in ("data", "model"))
    if data is None or model is None:
        raise SystemExit(f"the inputs of {trained[0].path} are no longer under {artifacts}: {inputs}")
    return trained[0].path, data.path, model.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--sample", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=75)
    p.add_argument("--show", type=int, default=0)
    args = p.parse_args()

    train, data, model_dir = newest_train_and_inputs(args.artifacts)
    pairs = []
    for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line).get("messages") or []
        roles = [m["role"] for m in messages]
        if roles == ["system", "user", "assistant"]:
            pairs.append((messages[0]["content"], messages[1]["content"], messages[2]["content"]))
    random.Random(args.seed).shuffle(pairs)
    pairs = pairs[: args.sample]

    model, tokenizer, _ = load_base(model_dir)
    model = attach_adapter(model, train)
    prompts = [chat_prompt(tokenizer, question, system) for system, question, _ in pairs]
    answers, seconds = answer_batch(model, tokenizer, prompts, args.max_tokens, args.batch)

    same = sum(a.text == want for a, (_, _, want) in zip(answers, pairs))
    wrongly_declined = sum(is_decline(a.text) and not is_decline(want) for a, (_, _, want) in zip(answers, pairs))
    not_declined = sum(is_decline(want) and not is_decline(a.text) for a, (_, _, want) in zip(answers, pairs))
    shown = 0
    for a, (_, question, want) in zip(answers, pairs):
        if a.text != want and shown < args.show:
            print(f"Q: {question}\n  trained: {want}\n  answer:  {a.text}", file=sys.stderr)
            shown += 1
    print(json.dumps({"measure": "train_recall", "train_stage": train.name, "questions": len(pairs),
                      "same_answer": same, "declined_but_trained_to_answer": wrongly_declined,
                      "answered_but_trained_to_decline": not_declined, "seconds": round(seconds, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
