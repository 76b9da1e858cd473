"""The sealed test set is reported, never used to choose: no training, sweep, checkpoint choice or publish gate can
read data/eval/test.jsonl or the figures measured on it."""

from __future__ import annotations

import ast
import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from farense.config import ExportConfig
from farense.evaluate import select_adapter
from farense.export import quality_gate
from farense.stages import run_local
from test_evaluate import TinyProject, shared_tiny_model, write_jsonl
from test_export import fact_meta

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("src", "tasks", "flows", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")]

# Where the sealed test set may be named at all: its config field, the two functions of the validate stage that
# read and report it, the plan that hashes it so a changed file is answered again (and leaves its location out of
# the data stage's key), and the report, the CLI and the seed table (benchmarks/seed_table.py: `--set test` prints
# recipes already chosen on dev) that print its figures.
ALLOWED = {
    ("src/farense/config.py", "DataConfig"),
    ("src/farense/config.py", "resolve_paths"),
    ("src/farense/evaluate.py", "sealed_test_questions"),
    ("src/farense/evaluate.py", "validate_stage"),
    ("src/farense/pipeline.py", "source_inputs"),
    ("src/farense/pipeline.py", "_section_for_key"),
    ("src/farense/validation_report.py", "<module>"),
    ("src/farense/cli.py", "_print_answer_quality"),
    ("benchmarks/seed_table.py", "main"),
}


def _mentions(path: Path) -> Iterator[tuple[str, int]]:
    """(enclosing function or class, line) for every reference to the test set or its figures in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node: ast.AST, where: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant):
                continue  # a docstring names things; it does not read them
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else where
            if isinstance(child, ast.Attribute) and child.attr == "test_questions":
                yield inner, child.lineno
            if isinstance(child, ast.Name) and child.id == "test_questions":
                yield inner, child.lineno
            if isinstance(child, ast.Constant) and isinstance(child.value, str):
                v = child.value
                if "test.jsonl" in v or v in ("test_", "test_questions") or v.startswith("test_fact"):
                    yield inner, child.lineno
            yield from walk(child, inner)

    yield from walk(tree, "<module>")


def test_only_the_validate_stage_and_reports_name_the_sealed_test_set() -> None:
    found = {(str(p.relative_to(ROOT)), where, line) for p in CODE for where, line in _mentions(p)}
    outside = sorted(f"{f}:{line} in {where}" for f, where, line in found if (f, where) not in ALLOWED)
    assert not outside, "the sealed test set is named where choices are made: " + ", ".join(outside)
    assert {(f, w) for f, w, _ in found} >= {("src/farense/evaluate.py", "sealed_test_questions")}


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every file path the process opens while inside the block (an audit hook; hooks cannot be removed, so it
    records only while the block runs)."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and isinstance(args[0], (str, Path)):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        yield seen
    finally:
        active[0] = False


def test_training_checkpoint_choice_and_the_gate_never_open_the_test_set(tmp_path: Path) -> None:
    sealed = write_jsonl(tmp_path / "sealed" / "test.jsonl", [
        {"id": "t1", "category": "fact", "facts": ["stadium"], "asks": ["stadium.name"],
         "question": "Para onde vou ver o Farense em casa?", "reference": "Estádio de São Luís."}])  # fmt: skip
    project = TinyProject(tmp_path, shared_tiny_model(), **{"data.test_questions": str(sealed)})
    with opened_files() as seen:
        paths = run_local(project.cfg, until="train")
        train_dir = Path(paths["train"]["path"])
        select_adapter(train_dir, tmp_path / "chosen", "best")
    assert not [p for p in seen if Path(p).resolve() == sealed.resolve()], "training or checkpoint choice read it"
    assert any(p.endswith(".jsonl") for p in seen), "the hook saw the training data being read"
    with opened_files() as seen:
        run_local(project.cfg, until="validate")
    assert any(Path(p).resolve() == sealed.resolve() for p in seen), "the validate stage answers it"


def test_the_gate_decides_the_same_whatever_the_test_figures_say() -> None:
    current = fact_meta(3.0, 0.80, sha="old")
    for candidate in (fact_meta(2.9, 0.85), fact_meta(2.9, 0.70), fact_meta(3.5, 0.90, valid="v2")):
        decisions = []
        for test_acc in (0.0, 0.5, 1.0):
            c, cur = copy.deepcopy(candidate), copy.deepcopy(current)
            for side in ("base", "tuned"):
                c["metrics"][side] |= {"test_fact_accuracy": test_acc, "test_fact_accuracy_n": 150}
                cur["metrics"][side] |= {"test_fact_accuracy": 1 - test_acc, "test_fact_accuracy_n": 150}
            decisions.append(quality_gate(c, cur, ExportConfig()))
        assert decisions[0] == decisions[1] == decisions[2]


@pytest.mark.parametrize("name", ["dev_questions", "test_questions"])
def test_the_config_names_both_sets_by_default(name: str) -> None:
    from farense.config import load_config

    cfg = load_config(None, root=ROOT)
    assert getattr(cfg.data, name) == ROOT / "data/eval" / ("dev.jsonl" if name == "dev_questions" else "test.jsonl")
