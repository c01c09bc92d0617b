"""The layers hold: the core (`b24scribe/`) imports nothing from `handlers/`, `schemas/` or Flask, and
the source modules (`schemas/`) nothing from `handlers/`. The app hands the registry to the core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, wherever the import statement sits (functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path) if m.split(".")[0] in forbidden)
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("b24scribe", ("handlers", "schemas", "flask", "flask_smorest", "app")), ("schemas", ("handlers", "app"))],
)
def test_a_layer_imports_nothing_from_the_layers_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    assert offending(package, forbidden) == {}


def test_the_walk_finds_imports_wherever_they_are(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from schemas.registry import SOURCES\n"
        "def f():\n    import handlers.hooks\n"
    )
    assert {"schemas.registry", "schemas.registry.SOURCES", "handlers.hooks"} <= imported_modules(sample)
