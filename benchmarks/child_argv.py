"""The command line a benchmark passes to the child processes it starts for itself: its own, less some options."""

from __future__ import annotations


def without(argv: list[str], *flags: str) -> list[str]:
    """`argv` without each of `flags`, whether given as `--flag value` or `--flag=value`."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            kept.append(a)
    return kept
