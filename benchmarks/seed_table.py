"""Recipes over seeds, as a markdown table, from validate_seeds.py's JSON lines (a benchmark helper, not a test).

    python benchmarks/seed_table.py RESULTS.jsonl [...] [--set dev|test] [--names today neutral ...]
    python benchmarks/seed_table.py RESULTS.jsonl [...] [--set dev|test] --compare A B

One row per recipe (and one for the base model, taken from the first recipe's rows): the mean over seeds of each
share, the seeds' range, and the Wilson 95% interval of the answers pooled over seeds (k and n summed). The pooled
interval counts every seed's answers as new draws, so it is narrower than the question sample alone supports; the
range shows the seed-to-seed spread. `--set dev` reads the unprefixed figures (the ones a choice may use), `--set
test` the sealed test set's `test_*` figures (reported, never compared to choose).

`--compare A B` prints, for each figure, B's mean minus A's over their seeds with the Welch 95% interval of that
difference (`farense.accuracy.seed_difference`): each seed one draw, so the interval reflects the seed-to-seed
spread that the pooled intervals leave out. "B beats A" holds where the interval excludes 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from farense.accuracy import seed_difference, wilson  # noqa: E402

SHARES = ("fact_accuracy", "indirect_accuracy", "wrong_declines", "live_declined", "off_topic_redirected")
HEADERS = ("fact accuracy", "indirect", "wrongly declined", "live declined", "off-topic redirected")


def share_cell(figures: list[dict], key: str) -> str:
    """'58% (52-63) [55-61] n=156': mean over seeds, seed range, pooled Wilson interval and pooled n."""
    present = [f for f in figures if f.get(key) is not None]
    if not present:
        return "-"
    values = [100 * f[key] for f in present]
    k, n = sum(f[f"{key}_k"] for f in present), sum(f[f"{key}_n"] for f in present)
    low, high = wilson(k, n)
    spread = f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
    return f"{statistics.mean(values):.0f}%{spread} [{100 * low:.0f}-{100 * high:.0f}] n={n}"


def count_cell(figures: list[dict], key: str) -> str:
    values = [f[key] for f in figures if f.get(key) is not None]
    if not values:
        return "-"
    spread = f" ({min(values)}-{max(values)})" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"


def rows_by_recipe(paths: list[Path]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("{"):
                row = json.loads(line)
                grouped[row["name"].rsplit("-s", 1)[0] if row["name"][-1].isdigit() else row["name"]].append(row)
    return grouped


def seed_list(seeds: list[int]) -> str:
    """"0-5" for a run of consecutive seeds, else "0,1,3"."""
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def table(grouped: dict[str, list[dict]], prefix: str, names: list[str] | None = None) -> str:
    names = names or list(grouped)
    out = ["| recipe | seeds | " + " | ".join(HEADERS) + " | contradictions |", "|---" * (len(HEADERS) + 3) + "|"]
    strip = len(prefix)

    def figures(side: str, rows: list[dict]) -> list[dict]:
        return [{k[strip:]: v for k, v in r[side].items() if k.startswith(prefix)} for r in rows]

    first = grouped[names[0]]
    for label, side, rows in [("base model", "base", first[:1])] + [(n, "tuned", grouped[n]) for n in names]:
        f = figures(side, rows)
        seeds = seed_list(sorted(r["seed"] for r in rows)) if side == "tuned" else "-"
        cells = [share_cell(f, key) for key in SHARES] + [count_cell(f, "contradictions")]
        out.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def comparison(grouped: dict[str, list[dict]], prefix: str, a: str, b: str) -> str:
    """Markdown: each figure's mean for A and B over their seeds and B - A with its Welch 95% interval, in points."""
    seeds = {n: seed_list(sorted(r["seed"] for r in grouped[n])) for n in (a, b)}
    out = [f"| figure | {a} (seeds {seeds[a]}) | {b} (seeds {seeds[b]}) | {b} - {a}, 95% interval |",
           "|---|---|---|---|"]
    for key, header in zip((*SHARES, "overall_accuracy"), (*HEADERS, "overall (every question)")):
        values = {n: [100 * r["tuned"][prefix + key] for r in grouped[n] if r["tuned"].get(prefix + key) is not None]
                  for n in (a, b)}  # fmt: skip
        d = seed_difference(values[a], values[b])
        means = [f"{statistics.mean(values[n]):.1f}%" if values[n] else "-" for n in (a, b)]
        cell = f"{d['diff']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" if d else "- (fewer than 2 seeds)"
        out.append(f"| {header} | {means[0]} | {means[1]} | {cell} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--set", choices=("dev", "test"), default="dev")
    ap.add_argument("--names", nargs="*", default=None, help="recipes to show, in this order (default: all)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="B minus A over seeds, with Welch 95%% intervals")
    args = ap.parse_args()
    prefix, grouped = "test_" if args.set == "test" else "", rows_by_recipe(args.results)
    print(comparison(grouped, prefix, *args.compare) if args.compare else table(grouped, prefix, args.names))


if __name__ == "__main__":
    main()
