"""Soak (issue #14): the whole stack under steady load, a service SIGKILLed every few minutes.

Memory of every process over time (flat?), lag (bounded?), and every event billed once.

Not run in CI. One run starts ``billing up`` (its own process group) on a fresh temporary
data dir — embedded Tansu and embedded PostgreSQL, or with ``--external-db`` a fresh
``bench_soak_<hex>`` database on ``BILLING_DATABASE_URL``'s server (else 127.0.0.1:5432),
dropped at the end — and waits for ``stack.json`` and the gateway's ``/readyz``. Then:

- **Load**: ``--rate`` events/s POSTed to ``/v1/usage`` in batches of ``--batch`` (one POST
  every batch/rate s on a monotonic clock, each its own task) for ``--minutes``, over
  ``--tenants`` tenants (created by the gateway on first use: ``BILLING_UNKNOWN_TENANTS=
  create``) and the bundled catalogue's models (the ones the pricer prices offline), with
  cached, cache-write and reasoning tokens and an OpenRouter-reported cost. ``--duplicates``
  (2 %) of the items are an already acknowledged item posted again, byte for byte (same
  ``request_id`` and ``occurred_at``): billed once. A POST that fails (the gateway killed, a
  503, a timeout) is retried with the same body until it is acknowledged: *sent* counts the
  unique ``request_id`` s acknowledged by a 202.
- **Kills**: every ``--kill-every`` minutes one service, in turn (``--kill-order``:
  projector, pricer, quota, gateway), is SIGKILLed; the supervisor restarts it. Timed from
  the kill: *restarted* (a new process), *resumed* (the new process handled a batch: its
  ``billing_batch_size_count``; the gateway: a POST sent after the kill was acknowledged) and
  *caught up* (its ``billing_pipeline_lag_seconds`` back under max(3 s, 2 × before); the
  gateway: no POST left waiting for a retry).
- **Samples** every ``--sample-every`` s: memory and CPU of every process of the stack (the
  supervisor, gateway, pricer, projector, quota, tansu, seaweedfs if any, the embedded
  postgres and its backends: RSS, or the sum of PSS for a group of processes, so shared
  buffers count once), each service's ``billing_pipeline_lag_seconds`` and counters, and the
  end-to-end backlog: events acknowledged but not yet in ``tenant_billing_summary``, with
  the age of the oldest of them. A progress line every minute.
- **Drain and check**: the load stops, the pipeline drains (until the billed count equals
  *sent*, stops moving for ``--drain-stall`` s, or ``--drain-timeout``), then PostgreSQL is
  checked: ``billing_transactions`` holds exactly the acknowledged ``request_id`` s, once
  each; ``tenant_billing_summary`` counts the same; the quota service charged each once, for
  the same total as the transactions.

The references measured in the same run: each process's memory slope (MB/min, least
squares over the second half, on its last process only if it was restarted then) beside its
own minute-1 memory and the ratio end / minute 1 (flat ≈ 1.0), and the throughput achieved
beside the rate offered. Figures also go to ``--out`` (JSON) for bench/RESULTS.md. The
machine is shared and noisy: read the ratios, not the absolute figures.

    .venv/bin/python bench/soak.py                                  # 30 min at 1,000 events/s
    .venv/bin/python bench/soak.py --minutes 2 --kill-every 1 --rate 200   # smoke, ~4 min
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from services.core.catalogue import default_catalogue
from services.local.state import read_state

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"
MODELS = [entry.model for entry in default_catalogue().entries]
SERVICES = ("gateway", "pricer", "projector", "quota", "invoices")
PIPELINE = ("pricer", "projector", "quota")
MB = 1024 * 1024
RING = 20_000  # acknowledged items kept for re-sending as duplicates


# -- the stack ---------------------------------------------------------------------------------


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20_000, 60_000)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


def label(process: psutil.Process, inherited: str) -> str:
    """What a process of the stack is: the service it runs (``python -m services.cli.main
    pricer …``), tansu, seaweedfs, postgres, or its parent's label (gateway workers)."""
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return inherited
    program = Path(cmdline[0]).name if cmdline else process.name()
    if "tansu" in program:
        return "tansu"
    if program.startswith("weed") or "seaweed" in program:
        return "seaweedfs"
    if program.startswith("postgres") or process.name().startswith("postgres"):
        return "postgres"
    if "services.cli.main" in cmdline or any(Path(a).name == "billing" for a in cmdline[:2]):
        for token in cmdline[1:]:
            if token in SERVICES:
                return token
    return inherited or program


