"""Grounded answers (opt-in, `data.facts`): the facts file's lines are appended to the system prompt of every chat
example, so the model is trained to answer from facts it is given, and every answer the validate stage, `farense
ask` and `farense serve` give is given them too (they all ask with the training data's most common system prompt).

Each example grows by the facts' tokens: about 273 for the sample's eight facts (348 a training row against 76), so
a grounded epoch is 4.6 times the default's tokens and needs `train.max_seq_length` above the default's 256
(`configs/grounded.yaml`). The model-alone figure is the same run without `data.facts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farense.errors import DataError

FACTS_HEADER = "Factos:"
MAX_FACT_CHARS = 1000


def read_facts(path: Path) -> list[str]:
    """The facts of a UTF-8 text file, one a line; blank lines and lines starting with '#' are skipped. A file that
    is missing, not UTF-8, has no fact or a line over MAX_FACT_CHARS raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: facts file not found (data.facts names a text file of facts, one a line)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    facts = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fact = raw.strip()
        if not fact or fact.startswith("#"):
            continue
        if len(fact) > MAX_FACT_CHARS:
            raise DataError(f"{path}:{lineno}: a fact of {len(fact)} characters (at most {MAX_FACT_CHARS}); split it")
        facts.append(fact)
    if not facts:
        raise DataError(f"{path}: no fact (one a line; blank lines and '#' comments are skipped)")
    return facts


def facts_block(facts: list[str]) -> str:
    """The text appended to a system prompt: a header line, then one "- fact" line each."""
    return "\n".join([FACTS_HEADER, *(f"- {f}" for f in facts)])


def grounded_row(row: dict[str, Any], block: str) -> dict[str, Any]:
    """A chat row with `block` after its system prompt (a system message holding only `block` where it had none)."""
    messages = list(row["messages"])
    if messages and messages[0].get("role") == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n{block}"}
    else:
        messages.insert(0, {"role": "system", "content": block})
    return {**row, "messages": messages}
