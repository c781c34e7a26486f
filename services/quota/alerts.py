"""Alert webhooks: each recorded alert POSTed, signed, to the operator's URL, with retries.

The body is the alert event exactly as published on ``billing.alerts.v1``; the
``X-Billing-Signature`` header is ``t=<unix seconds>,v1=<hex HMAC-SHA256>`` of
``"<t>." + body`` under the shared secret (``core.quota.webhook_signature``). A delivery
that fails (a connection error, a timeout, any status but 2xx) is retried with exponential
backoff up to ``max_attempts`` times; every attempt is recorded on the alert's row, so a
restart resumes where it stopped and a receiver sees the same ``alert_id`` again at most
when an attempt's answer was lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from services.adapters import metrics
from services.adapters.consuming import RETRYABLE
from services.adapters.quota import due_webhooks, record_webhook
from services.core.quota import SIGNATURE_HEADER, webhook_signature

log = logging.getLogger("billing.quota.webhooks")


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: str
    max_attempts: int = 8
    first_retry_seconds: float = 2.0
    timeout_seconds: float = 10.0


def retry_delay(webhook: Webhook, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1`` (doubling, at most an hour)."""
    return float(min(3600.0, webhook.first_retry_seconds * 2 ** max(0, attempts - 1)))


async def deliver_webhooks(
    pool: asyncpg.Pool, webhook: Webhook, stop: asyncio.Event, poll_seconds: float = 1.0
) -> None:
    """Deliver due alerts until ``stop``; database or network trouble only delays them."""
    async with httpx.AsyncClient(timeout=webhook.timeout_seconds) as client:
        while not stop.is_set():
            try:
                async with pool.acquire() as connection:
                    due = await due_webhooks(connection, datetime.now(UTC), webhook.max_attempts)
                for alert_id, attempts, body in due:  # no connection held while posting
                    outcome = await _post(client, webhook, body)
                    async with pool.acquire() as connection:
                        await _record(connection, webhook, alert_id, attempts, outcome)
            except (*RETRYABLE, asyncpg.PostgresError) as exc:
                log.warning("webhook delivery paused (%r)", exc)
            try:
                await asyncio.wait_for(stop.wait(), poll_seconds)
            except TimeoutError:
                pass


async def _post(client: httpx.AsyncClient, webhook: Webhook, body: bytes) -> str | None:
    """POST one alert; ``None`` when delivered, else why not."""
    headers = {
        "content-type": "application/json",
        SIGNATURE_HEADER: webhook_signature(webhook.secret, int(time.time()), body),
    }
    try:
        response = await client.post(webhook.url, content=body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"


async def _record(
    connection: asyncpg.Connection,
    webhook: Webhook,
    alert_id: str,
    attempts: int,
    error: str | None,
) -> None:
    if error is None:
        await record_webhook(connection, alert_id, delivered=True)
        metrics.WEBHOOKS.labels("delivered").inc()
        return
    tried = attempts + 1
    if tried >= webhook.max_attempts:
        log.error("alert %s: webhook abandoned after %d attempts (%s)", alert_id, tried, error)
        await record_webhook(connection, alert_id, delivered=False, error=error)
        metrics.WEBHOOKS.labels("abandoned").inc()
        return
    next_at = datetime.now(UTC) + timedelta(seconds=retry_delay(webhook, tried))
    log.warning("alert %s: webhook failed (%s); retrying at %s", alert_id, error, next_at)
    await record_webhook(connection, alert_id, delivered=False, error=error, next_at=next_at)
    metrics.WEBHOOKS.labels("failed").inc()
