"""``/internal/billing/prices``: price corrections and their history, for analysts' tools.

The same rules as ``billing prices set``: a correction is a new override version effective
from a past or future time, nothing is overwritten, and it carries who and why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from services.core.corrections import parse_changes, record_correction
from services.core.errors import QuoteRequestError
from services.core.quote import parse_time
from services.gateway.auth import require_admin
from services.gateway.bodies import json_object
from services.gateway.resources import resources_of

router = APIRouter(prefix="/internal/billing/prices", dependencies=[Depends(require_admin)])


@router.post("", status_code=201)
async def correct_price(request: Request) -> Any:
    """Body: ``{model, effective_from, reason, by, prompt?, completion?, input_cache_read?,
    input_cache_write?, per_million?, layer?}`` — prices as decimal strings, USD per token (per
    million tokens with ``per_million: true``). 201 with the new version; 200 with
    ``{"unchanged": true}`` when that price is already in effect."""
    body = await json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise QuoteRequestError("model", "is required")
    if "effective_from" not in body:
        raise QuoteRequestError("effective_from", "is required (RFC 3339)")
    effective_from = parse_time(body["effective_from"], "effective_from")
    changes = parse_changes(body, per_million=body.get("per_million") is True)
    layer = body.get("layer", "override")
    if layer not in ("override", "catalogue"):
        raise QuoteRequestError("layer", "must be override or catalogue")
    book = resources_of(request).prices.book
    version, base = await asyncio.to_thread(
        record_correction,
        book,
        model.strip(),
        changes,
        effective_from=effective_from,
        reason=str(body.get("reason") or ""),
        by=str(body.get("by") or ""),
        layer=layer,
    )
    if version is None:
        return JSONResponse({"unchanged": True}, status_code=200)
    return version.to_json() | {"replaces_version": base.version if base else None}


@router.get("/history")
async def price_history(request: Request, model: str = Query(min_length=1)) -> Any:
    """Every version of ``model``'s price, oldest first, with who, why and when."""
    book = resources_of(request).prices.book
    versions = sorted(book.history(model), key=lambda v: v.version)
    if not versions:
        raise HTTPException(404, f"no price has ever been recorded for {model}")
    return {"model": versions[0].model, "versions": [v.to_json() for v in versions]}
