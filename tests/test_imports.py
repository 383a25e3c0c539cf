"""Import hygiene: data flows one way, so methods and the trainer never import the layers above them."""

from __future__ import annotations

import ast
from pathlib import Path

import genlab

SRC = Path(genlab.__file__).parent
UPPER = {"genlab.api", "genlab.runs", "genlab.evaluation", "genlab.report", "genlab.cli", "genlab.interop"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or lazily inside a function (``from genlab import api`` is genlab.api)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def upward_imports(package: str) -> set[tuple[str, str]]:
    """(file, module) pairs where a file of ``package`` imports api, runs, evaluation, report, cli or interop."""
    return {(str(f.relative_to(SRC)), u) for f in sorted((SRC / package).rglob("*.py"))
            for m in imported_modules(f) for u in UPPER if m == u or m.startswith(u + ".")}


def test_methods_and_train_never_import_api_runs_or_evaluation():
    assert upward_imports("methods") == set()
    assert upward_imports("train") == set()  # periodic evaluation and report writers are injected by api.train
    # Nor do the layers below them (networks, blocks, metrics, text encoders) reach up.
    for package in ("models", "nn", "diffusion", "metrics", "text", "data"):
        assert upward_imports(package) == set(), package


def test_methods_never_import_the_trainer():
    """methods -> train would close a cycle (the trainer imports methods.base): the GAN health monitor is a method part."""
    found = {(str(f.relative_to(SRC)), m) for f in sorted((SRC / "methods").rglob("*.py"))
             for m in imported_modules(f) if m == "genlab.train" or m.startswith("genlab.train.")}
    assert found == set()


def test_the_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from genlab import runs\n    import genlab.evaluation as e\n")
    assert {"genlab.runs", "genlab.evaluation"} <= imported_modules(module)
