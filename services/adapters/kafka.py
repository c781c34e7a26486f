"""Kafka clients configured once for every service: topics, producer and consumer.

Only the Kafka protocol is used, so Apache Kafka works unchanged; the settings are chosen so
that the embedded Tansu 0.6.0 broker works too. Measured against it on this machine (aiokafka
0.14, loopback, 2 cores):

- Group join waits half the session timeout, whatever the rebalance timeout: a lone consumer
  gets its partitions 3.0 s after ``start()`` with session 6 s / heartbeat 0.5 s, 5.0 s with
  aiokafka's defaults (session 10 s), 23 s with Kafka's 45 s and 1.0 s with session 2 s.
  A second member is balanced in 4 s (8 s with the defaults); after a member leaves, the
  survivor holds every partition within 3.5 s (8 s), after one is SIGKILLed within ~9 s.
- Produce (acks=all) and consume work: 1,000 keyed records round-trip exactly; 700-byte
  records are produced at 30k-60k msg/s (256 KiB batches best, 16 KiB about half that).
- ListOffsets under-reports: ``end_offsets()`` answers the *base* offset of the partition's
  last batch plus one. 52 records (2 single sends + one batch of 50) gave 3; 1,057 records
  gave 940; 1,000 records over 6 partitions gave 1 per partition (sum 6). The high watermark
  carried by fetch responses (``consumer.highwater(tp)``) is right (1,057): never use end
  offsets to decide "caught up", nor for lag.
- A metadata request naming a missing topic creates it with 4 partitions, so topics are
  created explicitly first and checked through the all-topics metadata request.
- CreatePartitions is not supported, so a topic with the wrong partition count is an error.
- A fetch that finds no data waits the full ``fetch_max_wait_ms`` even when records arrive
  meanwhile (no long-poll wake-up): see ``FETCH_MAX_WAIT_MS``.
- With S3 storage (``billing up``'s durable log) every fetch below the high watermark, and
  every ListOffsets, lists every batch object of the partition (~12 µs per object), and a
  fetch whose listing outlasts ``fetch_max_wait_ms`` returns nothing: past ~8,000 batches
  in a partition consumers at 100 ms stop receiving anything. ``local/logretention.py``
  bounds the log for that reason.
- With the broker SIGKILLed, ``send_and_wait`` fails after ``request_timeout_ms`` (5 s here)
  with ``NodeNotReadyError`` (or ``UnknownTopicOrPartitionError`` for a topic it never sent to).

Every client made here (producer, consumer, admin) carries the transport's security options,
TLS and SASL, from the settings (:func:`kafka_client_options`); the pricer's faust app
takes the same options as faust credentials.

TopicSetupFailed (AdapterError)   topics could not be created or have the wrong partition count
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
)
from aiokafka.admin import (
    AIOKafkaAdminClient,
    NewTopic,
)
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    for_code,
)

from services.adapters.errors import AdapterError, ConfigError
from services.adapters.settings import Settings

log = logging.getLogger(__name__)

FETCH_MAX_WAIT_MS = 100
"""The default of ``BILLING_KAFKA_FETCH_MAX_WAIT_MS``. Tansu answers a fetch with no data
only when this wait is over, even if records arrive meanwhile (measured produce→consume
latency p50: 370 ms at 1,500 ms, 137 ms at 500 ms, 21 ms at 100 ms): a short wait is what
keeps the pipeline's latency low. Kafka returns as soon as data arrives, so the short wait
costs it only idle fetch requests. On S3 storage a longer one (``settings.S3_FETCH_MAX_WAIT_MS``)
lists the log less often and lets a longer listing finish (see above)."""
_RETRY_INTERVAL = 0.2
_TOPIC_ALREADY_EXISTS = 36

# Join time on Tansu is session_timeout_ms / 2 (measured above), so the session is kept short;
# 6 s still tolerates event-loop stalls of several seconds before the member is evicted.
GROUP_TIMINGS: Mapping[str, int] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
    # How long a broker waits for members to rejoin; no effect on Tansu's join time, but keeps
    # Apache Kafka's rebalances short too.
    "rebalance_timeout_ms": 2000,
}


class TopicSetupFailed(AdapterError):
    """Topics could not be created, or exist with another partition count."""


def kafka_client_options(settings: Settings | None = None) -> dict[str, Any]:
    """aiokafka's transport security options (TLS, SASL) from ``settings`` (``None``: the
    environment's, as every service process reads them): the one place they are mapped,
    for every producer, consumer and admin client, and for faust (``pricer.app``)."""
    settings = settings or Settings()
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        password = settings.kafka_sasl_password
        if not settings.kafka_sasl_username or password is None:
            raise ConfigError(
                f"BILLING_KAFKA_SECURITY_PROTOCOL={protocol} needs BILLING_KAFKA_SASL_USERNAME "
                "and BILLING_KAFKA_SASL_PASSWORD"
            )
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value()
    return options


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the brokers' certificates and host names (against ``kafka_ssl_cafile``, else
    the system's CAs); presents a client certificate when one is configured (mutual TLS)."""
    cafile = settings.kafka_ssl_cafile
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if settings.kafka_ssl_certfile is not None:
        keyfile = settings.kafka_ssl_keyfile
        context.load_cert_chain(str(settings.kafka_ssl_certfile), str(keyfile) if keyfile else None)
    elif settings.kafka_ssl_keyfile is not None:
        raise ConfigError("BILLING_KAFKA_SSL_KEYFILE needs BILLING_KAFKA_SSL_CERTFILE")
    return context


