"""JSON Schemas of the events, generated from the models into ``schemas/``."""

from __future__ import annotations

import json
from pathlib import Path

from services.core.events import EVENT_TYPES

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"


def _file_name(kind: str, version: int) -> str:
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in kind).lstrip("_")
    return f"{snake}.v{version}.json"


def generate() -> dict[str, str]:
    """File name → schema text, for every event type at its current version."""
    out: dict[str, str] = {}
    for kind, model in EVENT_TYPES.items():
        version = int(model.model_fields["schema_version"].default)
        schema = model.model_json_schema(mode="serialization")
        schema["$id"] = f"urn:llm-billing:event:{kind}:v{version}"
        name = _file_name(kind, version)
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write the schemas; return the names of the files that changed."""
    changed = []
    for name, text in generate().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(name)
    return changed
