"""The usage spool and the emitter in front of it, with the in-memory publisher (no broker)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.adapters.publisher import InMemoryPublisher
from services.core.events import UsageCounts, UsageRecorded, decode_recorded
from services.core.usage import Usage
from services.gateway.emitter import Emitter
from services.gateway.spool import REJECTED, Spool, SpoolBusy, claim, spooled_bytes


def event(n: int) -> UsageRecorded:
    now = datetime.now(UTC)
    return UsageRecorded(
        request_id=f"req-{n}",
        tenant_id="acme",
        provider="openrouter",
        provider_model_id="openai/gpt-4o-mini",
        occurred_at=now,
        recorded_at=now,
        usage=UsageCounts.of(Usage(prompt_tokens=10 + n, uncached_input_tokens=10 + n)),
    )


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool", segment_bytes=2_000)
    opened.open()
    yield opened
    opened.close()


def ids(events: list[UsageRecorded]) -> list[str]:
    return [e.request_id for e in events]


def read_back(spool: Spool) -> list[str]:
    return [e.request_id for path in spool.sealed() for batch in spool.read(path, 7) for e in batch]


def test_appended_events_survive_a_reopen_in_order(spool: Spool, tmp_path: Path) -> None:
    spool.append([event(n) for n in range(10)])
    spool.append([event(n) for n in range(10, 25)])
    assert len(spool.segments()) > 1, "2 kB segments should have rolled over"
    size = spool.size_bytes
    spool.close()
    again = Spool(tmp_path / "spool")
    again.open()
    assert again.size_bytes == size
    assert read_back(again) == [f"req-{n}" for n in range(25)]
    again.close()


def test_a_torn_last_line_is_cut_and_kept_aside(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    first.open()
    first.append([event(1), event(2)])
    first.close()
    segment = first.segments()[-1]
    with segment.open("ab") as handle:
        handle.write(event(3).model_dump_json().encode()[:40])  # died mid-write
    again = Spool(tmp_path / "spool")
    again.open()
    assert read_back(again) == ["req-1", "req-2"]
    assert segment.read_bytes().endswith(b"\n")
    assert (tmp_path / "spool" / "rejected.jsonl").read_bytes().startswith(b'{"event_type"')
    again.close()


def test_an_undecodable_line_goes_to_rejected_not_to_the_broker(spool: Spool) -> None:
    spool.append([event(1)])
    with spool.segments()[-1].open("ab") as handle:
        handle.write(b'{"event_type": "UsageRecorded", "nonsense": 1}\n')
    spool.append([event(2)])
    assert read_back(spool) == ["req-1", "req-2"]
    rejected = (spool.directory / "rejected.jsonl").read_text()
    assert "nonsense" in rejected


def test_removing_sealed_segments_empties_the_spool(spool: Spool) -> None:
    spool.append([event(n) for n in range(30)])
    assert spool.oldest is not None
    for path in spool.sealed():
        spool.remove(path)
    assert spool.empty and spool.size_bytes == 0 and spool.oldest is None
    assert spool.segments() == []


def test_one_gateway_owns_a_spool_directory(spool: Spool) -> None:
    other = Spool(spool.directory)
    with pytest.raises(SpoolBusy, match="BILLING_SPOOL_DIR"):
        other.open()


def sent(publisher: InMemoryPublisher) -> list[UsageRecorded]:
    """The usage events the fake broker acknowledged, in order."""
    return [decode_recorded(value) for value in publisher.values("usage")]


async def wait_until(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_emitter_sends_while_the_broker_is_up_and_spools_while_it_is_not(
    tmp_path: Path,
) -> None:
    publisher = InMemoryPublisher()
    emitter = Emitter(lambda: publisher, "usage", Spool(tmp_path / "spool"))
    await emitter.start()
    emitter.submit(event(1))
    await wait_until(lambda: len(sent(publisher)) == 1)
    assert emitter.spool.empty

    publisher.down = True
    for n in range(2, 12):
        emitter.submit(event(n))
    await wait_until(lambda: emitter.depth == 0 and not emitter.spool.empty)
    assert not emitter.broker_up
    assert ids(sent(publisher)) == ["req-1"]

    publisher.down = False  # the broker is back: the spool is re-sent, then deleted
    await wait_until(lambda: emitter.spool.empty, timeout=10)
    emitter.submit(event(12))
    await wait_until(lambda: len(sent(publisher)) == 12)
    assert sorted(ids(sent(publisher))) == sorted(f"req-{n}" for n in range(1, 13))
    await emitter.close()


async def test_shutdown_spools_what_it_could_not_send_and_the_next_run_sends_it(
    tmp_path: Path,
) -> None:
    emitter = Emitter(lambda: None, "usage", Spool(tmp_path / "spool"))
    await emitter.start()
    for n in range(5):
        emitter.submit(event(n))
    emitter.submit_later(lambda: event(5))  # an estimate, built in a worker thread
    emitter.submit_later(lambda: None)  # an estimate that failed: nothing to send
    await emitter.close(timeout=0.1)

    publisher = InMemoryPublisher()
    second = Emitter(lambda: publisher, "usage", Spool(tmp_path / "spool"))
    await second.start()
    await wait_until(lambda: second.spool.empty)
    assert sorted(ids(sent(publisher))) == [f"req-{n}" for n in range(6)]
    await second.close()


async def test_a_full_spool_refuses_new_work_only_when_told_to(tmp_path: Path) -> None:
    strict = Emitter(lambda: None, "usage", Spool(tmp_path / "a"), spool_max_bytes=1_000)
    lenient = Emitter(
        lambda: None, "usage", Spool(tmp_path / "b"), spool_max_bytes=1_000, reject_when_full=False
    )
    for emitter in (strict, lenient):
        await emitter.start()
        assert emitter.accepting
        for n in range(10):
            emitter.submit(event(n))
        await wait_until(lambda e=emitter: e.spool.size_bytes > 1_000)  # type: ignore[misc]
    assert not strict.accepting
    assert lenient.accepting
    for emitter in (strict, lenient):
        await emitter.close(timeout=0)


async def test_a_full_queue_refuses_new_work(tmp_path: Path) -> None:
    emitter = Emitter(lambda: None, "usage", Spool(tmp_path / "spool"), max_queue=3)
    for n in range(3):  # not started: nothing drains the queue
        emitter.submit(event(n))
    assert not emitter.accepting
    emitter.submit(event(3))  # an answered request is still taken
    assert emitter.depth == 4


async def test_shutdown_during_a_hanging_send_spools_that_batch(tmp_path: Path) -> None:
    hanging = InMemoryPublisher()
    hanging.hang = True  # a broker that went away mid-send: no acknowledgement comes
    emitter = Emitter(lambda: hanging, "usage", Spool(tmp_path / "spool"))
    await emitter.start()
    emitter.submit(event(1))
    emitter.submit(event(2))
    await wait_until(lambda: len(emitter.in_flight) == 2)
    await emitter.close(timeout=0.1)
    again = Spool(tmp_path / "spool")
    again.open()
    assert read_back(again) == ["req-1", "req-2"]
    again.close()


async def test_an_estimate_that_raises_costs_only_itself(tmp_path: Path) -> None:
    publisher = InMemoryPublisher()
    emitter = Emitter(lambda: publisher, "usage", Spool(tmp_path / "spool"))
    await emitter.start()

    def broken() -> UsageRecorded:
        raise RuntimeError("tokenizer files missing")

    emitter.submit(event(1))
    emitter.submit_later(broken)
    emitter.submit(event(2))
    await wait_until(lambda: len(sent(publisher)) == 2)
    emitter.submit(event(3))  # the sender is still alive
    await wait_until(lambda: len(sent(publisher)) == 3)
    await emitter.close()


async def test_a_failing_disk_refuses_new_work_and_keeps_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    emitter = Emitter(lambda: None, "usage", spool)
    await emitter.start()
    real_append, failures = spool.append, [2]

    def full_disk(events: list[UsageRecorded]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(28, "No space left on device")
        real_append(events)

    monkeypatch.setattr(spool, "append", full_disk)
    emitter.submit(event(1))
    await wait_until(lambda: emitter.spool_failing)
    assert not emitter.accepting
    await wait_until(lambda: not spool.empty, timeout=10)  # the disk came back: it is written
    assert emitter.accepting and read_back(spool) == ["req-1"]
    await emitter.close(timeout=0)


def test_a_short_write_leaves_the_segment_as_it_was(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.append([event(1)])
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", failing)
        return real_write(fd, bytes(data)[: len(data) // 2])

    def failing(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError):
        spool.append([event(2)])
    monkeypatch.setattr(os, "write", real_write)
    spool.append([event(3)])
    assert read_back(spool) == ["req-1", "req-3"]
    assert not (spool.directory / "rejected.jsonl").exists()


def test_workers_claim_one_spool_each_and_a_successor_takes_over(tmp_path: Path) -> None:
    base = tmp_path / "spool"
    first, second = claim(base, 2), claim(base, 2)
    assert (first.directory, second.directory) == (base, base / "worker-1")
    with pytest.raises(SpoolBusy, match="all 2 spools"):
        claim(base, 2)
    second.append([event(1), event(2)])
    second.close()  # the worker died: its lock is gone, its events are not
    successor = claim(base, 2)
    assert successor.directory == base / "worker-1"
    assert read_back(successor) == ["req-1", "req-2"]
    successor.close()
    first.close()


def test_spooled_bytes_count_every_workers_segments_but_not_rejected_lines(
    tmp_path: Path,
) -> None:
    base = tmp_path / "spool"
    assert spooled_bytes(base) == 0  # no spool yet
    first, second = claim(base, 2), claim(base, 2)
    first.append([event(1)])
    second.append([event(2), event(3)])
    assert spooled_bytes(base) == first.size_bytes + second.size_bytes > 0
    (base / REJECTED).write_text("not counted\n")
    assert spooled_bytes(base) == first.size_bytes + second.size_bytes
    first.close()
    second.close()
