"""How a fetch's cost grows with the number of batches in a partition, on Tansu's s3 storage
(`weed mini`, as `billing up` runs it) beside its memory storage, in the same run.

Tansu 0.6.0 lists every batch object of a partition on each fetch below its end; a fetch whose
listing outlasts ``fetch_max_wait_ms`` returns nothing. This writes one-record batches into a
one-partition topic (``send_and_wait`` one at a time: one batch each) and, at each checkpoint,
times a fetch of the newest record (p50 of 10, ``fetch_max_wait_ms`` 10 s so that the listing
always finishes), then asks whether fetches waiting 100 ms and 500 ms (``billing up``'s wait on
its s3 log) still get it within 3 s. The reference is the same on the memory engine.

    .venv/bin/python bench/tansu_listing.py                 # up to 40,000 batches, ~4 min
    .venv/bin/python bench/tansu_listing.py --batches 1000,5000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.adapters.kafka import ensure_topics  # noqa: E402
from services.local.broker import EmbeddedBroker  # noqa: E402
from services.local.objectstore import ObjectStore, load_or_create_credentials  # noqa: E402

TOPIC = "listing"
TP = TopicPartition(TOPIC, 0)


async def fetch_newest(consumer: AIOKafkaConsumer, offset: int, timeout_ms: int) -> float | None:
    """Seconds until the record at ``offset`` arrives (None: not within ``timeout_ms``)."""
    consumer.seek(TP, offset)
    started = time.perf_counter()
    fetched = await consumer.getmany(TP, timeout_ms=timeout_ms)
    if not fetched.get(TP):
        return None
    return time.perf_counter() - started


async def measure(bootstrap: str, checkpoints: list[int]) -> list[tuple[int, float, bool, bool]]:
    await ensure_topics(bootstrap, {TOPIC: 1})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, enable_idempotence=False)
    consumers = {
        wait: AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=wait)
        for wait in (10_000, 100, 500)
    }
    await producer.start()
    for consumer in consumers.values():
        await consumer.start()
        consumer.assign([TP])
    rows = []
    written = 0
    try:
        for target in checkpoints:
            while written < target:
                await producer.send_and_wait(TOPIC, b"x" * 700)
                written += 1
            times = [await fetch_newest(consumers[10_000], written - 1, 20_000) for _ in range(10)]
            p50 = statistics.median(t if t is not None else float("inf") for t in times)
            at_100 = await fetch_newest(consumers[100], written - 1, 3000) is not None
            at_500 = await fetch_newest(consumers[500], written - 1, 3000) is not None
            rows.append((target, p50, at_100, at_500))
            print(f"  {target:>7,} batches: fetch p50 {p50 * 1000:7.1f} ms", flush=True)
    finally:
        await producer.stop()
        for consumer in consumers.values():
            await consumer.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1000,5000,10000,20000,40000")
    args = parser.parse_args()
    checkpoints = sorted(int(n) for n in args.batches.split(","))
    results = {}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        root = Path(scratch)
        for engine in ("s3", "memory"):
            print(f"{engine}:", flush=True)
            storage, env = "memory://tansu/", {}
            if engine == "s3":
                credentials = load_or_create_credentials(root / "credentials.json")
                store = ObjectStore(root / "objects", credentials, log_path=root / "weed.log")
                stack.enter_context(store)
                storage, env = "s3://tansu/", store.s3_environment()
            broker = EmbeddedBroker(
                log_path=root / f"tansu-{engine}.log", storage=storage, storage_env=env
            )
            with broker:
                results[engine] = asyncio.run(measure(broker.bootstrap, checkpoints))
    print(
        "\nbatches in the partition | fetch p50 s3 | memory (reference) | s3 ÷ memory "
        "| s3 fetch answered at 100 ms / 500 ms wait"
    )
    for (n, s3, at_100, at_500), (_, memory, _, _) in zip(
        results["s3"], results["memory"], strict=True
    ):
        ratio = s3 / memory if memory > 0 else float("inf")
        print(
            f"{n:>24,} | {s3 * 1000:8.1f} ms | {memory * 1000:14.1f} ms | {ratio:10.1f} "
            f"| {'yes' if at_100 else 'NO'} / {'yes' if at_500 else 'NO'}"
        )


if __name__ == "__main__":
    main()
