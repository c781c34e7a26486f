"""``POST /internal/billing/credits``: prepaid credit grants (issue #11), for billing tools.

Body ``{tenant_id, amount, reason, idempotency_key?, expires_at?}`` — ``amount`` a decimal
string (a JSON number is read exactly too), ``expires_at`` RFC 3339. 201 with the grant as
recorded; 200 with the earlier grant when the same ``idempotency_key`` was used for the same
grant; 409 when it was used for another; 404 for an unknown tenant; 422 naming the field.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from services.adapters.credits import LedgerError, add_grant
from services.core.credits import grant_of
from services.gateway.auth import require_admin
from services.gateway.bodies import json_object
from services.gateway.resources import Deps
from services.gateway.responses import ORJSONResponse

router = APIRouter(prefix="/internal/billing/credits", dependencies=[Depends(require_admin)])


@router.post("", status_code=201)
async def add_credit(request: Request, resources: Deps) -> Any:
    """Grant prepaid credits to a tenant (see the module docstring)."""
    body = await json_object(request)
    grant = grant_of(
        body.get("tenant_id"),
        body.get("amount"),
        body.get("reason"),
        body.get("idempotency_key"),
        body.get("expires_at"),
        now=datetime.now(UTC),
    )
    async with resources.database().acquire() as connection:
        try:
            recorded, new = await add_grant(connection, grant)
        except LedgerError as exc:
            raise HTTPException(exc.status, str(exc)) from None
    return ORJSONResponse(recorded, status_code=201 if new else 200)
