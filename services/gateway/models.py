"""``GET /v1/models`` and ``GET /v1/models/{id}``: the priced models, in OpenAI's shapes
(what the ``openai`` SDK's ``client.models.list()`` and ``.retrieve(id)`` read), each with
the per-token prices the quote API shows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends

from services.core.errors import PriceNotFound
from services.core.pricebook import PriceBook, PriceVersion, prices_in_effect
from services.gateway.auth import require_tenant
from services.gateway.errors import sdk_error
from services.gateway.resources import Deps

router = APIRouter()


def model_list(book: PriceBook, at: datetime) -> dict[str, Any]:
    """Every model priced at ``at``, as an OpenAI model list."""
    return {"object": "list", "data": [_model(book, v) for v in prices_in_effect(book, at)]}


def _model(book: PriceBook, version: PriceVersion) -> dict[str, Any]:
    """One model object; ``created`` is when the model's first price took effect (the
    release date, for the bundled prices)."""
    first = min(v.effective_from for v in book.history(version.model))
    owner, slash, _ = version.model.partition("/")
    return {
        "id": version.model,
        "object": "model",
        "created": int(first.timestamp()),
        "owned_by": owner if slash else "unknown",
        "pricing": dict(version.pricing_json),
    }


@router.get("/v1/models", dependencies=[Depends(require_tenant)])
async def list_models(resources: Deps) -> dict[str, Any]:
    prices = resources.prices
    prices.poke()  # a due catalogue refresh or book reload starts in the background
    return model_list(prices.book, datetime.now(UTC))


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_tenant)])
async def retrieve_model(model_id: str, resources: Deps) -> Any:
    """One priced model (an alias resolves to its canonical id); 404 in the SDKs' error
    shape when it has no price now."""
    book = resources.prices.book
    try:
        version = book.lookup(model_id, datetime.now(UTC))
    except PriceNotFound:
        return sdk_error(404, f"no priced model {model_id!r}")
    return _model(book, version)
