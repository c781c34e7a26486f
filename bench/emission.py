"""What sending a batch of usage events costs the gateway, with its producer's settings beside
aiokafka's 5 ms linger (the other services' producer).

The gateway's emitter gathers events for 20 ms and hands each batch to the event publisher,
which waits for every acknowledgement (acks=all). This starts an embedded Tansu broker and a
6-partition topic, then, for each producer in turn (alone in the process, started fresh):
sends R batches of B ``UsageRecorded`` events (keys over 7 tenants) with a 20 ms pause after
each — what the emitter does at B × 50 requests/s — and reports the process's CPU per batch
and per event (the pauses' idle cost included: timers, the producer's own loop) and the
acknowledgement time (p50 / p99 of ``publish``). Alternating rounds, best CPU of each.

    .venv/bin/python bench/emission.py                  # B = 5 and 20, R = 300, 2 rounds
    .venv/bin/python bench/emission.py --batch 10 --batches 100 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from decimal import Decimal

from services.adapters.kafka import ensure_topics, make_producer
from services.adapters.publisher import KafkaPublisher
from services.core.events import UsageRecorded
from services.gateway.capture import OPENAI, Call, usage_event
from services.gateway.keys import TenantKey
from services.local.broker import EmbeddedBroker

USAGE = json.loads(
    '{"prompt_tokens": 35, "completion_tokens": 24, "total_tokens": 59, "cost": 0.0000195}',
    parse_float=Decimal,
)
PRODUCERS = {"gateway (linger_ms=0)": 0, "reference (linger_ms=5)": 5}


def batch(size: int, start: int) -> list[UsageRecorded]:
    events = []
    for n in range(start, start + size):
        key = TenantKey(f"tenant-{n % 7}", "k1")
        call = Call(key, OPENAI, "openai/gpt-4o-mini", {}, f"req-{n}", datetime.now(UTC))
        event = usage_event(call, USAGE)
        assert event is not None  # noqa: S101
        events.append(event)
    return events


async def measure(
    bootstrap: str, linger_ms: int, size: int, batches: int
) -> tuple[float, list[float]]:
    producer = make_producer(bootstrap, linger_ms=linger_ms)
    await producer.start()
    publisher = KafkaPublisher(producer)
    try:
        await publisher.publish("usage", batch(10, 0), 5.0)  # metadata, connections
        work = [batch(size, n * size) for n in range(batches)]
        acks: list[float] = []
        cpu = time.process_time()
        for events in work:
            sent = time.monotonic()
            await publisher.publish("usage", events, 5.0)
            acks.append(time.monotonic() - sent)
            await asyncio.sleep(0.02)
        return (time.process_time() - cpu) / batches, sorted(acks)
    finally:
        await producer.stop()


async def main(args: argparse.Namespace) -> None:
    broker = EmbeddedBroker()
    broker.start()
    try:
        await ensure_topics(broker.bootstrap, {"usage": 6})
        print(f"{'producer':<26}{'batch':>6}{'CPU ms/batch':>14}{'ms/event':>10}"
              f"{'ack p50':>9}{'p99':>7}")  # fmt: skip
        for size in args.batch:
            results: dict[str, tuple[float, list[float]]] = {}
            for _ in range(args.rounds):
                for name, linger in PRODUCERS.items():
                    cpu, acks = await measure(broker.bootstrap, linger, size, args.batches)
                    if name not in results or cpu < results[name][0]:
                        results[name] = (cpu, acks)
            for name, (cpu, acks) in results.items():
                p50, p99 = acks[len(acks) // 2], acks[int(len(acks) * 0.99)]
                print(f"{name:<26}{size:>6}{cpu * 1e3:>14.3f}{cpu / size * 1e3:>10.3f}"
                      f"{p50 * 1e3:>9.1f}{p99 * 1e3:>7.1f}")  # fmt: skip
            mine, ref = (results[name][0] for name in PRODUCERS)
            print(f"{'ratio (gateway / reference)':<32}{mine / ref:>14.2f}")
    finally:
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[5, 20])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
