"""Reading an admin route's JSON body: one place for its two refusals."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from fastapi import HTTPException, Request

from services.core.errors import FieldError


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, numbers with a point as exact ``Decimal``: 400 when it is
    not JSON (or nested too deep to read), 422 when it is not an object."""
    try:
        body = json.loads(await request.body(), parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise FieldError("", "the body must be a JSON object")
    return body