@dataclass
class Stack:
    """``billing up`` on a temporary data dir, and the processes under it."""

    data_dir: Path
    port: int
    env: dict[str, str]
    up: subprocess.Popen[bytes] | None = None
    database_url: str = ""
    metrics: dict[str, str] = field(default_factory=dict)
    seen: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid: (label, created)
    _postmaster: psutil.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> None:
        with log.open("ab") as output:
            self.up = subprocess.Popen(  # noqa: S603 - our own console script
                [BILLING, "up", "--port", str(self.port), "--data-dir", str(self.data_dir)],
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )

    async def ready(self, log: Path, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.up is None or self.up.poll() is not None:
                    raise RuntimeError(f"billing up exited:\n{tail(log)}")
                state = read_state(self.data_dir)
                if state is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{self.url}/readyz")).status_code == 200:
                            self.database_url = state.database_url
                            self.metrics = self._metrics_urls()
                            return
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the stack was not ready in {timeout:.0f} s:\n{tail(log)}")

    def _metrics_urls(self) -> dict[str, str]:
        """Every service's /metrics, as the supervisor hands them to the gateway."""
        from services.adapters.settings import Settings
        from services.local.supervisor import Stack as Supervised

        pairs = Supervised(Settings(), self.port, lambda _: None).pipeline_metrics().split(",")
        urls = {"gateway": f"{self.url}/metrics"}
        for pair in pairs:
            name, _, url = pair.partition("=")
            urls[name] = url
        return urls

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The stack's processes by label: ``billing up``'s descendants and the postgres
        running on the data dir (pgserver daemonises it)."""
        groups: dict[str, list[psutil.Process]] = defaultdict(list)
        if self.up is None:
            return groups
        try:
            root = psutil.Process(self.up.pid)
        except psutil.Error:
            return groups
        todo = [(root, "supervisor")]
        postmaster = self.postmaster()
        if postmaster is not None:
            todo.append((postmaster, "postgres"))
        visited: set[int] = set()
        while todo:
            process, name = todo.pop()
            if process.pid in visited:
                continue  # the postmaster, should it be a descendant of billing up
            visited.add(process.pid)
            try:
                created = process.create_time()
                children = process.children()
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue  # killed, not yet reaped by the supervisor
            except psutil.Error:
                continue
            groups[name].append(process)
            self.seen.setdefault(process.pid, (name, created))
            todo.extend((c, label(c, name)) for c in children)
        return groups

    def postmaster(self) -> psutil.Process | None:
        if self._postmaster is not None and self._postmaster.is_running():
            return self._postmaster
        pgdata = str(self.data_dir.resolve() / "postgres")
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if (
                cmdline
                and "postgres" in Path(cmdline[0]).name
                and any(pgdata in a for a in cmdline)
            ):
                self._postmaster = process
                return process
        return None

    def service_pid(self, name: str) -> int | None:
        """The pid of the supervisor's child running ``name`` (the first, for pricers)."""
        children = [p for p in self.processes().get(name, []) if self._is_child(p)]
        return children[0].pid if children else None

    def _is_child(self, process: psutil.Process) -> bool:
        try:
            return self.up is not None and process.ppid() == self.up.pid
        except psutil.Error:
            return False

    def stop(self) -> None:
        """SIGTERM ``billing up`` (it stops its children, broker and database), then make
        sure nothing it started is left."""
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(90)
            except subprocess.TimeoutExpired:
                print("billing up did not stop in 90 s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.up.pid, signal.SIGKILL)
                self.up.wait()
        leftovers = []
        for pid, (name, created) in self.seen.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)  # the same process, not a reused pid
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    leftovers.append((process, name))
        for process, name in leftovers:  # only ours: pids met under this run's processes
            print(f"left running after stop: {name} pid {process.pid}; SIGTERM")
            with contextlib.suppress(psutil.Error):
                process.terminate()
        psutil.wait_procs([p for p, _ in leftovers], timeout=15)


def tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as exc:
        return f"({path}: {exc})"


# -- load ----------------------------------------------------------------------------------


class Load:
    """Batches of usage items at a steady rate; each POST retried until acknowledged."""

    def __init__(self, args: argparse.Namespace, stack: Stack, token: str) -> None:
        self.args = args
        self.stack = stack
        self.token = token
        self.run = secrets.token_hex(3)
        self.rng = random.Random(args.seed)
        self.tenants = [f"soak-tenant-{n:03d}" for n in range(args.tenants)]
        self.next_id = 0
        self.acked = bytearray()  # acked[n]: request soak-<run>-<n> acknowledged
        self.unique = 0
        self.posted_items = 0  # items in first attempts, duplicates included
        self.duplicates = 0  # duplicate items acknowledged
        self.rejected = 0
        self.failures: Counter[str] = Counter()
        self.abandoned = 0  # unique items never acknowledged (give-up deadline)
        self.retrying = 0  # POSTs waiting for a retry now
        self.last_ack_started = 0.0  # monotonic start of the latest acknowledged attempt
        self.timeline: list[tuple[float, int]] = [(time.monotonic(), 0)]  # (t, unique)
        self.ring: list[dict[str, Any]] = []
        self.give_up_at = float("inf")
        self.tasks: set[asyncio.Task[None]] = set()

    def request_id(self, n: int) -> str:
        return f"soak-{self.run}-{n}"

    def item(self) -> tuple[dict[str, Any], int]:
        rng, n = self.rng, self.next_id
        self.next_id += 1
        model = rng.choice(MODELS)
        prompt, completion = rng.randint(50, 40_000), rng.randint(1, 4_000)
        cached = rng.randint(0, prompt) if rng.random() < 0.5 else 0
        written = (
            rng.randint(0, prompt - cached) if "anthropic" in model and rng.random() < 0.3 else 0
        )
        reasoning = rng.randint(0, completion) if rng.random() < 0.4 else 0
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
            "cost": rng.randint(1_000, 500_000) / 10**7,  # a JSON number, as OpenRouter sends
            "is_byok": False,
        }
        occurred = datetime.now(UTC).isoformat(timespec="microseconds")
        item = {"request_id": self.request_id(n), "tenant_id": rng.choice(self.tenants),
                "api_key_id": f"key-{rng.randint(1, 3)}", "provider": "openrouter",
                "provider_model_id": model, "occurred_at": occurred, "usage": usage,
                "metadata": {"app": "soak"}}  # fmt: skip
        return item, n

    def batch(self) -> tuple[list[dict[str, Any]], list[int | None]]:
        """``--batch`` items, a ``--duplicates`` share of them acknowledged ones again."""
        items: list[dict[str, Any]] = []
        numbers: list[int | None] = []
        for _ in range(self.args.batch):
            if self.ring and self.rng.random() < self.args.duplicates:
                items.append(self.rng.choice(self.ring))
                numbers.append(None)
            else:
                item, n = self.item()
                items.append(item)
                numbers.append(n)
        return items, numbers

    async def run_for(self, seconds: float, client: httpx.AsyncClient) -> None:
        interval = self.args.batch / self.args.rate
        started = time.monotonic()
        k = 0
        while (due := started + k * interval) < started + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            items, numbers = self.batch()
            self.posted_items += len(items)
            task = asyncio.create_task(self.deliver(client, items, numbers))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            k += 1
            if (now := time.monotonic()) - self.timeline[-1][0] >= 1.0:
                self.timeline.append((now, self.unique))

    async def deliver(
        self, client: httpx.AsyncClient, items: list[dict[str, Any]], numbers: list[int | None]
    ) -> None:
        body = json.dumps(items).encode()
        attempt = 0
        while True:
            started, status, text = time.monotonic(), 0, ""
            try:
                response = await client.post("/v1/usage", content=body)
                status, text = response.status_code, response.text
                if status == 202:
                    self.acknowledged(response.json(), items, numbers, started)
                    return
                reason = f"HTTP {status}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                reason = type(exc).__name__
            self.failures[reason] += 1
            if 400 <= status < 500 and status not in (408, 429):
                print(f"POST /v1/usage answered {status}: {text[:300]}")
                self.rejected += len(items)  # not retried: the same body would fail again
                return
            if time.monotonic() > self.give_up_at:
                self.abandoned += sum(1 for n in numbers if n is not None)
                return
            self.retrying += 1
            try:
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
            finally:
                self.retrying -= 1
            attempt += 1

    def acknowledged(
        self,
        answer: dict[str, Any],
        items: list[dict[str, Any]],
        numbers: list[int | None],
        started: float,
    ) -> None:
        self.last_ack_started = max(self.last_ack_started, started)
        for result in answer["results"]:
            index = result["index"]
            if result["status"] != "accepted":
                self.rejected += 1
                if self.rejected <= 5:
                    print(f"rejected: {result}")
                continue
            n = numbers[index]
            if n is None:
                self.duplicates += 1
                continue
            if n >= len(self.acked):
                self.acked.extend(bytes(max(n + 1 - len(self.acked), 65_536)))
            if not self.acked[n]:
                self.acked[n] = 1
                self.unique += 1
                if len(self.ring) < RING:
                    self.ring.append(items[index])
                else:
                    self.ring[self.rng.randrange(RING)] = items[index]

    async def finish(self, timeout: float) -> None:
        """Let every POST be acknowledged (retrying), giving up after ``timeout``."""
        self.give_up_at = time.monotonic() + timeout
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        self.timeline.append((time.monotonic(), self.unique))

    def unique_at(self, billed: int) -> float | None:
        """When the ``billed + 1``-th unique event was acknowledged (None: not yet)."""
        counts = [c for _, c in self.timeline]
        at = bisect.bisect_right(counts, billed)
        return self.timeline[at][0] if at < len(self.timeline) else None


