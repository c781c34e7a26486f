"""Monthly budgets for billing tools, and a tenant's own balance (issue #11).

``PUT /internal/billing/budgets/{tenant_id}`` (the tenant's budget) and
``PUT /internal/billing/budgets/{tenant_id}/keys/{key_id}`` (one API key's), body
``{"monthly_limit": "100.00", "hard": true, "alerts": [50, 80, 100]}`` (``hard`` and
``alerts`` optional, these are the defaults), create or replace a budget: 200 with it as
stored, 422 naming the field, 404 for an unknown tenant or a key not of that tenant.
``GET /internal/billing/budgets/{tenant_id}`` lists the tenant's budgets. All take the
admin token.

``GET /v1/billing/balance`` answers the calling key's tenant its balance, what is held for
requests in flight, and its (and the key's) budget this UTC month (``core.balances``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from services.adapters.quota import (
    BudgetTargetError,
    budgets_of,
    held,
    ledgers,
    set_budget,
    spent,
)
from services.adapters.tenants import tenant_exists
from services.core.balances import balance_view, budget_json, lease_scopes
from services.core.periods import month_of
from services.core.quota import BudgetError, budget_of
from services.gateway.auth import require_admin, require_tenant
from services.gateway.bodies import json_object
from services.gateway.keys import TenantKey
from services.gateway.resources import Deps, Resources

if TYPE_CHECKING:
    import asyncpg

router = APIRouter(prefix="/internal/billing/budgets", dependencies=[Depends(require_admin)])
tenant_router = APIRouter(prefix="/v1/billing")


def _tenant(tenant_id: str) -> str:
    """PostgreSQL text cannot hold NUL: say so rather than fail inside the query."""
    if "\x00" in tenant_id:
        raise BudgetError("tenant_id", "must not contain NUL characters")
    return tenant_id


async def _put(request: Request, resources: Resources, tenant_id: str, key_id: str) -> Any:
    body = await json_object(request)
    budget = budget_of(
        _tenant(tenant_id),
        body.get("monthly_limit"),
        api_key_id=key_id,
        hard=body.get("hard", True),
        alerts=body.get("alerts"),
    )
    async with resources.database().acquire() as connection:
        try:
            await set_budget(connection, budget)
        except BudgetTargetError as exc:
            raise HTTPException(404, str(exc)) from None
        stored = await budgets_of(connection, budget.tenant_id)
    [budget] = [b for b in stored if b.api_key_id == budget.api_key_id]
    return budget_json(budget)


@router.put("/{tenant_id}")
async def put_tenant_budget(request: Request, resources: Deps, tenant_id: str) -> Any:
    """Create or replace the tenant's own monthly budget (see the module docstring)."""
    return await _put(request, resources, tenant_id, "")


@router.put("/{tenant_id}/keys/{key_id}")
async def put_key_budget(request: Request, resources: Deps, tenant_id: str, key_id: str) -> Any:
    """Create or replace the monthly budget of one of the tenant's API keys."""
    return await _put(request, resources, tenant_id, key_id)


@router.get("/{tenant_id}")
async def list_budgets(resources: Deps, tenant_id: str) -> dict[str, Any]:
    """The tenant's budgets: its own first (``api_key_id`` null), then its keys'."""
    async with resources.database().acquire() as connection:
        if not await tenant_exists(connection, _tenant(tenant_id)):
            raise HTTPException(404, f"no tenant {tenant_id!r}")
        budgets = await budgets_of(connection, tenant_id)
    return {"tenant_id": tenant_id, "budgets": [budget_json(b) for b in budgets]}


async def read_balance(
    connection: asyncpg.Connection,
    tenant_id: str,
    key_id: str = "",
    *,
    require_credits: bool,
    now: datetime,
) -> dict[str, Any]:
    """The tenant's balance answer (``core.balances.balance_view``) in ``now``'s UTC month,
    read in one snapshot so the ledger, the spend and the leases agree. ``require_credits``
    makes every tenant prepaid, as it does for admission. Shared with ``billing balance``."""
    period = month_of(now)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        ledger = (await ledgers(connection, [tenant_id]))[tenant_id]
        budgets = await budgets_of(connection, tenant_id)
        spend = await spent(connection, tenant_id, period)
        holds = await held(connection, lease_scopes(tenant_id, key_id, period))
    return balance_view(
        tenant_id,
        ledger=ledger,
        prepaid=require_credits or ledger.prepaid,
        period=period,
        budgets=budgets,
        spent=spend,
        held=holds,
        key_id=key_id,
    )


@tenant_router.get("/balance")
async def own_balance(
    resources: Deps, key: Annotated[TenantKey, Depends(require_tenant)]
) -> dict[str, Any]:
    """The calling key's tenant's balance and budgets (see ``core.balances.balance_view``);
    ``key_budget`` is the calling key's own budget, if it has one."""
    async with resources.database().acquire() as connection:
        return await read_balance(
            connection,
            key.tenant_id,
            key.key_id,
            require_credits=resources.settings.require_credits,
            now=datetime.now(UTC),
        )
