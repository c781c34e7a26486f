"""The folders of ``services/`` are layers, and imports only go down them.

    cli                         entry points: may import anything below
    jobs                        reprice, rebuild, reconcile (may use a service's public fold)
    gateway pricer projector    the services: never each other
    quota
    local                       the local stack (launchers, supervisor, fake upstream)
    adapters                    Kafka, PostgreSQL, price books, settings, key store
    core                        pure rules

Every import is checked, including those inside functions and under ``TYPE_CHECKING``:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"

RANK = {
    "core": 0,
    "adapters": 1,
    "gateway": 2,
    "pricer": 2,
    "projector": 2,
    "quota": 2,
    "local": 2,
    "jobs": 3,
    "cli": 4,
}
"""A package may import its own modules and packages of a lower rank, never a sibling."""


def package_of(module: str) -> str | None:
    """``services.gateway.app`` → ``gateway``; None outside ``services``."""
    parts = module.split(".")
    if parts[0] != "services" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every ``services.*`` module or package a file imports (absolute imports only)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("services."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (use services.…)"
            if node.module == "services":
                found.update(f"services.{a.name}" for a in node.names)
            elif node.module.startswith("services."):
                found.add(node.module)
    return found


def violations(imports: Mapping[str, Iterable[str]]) -> list[str]:
    """``module → imported modules`` pairs that go against the layers, as readable lines."""
    wrong = []
    for module, targets in sorted(imports.items()):
        source = package_of(module)
        for target in sorted(targets):
            into = package_of(target)
            if source is None or into is None or into == source:
                continue
            if into not in RANK:
                wrong.append(f"{module} imports {target}: {into}/ is not a known layer")
            elif source not in RANK:
                wrong.append(f"{module}: {source}/ is not a known layer")
            elif RANK[into] >= RANK[source]:
                kind = "a sibling" if RANK[into] == RANK[source] else "a higher layer"
                wrong.append(f"{module} imports {target} ({kind}: {source} → {into})")
    return wrong


def _module_name(path: Path) -> str:
    relative = path.relative_to(SERVICES.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _all_imports() -> dict[str, set[str]]:
    return {_module_name(p): imports_of(p) for p in sorted(SERVICES.rglob("*.py"))}


LIBRARIES_KEPT_OUT = {
    "jobs": {"click", "fastapi", "uvicorn", "starlette"},
    "adapters": {"click", "fastapi", "uvicorn", "starlette", "faust"},
    "pricer": {"click", "fastapi"},
    "projector": {"click", "fastapi", "faust"},
    "quota": {"click", "fastapi", "faust"},
    "gateway": {"click", "faust"},
}
"""Libraries of another layer's job: the CLI's (click), the web server's, the pricer's."""


def library_roots(path: Path) -> set[str]:
    """The top-level names a file imports (``aiokafka`` for ``from aiokafka.errors import``)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(LIBRARIES_KEPT_OUT))
def test_layers_keep_out_other_layers_libraries(layer: str) -> None:
    wrong = {
        str(path.relative_to(SERVICES)): sorted(library_roots(path) & LIBRARIES_KEPT_OUT[layer])
        for path in sorted((SERVICES / layer).rglob("*.py"))
    }
    assert {name: libs for name, libs in wrong.items() if libs} == {}


def test_every_folder_is_a_known_layer() -> None:
    folders = {p.name for p in SERVICES.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(RANK)


def test_imports_only_go_down_the_layers() -> None:
    assert violations(_all_imports()) == []


def test_the_check_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from services.cli.context import Context\n"
        "def f():\n    from services import gateway\n    import services.pricer.app\n"
    )
    assert imports_of(source) == {
        "services.cli.context",
        "services.gateway",
        "services.pricer.app",
    }


@pytest.mark.parametrize(
    ("module", "target", "why"),
    [
        # The cycles of the old layout, as they would read in this one:
        ("services.jobs.rebuild", "services.cli.context", "a higher layer"),  # rebuild → CLI
        ("services.gateway.queries", "services.projector.apply", "a sibling"),  # service → service
        ("services.adapters.settings", "services.gateway.spool", "a higher layer"),
        ("services.core.usage", "services.adapters.metrics", "a higher layer"),
        ("services.local.supervisor", "services.cli.main", "a higher layer"),
    ],
)
def test_the_check_fails_on_an_upward_or_sideways_import(
    module: str, target: str, why: str
) -> None:
    [line] = violations({module: [target]})
    assert why in line and module in line and target in line


def test_downward_imports_pass() -> None:
    allowed = {
        "services.cli.main": ["services.jobs.rebuild", "services.local.supervisor"],
        "services.jobs.rebuild": ["services.adapters.readmodels", "services.adapters.offsets"],
        "services.jobs.replay": ["services.projector.plan"],  # a job may use a service
        "services.gateway.app": ["services.adapters.settings", "services.core.quote"],
        "services.adapters.kafka": ["services.core.events"],
        "services.core.rating": ["services.core.cost"],
    }
    assert violations(allowed) == []
