"""The layout shows the architecture: product code never imports the tests."""

from __future__ import annotations

import ast
from pathlib import Path

from config import REPO_ROOT

PACKAGES = ("config", "ml", "registry", "feedback", "bentos", "dags", "plugins", "stack", "benchmarks", "scripts")


def _modules() -> dict[str, Path]:
    """Every project module outside tests/, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """The absolute module names a file imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_no_module_outside_tests_imports_the_tests():
    offenders = [name for name, path in _modules().items() if any(i == "tests" or i.startswith("tests.") for i in _imports(path))]
    assert not offenders
