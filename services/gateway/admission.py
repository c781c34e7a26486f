"""Admission with reservations: no tenant spends past its balance or a hard budget.

Before a proxied request goes upstream, :meth:`Admission.admit` reserves its worst-case cost
(``core.quota.worst_case_cost``: the prompt counted locally with a margin, the request's
output limit — or the configured default — at the model's dearest prices) in every scope
that limits it: the tenant's balance when it is prepaid, the tenant's hard budget and its
key's, this month. It reserves against this process's **lease** of each scope — a slice of
the scope's headroom taken from PostgreSQL under a per-scope lock (``adapters.quota.refill``)
— so the request path touches the database only when a lease runs dry, and the sum of every
gateway's leases never exceeds what the scope allows. When a lease cannot cover a request,
the request is refused (402) before anything is sent upstream.

After the answer, :meth:`Admission.finish` turns the reservation into the request's
**pending** charge (the reservation, or the cost of the usage the upstream reported when
that is more) or releases it (nothing billed). Once a second (``lease_refresh_seconds``), the
upkeep asks which pending requests the quota service has charged, drops those (their cost is
in the balance now), returns headroom unused for two rounds and renews the leases' expiry —
only rows still live: an expired one is taken again by a refill, under the lock. A gateway
that dies stops renewing: its leases stop counting ``lease_ttl_seconds`` later. The
overspend bound is in the README ("Balances, budgets and admission").
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, localcontext

import asyncpg

from services.adapters import metrics
from services.adapters.consuming import RETRYABLE
from services.adapters.pricing_cache import PricingCache
from services.adapters.quota import Policy, policy, refill, release_all, renew, settled
from services.adapters.settings import Settings
from services.core.errors import BillingError
from services.core.money import EXACT
from services.core.periods import month_of
from services.core.quota import (
    ZERO,
    Scope,
    balance_scope,
    budget_scope,
    reserved_prompt_tokens,
    worst_case_cost,
)
from services.core.rating import price
from services.core.usage import Usage
from services.gateway.capture import Billed, Call

log = logging.getLogger("billing.admission")

POLICY_TTL = 5.0
"""Seconds a tenant's limits (prepaid? hard budgets?) are cached, give or take a random
tenth (so tenants cached together do not expire together); for one more TTL an expired
entry still answers while it is looked up again: a new grant or budget takes effect within
10 s."""
HAND_BACK_ROUNDS = 2
"""A lease unused for this many upkeep rounds hands its free headroom back."""
IDLE_ROUNDS = 4
"""An empty lease unused for this many upkeep rounds is deleted."""
SETTLE_CHUNK = 10_000
MAX_PENDING = 500_000
"""Answered requests one process holds uncharged at most: beyond it the quota service is not
keeping up (or is down), and new requests are refused with 503 rather than held unbounded."""
MAX_OUTPUT_TOKENS = 10_000_000
"""An output limit above any model's is reserved as this (a 4,000-digit max_tokens must not
make a 4,000-digit reservation)."""
VALIDITY = 2 / 3
"""A lease row written at t is trusted until t + VALIDITY × ttl (it expires at t + ttl)."""


class Refused(Exception):
    """The request would spend past a limit (answer 402)."""


class QuotaUnavailable(Exception):
    """The limits could not be checked (the database is away): answer 503, send nothing."""


@dataclass(slots=True, eq=False)
class Lease:
    """This process's slice of one scope's headroom; ``amount`` is what PostgreSQL holds."""

    scope: Scope
    amount: Decimal = ZERO
    reserved: Decimal = ZERO
    pending: Decimal = ZERO
    recent: Decimal = ZERO
    """Reserved since the last upkeep round."""
    rate: Decimal = ZERO
    """Reserved per upkeep round, smoothed over the last few (sizes refills)."""
    waiting: Decimal = ZERO
    """What requests waiting for a refill need."""
    idle: int = 0
    refilling: asyncio.Future[None] | None = None
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while this lease's row is written (a refill, or the upkeep's renewal): a
    renewal computed before a refill must not land after it."""
    valid_until: float = 0.0
    """(monotonic) Past this, the row may have expired in PostgreSQL — other gateways no
    longer count it — so nothing is reserved against it before a refill has written it
    again under the scope's lock."""

    def stale(self, now: float) -> bool:
        return self.valid_until <= now

    @property
    def free(self) -> Decimal:
        return self.amount - self.reserved - self.pending


@dataclass(slots=True, eq=False)
class Reservation:
    request_id: str
    model: str
    at: datetime
    amount: Decimal
    leases: tuple[Lease, ...]
    done: bool = False


