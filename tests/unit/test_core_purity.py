"""``services.core`` is pure domain code: it imports no service framework or I/O client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FORBIDDEN = {"faust", "aiokafka", "asyncpg", "fastapi", "httpx", "uvicorn", "starlette", "click"}
CORE = Path(__file__).resolve().parents[2] / "services" / "core"


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_framework(path: Path) -> None:
    assert not (_imported_roots(path) & FORBIDDEN)


def test_the_check_sees_every_core_module() -> None:
    names = {p.name for p in CORE.rglob("*.py")}
    assert {"usage.py", "cost.py", "pricing.py", "pricebook.py", "quote.py"} <= names


def test_importing_core_loads_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, services.core.quote, services.core.catalogue;"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r});"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
