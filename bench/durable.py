"""The durable local stack beside the in-memory one, in the same run: what keeping the log in
SeaweedFS (``billing up --broker-storage s3``, the default) costs against ``memory``.

For each storage engine, one ``billing up --broker-storage E`` on a fresh data dir and a fresh
database (``bench_<hex>`` on ``BILLING_DATABASE_URL``'s server, else
postgresql://postgres@127.0.0.1:5432), then:

1. ingest: N OpenRouter-style usage items POSTed to /v1/usage in batches of 1,000 over 4
   connections; events/s acknowledged (acks=all by the gateway's producer);
2. priced / projected: from the first POST until the pricer's ``billing_priced_events_total``
   and the projector's ``billing_projected_events_total`` reach N; events/s end to end;
3. memory: RSS of Tansu and weed (the broker's log store) before, at peak and after, sampled
   every 0.5 s; the objects dir's size on disk after (bytes per event).

The memory engine is the reference: the figures are printed side by side with their ratio.
The machine is shared and noisy: compare the ratios, not the absolute figures.

    .venv/bin/python bench/durable.py                  # N = 50,000 per engine
    .venv/bin/python bench/durable.py --events 200000  # the memory figures of the README
    .venv/bin/python bench/durable.py --quick          # smoke run: N = 5,000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from pipeline import make_item, scrape  # this folder (the script's own)

from services.local.processes import recorded_pid

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"
DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECTIONS, BATCH, TIMEOUT = 4, 1000, 600.0


def free_ports(count: int) -> int:
    """A port N with N … N + count - 1 all free now (``billing up`` listens on N … N+3)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                sockets.append(socket.socket())
                sockets[-1].bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free ports")


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def disk_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total / 2**20


async def fresh_database(server: str) -> tuple[str, str]:
    name = f"bench_{secrets.token_hex(4)}"
    connection = await asyncpg.connect(server)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    parts = urlsplit(server)
    return name, urlunsplit(parts._replace(path=f"/{name}"))


async def drop_database(server: str, name: str) -> None:
    connection = await asyncpg.connect(server)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


class Sampler:
    """RSS of the named pids every 0.5 s: the first sample and the peak."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.first = {name: rss_mb(pid) for name, pid in pids.items()}
        self.peak = dict(self.first)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
        return {name: rss_mb(pid) for name, pid in self.pids.items()}


async def run_engine(engine: str, events: int, server: str, workdir: Path) -> dict[str, Any]:
    data_dir = workdir / engine
    port = free_ports(4)
    token = secrets.token_hex(16)
    db_name, database_url = await fresh_database(server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")} | {
        "BILLING_DATA_DIR": str(data_dir),
        "BILLING_DATABASE_URL": database_url,
        "BILLING_ADMIN_TOKEN": token,
        "BILLING_CATALOGUE_SYNC": "false",
        "BILLING_BROKER_STORAGE": engine,
    }
    log = (workdir / f"up-{engine}.out").open("wb")
    process = subprocess.Popen(
        [BILLING, "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not (data_dir / "stack.json").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / f"up-{engine}.out").read_text()[-3000:])
            await asyncio.sleep(0.2)
        pids = {name: recorded_pid(data_dir / "pids" / f"{name}.pid") for name in ("tansu", "weed")}
        if engine == "memory":
            pids.pop("weed")
        rng = random.Random(7)
        items = [make_item(rng, f"{engine}-{n:08d}") for n in range(events)]
        bodies = [json.dumps(items[i : i + BATCH]).encode() for i in range(0, events, BATCH)]
        sampler = Sampler(pids)
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        async with httpx.AsyncClient(
            base_url=url, timeout=60, headers=headers,
            limits=httpx.Limits(max_connections=CONNECTIONS),
        ) as client:  # fmt: skip
            sampler.start()
            started = time.perf_counter()
            accepted = 0

            async def worker() -> None:
                nonlocal accepted
                while bodies:
                    response = await client.post("/v1/usage", content=bodies.pop())
                    if response.status_code != 202 or response.json()["rejected"]:
                        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
                    answered = int(response.json()["accepted"])
                    accepted += answered

            await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
            ingested = time.perf_counter() - started
            priced_at = projected_at = None
            while projected_at is None or priced_at is None:
                now = time.perf_counter()
                if now - started > TIMEOUT:
                    raise RuntimeError(f"{engine}: not all {events} events projected in time")
                if priced_at is None:
                    if scrape(port + 1).get("billing_priced_events_total", 0) >= events:
                        priced_at = now - started
                if projected_at is None:
                    if scrape(port + 2).get("billing_projected_events_total", 0) >= events:
                        projected_at = now - started
                await asyncio.sleep(0.2)
        after = await sampler.stop()
        objects = disk_mb(data_dir / "objects") if engine == "s3" else 0.0
        return {
            "ingest": accepted / ingested,
            "priced": events / priced_at,
            "projected": events / projected_at,
            "rss_first": sampler.first,
            "rss_peak": sampler.peak,
            "rss_after": after,
            "disk_mb": objects,
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        await drop_database(server, db_name)


def report(events: int, memory: dict[str, Any], s3: dict[str, Any]) -> None:
    print(f"\nbilling up, {events:,} usage events per engine (batches of {BATCH}, "
          f"{CONNECTIONS} connections)\n")  # fmt: skip
    print(f"{'events/s':<34}{'memory':>12}{'s3 (weed)':>12}{'s3/memory':>11}")
    rows = [
        ("ingest (POST /v1/usage, acked)", "ingest"),
        ("priced (first POST → all priced)", "priced"),
        ("projected (first POST → all rows)", "projected"),
    ]
    for title, key in rows:
        print(f"{title:<34}{memory[key]:>12,.0f}{s3[key]:>12,.0f}{s3[key] / memory[key]:>11.2f}")
    print(f"\n{'RSS MB (first / peak / after)':<34}{'memory':>22}{'s3 (weed)':>22}")
    for name in ("tansu", "weed"):
        cells = []
        for result in (memory, s3):
            if name in result["rss_first"]:
                cells.append(
                    f"{result['rss_first'][name]:.0f} / {result['rss_peak'][name]:.0f} / "
                    f"{result['rss_after'][name]:.0f}"
                )
            else:
                cells.append("—")
        print(f"{name:<34}{cells[0]:>22}{cells[1]:>22}")
    for name, result in (("memory", memory), ("s3", s3)):
        growth = result["rss_after"]["tansu"] - result["rss_first"]["tansu"]
        print(f"tansu growth per event ({name}): {growth * 2**20 / events:,.0f} B")
    print(f"objects dir on disk (s3): {s3['disk_mb']:.1f} MB, "
          f"{s3['disk_mb'] * 2**20 / events:,.0f} B per event (usage + cost record)")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    server = os.environ.get("BILLING_DATABASE_URL") or DEFAULT_DB
    workdir = Path(tempfile.mkdtemp(prefix="bench-durable-"))
    try:
        results = {}
        for engine in ("memory", "s3"):
            print(f"{engine}: {args.events:,} events …", flush=True)
            results[engine] = await run_engine(engine, args.events, server, workdir)
        report(args.events, results["memory"], results["s3"])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="N = 5,000")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.events = 5_000
    asyncio.run(main(arguments))
