"""``services.core`` is pure domain code: it imports no service framework or I/O client."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_layers import library_roots

FORBIDDEN = {"faust", "aiokafka", "asyncpg", "fastapi", "httpx", "uvicorn", "starlette", "click"}
CORE = Path(__file__).resolve().parents[2] / "services" / "core"


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_framework(path: Path) -> None:
    assert not (library_roots(path) & FORBIDDEN)


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