# -- samples -------------------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """Prometheus samples as {name or name{service}: value}; None if it does not answer."""
    try:
        text = (await client.get(url, timeout=3)).text
    except httpx.HTTPError:
        return None
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "service" in sample.labels:
                key += "{" + sample.labels["service"] + "}"
            elif sample.labels:
                if "le" in sample.labels or "quantile" in sample.labels:
                    continue
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
                continue
            values[key] = sample.value
    return values


def progress_of(name: str, metrics: dict[str, float] | None) -> float | None:
    """A counter that moves whenever ``name`` handles a batch."""
    if metrics is None:
        return None
    return metrics.get(f"billing_batch_size_count{{{name}}}")


def lag_of(name: str, metrics: dict[str, float] | None) -> float | None:
    return None if metrics is None else metrics.get(f"billing_pipeline_lag_seconds{{{name}}}")


class Sampler:
    """Memory, CPU, lag and backlog every ``every`` seconds."""

    def __init__(self, stack: Stack, load: Load, every: float) -> None:
        self.stack, self.load, self.every = stack, load, every
        self.samples: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._cpu: dict[int, tuple[float, float]] = {}
        self._db: asyncpg.Connection | None = None

    async def billed(self) -> int | None:
        """Requests in ``tenant_billing_summary`` (cheap: one row per tenant/day/model/key)."""
        try:
            if self._db is None or self._db.is_closed():
                self._db = await asyncpg.connect(self.stack.database_url, timeout=5)
            sql = "SELECT coalesce(sum(requests), 0) FROM tenant_billing_summary"
            return int(await self._db.fetchval(sql, timeout=10))
        except (OSError, asyncpg.PostgresError, TimeoutError):
            self._db = None
            return None

    async def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()

    def memory(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        for name, processes in self.stack.processes().items():
            rss = pss = cpu = 0.0
            pids = []
            for process in processes:
                try:
                    info = process.memory_full_info()
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                pids.append(process.pid)
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                used = times.user + times.system
                before = self._cpu.get(process.pid)
                if before is not None:
                    cpu += (used - before[0]) / max(now - before[1], 1e-6)
                self._cpu[process.pid] = (used, now)
            if pids:
                memory = rss if len(pids) == 1 else pss
                groups[name] = {"mb": memory / MB, "rss_mb": rss / MB, "pss_mb": pss / MB,
                                "cpu": cpu * 100, "pids": sorted(pids)}  # fmt: skip
        return groups

    async def sample(self, client: httpx.AsyncClient) -> dict[str, Any]:
        now = time.monotonic()
        scraped = await asyncio.gather(*(scrape(client, u) for u in self.stack.metrics.values()))
        metrics = dict(zip(self.stack.metrics, scraped, strict=True))
        billed = await self.billed()
        unique = self.load.unique
        oldest = self.load.unique_at(billed) if billed is not None else None
        sample = {
            "t": now - self.started,
            "memory": await asyncio.to_thread(self.memory),
            "lag": {s: lag_of(s, metrics.get(s)) for s in PIPELINE},
            "progress": {s: progress_of(s, metrics.get(s)) for s in PIPELINE},
            "sent": unique,
            "billed": billed,
            "behind": None if billed is None else unique - billed,
            "behind_s": 0.0 if oldest is None else now - oldest,
            "gateway": {
                k: (metrics.get("gateway") or {}).get(k)
                for k in (
                    "billing_emit_queue_depth",
                    "billing_spool_bytes",
                    "billing_spooled_events_total",
                    "billing_ingested_events_total",
                )
            },  # fmt: skip
            "dead_lettered": sum(
                (m or {}).get("billing_dead_lettered_total", 0.0) for m in metrics.values()
            ),
            "unpriced": (metrics.get("pricer") or {}).get("billing_unpriced_events_total"),
            "retrying": self.load.retrying,
        }
        self.samples.append(sample)
        return sample

    async def run(self, client: httpx.AsyncClient, until: float, minutes_total: float) -> None:
        next_line = 60.0
        while (t := time.monotonic() - self.started) < until:
            sample = await self.sample(client)
            if t + 1 >= next_line:
                print(progress_line(sample, self.load, minutes_total), flush=True)
                next_line += 60.0
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - self.started - t)))


