"""benchmarks/child_argv.py: a benchmark's own options, less those it sets itself for a child process."""

from __future__ import annotations

from benchmarks.child_argv import without


def test_both_spellings_of_a_flag_are_dropped_with_their_values() -> None:
    argv = ["--shape", "tiny", "--path", "a,b", "--out=x.jsonl", "--steps", "3", "--only", "windows"]
    assert without(argv, "--path", "--out") == ["--shape", "tiny", "--steps", "3", "--only", "windows"]
    assert without(argv, "--only", "--processes") == ["--shape", "tiny", "--path", "a,b", "--out=x.jsonl",
                                                      "--steps", "3"]  # fmt: skip


def test_a_flag_that_only_starts_like_a_dropped_one_is_kept() -> None:
    assert without(["--only-fast", "1", "--onlyx=2"], "--only") == ["--only-fast", "1", "--onlyx=2"]
