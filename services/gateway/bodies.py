"""Reading an admin route's JSON body: one place for its two refusals."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from fastapi import HTTPException, Request

from services.core.errors import FieldError


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, numbers with a point as exact ``Decimal``: 400 when it is
    not JSON (or nested too deep to read), 422 when it is not an object or holds a string
    PostgreSQL cannot store."""
    try:
        body = json.loads(await request.body(), parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FieldError("", "the body must be a JSON object")
    try:
        _storable(body, "")
    except RecursionError:
        raise HTTPException(400, "body is nested too deep to read") from None
    return body


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any, path: str) -> None:
    """422 naming the field of a string PostgreSQL's text cannot hold: one with a NUL or a
    lone surrogate (JSON allows both; asyncpg fails on them inside the query)."""
    if isinstance(value, str):
        if _UNSTORABLE.search(value):
            raise FieldError(path or "body", "must not contain NUL or lone surrogate characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            at = f"{path}.{key}" if path else key
            _storable(key, at)
            _storable(item, at)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _storable(item, f"{path}[{index}]")
