"""The pure parts of the durable local stack: S3 request signing, the credentials file, weed's
command line and ports, pid files, and log rotation (a child appending past the limit)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.local import objectstore
from services.local.logrotate import rotate, rotate_all
from services.local.objectstore import (
    Credentials,
    ObjectStore,
    load_or_create_credentials,
    ports_of,
    sigv4_headers,
)
from services.local.processes import recorded_pid, start_time, stop_recorded, write_pid_file


def test_sigv4_matches_the_aws_documented_example() -> None:
    """AWS's "GET Object" example of Signature Version 4 for S3 (the documented signature)."""
    credentials = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = sigv4_headers(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        credentials,
        dt.datetime(2013, 5, 24, tzinfo=dt.UTC),
        headers={"Range": "bytes=0-9"},
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-date"] == "20130524T000000Z"


def test_credentials_are_generated_once_private_and_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "data" / "s3-credentials.json"
    first = load_or_create_credentials(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_credentials(path) == first
    assert len(first.secret_access_key) >= 32
    assert first.secret_access_key not in repr(first)
    other = load_or_create_credentials(tmp_path / "other.json")
    assert other.secret_access_key != first.secret_access_key


def test_unreadable_credentials_are_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s3-credentials.json"
    path.write_text("{not json")
    with pytest.raises(objectstore.ObjectStoreError, match="unreadable"):
        load_or_create_credentials(path)
    assert path.read_text() == "{not json"  # the keys of an existing store are never lost


def test_weed_is_given_every_port_and_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "weed_binary", lambda: Path("/bin/weed"))
    store = ObjectStore(tmp_path / "objects", Credentials("k", "the-secret"), base_port=20000)
    command = store.command()
    assert command[:3] == ["/bin/weed", "-logtostderr", "mini"]
    for flag in (
        "-master.port=20000",
        "-volume.port=20001",
        "-filer.port=20002",
        "-s3.port=20003",
        "-admin.port=20004",
        "-ip.bind=127.0.0.1",
        "-bucket=tansu",
        "-master.telemetry=false",
    ):
        assert flag in command
    assert not any(".port.grpc" in part for part in command)  # weed dials admin+10000 itself
    assert store.endpoint == "http://127.0.0.1:20003"
    assert ports_of(20000) == [*range(20000, 20006), *range(30000, 30006)]
    assert not any("the-secret" in part for part in command)  # by environment only
    env = store.s3_environment()
    assert env["AWS_ENDPOINT"] == "http://127.0.0.1:20003" and env["AWS_ALLOW_HTTP"] == "true"


def test_a_recorded_process_is_stopped_and_a_reused_pid_is_not(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        write_pid_file(tmp_path / "pids" / "sleeper.pid", sleeper.pid)
        assert recorded_pid(tmp_path / "pids" / "sleeper.pid") == sleeper.pid
        # A file naming a live pid with another start time: a reused pid, left alone.
        (tmp_path / "pids" / "reused.pid").write_text(f"{sleeper.pid} 1\n")
        assert recorded_pid(tmp_path / "pids" / "reused.pid") is None
        began = time.monotonic()
        assert stop_recorded(tmp_path / "pids", timeout=5) == ["sleeper"]
        assert time.monotonic() - began < 5
        assert sleeper.wait(5) == -15  # SIGTERM
        assert list((tmp_path / "pids").glob("*.pid")) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert start_time(sleeper.pid) is None


def test_rotation_keeps_a_few_copies_and_the_writer_appends_from_the_start(
    tmp_path: Path,
) -> None:
    log = tmp_path / "gateway.log"
    with log.open("ab") as child_stdout:  # as the supervisor opens a child's log
        for round_ in range(1, 9):
            child_stdout.write(f"round {round_}\n".encode() * 200)
            child_stdout.flush()
            assert rotate(log, max_bytes=1000, backups=3)
        child_stdout.write(b"after\n")
        child_stdout.flush()
    assert log.read_bytes() == b"after\n"  # O_APPEND: no hole where the old content was
    copies = sorted(p.name for p in tmp_path.iterdir())
    assert copies == ["gateway.log", "gateway.log.1", "gateway.log.2", "gateway.log.3"]
    assert (tmp_path / "gateway.log.1").read_bytes().startswith(b"round 8\n")
    assert (tmp_path / "gateway.log.3").read_bytes().startswith(b"round 6\n")
    assert not rotate(log, max_bytes=1000)  # under the limit: left alone


LINE_LENGTH = len("line 000000 ") + 50


def test_a_child_writing_past_the_limit_is_rotated_without_waiting(tmp_path: Path) -> None:
    """A real process appending fast while the supervisor's rotation runs beside it."""
    logs = tmp_path / "logs"
    logs.mkdir()
    script = (
        "import sys\n"
        "for n in range(40000):\n"
        "    sys.stdout.write(f'line {n:06d} ' + 'x' * 50 + '\\n')\n"
        "    sys.stdout.flush()\n"
    )
    with (logs / "pricer.log").open("ab") as output:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=output)
    rotations = 0
    while child.poll() is None:
        rotations += len(rotate_all(logs, max_bytes=200_000, backups=2))
        time.sleep(0.01)
    assert child.wait() == 0
    rotations += len(rotate_all(logs, max_bytes=200_000, backups=2))
    assert rotations >= 3
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["pricer.log", "pricer.log.1", "pricer.log.2"]
    for path in logs.iterdir():
        # Over the limit by what the child wrote between two checks (every 10 ms here, every
        # 2 s in the supervisor), never by the whole output (2.5 MB).
        assert path.stat().st_size < 1_500_000
        lines = path.read_bytes().splitlines()
        assert all(b"\0" not in line for line in lines)  # no sparse hole after a truncation
        # A copy may end in a torn line (the child was writing it while it was read; its
        # rest went with the truncation: the documented window). Nowhere else.
        if lines and len(lines[-1]) != LINE_LENGTH:
            lines = lines[:-1]
        assert all(len(line) == LINE_LENGTH for line in lines), path
        numbers = [int(line.split()[1]) for line in lines]
        assert numbers == sorted(numbers)  # each file a run of whole lines, in order
    last = (logs / "pricer.log").read_bytes().splitlines() or (
        logs / "pricer.log.1"
    ).read_bytes().splitlines()
    assert last[-1].startswith(b"line 039999")


def test_stored_offsets_go_whenever_the_log_changes(tmp_path: Path) -> None:
    from services.local.supervisor import durable_log_id, offsets_outlived

    durable = durable_log_id(tmp_path / "objects-a")
    assert durable == durable_log_id(tmp_path / "objects-a")  # kept with its objects
    assert durable != durable_log_id(tmp_path / "objects-b")  # another dir: another log
    assert not offsets_outlived(durable, durable, embedded=True)  # a restart: kept
    assert offsets_outlived("memory 1", durable, embedded=True)  # memory → s3
    assert offsets_outlived(durable, "memory 2", embedded=True)  # s3 → memory
    assert offsets_outlived("external k:9092", durable, embedded=True)  # external → s3
    assert offsets_outlived(durable, "external k:9092", embedded=False)  # s3 → external
    assert offsets_outlived(None, durable, embedded=True)  # never recorded: replay (deduped)
    assert not offsets_outlived(None, "external k:9092", embedded=False)  # a deployment's own


def test_the_embedded_broker_gets_two_partitions_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.adapters.settings import Settings
    from services.local.supervisor import stack_partitions

    monkeypatch.delenv("BILLING_PARTITIONS", raising=False)
    monkeypatch.delenv("BILLING_PRICER_PROCESSES", raising=False)
    assert stack_partitions(Settings(), embedded=True) == 2
    assert stack_partitions(Settings(), embedded=False) == 6  # a real broker: the setting's
    assert stack_partitions(Settings(pricer_processes=3), embedded=True) == 3  # one each
    monkeypatch.setenv("BILLING_PARTITIONS", "6")
    assert stack_partitions(Settings(), embedded=True) == 6  # said explicitly
