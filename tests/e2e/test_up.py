"""`billing up` from nothing: the whole stack starts, bills a burst, and stops; the CLI run
beside it finds its database and broker by itself; a second one fails before starting
anything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_cli import BILLING, _free_ports, fake_upstream

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
    # Again on the same data directory: the database, its stored offsets and the embedded
    # broker's log (s3 storage, the default) all survive; the new burst is billed, exactly.
    second = run_up_demo(data_dir)
    assert "s3 storage" in second and "offsets cleared" not in second


def run_up_demo(data_dir: Path) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BILLING_DATABASE_URL", "BILLING_KAFKA_BOOTSTRAP")
    }
    env["BILLING_DATA_DIR"] = str(data_dir)
    port = _free_ports(4)
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
        _dashboard_signs_in_with_the_printed_key(f"http://127.0.0.1:{port}", output)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()  # also closes its output pipe
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert (data_dir / "logs" / "pricer.log").exists()
    time.sleep(1)
    broker = output.split("embedded Tansu at ", 1)[1].split()[0]
    assert _processes_under(data_dir) == []  # postgres runs with -D under the data dir
    assert _processes_under(Path(f"tcp://{broker}")) == []
    return output


def _dashboard_signs_in_with_the_printed_key(url: str, output: str) -> None:
    """The demo prints the dashboard's URL and a key of acme: it signs in to acme's view."""
    found = re.search(r"dashboard +(\S+)\n +sign in as tenant acme with the API key (\S+)", output)
    assert found is not None, output
    assert found.group(1) == f"{url}/dashboard"
    with httpx.Client(base_url=url, timeout=10, follow_redirects=True) as client:
        form = client.get("/dashboard")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        signed = client.post(
            "/dashboard/sign-in",
            data={"csrf": csrf.group(1), "credential": found.group(2)},
            headers={"origin": url},
        )
        assert signed.status_code == 200 and 'data-view="tenant"' in signed.text  # redirected
        overview = client.get("/dashboard/api/overview").json()
        summary = client.get(
            "/v1/billing/summary",
            params={"since": overview["month"]["start"]},
            headers={"Authorization": f"Bearer {found.group(2)}"},
        ).json()
    assert overview["tenant_id"] == "acme"
    assert overview["month"]["exact"] == summary["totals"]["total_cost"]


# -- one stack, shared by the checks below (each `billing up` start costs seconds) ----------------

ADMIN = {"Authorization": "Bearer e2e-up-admin"}


@dataclass
class Running:
    data_dir: Path
    port: int
    url: str
    output: str
    process: subprocess.Popen[str]


def _bare_env() -> dict[str, str]:
    """The environment without any BILLING_*, OPENROUTER_* or VERTEX_* variable."""
    prefixes = ("BILLING_", "OPENROUTER_", "VERTEX_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A `billing` command with no BILLING_* variable at all, as a new user types it."""
    return subprocess.run(
        [BILLING, *args], capture_output=True, text=True, timeout=60, env=_bare_env()
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`billing up --data-dir D` (no BILLING_* variables), its catalogue the fake upstream."""
    data_dir = tmp_path_factory.mktemp("up") / "stack"
    # N-1 free too: a test starts a second stack on N-1, whose metrics port N must clash.
    port = _free_ports(5) + 1
    with fake_upstream() as (upstream, _):
        env = _bare_env() | {
            "OPENROUTER_BASE_URL": f"{upstream}/api/v1",
            "BILLING_CATALOGUE_SYNC": "true",
            "BILLING_ADMIN_TOKEN": "e2e-up-admin",
            "TIKTOKEN_CACHE_DIR": str(data_dir.parent / "tiktoken"),
        }
        process = subprocess.Popen(
            [BILLING, "up", "--data-dir", str(data_dir), "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        lines: list[str] = []
        try:
            deadline = time.monotonic() + 120
            for line in process.stdout:
                lines.append(line)
                if "running; Ctrl-C stops everything" in line or time.monotonic() > deadline:
                    break
            output = "".join(lines)
            assert "running; Ctrl-C" in output, output
            yield Running(data_dir, port, f"http://127.0.0.1:{port}", output, process)
            process.send_signal(signal.SIGINT)
            rest, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()  # also closes its output pipe
    assert process.returncode == 0, rest
    assert not (data_dir / "stack.json").exists()  # removed on a clean stop


def test_up_writes_its_state_and_prints_the_exports(stack: Running) -> None:
    state = json.loads((stack.data_dir / "stack.json").read_text())
    assert state["pid"] == stack.process.pid
    assert state["gateway_url"] == stack.url
    exports = dict(
        line.strip().removeprefix("export ").split("=", 1)
        for line in stack.output.splitlines()
        if line.strip().startswith("export ")
    )
    assert exports["BILLING_KAFKA_BOOTSTRAP"] == state["kafka_bootstrap"]
    assert exports["BILLING_DATABASE_URL"].strip("'") == state["database_url"]
    assert exports["BILLING_DATA_DIR"] == str(stack.data_dir.resolve())


def test_tenants_and_keys_beside_the_stack_need_no_environment(stack: Running) -> None:
    created = cli("tenants", "create", "newcomer", "--data-dir", str(stack.data_dir))
    assert created.returncode == 0, created.stderr
    key = cli("keys", "create", "--tenant", "newcomer", "--data-dir", str(stack.data_dir))
    assert key.returncode == 0, key.stderr
    listing = cli("--data-dir", str(stack.data_dir), "keys", "list").stdout.splitlines()
    assert listing[0].split() == ["key", "id", "tenant", "name", "created", "revoked"]
    assert any(" newcomer " in row for row in listing[1:])
    # The key works at the stack's gateway: the CLI wrote to the stack's own database.
    models = httpx.get(
        f"{stack.url}/v1/models",
        headers={"Authorization": f"Bearer {key.stdout.strip()}"},
        timeout=10,
    )
    assert models.status_code == 200, models.text


def test_a_price_set_on_the_command_line_is_the_gateways_price(stack: Running) -> None:
    model = "openai/gpt-4o-mini"
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    result = cli(
        "prices", "set", model, "--prompt", "9", "--completion", "9", "--per-million",
        "--effective-from", since, "--reason", "newcomer", "--data-dir", str(stack.data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    local = cli("quote", "-m", model, "--data-dir", str(stack.data_dir))
    assert json.loads(local.stdout)["pricing"]["prompt"] == "0.000009"
    deadline = time.monotonic() + 20  # the gateway reloads its book every few seconds
    while True:
        answer = httpx.post(
            f"{stack.url}/internal/billing/quote",
            json={"provider_model_id": model},
            headers=ADMIN,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        if answer.json()["pricing"]["prompt"] == "0.000009" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.json()["pricing"]["prompt"] == "0.000009"
    assert answer.json()["price_source"].startswith("correction")


def test_readyz_is_clean_with_the_fake_upstream_as_catalogue(stack: Running) -> None:
    deadline = time.monotonic() + 20
    while True:
        httpx.post(  # a lookup starts the first catalogue refresh
            f"{stack.url}/internal/billing/quote",
            json={"provider_model_id": "openai/gpt-5"},
            headers=ADMIN,
            timeout=10,
        )
        prices = httpx.get(f"{stack.url}/readyz", timeout=10).json()["prices"]
        if prices["last_success"] or prices["last_error"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert prices["source"] == "openrouter"
    assert prices["last_error"] is None and prices["last_success"] is not None, prices


@pytest.mark.parametrize(
    ("same_data_dir", "offset", "needle"),
    [
        (True, 10, "another `billing up` is running on"),
        (False, 0, "port {port} (gateway) on 127.0.0.1 is in use"),
        (False, -1, "port {port} (pricer metrics) on 127.0.0.1 is in use"),
    ],
)
def test_a_second_up_fails_fast_and_starts_nothing(
    stack: Running, tmp_path: Path, same_data_dir: bool, offset: int, needle: str
) -> None:
    data_dir = stack.data_dir if same_data_dir else tmp_path / "second"
    began = time.monotonic()
    result = cli("up", "--data-dir", str(data_dir), "--port", str(stack.port + offset))
    assert result.returncode == 1, result.stdout
    assert needle.format(port=stack.port) in result.stderr
    assert "--port" in result.stderr
    assert time.monotonic() - began < 15
    assert "broker" not in result.stdout and "running" not in result.stdout
    if not same_data_dir:
        assert not (data_dir / "postgres").exists() and not (data_dir / "stack.json").exists()
    assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 200  # unharmed