def progress_line(sample: dict[str, Any], load: Load, minutes: float) -> str:
    memory = sample["memory"]
    order = ("gateway", "pricer", "projector", "quota", "tansu", "postgres", "supervisor")
    mem = " ".join(f"{k[:4]} {memory[k]['mb']:.0f}" for k in order if k in memory)
    lags = " ".join(
        f"{k[:4]} {v:.1f}" if v is not None else f"{k[:4]} -" for k, v in sample["lag"].items()
    )
    elapsed = sample["t"] / 60
    return (
        f"[{elapsed:4.1f}/{minutes:g} min] sent {sample['sent']:,} "
        f"({sample['sent'] / max(sample['t'], 1):,.0f}/s) billed {sample['billed'] or 0:,} "
        f"behind {sample['behind'] or 0:,} ({sample['behind_s']:.1f} s) | lag s {lags} | "
        f"MB {mem} | retries {sum(load.failures.values())}"
    )


# -- kills ---------------------------------------------------------------------------------


async def kill_and_watch(
    stack: Stack,
    load: Load,
    sampler: Sampler,
    name: str,
    client: httpx.AsyncClient,
    record: dict[str, Any],
) -> None:
    """SIGKILL ``name``; time its restart, first batch (resumed) and catching up."""
    at = record["at_min"] * 60
    pid = stack.service_pid(name)
    if pid is None:
        record["error"] = "no process found"
        return
    url = stack.metrics.get(name)
    before = await scrape(client, url) if url else None
    lag_before = lag_of(name, before) or 0.0
    threshold = max(3.0, 2 * lag_before)
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    print(f"[{at / 60:4.1f} min] SIGKILL {name} (pid {pid}, lag before {lag_before:.1f} s)")
    record.update(pid=pid, lag_before_s=lag_before)
    deadline = killed + min(300.0, max(30.0, load.args.kill_every * 60 - 5))
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        elapsed = time.monotonic() - killed
        if "restarted_s" not in record:
            new = stack.service_pid(name)
            if new is not None and new != pid:
                record["restarted_s"], record["new_pid"] = round(elapsed, 2), new
            continue
        if name == "gateway":
            if "resumed_s" not in record and load.last_ack_started > killed:
                record["resumed_s"] = round(elapsed, 2)
            if "resumed_s" in record and load.retrying == 0:
                record["caught_up_s"] = round(elapsed, 2)
                break
            continue
        metrics = await scrape(client, url) if url else None
        fresh = metrics is not None and metrics.get("process_start_time_seconds", 0) >= (
            killed_wall - 1
        )
        if not fresh:
            continue
        if "resumed_s" not in record and (progress_of(name, metrics) or 0) > 0:
            record["resumed_s"] = round(elapsed, 2)
        lag = lag_of(name, metrics)
        if "resumed_s" in record and lag is not None and lag <= threshold:
            record["caught_up_s"], record["lag_at_catch_up_s"] = round(elapsed, 2), lag
            break
    words = ", ".join(
        f"{k.removesuffix('_s')} {record[k]:.1f} s"
        for k in ("restarted_s", "resumed_s", "caught_up_s")
        if k in record
    )
    print(f"[{(time.monotonic() - sampler.started) / 60:4.1f} min] {name} after kill: {words}")


