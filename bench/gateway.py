"""Throughput and added latency of the chat-completions proxy, beside the fake upstream alone.

One run starts everything itself, each process in its own process group: a fresh PostgreSQL
database (``bench_gateway_<hex>`` on ``BILLING_DATABASE_URL``'s server, else
postgresql://postgres@127.0.0.1:5432, else the embedded pgserver), an embedded Tansu broker
and the topics (``billing topics``), a tenant and its API key (``billing tenants create`` /
``billing keys create``), ``billing fake-upstream`` (20 ms before the first byte, 24
completion tokens: a stream is 24 content chunks, the usage chunk and ``[DONE]``) and three
``billing gateway`` processes: one emitting usage, a second one like it (two processes behind two
ports) and one with ``BILLING_EMIT_USAGE=false``. Everything is stopped and the database
dropped at the end, Ctrl-C included. The pricer and the projector are not started: this
measures the gateway.

``--workers N`` (issue #10) starts instead one ``billing gateway --workers N`` (N = 2 by
default) emitting usage and one with emission off, and runs only phases 2 (direct and the
emitting gateway), 3 (at 500 req/s, ``--low-rate``, then at ``--rate``) and 4; a gateway's
CPU is that of all its processes, the uvicorn parent and its workers. The report ends with
the arithmetic of the goal rate: the gateway's CPU per answered request × the rate, against
the cores the upstream and the load generator leave when they serve that rate directly.

The load generator is in this file: a small HTTP/1.1 keep-alive client on
``asyncio.Protocol`` that parses only the status, the length or chunking and
``x-billing-request-id``. It shares the 2 cores with the gateway and the upstream, so it must
be cheap: ~14 µs of CPU per request here, where an httpx ``AsyncClient`` took ~600 µs (and
~7 ms with 64 requests in flight). Phases:

1. load-generator ceiling: closed loop against a canned-answer server (a raw asyncio protocol
   in a subprocess, same answer shapes, no latency), JSON and SSE;
2. max throughput: closed loop, C connections sending back to back for S s, against the
   upstream directly (the reference), the gateway, the gateway as two processes and the
   gateway without emission; JSON and SSE;
3. fixed rate: open loop — every request goes out at its scheduled time whatever happened
   to the earlier ones, and its latency counts from that time (no coordinated omission; a
   request still unanswered 20 s after the schedule ended counts as failed, and failures as
   infinitely slow in the percentiles) — direct, gateway with emission, gateway without;
   JSON (time to the last byte) and SSE (time to the first SSE chunk, and to the last
   byte); first at a sustainable rate (half what one gateway process managed in phase 2,
   ``--low-rate``) for 20 s, then at the goal rate R (``--rate``, 1,000/s) for D s
   (``--duration``, 60). Added latency = gateway percentile − direct percentile at the same
   rate; emission cost = p99 with emission − p99 without. Between phases the bench waits
   until the servers are idle (an overloaded gateway works through its backlog);
4. every request an emitting gateway answered 200 has exactly one ``UsageRecorded`` on its
   usage topic (read back from the beginning, deduplicated by request_id), and the
   non-emitting gateway's topic is empty.

Each phase prints the CPU (in cores) of the load generator ("lg"), of the servers and of
everything else on the machine ("others"). The machine is shared and noisy: compare the
ratios and differences, not the absolute figures.

    /tmp/venv/bin/python bench/gateway.py            # 1,000 req/s, 60 s per phase (~13 min)
    /tmp/venv/bin/python bench/gateway.py --quick    # smoke run: 5 s phases (~4 min)
    /tmp/venv/bin/python bench/gateway.py --rate 500 --duration 30 --concurrency 32
    /tmp/venv/bin/python bench/gateway.py --quick --py-spy /path/to/py-spy  # + gateway profile
    /tmp/venv/bin/python bench/gateway.py --workers --kinds json  # issue #10 (~6 min)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from scratch_db import scratch_database  # this folder (the script's own)

from services.local.broker import EmbeddedBroker

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"
HOST = "127.0.0.1"
MODEL = "openai/gpt-4o-mini"
LATENCY_MS, TOKENS = 20, 24
MAX_CONNECTIONS = 512  # per target in the open loop; a request waits for a free one beyond
IDLE_SECONDS = 3.0  # never reuse a connection idle this long (uvicorn closes them at 5 s)
DRAIN_SECONDS = 20.0  # after an open-loop schedule, wait this long for the last answers
GOALS = {  # issue #4, one gateway process: added p99 at the goal rate; issue #10, --workers N
    "one": {"added_p99": 15.0, "added_at": "rate", "emission_p99": 1.0},
    "workers": {"added_p99": 10.0, "added_at": "low", "emission_p99": 0.5},
}
ANCHOR = "LiteLLM proxy: 1,036 req/s on two 4-vCPU instances, 43 ms p99 overhead"
PROMPT = (
    "Summarise these invoice lines for the finance team in two sentences: 12 requests to "
    "a chat model, 40k prompt tokens of which 30k cached, 2k completion tokens."
)


# -- the load generator ----------------------------------------------------------------------


class Reply:
    """What the client kept of one answer."""

    __slots__ = ("complete", "done", "first", "request_id", "status")

    def __init__(self, status: int, first: float, done: float, request_id: str, complete: bool):
        self.status, self.first, self.done = status, first, done
        self.request_id, self.complete = request_id, complete


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that parses just enough of each answer: the status,
    ``content-length`` or chunking, ``x-billing-request-id``, and whether the body looks
    whole (JSON with ``usage``; a stream ending in ``[DONE]``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.in_body, self.chunked, self.keep_alive = False, False, True
        self.status, self.length, self.first, self.request_id = 0, -1, 0.0, ""
        self.last = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP only
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None  # noqa: S101 - connected by Pool.acquire
        self.waiter = self.loop.create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        buffer = self.buffer
        buffer += data
        if not self.in_body:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head(bytes(buffer[:end]))
            del buffer[: end + 4]
            self.in_body = True
        if buffer and not self.first:
            self.first = now
        if self.chunked:
            finished, complete = self._chunks()
        elif self.length >= 0:
            finished = len(buffer) >= self.length
            complete = finished and b'"usage"' in buffer[: self.length]
            if finished:
                del buffer[: self.length]
        else:
            self._fail("an answer with neither content-length nor chunking")
            return
        if not finished:
            return
        reply = Reply(self.status, self.first or now, now, self.request_id, complete)
        waiter, self.waiter = self.waiter, None
        keep_alive = self.keep_alive
        self._reset()
        if waiter is None or waiter.done():
            self._fail("an answer nobody asked for")
            return
        waiter.set_result(reply)
        if not keep_alive:
            self.close()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0][9:12])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"x-billing-request-id":
                self.request_id = value.strip().decode()
            elif name == b"connection":
                self.keep_alive = b"close" not in value.lower()

    def _chunks(self) -> tuple[bool, bool]:
        """Consume whole chunks; (finished, ended with ``[DONE]``) once the last one is in."""
        buffer = self.buffer
        while True:
            eol = buffer.find(b"\r\n")
            if eol < 0:
                return False, False
            size = int(bytes(buffer[:eol]).split(b";")[0], 16)
            end = eol + 2 + size + 2
            if len(buffer) < end:
                return False, False
            if size == 0:  # no trailers are ever sent here
                del buffer[:end]
                return True, b"[DONE]" in self.last
            self.last = bytes(buffer[eol + 2 : eol + 2 + size])
            del buffer[:end]

    def _fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(why))
        self.close()


class Pool:
    """Keep-alive connections to one port, most recently used first, at most ``limit``."""

    def __init__(self, port: int, limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port, self.limit = port, limit
        self.idle: list[Connection] = []
        self.everyone: set[Connection] = set()
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.opened = 0

    async def acquire(self) -> Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and self.loop.time() - connection.idle_since < IDLE_SECONDS:
                return connection
            self.discard(connection)
        if len(self.everyone) >= self.limit:
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
            self.waiters.append(waiter)
            handed = await waiter
            if handed is not None:
                return handed
        _, connection = await self.loop.create_connection(
            lambda: Connection(self.loop), HOST, self.port
        )
        self.opened += 1
        self.everyone.add(connection)
        return connection

    def release(self, connection: Connection) -> None:
        if connection.closed:
            self.discard(connection)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = self.loop.time()
        self.idle.append(connection)

    def discard(self, connection: Connection) -> None:
        connection.close()
        self.everyone.discard(connection)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it opens a connection of its own
                return

    def close(self) -> None:
        for connection in self.everyone:
            connection.close()
        self.everyone.clear()
        self.idle.clear()


@dataclass
class Phase:
    """The replies of one measured phase, and the CPU each process used meanwhile."""

    name: str
    latency: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)
    window: float = float("nan")
    last: float = 0.0  # loop time of the last answer
    max_lag: float = 0.0
    connections: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # cores, over ``wall`` seconds
    wall: float = float("nan")

    def add(self, sent: float, reply: Reply) -> None:
        self.last = max(self.last, reply.done)
        if reply.status == 200 and reply.request_id:
            self.request_ids.append(reply.request_id)  # billed, whole or not
        if reply.status != 200:
            self.errors[f"HTTP {reply.status}"] += 1
        elif not reply.complete:
            self.errors["incomplete body"] += 1
        else:
            self.latency.append(reply.done - sent)
            self.ttfb.append(reply.first - sent)

    @property
    def ok(self) -> int:
        return len(self.latency)

    @property
    def rate(self) -> float:
        return self.ok / self.window

    def ms(self, q: float, what: str = "latency") -> float:
        """The q-quantile (1.0: max) of ``latency`` or ``ttfb`` in milliseconds; a failed
        request counts as infinitely slow."""
        values = sorted(getattr(self, what))
        count = len(values) + sum(self.errors.values())
        if not count:
            return float("nan")
        index = min(count - 1, int(q * count))
        return values[index] * 1000 if index < len(values) else float("inf")


async def exchange(pool: Pool, request: bytes, sent: float, phase: Phase) -> None:
    """One request on a pooled connection, recorded against ``sent`` (its scheduled time)."""
    try:
        connection = await pool.acquire()
    except OSError as exc:
        phase.errors[f"connect: {type(exc).__name__}"] += 1
        return
    try:
        reply = await connection.send(request)
    except ConnectionError:
        pool.discard(connection)
        phase.errors["connection lost"] += 1
        return
    pool.release(connection)
    phase.add(sent, reply)


async def open_loop(pool: Pool, request: bytes, rate: float, seconds: float, phase: Phase) -> None:
    """Send ``rate`` requests/s for ``seconds`` on a fixed schedule; wait for the answers."""
    loop = asyncio.get_running_loop()
    count, sent, tasks = int(rate * seconds), 0, set()
    start = loop.time() + 0.005
    while sent < count:
        now = loop.time()
        due = min(count, int((now - start) * rate) + 1)
        if due > sent:
            phase.max_lag = max(phase.max_lag, now - (start + sent / rate))
        while sent < due:
            task = loop.create_task(exchange(pool, request, start + sent / rate, phase))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            phase.errors["no answer in time"] += len(pending)
    # From the first scheduled send to the last answer: a server that falls behind stretches
    # it (achieved < offered); one that keeps up adds only its last request's latency.
    phase.window = max(phase.last - start, seconds)
    phase.connections = pool.opened


async def closed_loop(
    ports: list[int], request: bytes, concurrency: int, seconds: float, phase: Phase, warm: Phase
) -> None:
    """``concurrency`` connections (spread over ``ports``) each sending back to back; requests
    sent in the first second go to ``warm``, the rest to ``phase``."""
    loop = asyncio.get_running_loop()
    pools = [Pool(port, concurrency) for port in ports]
    start = loop.time()
    counted, end = start + 1.0, start + 1.0 + seconds

    async def worker(pool: Pool) -> None:
        while (now := loop.time()) < end:
            await exchange(pool, request, now, phase if now >= counted else warm)

    try:
        await asyncio.gather(*(worker(pools[n % len(pools)]) for n in range(concurrency)))
    finally:
        for pool in pools:
            pool.close()
    phase.window = seconds
    phase.connections = sum(p.opened for p in pools)


def http_request(path: str, stream: bool, key: str | None = None) -> bytes:
    """A whole chat-completions request, as the OpenAI SDK would send it."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": PROMPT},
        ],
        "max_tokens": TOKENS,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\nuser-agent: bench-gateway\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
    )
    if key is not None:
        head += f"authorization: Bearer {key}\r\n"
    return head.encode() + b"\r\n" + data