@dataclass(slots=True)
class _Pending:
    since: float
    amount: Decimal
    leases: tuple[Lease, ...]


@dataclass(slots=True)
class Admission:
    pool: asyncpg.Pool
    settings: Settings
    prices: PricingCache
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    )
    _leases: dict[str, Lease] = field(default_factory=dict)
    _policies: dict[str, tuple[float, Policy]] = field(default_factory=dict)
    _looking_up: dict[str, asyncio.Task[Policy]] = field(default_factory=dict)
    """One look-up of a tenant's limits at a time: the requests that find them expired
    meanwhile wait for it rather than each asking the database."""
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_ttl_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._upkeep_forever())

    async def close(self) -> None:
        """Stop the upkeep and hand the leases' free headroom back at once (what answered
        requests still hold uncharged stays held until the rows expire)."""
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with self.pool.acquire() as connection:
                await release_all(connection, self.holder)
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            log.warning("leases not handed back (%r): they expire on their own", exc)

    # -- the request path ------------------------------------------------------------------

    async def admit(self, call: Call) -> Reservation | None:
        """Reserve ``call``'s worst-case cost in every scope limiting it (``None``: none does).

        Raises :class:`Refused` when a scope has not enough left, :class:`QuotaUnavailable`
        when the limits cannot be read.
        """
        limits = await self._policy(call.key.tenant_id)
        scopes = self._scopes(call, limits)
        if not scopes:
            return None
        if len(self._pending) >= MAX_PENDING:
            raise QuotaUnavailable(
                f"{len(self._pending)} answered requests are waiting to be charged"
            )
        amount = self.worst_case(call)
        leases = tuple(self._lease(scope) for scope in scopes)
        for _ in range(8):  # a refill awaits: other requests may take what it brought
            now = time.monotonic()
            short = next((le for le in leases if le.free < amount or le.stale(now)), None)
            if short is None:
                break
            if not await self._refill(short, amount):
                metrics.RESERVATIONS.labels("refused").inc()
                raise Refused(_refusal(short.scope, amount))
        else:  # headroom there, but taken by others each time: the scope is contended dry
            metrics.RESERVATIONS.labels("refused").inc()
            raise Refused(_refusal(leases[0].scope, amount))
        with localcontext(EXACT):
            for lease in leases:
                lease.reserved += amount
                lease.recent += amount
                if lease.refilling is None and lease.free < max(lease.rate, lease.recent) * 2:
                    self._refill_ahead(lease)
        metrics.RESERVATIONS.labels("made").inc()
        metrics.add_usd(metrics.RESERVED_USD, amount)
        return Reservation(call.request_id, call.model, call.started, amount, leases)

    def finish(self, reservation: Reservation | None, billed: Billed) -> None:
        """The answer is done: hold its cost until it is charged, or release it."""
        if reservation is None or reservation.done:
            return
        reservation.done = True
        metrics.add_usd(metrics.RESERVED_USD, -reservation.amount)
        with localcontext(EXACT):
            for lease in reservation.leases:
                lease.reserved -= reservation.amount
            if not billed.billed:
                metrics.RESERVATIONS.labels("released").inc()
                return
            # Held until charged: the reservation, or more if the answer cost more (an
            # upstream that ignored the limit, a prompt counted short): spent already, so
            # the lease grows to hold it. Never less: the pricer may price it higher than
            # this process's prices (a newer price), and the difference must stay held.
            cost = reservation.amount
            if billed.event is not None:
                cost = max(cost, self._cost(reservation, billed.event.usage.to_usage()))
            for lease in reservation.leases:
                lease.pending += cost
                lease.amount = max(lease.amount, lease.reserved + lease.pending)
        self._pending[reservation.request_id] = _Pending(time.monotonic(), cost, reservation.leases)
        metrics.add_usd(metrics.PENDING_USD, cost)

    def worst_case(self, call: Call) -> Decimal:
        try:
            version = self.prices.lookup(call.model)
        except BillingError:
            return self.settings.unpriced_reservation
        limit, choices = call.dialect.max_output(call.body)
        if limit is None:
            limit = self.settings.model_max_tokens.get(call.model, self.settings.default_max_tokens)
        output = min(limit * choices, MAX_OUTPUT_TOKENS)
        prompt = reserved_prompt_tokens(call.dialect.prompt_tokens(call.model, call.body))
        return worst_case_cost(version.pricing, prompt, output, call.started)

    def _cost(self, reservation: Reservation, usage: Usage) -> Decimal:
        try:  # as the pricer will: the price in effect when the request started
            return price(self.prices, reservation.model, usage, reservation.at)[1].total_cost
        except BillingError:
            return reservation.amount

    def _scopes(self, call: Call, limits: Policy) -> list[Scope]:
        tenant_id = call.key.tenant_id
        scopes = [balance_scope(tenant_id)] if limits.prepaid else []
        period = month_of(call.started)
        for key_id in ("", call.key.key_id):
            if key_id in limits.budgets:
                scopes.append(budget_scope(tenant_id, key_id, period))
        return scopes

    def _lease(self, scope: Scope) -> Lease:
        lease = self._leases.get(scope.key)
        if lease is None:
            lease = self._leases[scope.key] = Lease(scope)
        lease.idle = 0
        return lease

    async def _policy(self, tenant_id: str) -> Policy:
        cached = self._policies.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        task = self._looking_up.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._look_up(tenant_id))
            self._looking_up[tenant_id] = task
            task.add_done_callback(lambda _: self._looking_up.pop(tenant_id, None))
        if cached is not None and cached[0] + POLICY_TTL > now:
            # Just expired: answer from it while the look-up runs (a change takes effect
            # within two TTLs at most, and no request waits for the database here).
            task.add_done_callback(_retrieve)
            return cached[1]
        try:
            return await asyncio.shield(task)
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            if cached is not None:  # the last known limits, rather than none or a refusal
                log.warning("tenant limits not refreshed (%r); using the last known", exc)
                return cached[1]
            raise QuotaUnavailable("the tenant's limits cannot be checked now") from exc

    async def _look_up(self, tenant_id: str) -> Policy:
        async with self.pool.acquire() as connection:
            found = await policy(
                connection, tenant_id, require_credits=self.settings.require_credits
            )
        ttl = POLICY_TTL * random.uniform(0.9, 1.1)  # noqa: S311 - spreading, not secrecy
        earlier = self._policies.get(tenant_id)
        self._policies[tenant_id] = (time.monotonic() + ttl, found)
        if earlier is not None and earlier[1] != found:
            # A budget lowered or removed, credits added: the free headroom taken under the
            # old limits is handed back (at the next renewal) and taken again under the new.
            for lease in self._leases.values():
                if lease.scope.tenant_id == tenant_id and lease.refilling is None:
                    lease.amount = lease.reserved + lease.pending
        return found

    async def _refill(self, lease: Lease, need: Decimal) -> bool:
        """Grow ``lease`` from its scope's headroom until ``need`` fits; ``False`` when the
        scope has not that much left. One refill runs at a time per scope: requests that
        need one meanwhile wait for it, then look again."""
        lease.waiting += need
        try:
            while lease.free < need or lease.stale(time.monotonic()):
                if lease.refilling is not None:
                    await asyncio.shield(lease.refilling)
                    continue
                lease.refilling = asyncio.get_running_loop().create_future()
                try:
                    return await self._refill_once(lease, need)
                finally:
                    lease.refilling.set_result(None)
                    lease.refilling = None
            return True
        finally:
            lease.waiting -= need

    def _refill_ahead(self, lease: Lease) -> None:
        """Refill in the background while the lease still has two rounds of traffic left,
        so that requests seldom wait for one."""

        async def refill_ahead() -> None:
            try:
                await self._refill_once(lease, ZERO)
            except QuotaUnavailable as exc:
                log.info("refilling ahead failed (%r): the next request will try", exc)
            finally:
                assert lease.refilling is not None  # noqa: S101 - set just below
                lease.refilling.set_result(None)
                lease.refilling = None

        lease.refilling = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(refill_ahead())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refill_once(self, lease: Lease, need: Decimal) -> bool:
        try:
            async with lease.writing, self.pool.acquire() as connection:
                written = time.monotonic()
                before = lease.amount
                reserved, pending = lease.reserved, lease.pending
                got = await refill(
                    connection,
                    holder=self.holder,
                    scope=lease.scope,
                    reserved=reserved,
                    pending=pending,
                    need=lease.waiting,
                    recent=max(lease.rate, lease.recent),
                    ttl=self.ttl,
                )
                # Reservations made meanwhile moved free into reserved: the total is unchanged.
                with localcontext(EXACT):
                    lease.amount += reserved + pending + got.free - before
                lease.valid_until = written + VALIDITY * self.settings.lease_ttl_seconds
                fits = lease.free >= need  # judged before anything else can run
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            raise QuotaUnavailable("the tenant's headroom cannot be checked now") from exc
        metrics.LEASE_REFILLS.inc()
        return fits

    # -- upkeep ----------------------------------------------------------------------------

    async def _upkeep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_refresh_seconds)
            try:
                await self.upkeep()
            except (*RETRYABLE, asyncpg.PostgresError) as exc:
                log.warning("lease upkeep failed (%r); trying again", exc)

    async def upkeep(self) -> None:
        """Settle charged requests, return unused headroom, renew the leases' expiry.

        The settlement query runs without holding any lease (and its failure does not stop
        the renewal); only the renewal's write holds the leases it writes (those being
        refilled are skipped: the refill writes them). A lease whose row had expired is not
        renewed but refilled, under the scope's lock.
        """
        try:
            self._settle(await self._charged())
        except (*RETRYABLE, asyncpg.PostgresError) as exc:
            log.warning("settlement skipped this round (%r)", exc)
        rows, dropped, held = [], [], []
        with localcontext(EXACT):
            for key, lease in list(self._leases.items()):
                if lease.writing.locked():
                    continue  # a refill is writing it, with a fresh expiry
                await lease.writing.acquire()  # free: returns at once, nothing runs in between
                held.append(lease)
                if lease.recent == 0 and lease.waiting == 0:
                    lease.idle += 1
                    if lease.idle >= HAND_BACK_ROUNDS:  # (a quiet round alone is common)
                        lease.amount = lease.reserved + lease.pending  # hand back what is free
                lease.rate = (lease.rate + lease.recent) / 2
                lease.recent = ZERO
                if lease.amount == 0 and lease.idle >= IDLE_ROUNDS and lease.refilling is None:
                    del self._leases[key]
                    dropped.append(key)
                else:
                    rows.append((lease.scope, lease.amount, lease.reserved, lease.pending))
        try:
            written = time.monotonic()
            async with self.pool.acquire() as connection:
                renewed = await renew(connection, self.holder, rows, dropped, self.ttl)
            for lease in held:
                if lease.scope.key in renewed:
                    lease.valid_until = written + VALIDITY * self.settings.lease_ttl_seconds
                elif lease.scope.key not in dropped:
                    lease.valid_until = 0.0  # expired or gone: taken again under the lock
                    if lease.reserved or lease.pending:
                        metrics.LEASES_LOST.inc()
                        log.warning(
                            "lease of %s expired while holding %s USD (this process stalled"
                            " longer than BILLING_LEASE_TTL_SECONDS); taking it again",
                            lease.scope.key,
                            lease.reserved + lease.pending,
                        )
        finally:
            for lease in held:
                lease.writing.release()
        for lease in held:
            if lease.valid_until == 0.0 and lease.refilling is None and lease.amount > 0:
                self._refill_ahead(lease)

    async def _charged(self) -> set[str]:
        ids = list(self._pending)
        charged: set[str] = set()
        async with self.pool.acquire() as connection:
            for start in range(0, len(ids), SETTLE_CHUNK):
                charged |= await settled(connection, ids[start : start + SETTLE_CHUNK])
        return charged

    def _settle(self, charged: set[str]) -> None:
        """Drop the pending charges the quota service has applied (or that waited too long)."""
        expire_before = time.monotonic() - self.settings.pending_ttl_seconds
        with localcontext(EXACT):
            for request_id, entry in list(self._pending.items()):
                if request_id not in charged and entry.since >= expire_before:
                    continue
                del self._pending[request_id]
                for lease in entry.leases:
                    lease.pending -= entry.amount
                    lease.amount -= entry.amount
                metrics.add_usd(metrics.PENDING_USD, -entry.amount)
                outcome = "settled" if request_id in charged else "expired"
                metrics.RESERVATIONS.labels(outcome).inc()


def _retrieve(task: asyncio.Task[Policy]) -> None:
    """Take a background look-up's outcome (a failure was logged by whoever waits next)."""
    if not task.cancelled():
        task.exception()


def _refusal(scope: Scope, amount: Decimal) -> str:
    if scope.kind == "balance":
        what = f"tenant {scope.tenant_id!r} has not enough prepaid credit"
    elif scope.api_key_id:
        what = f"API key {scope.api_key_id!r} has reached its monthly budget"
    else:
        what = f"tenant {scope.tenant_id!r} has reached its monthly budget"
    return (
        f"{what}: this request may cost up to {amount:f} USD (its prompt and output token "
        "limit at the model's prices); add credits, raise the budget or lower max_tokens"
    )