async def killer(
    stack: Stack,
    load: Load,
    sampler: Sampler,
    client: httpx.AsyncClient,
    records: list[dict[str, Any]],
) -> None:
    """Every ``--kill-every`` minutes of the load, the next service of ``--kill-order``."""
    args = load.args
    order = [s.strip() for s in args.kill_order.split(",") if s.strip()]
    k = 1
    while args.kill_every > 0 and (at := k * args.kill_every * 60) < args.minutes * 60:
        await asyncio.sleep(max(0.0, at - (time.monotonic() - sampler.started)))
        record = {"service": order[(k - 1) % len(order)], "at_min": round(at / 60, 2)}
        records.append(record)  # filled in as it goes: still there if the run ends first
        await kill_and_watch(stack, load, sampler, record["service"], client, record)
        k += 1


# -- drain and check ------------------------------------------------------------------------


async def drain(sampler: Sampler, load: Load, stall: float, timeout: float) -> dict[str, Any]:
    """Wait until the billed count equals the acknowledged one, stops moving, or time's up."""
    started = time.monotonic()
    last, moved = -1, started
    while True:
        billed = await sampler.billed()
        now = time.monotonic()
        if billed is not None and billed != last:
            last, moved = billed, now
        if billed == load.unique:
            outcome = "equal"
            break
        if now - moved > stall:
            outcome = f"stalled {stall:.0f} s"
            break
        if now - started > timeout:
            outcome = f"timeout {timeout:.0f} s"
            break
        await asyncio.sleep(2)
    # The quota service consumes the same topic in its own group: give it the same chance.
    connection = await asyncpg.connect(sampler.stack.database_url)
    try:
        while time.monotonic() - started < timeout:
            charged = await connection.fetchval("SELECT count(*) FROM billing_credit_charges")
            if charged >= load.unique:
                break
            await asyncio.sleep(2)
    finally:
        await connection.close()
    return {"outcome": outcome, "seconds": round(time.monotonic() - started, 1), "billed": last}