# -- the canned-answer server (the load generator's own ceiling) -----------------------------


def canned_answer(stream: bool) -> bytes:
    """An answer shaped like the fake upstream's (JSON, or SSE with TOKENS chunks)."""
    usage = {"prompt_tokens": 60, "completion_tokens": TOKENS, "total_tokens": 60 + TOKENS,
             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0}, "is_byok": False,
             "cost": 0.0000234, "cost_details": {"upstream_inference_cost": None}}  # fmt: skip
    base = {"id": "gen-canned", "created": 0, "model": MODEL}
    if not stream:
        message = {"role": "assistant", "content": "usage " * TOKENS}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = json.dumps({**base, "object": "chat.completion", "choices": [choice],
                           "usage": usage}).encode()  # fmt: skip
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        return head.encode() + b"\r\n\r\n" + body
    base["object"] = "chat.completion.chunk"
    delta = {"index": 0, "delta": {"content": "usage "}, "finish_reason": None}
    events = [json.dumps({**base, "choices": [delta]}) for _ in range(TOKENS)]
    final = {"index": 0, "delta": {}, "finish_reason": "stop"}
    events += [json.dumps({**base, "choices": [final], "usage": usage}), "[DONE]"]
    chunks = [f"data: {event}\n\n".encode() for event in events]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
    return head + b"\r\n\r\n" + body


