"""Where the project keeps its files (kept apart from ``settings`` so the CLI's hot paths
need not import pydantic)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path(".billing")


def price_book_path(data_dir: Path) -> Path:
    return data_dir / "prices.jsonl"