async def check(database_url: str, load: Load) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        ids = [r[0] for r in await connection.fetch("SELECT request_id FROM billing_transactions")]
        summary = await connection.fetchval(
            "SELECT coalesce(sum(requests), 0) FROM tenant_billing_summary"
        )
        cost = await connection.fetchval(
            "SELECT coalesce(sum(total_cost), 0) FROM billing_transactions"
        )
        charges = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT request_id) AS distinct_ids,"
            " coalesce(sum(amount), 0) AS amount FROM billing_credit_charges"
        )
        unpriced = await connection.fetchval("SELECT count(*) FROM unpriced_usage")
    finally:
        await connection.close()
    prefix = f"soak-{load.run}-"
    size = max(load.next_id, len(load.acked))
    acked = load.acked + bytes(size - len(load.acked))
    billed = bytearray(size)
    foreign = 0
    for request_id in ids:
        if not request_id.startswith(prefix):
            foreign += 1
            continue
        n = int(request_id[len(prefix) :])
        if n < len(billed):
            billed[n] = 1
    distinct = len(set(ids))
    missing = sum(1 for a, b in zip(acked, billed, strict=True) if a and not b)
    unacknowledged = sum(1 for a, b in zip(acked, billed, strict=True) if b and not a)
    return {
        "sent": load.unique,
        "transactions": len(ids),
        "distinct_request_ids": distinct,
        "doubled": len(ids) - distinct,
        "missing": missing,
        "billed_not_acknowledged": unacknowledged,
        "foreign": foreign,
        "summary_requests": int(summary),
        "total_cost": str(cost),
        "quota_charges": int(charges["n"]),
        "quota_charged_ids": int(charges["distinct_ids"]),
        "quota_amount": str(charges["amount"]),
        "quota_amount_equal": charges["amount"] == cost,
        "unpriced": int(unpriced),
    }


def verdicts(checked: dict[str, Any]) -> list[tuple[str, bool]]:
    sent = checked["sent"]
    return [
        ("transactions == sent", checked["transactions"] == sent),
        ("no request billed twice", checked["doubled"] == 0),
        ("no acknowledged request missing", checked["missing"] == 0),
        ("summary requests == sent", checked["summary_requests"] == sent),
        (
            "quota charged each request once",
            checked["quota_charges"] == sent and checked["quota_charged_ids"] == sent,
        ),  # fmt: skip
        ("quota amount == transactions' total cost", checked["quota_amount_equal"]),
        ("nothing unpriced", checked["unpriced"] == 0),
    ]


# -- report --------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y)."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return None if var == 0 else sum((t - mt) * (y - my) for t, y in points) / var


def nearest(samples: list[dict[str, Any]], t: float, name: str) -> dict[str, Any] | None:
    having = [s for s in samples if name in s["memory"]]
    return min(having, key=lambda s: abs(s["t"] - t)) if having else None


