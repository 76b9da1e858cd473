"""Accuracies of scored answers, each with its n and Wilson 95% interval, and the one-line headline.

Every share the pipeline prints or writes goes through `rate`: {"k", "n", "value", "low", "high"}. With 57 scored
questions one question is 1.75 points, so a figure without its interval says more than was measured.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from farense.eval_questions import CATEGORIES, FACT_CATEGORIES, HeldOutQuestion
from farense.fact_scoring import Verdict

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (Wilson 1927): unlike the normal approximation it stays
    inside [0, 1] and is not zero-width at 0 or n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def rate(hits: Sequence[bool]) -> dict[str, Any] | None:
    """A share with its n and 95% interval; None for no questions."""
    n, k = len(hits), sum(bool(h) for h in hits)
    if n == 0:
        return None
    low, high = wilson(k, n)
    return {"k": k, "n": n, "value": k / n, "low": low, "high": high}


# Student's t 97.5% quantiles for 1-30 degrees of freedom, then 40, 60, 120 (Welch's df rounded down:
# conservative).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
_T975_TAIL = ((40, 2.042), (60, 2.021), (120, 2.000))


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with floor(df) degrees of freedom (at least 1; infinite: the normal's)."""
    if math.isinf(df):
        return Z95
    whole = max(1, math.floor(df))
    if whole <= len(_T975):
        return _T975[whole - 1]
    return next((t for limit, t in _T975_TAIL if whole < limit), 1.980)


def seed_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """mean(b) - mean(a) over seeds with its Welch 95% interval: the claim "recipe B beats A" needs the interval
    to exclude 0. Each seed is one draw of the recipe (a seed's answers are not independent of each other, so pooling
    answers over seeds understates the spread). None with fewer than two seeds a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.mean(b) - statistics.mean(a), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else math.inf
    half = t975(df) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df}


def fact_summary(questions: Sequence[HeldOutQuestion], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Fact accuracy (overall and on indirectly worded questions), wrong declines, contradictions, live declines,
    off-topic redirects, and per category and per fact; every share a `rate`."""
    pairs = [(q, v) for q, v in zip(questions, verdicts) if q.scored]
    facts = [(q, v) for q, v in pairs if q.category in FACT_CATEGORIES]
    per_category: dict[str, list[bool]] = defaultdict(list)
    per_fact: dict[str, list[bool]] = defaultdict(list)
    for q, v in pairs:
        per_category[q.category].append(v.passed)
        for f in q.facts:
            per_fact[f].append(v.passed)
    declined = [(q, v) for q, v in pairs if v.declined]
    return {
        "fact_accuracy": rate([v.passed for _, v in facts]),
        "indirect_accuracy": rate([v.passed for q, v in facts if q.wording == "indirect"]),
        "wrong_declines": rate([v.declined for _, v in facts]),
        "contradictions": sum(v.contradiction for _, v in facts),
        "live_declined": rate(per_category["live"]),
        "off_topic_redirected": rate(per_category["off_topic"]),
        "decline_precision": rate([q.category in ("live", "off_topic") for q, _ in declined]),
        "overall_accuracy": rate([v.passed for _, v in pairs]),
        "questions": len(pairs),
        "per_category": {c: rate(per_category[c]) for c in CATEGORIES if per_category[c]},
        "per_fact": {f: rate(per_fact[f]) for f in sorted(per_fact)},
    }


def flat_rates(summary: dict[str, Any]) -> dict[str, Any]:
    """`fact_summary` with each top-level rate as scalars (name, name_k, name_n, name_low, name_high), the way
    metrics.json keeps them; per-category and per-fact rates stay nested."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict) and "value" in value:
            out |= {key: value["value"], **{f"{key}_{p}": value[p] for p in ("k", "n", "low", "high")}}
        elif value is None and key not in ("per_category", "per_fact"):
            out[key] = None
        else:
            out[key] = value
    return out


def unflat_rate(metrics: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The rate `flat_rates` wrote as scalars under `key`, or None."""
    if metrics.get(key) is None or f"{key}_n" not in metrics:
        return None
    return {"value": metrics[key], **{p: metrics[f"{key}_{p}"] for p in ("k", "n", "low", "high")}}


def pct(r: dict[str, Any] | None) -> str:
    """"84% [73-91%] (n=57)", or "n/a"."""
    if not r:
        return "n/a"
    return f"{100 * r['value']:.0f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}%] (n={r['n']})"


def headline(r: dict[str, Any], prefix: str = "") -> str:
    """One line of what matters (from metrics.json's flat scalars, `prefix` "test_" for the sealed test set):
    fact accuracy with its interval, indirect wordings, wrong declines, contradictions, live declines."""
    def rate_of(key: str) -> dict[str, Any] | None:
        return unflat_rate(r, prefix + key)

    if rate_of("fact_accuracy") is None:
        return f"val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None and not prefix else "no questions"
    parts = [
        f"fact accuracy {pct(rate_of('fact_accuracy'))}",
        f"indirect {pct(rate_of('indirect_accuracy'))}" if rate_of("indirect_accuracy") else "",
        f"{r.get(prefix + 'wrong_declines_k', 0)} wrongly declined, {r.get(prefix + 'contradictions', 0)} contradictions",
        f"live declined {pct(rate_of('live_declined'))}",
        f"off-topic redirected {pct(rate_of('off_topic_redirected'))}",
    ]
    if r.get("val_loss") is not None and not prefix:
        parts.append(f"val loss {r['val_loss']:.4f}")
    return ", ".join(p for p in parts if p)
