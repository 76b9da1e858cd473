"""Training-data variants for the answer-quality issue (#34): one folder per recipe (a benchmark helper, not a test).

    python benchmarks/answer_style_data.py OUT_DIR

Writes OUT_DIR/<variant>/{qa,completions}.jsonl from data/farense (and data/augment), each a folder the data stage
reads as it reads data/farense. The #34 sweep made them from data/farense of commit 2ff01ec; `neutral` won
(benchmarks/results/decision_34.md) and is data/farense since, so on today's tree `neutral` is data/farense again
(`git show 2ff01ec:data/farense/qa.jsonl` is the data before it).

- neutral: every answer that opens with "Sim, " or "Não. "/"Não, " (154 and 154 in qa.jsonl: yes-questions and
  false premises) states the fact without the opening word. A 135M model cannot tell a yes-question from a false
  premise reliably; the opening word it guesses is the contradiction the scorer counts, and the fact alone answers
  both ("O Farense foi campeão?" -> "A melhor classificação do Farense foi o 5.º lugar ...").
- diet: at most DIET_CAP rows per "Não tenho ..." decline sentence (180 such rows, 10 sentences used 11-21 times),
  so that no decline is the safest guess for an unfamiliar question; every decline topic stays, and the off-topic
  redirects are left as they are.
- hard: data/augment's 430 rows (indirect questions about known facts answered with the fact, declarative
  restatements, yes-questions, topic-named declines) added; run it with train.max_steps=332 to keep the compute.
- redirect: data/augment/redirects.jsonl's rows added (requests about Faro and the Algarve that are not about the
  club, redirected to it: tourism, food, transport, weather, other Algarve clubs; and requests for match statistics
  or the players and coaches of the facts' seasons, declined with a sentence naming that topic). The rest of
  data/farense answers every "Faro ..." question with the city fact, so any request naming Faro drew it.
- redirect-hard: both.
- hard-nostatements, redirect-hard-nostatements: the same without data/augment/statements.jsonl, whose open prompts
  ("Conta-me uma curiosidade ...") answered with a fact may teach "Conta-me ..." off-topic requests a fact.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from farense.fact_scoring import is_decline  # noqa: E402
from farense.jsonl import read_jsonl  # noqa: E402

DIET_CAP = 6
REDIRECT_FILES = ("redirects.jsonl",)
_OPENER = re.compile(r"^(?:Sim|Não)[,.:]\s+")


def neutral(answer: str) -> str:
    """The answer without an opening "Sim,"/"Não." (first letter upper-cased); declines are left as they are."""
    m = _OPENER.match(answer)
    if not m:
        return answer
    rest = answer[m.end() :]
    return rest[:1].upper() + rest[1:]


def _assistant_answers(row: dict) -> list[str]:
    return [m["content"] for m in row.get("messages", []) if m["role"] == "assistant"]


def restyle(row: dict) -> dict:
    if "messages" in row:
        return {**row, "messages": [{**m, "content": neutral(m["content"])} if m["role"] == "assistant" else m
                                    for m in row["messages"]]}  # fmt: skip
    return {**row, "completion": neutral(row["completion"])}


def diet(rows: list[dict], cap: int = DIET_CAP) -> list[dict]:
    """Keeps at most `cap` single-exchange rows per "Não tenho" decline answer (in file order); every other row stays."""
    seen: collections.Counter[str] = collections.Counter()
    kept = []
    for row in rows:
        answers = _assistant_answers(row)
        if len(answers) == 1 and answers[0].startswith("Não tenho") and is_decline(answers[0]):
            seen[answers[0]] += 1
            if seen[answers[0]] > cap:
                continue
        kept.append(row)
    return kept


def augment_rows(leave_out: tuple[str, ...] = ()) -> list[dict]:
    """data/augment's rows, file by file in name order, without the files named in `leave_out` and the redirects."""
    folder = ROOT / "data/augment"
    return [r for f in sorted(folder.glob("*.jsonl")) if f.name not in (*REDIRECT_FILES, *leave_out)
            for r in read_jsonl(f)]  # fmt: skip


def write(folder: Path, qa: list[dict], completions: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("qa.jsonl", qa), ("completions.jsonl", completions)):
        seen, lines = set(), []
        for r in rows:
            line = json.dumps(r, ensure_ascii=False)
            if line not in seen:
                seen.add(line)
                lines.append(line)
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(folder.name, len(qa), "qa rows,", len(completions), "completions")


def main(out: Path) -> None:
    qa = read_jsonl(ROOT / "data/farense/qa.jsonl")
    comp = read_jsonl(ROOT / "data/farense/completions.jsonl")
    redirects = [r for name in REDIRECT_FILES for r in read_jsonl(ROOT / "data/augment" / name)]
    n_qa, n_comp = [restyle(r) for r in qa], [restyle(r) for r in comp]
    n_aug = [restyle(r) for r in augment_rows()]
    write(out / "neutral", n_qa, n_comp)
    write(out / "neutral-diet", diet(n_qa), n_comp)
    write(out / "neutral-hard", n_qa + n_aug, n_comp)
    write(out / "neutral-hard-diet", diet(n_qa + n_aug), n_comp)
    write(out / "redirect", n_qa + redirects, n_comp)
    write(out / "redirect-hard", n_qa + n_aug + redirects, n_comp)
    no_statements = [restyle(r) for r in augment_rows(leave_out=("statements.jsonl",))]
    write(out / "hard-nostatements", n_qa + no_statements, n_comp)
    write(out / "redirect-hard-nostatements", n_qa + no_statements + redirects, n_comp)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
