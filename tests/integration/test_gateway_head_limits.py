"""``billing gateway`` bounds every request's head: 431 past ``BILLING_MAX_HEAD_BYTES``, 408
when it takes longer than ``BILLING_HEAD_TIMEOUT_SECONDS`` (so does a connection that sends
nothing), the connection closed after either — with one worker and with two.

Raw sockets: an HTTP client would not send such heads, nor trickle one. Two gateways run for
the module, started together: one worker with the default limit, and ``--workers 2`` with a
small one (only a worker that read it from the environment can refuse at 4 KiB).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from services.local.broker import _free_port
from tests.conftest import migrated_database
from tests.integration.pipeline import BILLING, Pipeline

pytestmark = pytest.mark.integration

TIMEOUT = 1.0
"""BILLING_HEAD_TIMEOUT_SECONDS of both gateways."""
SMALL_LIMIT = 4096
"""BILLING_MAX_HEAD_BYTES of the two-worker gateway (the other keeps the default, 64 KiB)."""
UNSAFE_ENV = ("OPENROUTER_API_KEY", "BILLING_ADMIN_TOKEN", "BILLING_ENV", "VERTEX_API_KEY")


@dataclass
class Gateways:
    one: int
    """Port of ``billing gateway`` (one worker, the default head limit)."""
    two: int
    """Port of ``billing gateway --workers 2`` (``SMALL_LIMIT``)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(path: str = "/healthz", filler: int = 0) -> bytes:
    """A GET whose head carries a header of ``filler`` bytes."""
    header = b"x-filler: %s\r\n" % (b"a" * filler) if filler else b""
    return b"GET %s HTTP/1.1\r\nhost: gateway\r\n%s\r\n" % (path.encode(), header)


