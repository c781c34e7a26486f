"""The topics, their keys and partition counts (created explicitly: Tansu would auto-create
them with 4 partitions). A prefix keeps several pipelines apart on one broker (tests,
staging next to production)."""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_PARTITIONS = 6


class Topics(NamedTuple):
    usage: str = "billing.usage.v1"
    """``UsageRecorded``, key ``tenant_id``."""
    costs: str = "billing.costs.v1"
    """``UsagePriced``, key ``tenant_id``: the contract for quota services."""
    unpriced: str = "billing.usage.unpriced.v1"
    """``UsageRecorded`` with no price yet (held back, re-driven when one arrives)."""
    dlq: str = "billing.dlq.v1"
    """Undecodable messages, with where they came from and why in their headers."""
    alerts: str = "billing.alerts.v1"
    """``QuotaAlert`` (budget thresholds crossed, balances low or exhausted), key ``tenant_id``."""
    invoices: str = "billing.invoices.v1"
    """``InvoiceIssued``, key ``tenant_id``."""

    @classmethod
    def named(cls, prefix: str = "") -> Topics:
        return cls(*(prefix + name for name in cls()))

    def partitions(self, count: int = DEFAULT_PARTITIONS) -> dict[str, int]:
        """Every topic with its partition count, for ``ensure_topics``."""
        return dict.fromkeys(self, count)


def dead_letter_headers(
    topic: str, partition: int, offset: int, reason: str
) -> list[tuple[str, bytes]]:
    """Headers that say where a dead letter came from and why."""
    return [
        ("source-topic", topic.encode()),
        ("source-partition", str(partition).encode()),
        ("source-offset", str(offset).encode()),
        ("reason", reason.encode()[:1000]),
    ]