def memory_rows(samples: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    # What runs to the end (not a passing ``billing invoices close``).
    names = sorted(samples[-1]["memory"] if samples else (), key=order_key)
    rows = []
    for name in names:
        first, middle = nearest(samples, 60, name), nearest(samples, seconds / 2, name)
        end = nearest(samples, seconds, name)
        if first is None or middle is None or end is None:
            continue
        last_pids = end["memory"][name]["pids"]
        half = [s for s in samples if s["t"] >= seconds / 2 and name in s["memory"]]
        # A process restarted in the second half: fit its last process only, from a minute
        # after its start (a fresh interpreter warms up: imports, caches, first batches).
        same = [s for s in half if s["memory"][name]["pids"][:1] == last_pids[:1]]
        if same and same[0]["t"] > half[0]["t"]:
            same = [s for s in same if s["t"] >= same[0]["t"] + 60]
        fit = slope([(s["t"] / 60, s["memory"][name]["mb"]) for s in same])
        pid_sets = {tuple(s["memory"][name]["pids"][:1]) for s in samples if name in s["memory"]}
        cpu = [s["memory"][name]["cpu"] for s in samples if name in s["memory"]][1:]
        m1, mid, mend = (x["memory"][name]["mb"] for x in (first, middle, end))
        rows.append({
            "process": name,
            "processes": len(last_pids),
            "mb_minute_1": round(m1, 1),
            "mb_middle": round(mid, 1),
            "mb_end": round(mend, 1),
            "end_over_minute_1": round(mend / m1, 3) if m1 else None,
            "slope_mb_per_min": None if fit is None else round(fit, 3),
            "fit_minutes": round((same[-1]["t"] - same[0]["t"]) / 60, 1) if same else 0,
            "cpu_percent_mean": round(sum(cpu) / len(cpu), 1) if cpu else None,
            "restarted": len(pid_sets) > 1 and name != "postgres",
        })  # fmt: skip
    return rows


def order_key(name: str) -> tuple[int, str]:
    order = ["supervisor", "gateway", "pricer", "projector", "quota", "tansu", "seaweedfs",
             "postgres"]  # fmt: skip
    return (order.index(name) if name in order else len(order), name)


def report(result: dict[str, Any]) -> None:
    args = result["args"]
    print(f"\nmemory ({args['minutes']:g} min; MB = RSS, or the PSS sum of a group of processes)")
    print(f"{'process':<12}{'procs':>6}{'min 1':>9}{'middle':>9}{'end':>9}{'end/min1':>10}"
          f"{'MB/min 2nd half':>17}{'fit min':>9}{'CPU %':>8}")  # fmt: skip
    for row in result["memory"]:
        fit = row["slope_mb_per_min"]
        mark = " (restarted)" if row["restarted"] else ""
        print(
            f"{row['process']:<12}{row['processes']:>6}{row['mb_minute_1']:>9.1f}"
            f"{row['mb_middle']:>9.1f}{row['mb_end']:>9.1f}{row['end_over_minute_1']:>10.2f}"
            f"{'-' if fit is None else f'{fit:+.3f}':>17}{row['fit_minutes']:>9.1f}"
            f"{row['cpu_percent_mean'] or 0:>8.1f}{mark}"
        )
    lag = result["lag"]
    services = ", ".join(
        f"{k} {v:.1f} s" if v is not None else f"{k} -" for k, v in lag["max_service_s"].items()
    )
    print(
        f"\nlag (max over the run): {services}; end to end: {lag['max_behind']:,} events "
        f"behind, oldest {lag['max_behind_s']:.1f} s"
    )
    print("\nkills" if result["kills"] else "\nkills: none")
    for kill in result["kills"]:
        times = "  ".join(
            f"{k.removesuffix('_s')} {kill[k]:5.1f} s" if k in kill else f"{k.removesuffix('_s')} -"
            for k in ("restarted_s", "resumed_s", "caught_up_s")
        )
        print(f"  {kill['at_min']:5.1f} min  {kill['service']:<10} {times}"
              + (f"  ({kill['error']})" if "error" in kill else ""))  # fmt: skip
    load = result["load"]
    print(
        f"\nload: offered {args['rate']:,.0f} events/s, acknowledged {load['achieved_per_s']:,.0f}"
        f"/s (ratio {load['achieved_per_s'] / args['rate']:.3f}; unique "
        f"{load['unique_per_s']:,.0f}/s); "
        f"{load['posted_items']:,} items posted, {load['duplicates']:,} duplicates, "
        f"{load['rejected']} rejected, {load['abandoned']} abandoned; failed POSTs "
        f"{dict(load['failures']) or 0}; load generator CPU {load['cpu_cores']:.2f} cores"
    )
    checked = result["check"]
    print(
        f"drain: {result['drain']['outcome']} after {result['drain']['seconds']:.0f} s; "
        f"sent {checked['sent']:,}, transactions {checked['transactions']:,} "
        f"(distinct {checked['distinct_request_ids']:,}), summary {checked['summary_requests']:,}, "
        f"quota charges {checked['quota_charges']:,}; duplicates sent {load['duplicates']:,}"
    )
    for what, ok in result["verdicts"]:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")


def summarise(
    args: argparse.Namespace,
    sampler: Sampler,
    load: Load,
    kills: list[dict[str, Any]],
    drained: dict[str, Any],
    checked: dict[str, Any],
    load_seconds: float,
    cpu_seconds: float,
) -> dict[str, Any]:
    samples = [s for s in sampler.samples if s["t"] <= load_seconds + 1]
    lags: dict[str, float | None] = {}
    for service in PIPELINE:
        values = [s["lag"][service] for s in samples if s["lag"][service] is not None]
        lags[service] = round(max(values), 2) if values else None
    behind = [s["behind"] for s in samples if s["behind"] is not None]
    verdict = verdicts(checked)
    return {
        "issue": 14,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "memory": memory_rows(samples, load_seconds),
        "lag": {
            "max_service_s": lags,
            "max_behind": max(behind, default=0),
            "max_behind_s": round(max((s["behind_s"] for s in samples), default=0.0), 1),
        },  # fmt: skip
        "kills": kills,
        "load": {
            "seconds": round(load_seconds, 1),
            "achieved_per_s": round((load.unique + load.duplicates) / load_seconds, 1),
            "unique_per_s": round(load.unique / load_seconds, 1),
            "posted_items": load.posted_items,
            "duplicates": load.duplicates,
            "rejected": load.rejected,
            "abandoned": load.abandoned,
            "failures": dict(load.failures),
            "cpu_cores": round(cpu_seconds / load_seconds, 3),
        },
        "drain": drained,
        "check": checked,
        "verdicts": verdict,
        "ok": all(ok for _, ok in verdict),
        "samples": sampler.samples,
    }


# -- main ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def database(args: argparse.Namespace, workdir: Path) -> AsyncIterator[str | None]:
    """A fresh database on a server (``--external-db``), or None: the stack's embedded one."""
    if not args.external_db:
        yield None
        return
    from scratch_db import scratch_database  # this folder (the script's own)

    async with scratch_database(workdir, "soak") as url:
        yield url


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM cleans up as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    token = secrets.token_hex(16)
    try:
        async with database(args, workdir) as database_url:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("BILLING_DATABASE_URL", "BILLING_KAFKA_BOOTSTRAP",
                                "BILLING_TOPIC_PREFIX")}  # fmt: skip
            env.update(BILLING_DATA_DIR=str(workdir / "stack"), BILLING_ADMIN_TOKEN=token,
                       BILLING_CATALOGUE_SYNC="false", BILLING_UNKNOWN_TENANTS="create",
                       PYTHONUNBUFFERED="1")  # fmt: skip
            if database_url is not None:
                env["BILLING_DATABASE_URL"] = database_url
            stack = Stack(workdir / "stack", free_ports(4 + max(0, pricers() - 1)), env)
            try:
                return await soak(args, stack, token, workdir)
            finally:  # before the database is dropped
                print("stopping the stack …", flush=True)
                stack.stop()
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def pricers() -> int:
    return int(os.environ.get("BILLING_PRICER_PROCESSES", "1"))