async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    replication: int = 1,
    timeout: float = 15.0,
) -> None:
    """Create the missing topics with their partition counts and check that all of them exist."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await _create_and_check(bootstrap, topics, replication)
            return
        except (KafkaError, TimeoutError, _NotYet) as exc:
            # A broker that is still starting refuses connections or times out; anything
            # permanent has already been raised as TopicSetupFailed.
            transient = not isinstance(exc, KafkaError) or exc.retriable
            if not transient and not isinstance(exc, KafkaTimeoutError):
                raise TopicSetupFailed(f"cannot create topics on {bootstrap}: {exc}") from exc
            if loop.time() >= deadline:
                raise TopicSetupFailed(
                    f"topics {sorted(topics)} not ready on {bootstrap} after {timeout}s: {exc}"
                ) from exc
            log.debug("topics not ready on %s yet: %s", bootstrap, exc)
        await asyncio.sleep(_RETRY_INTERVAL)


def make_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """A producer that waits for acks=all and reports an unreachable broker within seconds."""
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        # The idempotent producer starts with InitProducerId v0, which Tansu rejects; duplicates
        # from retries are harmless because every consumer deduplicates by request_id.
        "enable_idempotence": False,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        # Bounds metadata waits, a full buffer and batch expiry: with the broker gone, a send
        # fails after this long instead of the default 40 s (ingest must answer 503 quickly).
        "request_timeout_ms": 5000,
        **kafka_client_options(),
    }
    settings.update(overrides)
    return AIOKafkaProducer(**settings)


def make_consumer(
    bootstrap: str, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A group consumer that commits only when told to and starts from the earliest record;
    its fetches wait ``BILLING_KAFKA_FETCH_MAX_WAIT_MS`` (``FETCH_MAX_WAIT_MS``)."""
    configured = Settings()
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": configured.kafka_fetch_max_wait_ms,
        **GROUP_TIMINGS,
        **kafka_client_options(configured),
    }
    settings.update(overrides)
    return AIOKafkaConsumer(*topics, **settings)


def make_admin(bootstrap: str, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (topic set-up) with the transport's security options."""
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "request_timeout_ms": 5000,
        **kafka_client_options(),
    }
    settings.update(overrides)
    return AIOKafkaAdminClient(**settings)


class _NotYet(Exception):
    """Created topics not visible in metadata yet (Apache Kafka propagates them lazily)."""


async def _create_and_check(bootstrap: str, topics: Mapping[str, int], replication: int) -> None:
    admin = make_admin(bootstrap)
    try:
        await admin.start()
        await _create(admin, topics, replication)
        # All topics, never named ones: a metadata request naming a missing topic makes Tansu
        # auto-create it with 4 partitions.
        described = await admin.describe_topics(None)
    finally:
        await admin.close()
    partitions = {
        entry["topic"]: len(entry["partitions"])
        for entry in described
        if entry["error_code"] == 0 and entry["topic"] in topics
    }
    wrong = {
        name: (partitions[name], wanted)
        for name, wanted in topics.items()
        if name in partitions and partitions[name] != wanted
    }
    if wrong:
        found = ", ".join(f"{name} has {has}, wanted {want}" for name, (has, want) in wrong.items())
        # Adding partitions would move keys (tenants) to other partitions, and Tansu cannot.
        raise TopicSetupFailed(f"topics exist with another partition count: {found}")
    missing = sorted(set(topics) - set(partitions))
    if missing:
        raise _NotYet(f"not in metadata yet: {missing}")


async def _create(admin: AIOKafkaAdminClient, topics: Mapping[str, int], replication: int) -> None:
    existing = set(await admin.list_topics())
    wanted = [
        NewTopic(name, partitions, replication)
        for name, partitions in topics.items()
        if name not in existing
    ]
    if not wanted:
        return
    response = await admin.create_topics(wanted)
    for name, code, message in _topic_errors(response):
        if code in (0, _TOPIC_ALREADY_EXISTS):
            continue
        error = for_code(code)(message or name)
        if error.retriable:
            raise error
        raise TopicSetupFailed(f"cannot create topic {name}: {error}")


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """(topic, error code, message) per topic of a CreateTopics response of any version."""
    errors: list[tuple[str, int, str | None]] = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        errors.append((name, code, message))
    return errors
