"""``billing up``: start what is missing, then run and supervise the services.

The broker (embedded Tansu unless ``BILLING_KAFKA_BOOTSTRAP``) and PostgreSQL (embedded
``pgserver`` unless ``BILLING_DATABASE_URL``) are started first; migrations are applied and
the topics created; then gateway, pricer, projector and quota service run as child processes,
each logging
to ``<data-dir>/logs/<name>.log`` and restarted (with backoff) if it dies
(``BILLING_PRICER_PROCESSES`` pricers share the usage topic's partitions). Ctrl-C or SIGTERM
stops the children, then what was started for them: Tansu, then the object store.

The embedded broker is durable by default: Tansu keeps its log in the ``weed mini`` object
store under ``<data-dir>/objects`` (``--broker-storage memory`` keeps it in memory, lost at
every stop). Every child dies with the supervisor (``PR_SET_PDEATHSIG``) and is recorded in
``<data-dir>/pids``, so a stack killed outright leaves nothing behind that the next
``billing up`` on the data dir does not stop first. The logs are rotated by size
(``services.local.logrotate``).

Before anything starts, the data dir is locked (one stack per data dir) and every port the
stack will listen on is checked, so a clash fails at once with the port's name instead of a
gateway restarting forever. Once ready, the stack writes ``<data-dir>/stack.json``
(``services.local.state``) for the CLI commands run beside it, and removes it when it stops.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import click
import httpx

from services.adapters.consuming import PRICER_GROUP
from services.adapters.database import connect, migrate
from services.adapters.errors import AdapterError
from services.adapters.kafka import ensure_topics
from services.adapters.quota import QUOTA_CONSUMER
from services.adapters.readmodels import PROJECTOR_CONSUMER
from services.adapters.settings import S3_FETCH_MAX_WAIT_MS, Settings
from services.adapters.topics import Topics
from services.core.periods import closable_month
from services.local.broker import EmbeddedBroker
from services.local.logretention import LogRetention, Readers, duration_text, positions_of
from services.local.logrotate import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, rotate_all
from services.local.objectstore import BUCKET, ObjectStore, load_or_create_credentials
from services.local.postgres import EmbeddedPostgres
from services.local.processes import die_with_parent, stop_recorded, write_pid_file
from services.local.state import (
    StackState,
    lock_path,
    read_state,
    remove_state,
    state_path,
    write_state,
)

RESTART_BACKOFF_MAX = 10.0
ONE_CONSUMER = {"BILLING_CONSUMER_ASSIGNMENT": "all"}
"""The stack runs one projector and one quota service: each reads every partition without
a consumer group, so a restarted one resumes at once (``Settings.consumer_assignment``)."""
CLOSE_EVERY_SECONDS = 3600.0
"""How often ``billing up`` looks for a month to close (BILLING_CLOSE_GRACE)."""
GATEWAY_HOST = "127.0.0.1"
ROTATE_EVERY_SECONDS = 2.0
STORAGES = ("s3", "memory")
CREDENTIALS_FILE = "s3-credentials.json"
"""The object store's access key and secret (0600), generated for the data dir."""
PORTS_FILE = "ports.json"
"""The ports the embedded broker and object store took last: taken again if free."""