async def soak(args: argparse.Namespace, stack: Stack, token: str, workdir: Path) -> int:
    log = workdir / "up.log"
    clock = time.monotonic()
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; {args.rate:,.0f} events/s "
        f"for {args.minutes:g} min, batches of {args.batch}, {args.tenants} tenants, "
        f"{args.duplicates:.0%} duplicates, "
        + (
            f"a kill every {args.kill_every:g} min ({args.kill_order})"
            if args.kill_every > 0
            else "no kills"
        )
        + f"; billing up on port {stack.port}, data dir {stack.data_dir}"
    )
    stack.start(log)
    await stack.ready(log)
    where = "external" if args.external_db else "embedded"
    print(f"stack ready in {time.monotonic() - clock:.0f} s ({where} PostgreSQL); "
          f"metrics {', '.join(stack.metrics)}", flush=True)  # fmt: skip
    load = Load(args, stack, token)
    sampler = Sampler(stack, load, args.sample_every)
    seconds = args.minutes * 60
    limits = httpx.Limits(
        max_connections=args.connections, max_keepalive_connections=args.connections
    )
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    async with (
        httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits, headers=headers) as post,
        httpx.AsyncClient() as metrics_client,
    ):
        cpu_before = time.process_time()
        sampler.started = time.monotonic()
        load.timeline = [(sampler.started, 0)]
        sampling = asyncio.create_task(sampler.run(metrics_client, seconds + 1, args.minutes))
        kills: list[dict[str, Any]] = []
        killing = asyncio.create_task(killer(stack, load, sampler, metrics_client, kills))
        try:
            await load.run_for(seconds, post)
            load_seconds = time.monotonic() - sampler.started
            await sampling
            print(f"load stopped after {load_seconds:.0f} s; waiting for "
                  f"{len(load.tasks)} POSTs to be acknowledged …", flush=True)  # fmt: skip
            await load.finish(args.drain_timeout / 2)
            cpu_seconds = time.process_time() - cpu_before
            killing.cancel()
            for outcome in await asyncio.gather(killing, return_exceptions=True):
                if isinstance(outcome, Exception):
                    print(f"the killer failed: {outcome!r}")
            print(f"draining the pipeline ({load.unique:,} sent) …", flush=True)
            drained = await drain(sampler, load, args.drain_stall, args.drain_timeout)
            await sampler.sample(metrics_client)  # after the drain
            checked = await check(stack.database_url, load)
        finally:
            for task in (sampling, killing, *load.tasks):
                task.cancel()
            await sampler.close()
    result = summarise(args, sampler, load, kills, drained, checked, load_seconds, cpu_seconds)
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"figures in {out}; {time.monotonic() - clock:.0f} s in all")
    if not result["ok"]:
        print(f"service logs: {stack.data_dir / 'logs'} (--keep keeps them)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of load")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s offered")
    parser.add_argument("--kill-every", type=float, default=5.0, help="minutes; 0: no kills")
    parser.add_argument("--kill-order", default="projector,pricer,quota,gateway")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--duplicates", type=float, default=0.02, help="share re-sent")
    parser.add_argument("--batch", type=int, default=50, help="items per POST")
    parser.add_argument("--connections", type=int, default=8, help="HTTP connections")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--drain-stall", type=float, default=90.0, help="seconds unmoved")
    parser.add_argument("--external-db", action="store_true",
                        help="a fresh database on BILLING_DATABASE_URL's server (else "
                        "127.0.0.1:5432) instead of the embedded PostgreSQL")  # fmt: skip
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and its logs")
    parser.add_argument("--out", default="build/soak.json")
    try:
        sys.exit(asyncio.run(main(parser.parse_args())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the stack was stopped and its data dir removed")
        sys.exit(130)
