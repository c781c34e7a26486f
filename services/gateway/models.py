"""``GET /v1/models``: the priced models, in OpenAI's list shape (what the ``openai`` SDK's
``client.models.list()`` reads), each with the per-token prices the quote API shows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends

from services.core.pricebook import PriceBook, prices_in_effect
from services.gateway.auth import require_tenant
from services.gateway.resources import Deps

router = APIRouter()


def model_list(book: PriceBook, at: datetime) -> dict[str, Any]:
    """Every model priced at ``at``, as an OpenAI model list. ``created`` is when the
    model's first price took effect (the release date, for the bundled prices)."""
    data = []
    for version in prices_in_effect(book, at):
        first = min(v.effective_from for v in book.history(version.model))
        owner, slash, _ = version.model.partition("/")
        data.append(
            {
                "id": version.model,
                "object": "model",
                "created": int(first.timestamp()),
                "owned_by": owner if slash else "unknown",
                "pricing": dict(version.pricing_json),
            }
        )
    return {"object": "list", "data": data}


@router.get("/v1/models", dependencies=[Depends(require_tenant)])
async def list_models(resources: Deps) -> dict[str, Any]:
    prices = resources.prices
    prices.poke()  # a due catalogue refresh or book reload starts in the background
    return model_list(prices.book, datetime.now(UTC))