@dataclass
class Child:
    name: str
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    next_start: float = 0.0
    handle: object = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**env, **self.env}
        handle = self.log.open("ab")
        self.handle = handle
        self.process = subprocess.Popen(  # noqa: S603 - our own executable and arguments
            [sys.executable, "-m", "services.cli.main", *self.args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no locks involved
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Stack:
    """The whole pipeline on one machine."""

    def __init__(
        self,
        settings: Settings,
        port: int,
        echo: Callable[[str], None],
        broker_storage: str = "s3",
        log_max_bytes: int = DEFAULT_MAX_BYTES,
        log_backups: int = DEFAULT_BACKUPS,
        broker_retention: timedelta | None = None,
    ) -> None:
        if broker_storage not in STORAGES:
            raise ValueError(f"broker storage {broker_storage!r} is not one of {STORAGES}")
        self.settings = settings
        self.port = port
        self.echo = echo
        self.broker_storage = broker_storage
        """Of the embedded broker: ``s3`` (durable, weed mini) or ``memory``."""
        self.broker_retention = broker_retention
        """How long the s3 log keeps consumed batches (``None``: all of them)."""
        self.retention: LogRetention | None = None
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.data_dir = settings.data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.pids = self.data_dir / "pids"
        self.objects_dir = self.data_dir / "objects"
        self.broker: EmbeddedBroker | None = None
        self.objects: ObjectStore | None = None
        self.log_id = ""
        """The name of the log the services will read (``log_identity``)."""
        self.database: EmbeddedPostgres | None = None
        self.children: list[Child] = []
        self.env: dict[str, str] = {}
        self.stopping = False
        self.state: StackState | None = None
        self._lock_file: IO[str] | None = None
        self._next_close = 0.0
        self._next_rotate = 0.0
        self._closer: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{GATEWAY_HOST}:{self.port}"

    def listeners(self) -> list[tuple[str, str, int]]:
        """(what, host, port) of every TCP port the stack listens on (the embedded broker
        picks a free port itself; the embedded database listens on a unix socket)."""
        metrics = self.settings.metrics_host
        return [
            ("gateway", GATEWAY_HOST, self.port),
            ("pricer metrics", metrics, self.port + 1),
            ("projector metrics", metrics, self.port + 2),
            *(
                (f"pricer {n} metrics", metrics, self.pricer_metrics_port(n))
                for n in range(2, self.settings.pricer_processes + 1)
            ),
            ("quota metrics", metrics, self.quota_metrics_port),
        ]

    def pipeline_metrics(self) -> str:
        """``BILLING_PIPELINE_METRICS`` for the gateway: every service's metrics endpoint."""
        return ",".join(
            f"{what.removesuffix(' metrics').replace(' ', '-')}=http://{host}:{port}/metrics"
            for what, host, port in self.listeners()
            if what.endswith(" metrics")
        )

    @property
    def quota_metrics_port(self) -> int:
        """After the last pricer's."""
        return self.port + self.settings.pricer_processes + 2

    def pricer_metrics_port(self, n: int) -> int:
        """Pricer 1 serves metrics on port + 1, pricer n ≥ 2 on port + n + 1 (after the
        projector's port + 2)."""
        return self.port + 1 if n == 1 else self.port + n + 1

    def pricers(self) -> list[Child]:
        """``BILLING_PRICER_PROCESSES`` pricers in one consumer group (partitions shared)."""
        return [
            Child(
                "pricer" if n == 1 else f"pricer-{n}",
                ["pricer", "--log-level", "warning"],
                self.logs / ("pricer.log" if n == 1 else f"pricer-{n}.log"),
                env={"BILLING_METRICS_PORT": str(self.pricer_metrics_port(n))},
            )
            for n in range(1, self.settings.pricer_processes + 1)
        ]

    def claim(self) -> None:
        """Lock the data dir and check the ports: fail before anything is started."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        # A stack killed outright (SIGKILL, OOM) leaves children that are still stopping
        # (they got SIGTERM when it died): wait for them before taking their ports and files.
        leftovers = stop_recorded(self.pids)
        if leftovers:
            self.echo(f"leftovers   stopped {', '.join(leftovers)} of a previous stack")
        check_ports(self.listeners())

    def start(self) -> None:
        if self._lock_file is None:
            self.claim()
        self.rotate_logs()
        bootstrap = self.settings.kafka_bootstrap
        if not bootstrap:
            try:
                bootstrap = self._start_broker()
            except AdapterError as exc:
                raise click.ClickException(str(exc)) from exc
        else:
            self.echo(f"broker      {bootstrap}")
        database_url = self.settings.database_url
        if not database_url:
            self.database = EmbeddedPostgres(self.data_dir)
            database_url = self.database.start()
            self._watch_database(self.database.pgdata)
            self.echo(f"database    embedded PostgreSQL in {self.database.pgdata}")
        else:
            self.echo("database    $BILLING_DATABASE_URL")
        applied = asyncio.run(migrate(database_url))
        self.echo(f"migrations  {', '.join(applied) if applied else 'up to date'}")
        if not self.log_id:
            self.log_id = f"external {bootstrap}"
        cleared = asyncio.run(_adopt_log(database_url, self.log_id, self.broker is not None))
        if cleared:
            # Offsets stored against another log (a lost in-memory one, another objects dir,
            # another broker) would skip this one's records; a replay is deduplicated.
            self.echo(f"offsets     {cleared} stored offsets cleared (positions in another log)")
        topics = Topics.named(self.settings.topic_prefix)
        partitions = stack_partitions(self.settings, embedded=self.broker is not None)
        asyncio.run(ensure_topics(bootstrap, topics.partitions(partitions)))
        self.echo(f"topics      {', '.join(topics)} ({partitions} partitions)")

        self.env = {
            **os.environ,
            "BILLING_KAFKA_BOOTSTRAP": bootstrap,
            "BILLING_DATABASE_URL": database_url,
            "BILLING_DATA_DIR": str(self.data_dir),
        }
        if self.objects is not None:  # Tansu lists the s3 log on every fetch: fewer of them
            self.env.setdefault("BILLING_KAFKA_FETCH_MAX_WAIT_MS", str(S3_FETCH_MAX_WAIT_MS))
        self.children = [
            Child(
                "gateway",
                ["gateway", "--port", str(self.port)],
                self.logs / "gateway.log",
                env={"BILLING_PIPELINE_METRICS": self.pipeline_metrics()},
            ),
            *self.pricers(),
            Child(
                "projector",
                ["projector"],
                self.logs / "projector.log",
                # one projector and one quota service: no group to rejoin after a crash
                env={"BILLING_METRICS_PORT": str(self.port + 2), **ONE_CONSUMER},
            ),
            Child(
                "quota",
                ["quota"],
                self.logs / "quota.log",
                env={"BILLING_METRICS_PORT": str(self.quota_metrics_port), **ONE_CONSUMER},
            ),
        ]
        for child in self.children:
            self._start_child(child)
        self._wait_ready()
        if self.objects is not None:
            self._start_retention(self.objects, database_url, bootstrap, topics)
        elif self.broker_retention is not None:
            self.echo("retention   --broker-retention trims the s3 log only: ignored here")
        self.state = StackState(
            pid=os.getpid(),
            data_dir=str(self.data_dir),
            database_url=database_url,
            kafka_bootstrap=bootstrap,
            gateway_url=self.url,
            topic_prefix=self.settings.topic_prefix,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            broker_storage=self.broker_storage if self.broker is not None else "external",
        )
        write_state(self.data_dir, self.state)

    def _start_broker(self) -> str:
        """Start the object store (s3 storage), then Tansu on it; return the bootstrap."""
        ports = _read_ports(self.data_dir / PORTS_FILE)
        storage, storage_env = "memory://tansu/", {}
        if self.broker_storage == "s3":
            credentials = load_or_create_credentials(self.data_dir / CREDENTIALS_FILE)
            self.objects = ObjectStore(
                self.objects_dir,
                credentials,
                base_port=ports.get("objectstore"),
                log_path=self.logs / "weed.log",
                die_with_parent=True,
            )
            self.objects.start()
            self._record("weed", self.objects.pid)
            self.log_id = durable_log_id(self.objects_dir)
            storage, storage_env = f"s3://{BUCKET}/", self.objects.s3_environment()
        else:
            self.log_id = f"memory {uuid.uuid4()}"  # a new log at every start
        self.broker = EmbeddedBroker(
            log_path=self.logs / "tansu.log",
            storage=storage,
            storage_env=storage_env,
            die_with_parent=True,
            preferred_port=ports.get("broker"),
        )
        self.broker.start()
        self._record("tansu", self.broker.pid)
        used = {"broker": self.broker.port}
        if self.objects is not None and self.objects.base_port is not None:
            used["objectstore"] = self.objects.base_port
        _write_ports(self.data_dir / PORTS_FILE, {**ports, **used})
        if self.objects is not None:
            where = f"s3 storage: weed mini in {self.objects_dir}, S3 at {self.objects.endpoint}"
        else:
            where = "memory storage: lost when it stops"
        self.echo(f"broker      embedded Tansu at {self.broker.bootstrap} ({where})")
        return self.broker.bootstrap

    def _start_retention(
        self, objects: ObjectStore, database_url: str, bootstrap: str, topics: Topics
    ) -> None:
        """Sweep the s3 log every minute: trim what is old and consumed, or warn when it
        grows long enough to slow Tansu down (``logretention``)."""
        readers = {
            topics.usage: Readers(groups=(f"{self.settings.topic_prefix}{PRICER_GROUP}",)),
            topics.costs: Readers(stored=(PROJECTOR_CONSUMER, QUOTA_CONSUMER)),
        }
        self.retention = LogRetention(
            objects.client(),
            objects.bucket,
            self.broker_retention,
            positions_of(database_url, bootstrap, readers),
            self.echo,
            vacuum=objects.vacuum,
            topics=list(topics),
            guarded=list(readers),
        )
        self.retention.start()
        if self.broker_retention is None:
            self.echo("retention   off: the log keeps every batch (--broker-retention)")
        else:
            age = duration_text(self.broker_retention)
            self.echo(f"retention   batches consumed and older than {age} are deleted from the log")

    def _watch_database(self, pgdata: Path) -> None:
        """A child that stops the embedded PostgreSQL if the supervisor dies: pgserver runs
        it detached, and nothing else would."""
        self._watchdog = subprocess.Popen(  # noqa: S603 - our own module and arguments
            [sys.executable, "-m", "services.local.processes", "watch-postmaster", str(pgdata)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no locks involved
        )
        self._record("postgres-watchdog", self._watchdog.pid)

    def _record(self, name: str, pid: int | None) -> None:
        if pid is not None:
            write_pid_file(self.pids / f"{name}.pid", pid)

    def _start_child(self, child: Child) -> None:
        child.start(self.env)
        self._record(child.name, child.process.pid if child.process else None)

    def rotate_logs(self) -> None:
        """Every few seconds: rotate the logs over the size limit (copy, then truncate)."""
        now = time.monotonic()
        if now < self._next_rotate:
            return
        self._next_rotate = now + ROTATE_EVERY_SECONDS
        rotate_all(self.logs, self.log_max_bytes, self.log_backups)

    def exports(self) -> list[str]:
        """Shell lines giving other tools (and other shells) the stack's addresses."""
        if self.state is None:
            return []
        values = {"BILLING_DATA_DIR": self.state.data_dir}
        # What the stack started itself; a database or broker given in the environment is
        # already there (and its URL may hold a password: not echoed to the terminal).
        if not self.settings.database_url:
            values["BILLING_DATABASE_URL"] = self.state.database_url
        if not self.settings.kafka_bootstrap:
            values["BILLING_KAFKA_BOOTSTRAP"] = self.state.kafka_bootstrap
        if self.state.topic_prefix:
            values["BILLING_TOPIC_PREFIX"] = self.state.topic_prefix
        return [f"export {name}={shlex.quote(value)}" for name, value in values.items()]

    def _lock_data_dir(self) -> None:
        """One stack per data directory: a second would fight over ports and files."""
        lock_file = lock_path(self.data_dir).open("w")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            running = read_state(self.data_dir)
            where = f" (pid {running.pid}, gateway {running.gateway_url})" if running else ""
            raise click.ClickException(
                f"another `billing up` is running on {self.data_dir}{where}; stop it, or "
                "start a second stack with another --data-dir and --port"
            ) from None
        self._lock_file = lock_file  # held (open) until this process exits

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping:
                raise click.Abort
            self.supervise()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise click.ClickException(f"the gateway did not become ready; see {self.logs}")

    def supervise(self) -> None:
        """Restart any child that died, with a growing pause."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            if child.next_start == 0.0:
                delay = min(2.0**child.restarts * 0.5, RESTART_BACKOFF_MAX)
                child.next_start = now + delay
                self.echo(
                    f"{child.name} exited with {child.process.returncode}; "
                    f"restarting in {delay:.1f}s (log: {child.log})"
                )
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._start_child(child)

    def close_due_month(self, now: datetime) -> None:
        """Hourly (and at start): ``billing invoices close`` for the latest month over for
        ``BILLING_CLOSE_GRACE``, as a child of its own (closing again issues nothing; a month
        with usage held unpriced is refused and tried again next hour — see its log)."""
        if self._closer is not None and self._closer.poll() is not None:
            self._closer = None  # reaped: no zombie waits the hour until the next close
        grace = self.settings.close_grace_delta
        if grace is None or time.monotonic() < self._next_close:
            return
        if self._closer is not None and self._closer.poll() is None:
            return  # the last one is still running
        self._next_close = time.monotonic() + CLOSE_EVERY_SECONDS
        month = closable_month(now, grace)
        log = (self.logs / "invoices.log").open("ab")
        self._closer = subprocess.Popen(  # noqa: S603 - our own executable and arguments
            [sys.executable, "-m", "services.cli.main", "invoices", "close", "--month",
             f"{month:%Y-%m}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, no locks involved
        )  # fmt: skip
        log.close()
        self._record("invoices-close", self._closer.pid)

    def stop(self) -> None:
        if self.state is not None:  # first: no command should pick a stack that is going
            remove_state(self.data_dir, self.state.pid)
            self.state = None
        if self.retention is not None:
            self.retention.stop()
        if self._closer is not None and self._closer.poll() is None:
            self._closer.terminate()  # a close is one transaction: nothing half-issued
            try:
                self._closer.wait(15)
            except subprocess.TimeoutExpired:
                self._closer.kill()
                self._closer.wait()
        for child in reversed(self.children):
            child.stop()
        if self.broker is not None:
            self.broker.stop()  # before the object store: it writes there until it exits
        if self.objects is not None:
            self.objects.stop()
        if self.database is not None:
            self.database.stop()
        if self._watchdog is not None:  # after the database: it has nothing left to stop
            self._watchdog.terminate()
            try:
                self._watchdog.wait(35)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
        stop_recorded(self.pids)  # nothing recorded should outlive the stack; forget them


def check_ports(listeners: list[tuple[str, str, int]]) -> None:
    """Fail, naming the port, if any of them cannot be listened on now."""
    for what, host, port in listeners:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the servers will: a port in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                reason = "is in use" if exc.errno == errno.EADDRINUSE else f"failed: {exc}"
                raise click.ClickException(
                    f"port {port} ({what}) on {host} {reason}; nothing was started. "
                    "Choose other ports with `billing up --port N` (the gateway listens "
                    "on N, the pricer's, projector's and quota service's metrics on N+1, N+2"
                    " and N+3)"
                ) from None


def _read_ports(path: Path) -> dict[str, int]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {k: v for k, v in document.items() if isinstance(v, int) and 0 < v < 65536}


def _write_ports(path: Path, ports: dict[str, int]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(ports) + "\n")
    os.replace(temporary, path)


LOCAL_PARTITIONS = 2
"""Partitions of each topic on the embedded broker unless ``BILLING_PARTITIONS`` is set."""


def stack_partitions(settings: Settings, *, embedded: bool) -> int:
    """Partitions for the topics ``billing up`` creates. On the embedded broker every
    partition of a batch is an object written to the local S3 store: at 1,000 events/s on
    2 cores, 6 partitions kept weed and Tansu busy on 1.5 cores and the pricer fell behind
    (lag +35 s a minute), 2 held the rate with lag under 1 s (``bench/soak.py``). So 2, or
    one per pricer process, unless ``BILLING_PARTITIONS`` says otherwise; an existing
    topic keeps the partitions it has."""
    if not embedded or "partitions" in settings.model_fields_set:
        return settings.partitions
    return max(LOCAL_PARTITIONS, settings.pricer_processes)


LOG_ID_FILE = "billing-log-id"


def durable_log_id(objects_dir: Path) -> str:
    """The name of the durable log in ``objects_dir``, made when the directory first holds
    one (it goes with the objects: a new or replaced directory is another log)."""
    path = objects_dir / LOG_ID_FILE
    objects_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(f"s3 {uuid.uuid4()}\n")
    return path.read_text().strip()


def offsets_outlived(previous: str | None, current: str, embedded: bool) -> bool:
    """Whether offsets stored against log ``previous`` must go before reading ``current``:
    whenever the log changed, except the first time an external broker is seen (a
    deployment's own Kafka, whose offsets predate the identity) — clearing is always safe
    (a replay is deduplicated), keeping another log's offsets is not."""
    if previous is None:
        return embedded
    return previous != current


async def _adopt_log(database_url: str, log_id: str, embedded: bool) -> int:
    """Record ``log_id`` as the log the stored offsets belong to, clearing them first when
    they belonged to another (:func:`offsets_outlived`); how many were cleared."""
    connection = await connect(database_url)
    try:
        async with connection.transaction():
            previous = await connection.fetchval(
                "SELECT log_id FROM billing_log_identity FOR UPDATE"
            )
            cleared = "DELETE 0"
            if offsets_outlived(previous, log_id, embedded):
                cleared = await connection.execute("DELETE FROM consumer_offsets")
            await connection.execute(
                "INSERT INTO billing_log_identity (log_id) VALUES ($1) ON CONFLICT (singleton)"
                " DO UPDATE SET log_id = EXCLUDED.log_id, recorded_at = now()",
                log_id,
            )
    finally:
        await connection.close()
    return int(cleared.split()[-1])


def run(stack: Stack, after_start: Callable[[Stack], None] | None = None) -> None:
    """Start the stack, run ``after_start``, then supervise until Ctrl-C or SIGTERM."""

    def request_stop(*_: object) -> None:
        stack.stopping = True

    stack.claim()
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stack.start()
        if stack.stopping:
            return
        stack.echo(f"\ngateway     {stack.url}  (quote, ingest, queries, /metrics)")
        stack.echo(
            f"metrics     pricer http://127.0.0.1:{stack.port + 1}/metrics, "
            f"projector http://127.0.0.1:{stack.port + 2}/metrics"
        )
        for n in range(2, stack.settings.pricer_processes + 1):
            port = stack.pricer_metrics_port(n)
            stack.echo(f"            pricer {n} http://127.0.0.1:{port}/metrics")
        stack.echo(f"            quota http://127.0.0.1:{stack.quota_metrics_port}/metrics")
        stack.echo(f"logs        {stack.logs}")
        stack.echo(
            f"state       {state_path(stack.data_dir)} (billing commands given this "
            "data dir find the database and broker there)"
        )
        stack.echo("\nfor other tools and shells:")
        for line in stack.exports():
            stack.echo(f"  {line}")
        if after_start is not None:
            after_start(stack)
        stack.echo("\nrunning; Ctrl-C stops everything")
        while not stack.stopping:
            stack.supervise()
            stack.close_due_month(datetime.now(UTC))
            stack.rotate_logs()
            time.sleep(0.2)
    finally:
        stack.echo("stopping…")
        stack.stop()
        stack.echo("stopped")