class Connection:
    """A raw connection to a gateway: bytes out, answers in (several may come in one read)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.received = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send what the gateway takes (it may close before reading the rest)."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def answer(self) -> Answer:
        """The next response (one with a ``content-length``)."""
        while b"\r\n\r\n" not in self.received:
            self._receive()
        head, _, self.received = self.received.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines)}
        length = int(headers["content-length"])
        while len(self.received) < length:
            self._receive()
        body, self.received = self.received[:length], self.received[length:]
        return Answer(int(status_line.split()[1]), headers, body)

    def healthz_pid(self) -> int:
        self.sock.sendall(request())
        answer = self.answer()
        assert answer.status == 200, answer
        return int(answer.json()["pid"])

    def is_closed(self) -> bool:
        """Whether the gateway closed the connection (within a few seconds), having sent
        nothing more."""
        self.sock.settimeout(3)
        try:
            return self.sock.recv(1) == b"" and not self.received
        except ConnectionResetError:  # closed with some of what was sent unread
            return not self.received
        except TimeoutError:
            return False

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"closed in the middle of an answer: {self.received!r}"
        self.received += chunk


def _spawn(pipeline: Pipeline, name: str, args: list[str], env: dict[str, str]) -> None:
    with (pipeline.workdir / f"{name}.log").open("ab") as log:
        pipeline.processes[name] = subprocess.Popen(
            [BILLING, *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_until_up(pipeline: Pipeline, name: str, port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError):
            with Connection(port) as connection:
                connection.healthz_pid()
                return
        process = pipeline.processes[name]
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name} did not come up (exit {process.poll()})\n{pipeline.log(name)}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gateways(
    postgres_server: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    workdir = tmp_path_factory.mktemp("head-limits")
    with migrated_database(postgres_server, "head_limits") as database_url:
        pipeline = Pipeline(kafka_bootstrap, database_url, f"h{uuid.uuid4().hex[:10]}.", workdir)
        env = {k: v for k, v in pipeline.env().items() if k not in UNSAFE_ENV} | {
            "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1",  # nothing is proxied
            "BILLING_HEAD_TIMEOUT_SECONDS": str(TIMEOUT),
        }
        ports = Gateways(_free_port(), _free_port())
        try:
            one = env | {"BILLING_DATA_DIR": str(workdir / "one")}
            _spawn(pipeline, "gateway-one", ["gateway", "--port", str(ports.one)], one)
            two = env | {
                "BILLING_DATA_DIR": str(workdir / "two"),
                "BILLING_MAX_HEAD_BYTES": str(SMALL_LIMIT),
            }
            command = ["gateway", "--port", str(ports.two), "--workers", "2"]
            _spawn(pipeline, "gateway-two", command, two)
            _wait_until_up(pipeline, "gateway-one", ports.one)
            _wait_until_up(pipeline, "gateway-two", ports.two)
            yield ports
        finally:
            pipeline.stop_all()


def test_a_head_over_the_limit_is_answered_431_and_the_connection_closed(
    gateways: Gateways,
) -> None:
    with Connection(gateways.one) as connection:
        connection.send(request(filler=100_000))
        answer = connection.answer()
        assert connection.is_closed()
    assert answer.status == 431
    assert answer.headers["connection"] == "close"
    assert answer.json() == {"error": "the request head is larger than 65536 bytes"}
    with Connection(gateways.one) as connection:
        assert connection.healthz_pid()  # the gateway serves on


def test_a_head_under_the_limit_is_served(gateways: Gateways) -> None:
    with Connection(gateways.one) as connection:
        connection.send(request(filler=60_000))
        answer = connection.answer()
        assert answer.status == 200, answer
        assert connection.healthz_pid()  # kept alive


def test_a_keep_alive_connections_second_head_is_bounded_too(gateways: Gateways) -> None:
    with Connection(gateways.one) as connection:
        assert connection.healthz_pid()
        connection.send(request(filler=100_000))
        assert connection.answer().status == 431
        assert connection.is_closed()


def test_a_pipelined_head_is_refused_after_the_answer_before_it(gateways: Gateways) -> None:
    # A head that begins part-way through a read is counted from the end of that read (or
    # piece of it, at most the limit): it is refused by twice the limit, whatever the reads.
    with Connection(gateways.one) as connection:
        connection.send(request() + request(filler=140_000))
        first, second = connection.answer(), connection.answer()
        assert connection.is_closed()
    assert first.status == 200
    assert second.status == 431


def test_a_head_trickled_past_the_timeout_is_answered_408_in_the_sdk_shape(
    gateways: Gateways,
) -> None:
    with Connection(gateways.one) as connection:
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n")
        started = time.monotonic()
        connection.sock.settimeout(0.1)
        while time.monotonic() - started < 5:
            try:
                connection.sock.recv(1, socket.MSG_PEEK)  # an answer, or the connection's end
                break
            except TimeoutError:
                connection.send(b"x")  # one more byte of a header name, every 0.1 s
        waited = time.monotonic() - started
        connection.sock.settimeout(5)
        answer = connection.answer()
        assert connection.is_closed()
    assert answer.status == 408
    assert TIMEOUT * 0.9 < waited < TIMEOUT + 2
    error = answer.json()["error"]  # a proxy route's error: the SDKs' shape
    assert error["message"] == "the request head did not arrive within 1 s"
    assert error["type"] == "invalid_request_error"


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(gateways: Gateways) -> None:
    started = time.monotonic()
    with Connection(gateways.one) as connection:
        answer = connection.answer()
        waited = time.monotonic() - started
        assert connection.is_closed()
    assert answer.status == 408
    assert answer.json() == {"error": "the request head did not arrive within 1 s"}
    assert TIMEOUT * 0.9 < waited < TIMEOUT + 2


def test_every_worker_applies_the_limit(gateways: Gateways) -> None:
    refused_by: set[int] = set()
    deadline = time.monotonic() + 30
    while len(refused_by) < 2:  # until both workers have refused a head
        assert time.monotonic() < deadline, f"only {refused_by} refused a head"
        with Connection(gateways.two) as connection:  # served by one worker throughout
            pid = connection.healthz_pid()
            connection.send(request(filler=2 * SMALL_LIMIT))
            answer = connection.answer()
            assert answer.status == 431, answer
            assert answer.json() == {"error": "the request head is larger than 4096 bytes"}
            assert connection.is_closed()
        refused_by.add(pid)
