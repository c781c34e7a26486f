"""`billing up --demo` from nothing: the whole stack starts, bills the burst, and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cli import BILLING, _free_port

pytestmark = pytest.mark.e2e


def _processes_under(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -eo" not in line]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}")


def test_up_demo_bills_every_request_once_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    run_up_demo(data_dir)
    # Again on the same data directory: the database (and its stored offsets) survive, the
    # embedded broker's log does not; the new burst must still be billed, exactly.
    second = run_up_demo(data_dir)
    assert "stored offsets of the previous (lost) log cleared" in second


def run_up_demo(data_dir: Path) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BILLING_DATABASE_URL", "BILLING_KAFKA_BOOTSTRAP")
    }
    env["BILLING_DATA_DIR"] = str(data_dir)
    port = _free_port()
    process = subprocess.Popen(
        [BILLING, "up", "--demo", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        for line in process.stdout:
            lines.append(line)
            if "running; Ctrl-C stops everything" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "billed == expected for every tenant" in output, output
        for tenant in ("acme", "globex", "initech"):
            assert tenant in output
        assert metric(f"http://127.0.0.1:{port}/metrics", "billing_ingested_events_total") == 330
        priced = metric(f"http://127.0.0.1:{port + 1}/metrics", "billing_priced_events_total")
        assert priced >= 300  # at-least-once: a redelivered batch may be priced twice
        projected = metric(f"http://127.0.0.1:{port + 2}/metrics", "billing_projected_events_total")
        assert projected == 300
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert (data_dir / "logs" / "pricer.log").exists()
    time.sleep(1)
    broker = output.split("embedded Tansu at ", 1)[1].split()[0]
    assert _processes_under(data_dir) == []  # postgres runs with -D under the data dir
    assert _processes_under(Path(f"tcp://{broker}")) == []
    return output