class CannedServer(asyncio.Protocol):
    """Answers every request at once with a canned answer (a stream when it asks for one)."""

    answers = {False: canned_answer(False), True: canned_answer(True)}

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - TCP only
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in bytes(buffer[:end]).lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(buffer) < end + 4 + length:
                return
            body = bytes(buffer[end + 4 : end + 4 + length])
            del buffer[: end + 4 + length]
            assert self.transport is not None  # noqa: S101 - set on connect
            self.transport.write(self.answers[b'"stream": true' in body])


async def serve_canned(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(CannedServer, HOST, port, backlog=1024)
    await server.serve_forever()


# -- the minimal forwarder (the reference for the gateway's CPU per request) -------------------


def forwarder_app(upstream: str) -> Any:
    """A minimal forwarder on the gateway's own stack (uvicorn, a raw ASGI route, aiohttp's
    client to the upstream): it reads the body, sends it upstream and passes the answer back
    chunk by chunk — no auth, no billing. What the gateway costs beyond it is its own work."""
    from aiohttp import ClientSession, TCPConnector

    state: dict[str, ClientSession] = {}
    headers = {"content-type": "application/json"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["session"] = ClientSession(connector=TCPConnector(limit=512))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await state["session"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        url = f"{upstream}/chat/completions"
        async with state["session"].post(url, data=body, headers=headers) as answer:
            relayed = [(b"content-type", answer.headers["content-type"].encode())]
            if answer.content_length is not None:
                relayed.append((b"content-length", str(answer.content_length).encode()))
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": relayed})  # fmt: skip
            async for chunk in answer.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def serve_forwarder(port: int, upstream: str) -> None:
    import uvicorn

    uvicorn.run(forwarder_app(upstream), host=HOST, port=port, log_level="warning")


def serve_aiohttp_forwarder(port: int, upstream: str) -> None:
    """The same minimal forwarder on aiohttp's server and client (the issue's lighter-stack
    reference): what a proxy costs without uvicorn and ASGI."""
    from aiohttp import ClientSession, TCPConnector, web

    async def forward(request: web.Request) -> web.StreamResponse:
        session: ClientSession = request.app["session"]
        body = await request.read()
        headers = {"content-type": "application/json"}
        async with session.post(f"{upstream}/chat/completions", data=body, headers=headers) as up:
            answer = web.StreamResponse(status=up.status)
            answer.content_type = up.content_type
            if up.content_length is not None:
                answer.content_length = up.content_length
            await answer.prepare(request)
            async for chunk in up.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    async def session(app: web.Application) -> Any:
        app["session"] = ClientSession(connector=TCPConnector(limit=512))
        yield
        await app["session"].close()

    app = web.Application()
    app.router.add_post("/{path:.*}", forward)  # like the ASGI forwarder: any path
    app.cleanup_ctx.append(session)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


# -- the processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU time of each named process and, unless it is this one, of every live
    process in the group it leads: a server's children, such as the uvicorn workers of
    ``billing gateway --workers N`` (each server leads its own group; Linux /proc)."""
    owners = {pid: name for name, pid in pids.items()}
    used = dict.fromkeys(pids, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        group = int(fields[2])
        name = owners.get(int(entry.name)) or (owners.get(group) if group != os.getpid() else None)
        if name is not None:
            used[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy, all cores (Linux /proc/stat)."""
    user, nice, system, _, _, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stack:
    """The child processes of one run, each the leader of its own process group."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}

    def start(self, name: str, argv: list[str], **env: str) -> int:
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                argv, env={**self.env, **env}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes[name], self.pids[name] = process, process.pid
        return process.pid

    def run(self, *args: str, **env: str) -> str:
        """Run a ``billing`` command to its end; its standard output."""
        done = subprocess.run(
            [BILLING, *args], env={**self.env, **env}, capture_output=True, timeout=120
        )
        if done.returncode:
            raise RuntimeError(f"billing {' '.join(args)}: {done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM the process group (a gateway drains its emitter), then SIGKILL it."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    async def ready(self, name: str, url: str, method: str = "GET", body: bytes = b"") -> None:
        """Wait until ``url`` answers 200 (60 s at most)."""
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    answer = await client.request(method, url, content=body, timeout=2)
                    if answer.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} did not answer 200 on {url} in 60 s")


def scrape(port: int) -> dict[str, float]:
    """Each metric's samples summed (a gauge of ``--workers N`` has one sample a worker)."""
    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=5).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def drained(ports: list[int], timeout: float = 60.0) -> None:
    """Wait until no gateway holds an unsent usage event (queued, in flight or spooled)."""
    deadline = time.monotonic() + timeout
    names = ("billing_emit_queue_depth", "billing_spool_bytes")
    while any(scrape(p).get(n, 0.0) for p in ports for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"usage still queued in a gateway after {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def read_topic(bootstrap: str, topic: str, expected: int) -> Counter[str]:
    """How often each request_id occurs on ``topic``, read from the beginning until every
    partition is at its high watermark (fetch-reported: Tansu's end offsets are wrong) and
    nothing new came for 2 s, or until 60 s have passed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    try:
        await consumer.topics()  # all topics (naming one would auto-create it)
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline, quiet_since = time.monotonic() + 60, time.monotonic()
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=200, max_records=10_000)
            records = [r for batch in fetched.values() for r in batch]
            for record in records:
                seen[json.loads(record.value)["request_id"]] += 1
            if records:
                quiet_since = time.monotonic()
            at_end = True
            for tp in parts:
                mark = consumer.highwater(tp)
                at_end = at_end and mark is not None and await consumer.position(tp) >= mark
            if at_end and len(seen) >= expected and time.monotonic() - quiet_since > 2:
                break
    finally:
        await consumer.stop()
    return seen


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Targets:
    upstream: int
    gateway: int
    quiet: int  # the gateway with emission off
    key: str
    gateway2: int = 0  # 0: not started (``--workers``)
    canned: int = 0
    forwarder: int = 0  # the minimal forwarder (the CPU-per-request reference)
    aioforwarder: int = 0  # the same on aiohttp's server and client


class Bench:
    def __init__(self, args: argparse.Namespace, stack: Stack, targets: Targets) -> None:
        self.args, self.stack, self.targets = args, stack, targets
        self.goals = GOALS["workers" if args.workers else "one"]
        self.gateway = f"gateway --workers {args.workers}" if args.workers else "gateway"
        t = targets
        self.names = {t.upstream: "upstream", t.gateway: "gateway", t.gateway2: "gateway2",
                      t.quiet: "quiet", t.canned: "canned",
                      t.forwarder: "forwarder", t.aioforwarder: "aioforwarder"}  # fmt: skip
        self.billed: list[str] = []  # request ids answered 200 by an emitting gateway
        self.results: dict[str, Phase] = {}
        self.low: dict[str, float] = {}  # the sustainable rate, per kind
        self.profiles: dict[str, Path] = {}
        self.cpu: dict[str, tuple[Phase, float]] = {}  # key: (phase, CPU ms per request)

    def request(self, port: int, stream: bool) -> bytes:
        t = self.targets
        if port in (t.upstream, t.canned, t.forwarder, t.aioforwarder):
            return http_request("/api/v1/chat/completions", stream)
        return http_request("/v1/chat/completions", stream, self.targets.key)

    def emitting(self, ports: list[int]) -> bool:
        return self.targets.gateway in ports or self.targets.gateway2 in ports

    def watched(self, ports: list[int]) -> dict[str, int]:
        """The processes whose CPU a phase reports: the load generator, the servers."""
        chosen = {
            "lg": os.getpid(),
            **{self.names[p]: self.stack.pids[self.names[p]] for p in ports},
        }
        if self.targets.upstream not in ports and self.targets.canned not in ports:
            chosen["upstream"] = self.stack.pids["upstream"]
        if self.emitting(ports):
            chosen["broker"] = self.stack.pids["broker"]
        return chosen

    async def measure(
        self, key: str, ports: list[int], work: Any, phase: Phase, warm: Phase
    ) -> Phase:
        pids = self.watched(ports)
        before, machine = cpu_seconds(pids), busy_seconds()
        started = time.monotonic()
        await work
        phase.wall = wall = time.monotonic() - started
        phase.cpu = {n: (used - before[n]) / wall for n, used in cpu_seconds(pids).items()}
        others = (busy_seconds() - machine) / wall - sum(phase.cpu.values())
        phase.cpu["others"] = max(0.0, others)  # whatever else ran on the machine
        self.stack.check_alive()
        if self.emitting(ports):
            self.billed += warm.request_ids + phase.request_ids
        self.results[key] = phase
        await self.settle(pids)
        return phase

    async def settle(self, pids: dict[str, int]) -> None:
        """Wait (60 s at most) until the servers are idle: an overloaded gateway works
        through its backlog after the client gave up on it."""
        servers = {name: pid for name, pid in pids.items() if name != "lg"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            before = sum(cpu_seconds(servers).values())
            await asyncio.sleep(0.5)
            if sum(cpu_seconds(servers).values()) - before < 0.05:
                return

    async def closed(self, key: str, name: str, ports: list[int], stream: bool) -> Phase:
        request, phase, warm = self.request(ports[0], stream), Phase(name), Phase("warm-up")
        work = closed_loop(ports, request, self.args.concurrency, self.args.seconds, phase, warm)
        return await self.measure(key, ports, work, phase, warm)

    async def fixed(
        self, key: str, name: str, port: int, stream: bool, rate: float, seconds: float
    ) -> Phase:
        """Warm up at the sustainable rate (connections open, caches full), then measure."""
        request, pool = self.request(port, stream), Pool(port, MAX_CONNECTIONS)
        phase, warm = Phase(name), Phase("warm-up")
        low = self.low["sse" if stream else "json"]
        try:
            await open_loop(pool, request, min(rate, low), self.args.warmup, warm)
            work = open_loop(pool, request, rate, seconds, phase)
            profile = self.profile(key, port, seconds)
            try:
                return await self.measure(key, [port], work, phase, warm)
            finally:
                if profile is not None:
                    profile.wait()
        finally:
            pool.close()

    async def cpu_per_request(
        self, key: str, name: str, port: int, stream: bool, rate: float, seconds: float
    ) -> Phase:
        """CPU milliseconds the server on ``port`` spends per answered request at a rate
        it sustains (its own process only: the upstream's CPU is not counted)."""
        request, pool = self.request(port, stream), Pool(port, MAX_CONNECTIONS)
        server, phase = self.names[port], Phase(name)
        pids = {server: self.stack.pids[server]}
        try:
            warm = Phase("warm-up")
            await open_loop(pool, request, rate, 1.0, warm)
            await asyncio.sleep(0.3)
            profile = self.profile(key, port, seconds)
            before, started = cpu_seconds(pids)[server], time.monotonic()
            await open_loop(pool, request, rate, seconds, phase)
            await asyncio.sleep(0.3)  # the emitter's last batch after the last answer
            used = cpu_seconds(pids)[server] - before
            phase.cpu = {server: used / (time.monotonic() - started)}
            if profile is not None:
                profile.wait()
        finally:
            pool.close()
        self.stack.check_alive()
        if self.emitting([port]):
            self.billed += warm.request_ids + phase.request_ids
        self.cpu[key] = (phase, 1000 * used / max(1, phase.ok))
        return phase

    def profile(self, key: str, port: int, seconds: float) -> subprocess.Popen[bytes] | None:
        """py-spy on the emitting gateway during its fixed-rate phases (``--py-spy``)."""
        if not self.args.py_spy or port != self.targets.gateway:
            return None
        self.profiles[key] = out = self.stack.workdir / f"profile-{key}.txt"
        pid = str(self.stack.pids["gateway"])
        argv = [self.args.py_spy, "record", "--format", "raw", "--rate", "200", "--nonblocking",
                "--subprocesses",  # the uvicorn workers of --workers N
                "-d", str(int(seconds)), "-o", str(out), "-p", pid]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def run_cpu_phases(bench: Bench) -> None:
    """CPU per request at a fixed rate every target sustains: the fake upstream alone, the
    minimal forwarder on the gateway's stack and on aiohttp's, the gateway with emission on
    and with it off."""
    t, a = bench.targets, bench.args
    targets = (("direct", "direct upstream", t.upstream),
               ("forwarder", "minimal forwarder", t.forwarder),
               ("aioforwarder", "minimal forwarder, aiohttp", t.aioforwarder),
               ("gateway", "gateway, emission on", t.gateway),
               ("quiet", "gateway, emission off", t.quiet))  # fmt: skip
    for kind in a.kinds:
        for mode, name, port in targets:
            key = f"cpu-{mode}-{kind}"
            print(f"{key} …", end=" ", flush=True)
            phase = await bench.cpu_per_request(
                key, f"{name}, {kind.upper()}", port, kind == "sse", a.cpu_rate, a.cpu_seconds
            )
            errors = sum(phase.errors.values())
            print(f"{phase.rate:,.0f}/s, {bench.cpu[key][1]:.2f} ms CPU/request, {errors} errors")


def report_cpu(bench: Bench) -> None:
    a = bench.args
    print(f"\nCPU per request: open loop at {a.cpu_rate:,.0f} req/s for {a.cpu_seconds:.0f} s "
          f"(after 1 s warm-up); the server's own process, ms of CPU per answered request\n"
          f"  {'':<42}{'req/s':>8}{'errors':>7}{'p50':>8}{'p99':>8}{'CPU ms':>8}")  # fmt: skip
    for phase, ms in bench.cpu.values():
        errors = sum(phase.errors.values())
        print(f"  {phase.name:<42}{phase.rate:>8,.0f}{errors:>7}{cell(phase.ms(0.5))}"
              f"{cell(phase.ms(0.99))}{ms:>8.2f}")  # fmt: skip
    print(f"\n{'measurement':<46}{'project':>10}{'reference':>11}{'ratio':>7}  goal")
    for kind in a.kinds:
        mine, ref = bench.cpu[f"cpu-gateway-{kind}"][1], bench.cpu[f"cpu-forwarder-{kind}"][1]
        label = f"CPU ms/request, gateway, {kind.upper()}"
        print(f"{label:<46}{mine:>10.2f}{ref:>11.2f}{mine / ref:>7.2f}  [minimal forwarder] "
              f"<= 1.0 ms {verdict(mine <= 1.0)}, <= 3x {verdict(mine <= 3 * ref)}")  # fmt: skip
        light = bench.cpu[f"cpu-aioforwarder-{kind}"][1]
        label = f"  the same forwarder on aiohttp, {kind.upper()}"
        print(f"{label:<46}{light:>10.2f}{ref:>11.2f}{light / ref:>7.2f}  [minimal forwarder]")
        quiet = bench.cpu[f"cpu-quiet-{kind}"][1]
        label = f"  the gateway, emission off, {kind.upper()}"
        print(f"{label:<46}{quiet:>10.2f}{ref:>11.2f}{quiet / ref:>7.2f}  [minimal forwarder]"
              f"  (emission: +{mine - quiet:.2f} ms)")  # fmt: skip


async def run_phases(bench: Bench) -> None:
    t, a, gateway = bench.targets, bench.args, bench.gateway
    kinds = [(kind == "sse", kind) for kind in a.kinds]
    closed = [("ceiling", "load generator vs canned server", [t.canned]),
              ("max-direct", "direct upstream", [t.upstream]),
              ("max-on", f"{gateway}, emission on", [t.gateway]),
              ("max-two", "gateway x2 processes, emission on", [t.gateway, t.gateway2]),
              ("max-off", f"{gateway}, emission off", [t.quiet])]  # fmt: skip
    if a.workers:  # neither the canned server nor a second gateway is started
        closed = closed[1:3]
    fixed = [("direct", "direct upstream", t.upstream),
             ("on", f"{gateway}, emission on", t.gateway),
             ("off", f"{gateway}, emission off", t.quiet)]  # fmt: skip
    total, clock, number = len(kinds) * (len(closed) + 2 * len(fixed)), time.monotonic(), 0

    def announce(key: str) -> None:
        nonlocal number
        number += 1
        print(f"{number}/{total} {key} …", end=" ", flush=True)

    def done(phase: Phase) -> None:
        errors = sum(phase.errors.values())
        print(f"{phase.rate:,.0f}/s, {errors} errors ({time.monotonic() - clock:.0f} s)")
        if errors:
            print(f"   errors: {dict(phase.errors)}")

    for stream, kind in kinds:
        for prefix, name, ports in closed:
            announce(f"{prefix}-{kind}")
            done(await bench.closed(f"{prefix}-{kind}", f"{name}, {kind.upper()}", ports, stream))
        # Half what one gateway process managed, rounded down to tens.
        measured = bench.results[f"max-on-{kind}"].rate
        bench.low[kind] = a.low_rate or max(10.0, 10 * (measured // 20))
    for prefix, seconds in (("low", a.low_duration), ("rate", a.duration)):
        for stream, kind in kinds:
            rate = bench.low[kind] if prefix == "low" else a.rate
            for mode, name, port in fixed:
                key = f"{prefix}-{mode}-{kind}"
                announce(key)
                label = f"{name}, {kind.upper()}"
                done(await bench.fixed(key, label, port, stream, rate, seconds))


def cell(value: float, width: int = 8) -> str:
    if value != value:  # NaN: nothing measured
        return "-".rjust(width)
    return ("fail" if value == float("inf") else f"{value:.1f}").rjust(width)


def row(phase: Phase, extra: str = "") -> str:
    errors = sum(phase.errors.values())
    cpu = " ".join(f"{n} {c:.2f}" for n, c in phase.cpu.items())
    return (f"  {phase.name:<42}{phase.rate:>8,.0f}{errors:>7}{cell(phase.ms(0.5))}"
            f"{cell(phase.ms(0.99))}{cell(phase.ms(1.0))}{extra}   {cpu}")  # fmt: skip


def sustained(phase: Phase, rate: float) -> bool:
    return phase.rate >= 0.98 * rate and not sum(phase.errors.values())


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(bench: Bench, usage: dict[str, Any]) -> None:
    r, a = bench.results, bench.args
    columns = f"{'req/s':>8}{'errors':>7}{'p50':>8}{'p99':>8}{'max':>8}"
    print(f"\nmax throughput: closed loop, {a.concurrency} connections, {a.seconds:.0f} s each "
          f"(after 1 s warm-up); latency from send to last byte, ms\n  {'':<42}{columns}"
          "   CPU (cores)")  # fmt: skip
    for key, phase in r.items():
        if key.startswith(("ceiling", "max")):
            print(row(phase))
    low = "--low-rate" if a.low_rate else "sustainable rate (half the gateway's max)"
    titles = (("low", low, a.low_duration), ("rate", "goal rate", a.duration))
    for prefix, title, seconds in titles:
        print(f"\nfixed rate, {title}: open loop, {seconds:.0f} s each after {a.warmup:.0f} s "
              f"warm-up; latency from the scheduled send time, ms (fail: a failed request)\n"
              f"  {'':<42}{columns}{'added p50':>10}{'p99':>8}{'TTFB p50':>9}{'p99':>8}"
              "   CPU (cores)")  # fmt: skip
        for kind in a.kinds:
            rate = bench.low[kind] if prefix == "low" else a.rate
            print(f"  {kind.upper()} at {rate:,.0f} req/s")
            direct = r[f"{prefix}-direct-{kind}"]
            for mode in ("direct", "on", "off"):
                phase = r[f"{prefix}-{mode}-{kind}"]
                added = cell(phase.ms(0.5) - direct.ms(0.5), 10) + cell(
                    phase.ms(0.99) - direct.ms(0.99)
                )
                extra = " " * 18 if mode == "direct" else added
                if kind == "sse":
                    extra += cell(phase.ms(0.5, "ttfb"), 9) + cell(phase.ms(0.99, "ttfb"))
                print(row(phase, extra))
    fixed = {k: p for k, p in r.items() if k.startswith(("low", "rate"))}
    lags = ", ".join(f"{k} {p.max_lag * 1000:.0f}" for k, p in fixed.items())
    conns = ", ".join(f"{k} {p.connections}" for k, p in fixed.items())
    print(f"  load generator, worst send late by (ms): {lags}\n  connections opened: {conns}")

    print(f"\n{'measurement':<46}{'project':>10}{'reference':>11}{'ratio':>7}  goal")
    goals, gateway = bench.goals, bench.gateway
    for kind in a.kinds:
        mine, ref = r[f"max-on-{kind}"].rate, r[f"max-direct-{kind}"].rate
        print(f"{f'max req/s, {gateway}, {kind.upper()}':<46}{mine:>10,.0f}{ref:>11,.0f}"
              f"{mine / ref:>7.2f}  [direct upstream] (goal rate {a.rate:,.0f}/s)")  # fmt: skip
    for prefix in ("rate", "low"):
        for kind in a.kinds:
            rate = bench.low[kind] if prefix == "low" else a.rate
            on, off, direct = (r[f"{prefix}-{m}-{kind}"] for m in ("on", "off", "direct"))
            added, cost = on.ms(0.99) - direct.ms(0.99), on.ms(0.99) - off.ms(0.99)
            label = f"p99 ms at {rate:,.0f}/s, {gateway}, {kind.upper()}"
            goal = f"added {cell(added, 0)} ms"
            if prefix == "rate":
                ok = sustained(on, rate) and sustained(direct, rate)
                goal += (f"; {rate:,.0f}/s for {a.duration:.0f} s {verdict(ok)} (achieved "
                         f"{on.rate:,.0f}/s, {sum(on.errors.values())} failed)")  # fmt: skip
            if prefix == goals["added_at"]:
                ok = sustained(on, rate) and added <= goals["added_p99"]
                goal += f"; added p99 <= {goals['added_p99']:g} ms {verdict(ok)}"
            print(f"{label:<46}{cell(on.ms(0.99), 10)}{cell(direct.ms(0.99), 11)}"
                  f"{on.ms(0.99) / direct.ms(0.99):>7.2f}  {goal}")  # fmt: skip
            label = f"p99 ms at {rate:,.0f}/s, emission on/off, {kind.upper()}"
            both = sustained(on, rate) and sustained(off, rate)
            goal = f"emission cost {cell(cost, 0)} ms, <= {goals['emission_p99']:g} ms " + (
                verdict(cost <= goals["emission_p99"])
                if both
                else "not measurable: rate not sustained"
            )
            print(f"{label:<46}{cell(on.ms(0.99), 10)}{cell(off.ms(0.99), 11)}"
                  f"{on.ms(0.99) / off.ms(0.99):>7.2f}  {goal}")  # fmt: skip
    report_capacity(bench)
    print(f"\nanchor: {ANCHOR}; here 2 cores in all, shared by the load generator, the gateway "
          f"and the fake upstream ({LATENCY_MS} ms to first byte, {TOKENS} tokens)")  # fmt: skip
    print(
        f"usage events: {usage['answered']:,} requests answered 200 by the emitting gateways, "
        f"{usage['events']:,} events on their topic ({usage['distinct']:,} distinct): lost "
        f"{usage['lost']}, duplicates {usage['duplicates']}, for requests the client saw no 200 "
        f"for (gave up waiting) {usage['extra']}; the emission-off gateway's topic: "
        f"{usage['quiet']} events"
        + (" (BILLING_EMIT_USAGE=false is not honoured)" if usage["quiet"] else "")
    )
    report_profiles(bench)


def report_capacity(bench: Bench) -> None:
    """Whether the machine has the cores for the goal rate: the gateway's CPU (all its
    processes) per answered request × the rate, against the cores the upstream and the load
    generator leave when they serve that rate directly."""
    r, a, cores = bench.results, bench.args, os.cpu_count() or 1
    print(f"\ncapacity: gateway CPU per answered request x {a.rate:,.0f}/s, against the "
          f"{cores} cores less the upstream's and the load generator's at {a.rate:,.0f}/s "
          "direct")  # fmt: skip
    for kind in a.kinds:
        low, on, direct = (r[f"{p}-{kind}"] for p in ("low-on", "rate-on", "rate-direct"))
        costs = [1000 * p.cpu["gateway"] * p.wall / max(1, p.ok) for p in (low, on)]  # ms
        need = min(costs) * a.rate / 1000
        upstream, lg = direct.cpu["upstream"], direct.cpu["lg"]
        left = cores - upstream - lg
        broker = on.cpu["broker"] * a.rate / max(1.0, on.rate)
        busy = (need + upstream + lg + broker) / cores
        fits = f"fits on this machine, {busy:.0%} busy" if need <= left else (
            f"cannot fit on this machine: short by {need - left:.2f} cores "
            f"({need / left:.2f}x the cores left)")  # fmt: skip
        print(f"  {kind.upper()}: {costs[0]:.2f} ms CPU/request at {low.rate:,.0f}/s answered, "
              f"{costs[1]:.2f} ms at {on.rate:,.0f}/s answered of {a.rate:,.0f}/s offered\n"
              f"    {min(costs):.2f} ms x {a.rate:,.0f}/s = {need:.2f} cores; cores left after "
              f"upstream {upstream:.2f} + load generator {lg:.2f} at {a.rate:,.0f}/s = "
              f"{left:.2f} (a budget of {1000 * left / a.rate:.2f} ms/request)\n"
              f"    {a.rate:,.0f}/s {fits} (with the broker's ~{broker:.2f} cores; a machine "
              "that busy queues, so the latency goals want headroom)")  # fmt: skip


def report_profiles(bench: Bench) -> None:
    for key, path in bench.profiles.items():
        if path.exists():
            parts, leaves = hot_spots(path)
            print(f"\npy-spy, gateway during {key}: share of samples by component, then the "
                  "functions most often on top of the stack")  # fmt: skip
            for share, name in parts + leaves:
                print(f"  {share:5.1f}%  {name}")


async def verify(bench: Bench, bootstrap: str, prefixes: dict[str, str]) -> dict[str, Any]:
    t = bench.targets
    await drained([port for port in (t.gateway, t.gateway2, t.quiet) if port])
    answered = set(bench.billed)
    seen = await read_topic(bootstrap, prefixes["on"] + "billing.usage.v1", len(answered))
    quiet = await read_topic(bootstrap, prefixes["off"] + "billing.usage.v1", 0)
    return {
        "answered": len(answered),
        "events": sum(seen.values()),
        "distinct": len(seen),
        "lost": len(answered - seen.keys()),
        "duplicates": sum(n - 1 for n in seen.values()),
        "extra": len(seen.keys() - answered),
        "quiet": sum(quiet.values()),
    }


COMPONENTS = (
    ("(httpcore/", "httpx + httpcore"),
    ("(httpx/", "httpx + httpcore"),
    ("(aiohttp/", "aiohttp (the upstream client)"),
    ("(multidict/", "aiohttp (the upstream client)"),
    ("(yarl/", "aiohttp (the upstream client)"),
    ("(h11/", "uvicorn + h11/httptools (the HTTP server)"),
    ("(httptools/", "uvicorn + h11/httptools (the HTTP server)"),
    ("(uvicorn/", "uvicorn + h11/httptools (the HTTP server)"),
    ("(fastapi/", "FastAPI + Starlette + anyio"),
    ("(starlette/", "FastAPI + Starlette + anyio"),
    ("(anyio/", "FastAPI + Starlette + anyio"),
    ("(aiokafka/", "aiokafka (usage emission)"),
    ("(pydantic", "pydantic (the usage event)"),
    ("(services/", "project code (auth, proxy, emitter, usage)"),
)


def component(stack: list[str]) -> str:
    """Who a py-spy sample belongs to: a socket send or the poll by its leaf, anything else
    by the innermost frame of a known component (stdlib calls count for their caller)."""
    leaf = stack[-1]
    if leaf.startswith(("_SelectorSocketTransport.write", "socket.send")):
        return "socket send (syscall; on a busy machine, also waiting for a CPU)"
    if "selectors.py" in leaf:
        return "event loop poll (epoll)"
    for frame in reversed(stack):
        for marker, name in COMPONENTS:
            if marker in frame:
                return name
    return "asyncio and other stdlib"


def hot_spots(path: Path, top: int = 12) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """From py-spy's raw output: the share of samples of each component, and of the
    functions most often at the top of the stack."""
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        parts[component(frames)] += int(count)
        leaves[frames[-1]] += int(count)
    total = sum(leaves.values()) or 1
    return (
        [(100 * n / total, name) for name, n in parts.most_common()],
        [(100 * n / total, frame) for frame, n in leaves.most_common(top)],
    )


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    stack = Stack(workdir, {})
    exits = contextlib.AsyncExitStack()
    try:
        database_url = await exits.enter_async_context(scratch_database(workdir, "gateway"))
        broker.start()
        run_id = secrets.token_hex(3)
        prefixes = {"on": f"bench-gw-{run_id}-on.", "off": f"bench-gw-{run_id}-off."}
        gateways = ("gateway", "quiet") if args.workers else ("gateway", "gateway2", "quiet")
        references = ("canned", "forwarder", "aioforwarder")
        ports = {p: free_port() for p in ("upstream", *gateways, *references)}
        if args.workers:  # the gateway's throughput and latency: no CPU-per-request phases
            for reference in references:
                del ports[reference]
        stack.env = {**os.environ, "BILLING_KAFKA_BOOTSTRAP": broker.bootstrap,
                     "BILLING_DATABASE_URL": database_url,
                     "BILLING_DATA_DIR": str(workdir), "BILLING_CATALOGUE_SYNC": "false",
                     "OPENROUTER_BASE_URL": f"http://{HOST}:{ports['upstream']}/api/v1",
                     "OPENROUTER_API_KEY": "sk-or-bench-not-a-real-key"}  # fmt: skip
        stack.pids["broker"] = broker.pid or 0
        for prefix in prefixes.values():
            stack.run("topics", BILLING_TOPIC_PREFIX=prefix)
        stack.run("tenants", "create", "bench")
        key = stack.run("keys", "create", "--tenant", "bench").split()[0]
        stack.start("upstream", [BILLING, "fake-upstream", "--port", str(ports["upstream"]),
                                 "--latency-ms", str(LATENCY_MS),
                                 "--completion-tokens", str(TOKENS)])  # fmt: skip
        if not args.workers:
            stack.start("canned", [sys.executable, __file__, "--canned-server",
                                   str(ports["canned"])])  # fmt: skip
            for forwarder in ("forwarder", "aioforwarder"):
                stack.start(forwarder, [sys.executable, __file__, f"--{forwarder}",
                                        str(ports[forwarder]), "--upstream",
                                        stack.env["OPENROUTER_BASE_URL"]])  # fmt: skip
        for gateway in gateways:
            mode = "off" if gateway == "quiet" else "on"
            workers = ["--workers", str(args.workers)] if args.workers else []
            stack.start(gateway, [BILLING, "gateway", "--port", str(ports[gateway]), *workers],
                        BILLING_TOPIC_PREFIX=prefixes[mode],
                        BILLING_SPOOL_DIR=str(workdir / f"spool-{gateway}"),
                        BILLING_EMIT_USAGE="false" if mode == "off" else "true")  # fmt: skip
        await stack.ready("upstream", f"http://{HOST}:{ports['upstream']}/docs")
        if not args.workers:
            body = b'{"model": "openai/gpt-4o-mini", "messages": []}'
            for forwarder in ("forwarder", "aioforwarder"):
                url = f"http://{HOST}:{ports[forwarder]}/chat/completions"
                await stack.ready(forwarder, url, "POST", body)
        for gateway in gateways:
            await stack.ready(gateway, f"http://{HOST}:{ports[gateway]}/readyz")
        bench = Bench(args, stack, Targets(**ports, key=key))
        load = os.getloadavg()[0]
        print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs (load average "
              f"{load:.1f} at start); fake upstream {LATENCY_MS} ms to first byte, {TOKENS} "
              f"completion tokens; broker Tansu {broker.bootstrap}; database "
              f"{urlsplit(database_url).path[1:]}")  # fmt: skip
        if not args.workers:
            await run_cpu_phases(bench)
        if not args.cpu_only:
            await run_phases(bench)
        usage = await verify(bench, broker.bootstrap, prefixes)
        if not args.cpu_only:
            report(bench, usage)
        if not args.workers:
            report_cpu(bench)
            print(f"usage events: {usage['answered']:,} answered 200 by the emitting gateways, "
                  f"{usage['events']:,} on their topic: lost {usage['lost']}, duplicates "
                  f"{usage['duplicates']}")  # fmt: skip
        if args.cpu_only:
            report_profiles(bench)
        if args.keep:
            print(f"(logs and profiles kept in {workdir})")
    finally:
        stack.stop_all()
        broker.stop()
        await exits.aclose()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short phases")
    parser.add_argument("--rate", type=float, default=1000.0, help="goal rate, req/s")
    parser.add_argument("--duration", type=float, help="seconds per goal-rate phase (60)")
    parser.add_argument("--low-rate", type=float, help="sustainable rate (half the max)")
    parser.add_argument("--low-duration", type=float, help="seconds per such phase (20)")
    parser.add_argument("--seconds", type=float, help="seconds per closed-loop phase (8)")
    parser.add_argument("--warmup", type=float, help="seconds before a fixed-rate phase (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    parser.add_argument("--workers", type=int, nargs="?", const=2,
                        help="issue #10: one `billing gateway --workers N` (2)")  # fmt: skip
    parser.add_argument("--kinds", default="json,sse", help="answer kinds: json, sse or both")
    parser.add_argument("--py-spy", help="path of py-spy: profile the gateway at fixed rates")
    parser.add_argument("--keep", action="store_true", help="keep the logs and profiles")
    parser.add_argument("--cpu-only", action="store_true",
                        help="only the CPU-per-request phases (~1 min)")  # fmt: skip
    parser.add_argument("--cpu-rate", type=float, default=200.0,
                        help="req/s of the CPU-per-request phases")  # fmt: skip
    parser.add_argument("--cpu-seconds", type=float, help="seconds per such phase (10)")
    parser.add_argument("--canned-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forwarder", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--aioforwarder", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.forwarder:
        serve_forwarder(arguments.forwarder, arguments.upstream)
        sys.exit(0)
    if arguments.aioforwarder:
        serve_aiohttp_forwarder(arguments.aioforwarder, arguments.upstream)
        sys.exit(0)
    if arguments.canned_server:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_canned(arguments.canned_server))
        sys.exit(0)
    quick = arguments.quick
    arguments.kinds = arguments.kinds.split(",")
    if arguments.workers:
        arguments.low_rate = arguments.low_rate or 500.0
    arguments.duration = arguments.duration or (5.0 if quick else 60.0)
    arguments.low_duration = arguments.low_duration or (5.0 if quick else 20.0)
    arguments.seconds = arguments.seconds or (3.0 if quick else 8.0)
    arguments.warmup = arguments.warmup or (1.0 if quick else 2.0)
    arguments.cpu_seconds = arguments.cpu_seconds or (5.0 if quick else 10.0)
    try:
        asyncio.run(main(arguments))
    except KeyboardInterrupt:
        print("\ninterrupted: every process stopped, the database dropped")
