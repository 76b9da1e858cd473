"""The shipped training answers keep the style the dev sweep chose (#34): facts stated, never a bare yes/no first."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE_OPENERS = ("Sim,", "Sim.", "Não,", "Não.", "Não:", "Sim:")


def training_answers() -> list[tuple[str, int, str]]:
    out = []
    for name in ("qa.jsonl", "completions.jsonl"):
        for number, line in enumerate((ROOT / "data/farense" / name).read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            answers = [m["content"] for m in row.get("messages", []) if m["role"] == "assistant"]
            out += [(name, number, a) for a in answers or [row["completion"]]]
    return out


def test_no_training_answer_opens_with_a_bare_yes_or_no() -> None:
    # A 135M model guesses the opening word before the fact; "Não." before a fact the question asks about is the
    # contradiction scorer v2 counts, and "Não" is also the first word of every decline (dev: 3 contradictions and
    # 29% wrong declines with the openers, 0 and 8% without, seed 0 on the CPU; benchmarks/results/decision_34.md)
    openers = [(n, i, a) for n, i, a in training_answers() if a.lstrip().startswith(BARE_OPENERS)]
    assert openers == []
