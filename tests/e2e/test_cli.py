"""The ``billing`` command line, run as a subprocess like a user would."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.context import Context
from services.local.state import StackState, lock_path, read_state, write_state
from tests.conftest import OWN_FIXTURES

pytestmark = pytest.mark.e2e

BILLING = shutil.which("billing", path=os.path.dirname(sys.executable)) or "billing"


def billing(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


SONNET_USAGE = json.dumps(
    {
        "usage": {
            "prompt_tokens": 1800,
            "completion_tokens": 320,
            "prompt_tokens_details": {"cached_tokens": 600},
            "completion_tokens_details": {"reasoning_tokens": 24},
        }
    }
)


def test_quote_prints_the_breakdown() -> None:
    result = billing(
        "quote", "--model", "anthropic/claude-sonnet-4.5", "--usage-json", SONNET_USAGE
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["breakdown"]["total_cost"] == "0.00858"
    assert body["breakdown"]["tier"] is None


def test_quote_from_a_file_with_what_if_pricing_and_at(tmp_path: Path) -> None:
    usage = tmp_path / "usage.json"
    usage.write_text('{"input_tokens": 1000, "output_tokens": 10}')
    pricing = tmp_path / "pricing.json"
    pricing.write_text('{"prompt": "0.000002", "completion": "0.00001"}')
    result = billing(
        "quote", "-m", "mine/model", "--usage-file", str(usage), "--format", "anthropic",
        "--pricing-file", str(pricing), "--at", "2026-01-01T00:00:00Z",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["breakdown"]["total_cost"] == "0.0021"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["quote", "-m", "openai/gpt-5", "--usage-json", '{"prompt_tokens": -4}'],
            '"field": "usage.prompt_tokens"',
        ),
        (["quote", "-m", "nope/nothing", "--usage-json", "{}"], '"suggestions"'),
    ],
)
def test_quote_errors_exit_1_with_the_api_error_document(args: list[str], needle: str) -> None:
    result = billing(*args)
    assert result.returncode == 1
    assert needle in result.stdout


def test_quote_usage_mistakes_are_reported() -> None:
    assert billing("quote", "--usage-json", "{}").returncode == 2
    bad_json = billing("quote", "-m", "openai/gpt-5", "--usage-json", "{oops")
    assert bad_json.returncode == 2
    assert "not valid JSON" in bad_json.stderr


def test_batch_answers_every_line_in_order_and_survives_bad_ones() -> None:
    gpt5 = "openai/gpt-5"
    lines = [
        {"provider_model_id": gpt5, "usage": {"prompt_tokens": 1000, "completion_tokens": 100}},
        "not json at all",
        {"provider_model_id": gpt5, "usage": {"prompt_tokens": 1, "completion_tokens": -1}},
        {"provider_model_id": "who/knows", "usage": {"prompt_tokens": 1}},
        {
            "provider_model_id": "x/y",
            "usage": {"input_tokens": 10, "output_tokens": 1},
            "format": "anthropic",
            "pricing": {"prompt": "0.1", "completion": "1"},
        },
        {"provider_model_id": gpt5, "usage": {"prompt_tokens": 1000}, "at": "2020-01-01T00:00:00Z"},
        "",
        "[" * 100_000,
        {"provider_model_id": gpt5, "usage": {"prompt_tokens": 1, "cost": "1E+999999"}},
        {"provider_model_id": gpt5, "usage": {"prompt_tokens": 2000}},
    ]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    result = billing("quote", "--batch", stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == len(lines)
    assert out[0]["breakdown"]["total_cost"] == "0.00225"  # 1,000 × $1.25/M + 100 × $10/M
    assert out[1]["line"] == 2 and "not valid JSON" in out[1]["error"]
    assert out[2]["field"] == "usage.completion_tokens"
    assert out[3]["model"] == "who/knows" and "suggestions" in out[3]
    assert out[4]["breakdown"]["total_cost"] == "2"
    assert "in effect at 2020" in out[5]["error"]
    assert out[6] == {"error": "line is empty", "line": 7}
    assert out[7]["line"] == 8 and "not valid JSON" in out[7]["error"]
    assert out[8]["field"] == "usage.cost"
    assert out[9]["breakdown"]["total_cost"] == "0.0025"
    assert "7 line(s) had errors" in result.stderr


def test_prices_sync_from_files_of_both_shapes_list_and_show() -> None:
    first = billing("prices", "sync", "--file", str(OWN_FIXTURES / "catalogue_2025_shape.json"))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["new_versions"] == 2
    assert "skipped openrouter/auto" in first.stderr
    second = billing("prices", "sync", "--file", str(OWN_FIXTURES / "catalogue_2026_shape.json"))
    assert json.loads(second.stdout)["new_versions"] == 2  # alpha-1 changed, gamma-3 is new
    again = billing("prices", "sync", "--file", str(OWN_FIXTURES / "catalogue_2026_shape.json"))
    assert json.loads(again.stdout)["new_versions"] == 0

    listing = billing("prices", "list")
    assert listing.returncode == 0
    assert "acme/gamma-3" in listing.stdout and "openai/gpt-5" in listing.stdout

    shown = json.loads(billing("prices", "show", "acme/alpha-1-20250101").stdout)
    assert shown["model"] == "acme/alpha-1"
    assert shown["pricing"]["prompt"] == "0.0000018"
    assert [v["pricing"]["prompt"] for v in shown["history"]] == ["0.000002", "0.0000018"]
    missing = billing("prices", "show", "acme/zzz")
    assert missing.returncode == 1 and "no price" in missing.stdout


def test_prices_sync_offline_fails_clearly_and_changes_nothing() -> None:
    result = billing("prices", "sync")  # OPENROUTER_BASE_URL points where nothing listens
    assert result.returncode == 1
    assert "prices unchanged" in result.stderr


class _FakeOpenRouter(BaseHTTPRequestHandler):
    body = (OWN_FIXTURES / "catalogue_2026_shape.json").read_bytes()
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization", "")})
        if self.path != "/api/v1/models":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_openrouter() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenRouter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/api/v1"
    server.shutdown()
    server.server_close()


def test_prices_sync_from_a_live_catalogue(fake_openrouter: str) -> None:
    env = {"OPENROUTER_BASE_URL": fake_openrouter, "OPENROUTER_API_KEY": "sk-or-e2e"}
    result = billing("prices", "sync", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_versions"] == 3
    assert _FakeOpenRouter.seen[-1] == {"path": "/api/v1/models", "auth": "Bearer sk-or-e2e"}


def test_demo_runs_offline() -> None:
    result = billing("demo")
    assert result.returncode == 0, result.stderr
    assert "0.00858" in result.stdout
    assert "error" not in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> int:
    """A port N with N … N + count - 1 all free now (``billing up`` listens on N … N+3)."""
    for _ in range(100):
        base = _free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


@pytest.fixture
def gateway(fake_openrouter: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "BILLING_ADMIN_TOKEN": "e2e-admin-token",
        "BILLING_CATALOGUE_SYNC": "true",
        "OPENROUTER_BASE_URL": fake_openrouter,
    }
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen(
        [BILLING, "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        process.wait()
        log.close()
        pytest.fail(f"gateway did not start: {(tmp_path / 'gateway.log').read_text()}")
    yield url
    process.terminate()
    process.wait(timeout=15)
    log.close()


def test_gateway_serves_quotes_over_http_and_refreshes_prices(gateway: str) -> None:
    auth = {"Authorization": "Bearer e2e-admin-token"}
    payload = {
        "provider_model_id": "anthropic/claude-sonnet-4.5",
        "usage": json.loads(SONNET_USAGE),
    }
    assert httpx.post(f"{gateway}/internal/billing/quote", json=payload).status_code == 401
    response = httpx.post(f"{gateway}/internal/billing/quote", json=payload, headers=auth)
    assert response.status_code == 200
    assert response.json()["breakdown"]["total_cost"] == "0.00858"
    # The background refresh pulled the live catalogue in: a model only it knows is priced.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        answer = httpx.post(
            f"{gateway}/internal/billing/quote",
            json={"provider_model_id": "acme/gamma-3"},
            headers=auth,
        )
        if answer.status_code == 200:
            break
        time.sleep(0.1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["price_source"] == "openrouter"


def test_prices_override_wins_over_the_catalogue_from_its_time(tmp_path: Path) -> None:
    pricing = tmp_path / "deal.json"
    pricing.write_text('{"prompt": "0.000001", "completion": "0.000005"}')
    result = billing(
        "prices", "override", "openai/gpt-5", "--pricing-file", str(pricing),
        "--effective-from", "2026-02-01T00:00:00Z", "--reason", "negotiated 20% off",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layer"] == "override"
    usage = '{"prompt_tokens": 1000, "completion_tokens": 100}'
    before = billing(
        "quote", "-m", "openai/gpt-5", "--usage-json", usage, "--at", "2026-01-15T00:00:00Z"
    )
    after = billing(
        "quote", "-m", "openai/gpt-5", "--usage-json", usage, "--at", "2026-02-15T00:00:00Z"
    )
    assert json.loads(before.stdout)["breakdown"]["total_cost"] == "0.00225"
    assert json.loads(after.stdout)["breakdown"]["total_cost"] == "0.0015"
    assert json.loads(after.stdout)["price_source"] == "override"
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "0.000001"}')
    refused = billing(
        "prices", "override", "openai/gpt-5", "--pricing-file", str(bad),
        "--effective-from", "2026-02-01T00:00:00Z", "--reason", "typo",
    )  # fmt: skip
    assert refused.returncode == 1 and "pricing.completion" in refused.stdout


@contextmanager
def fake_upstream(*args: str) -> Iterator[tuple[str, list[str]]]:
    """Run `billing fake-upstream` on a free port; yield its base URL and the lines it printed
    before serving."""
    process = subprocess.Popen(
        [BILLING, "fake-upstream", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        printed = [process.stdout.readline() for _ in range(3)]
        assert printed[0].startswith("fake upstream at http://127.0.0.1:"), printed
        yield printed[0].split()[3].rstrip(";"), printed
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_fake_upstream_prints_its_url_and_serves_on_loopback() -> None:
    with fake_upstream("--completion-tokens", "7") as (base, printed):
        assert f"export OPENROUTER_BASE_URL={base}/api/v1" in printed[1]
        assert f"export VERTEX_BASE_URL={base}" in printed[2]
        body = {"model": "openai/gpt-5", "messages": [{"role": "user", "content": "hi"}]}
        # Listening before the URL is printed: the first request needs no retry.
        response = httpx.post(f"{base}/api/v1/chat/completions", json=body, timeout=5)
        assert response.json()["usage"]["completion_tokens"] == 7
        models = httpx.get(f"{base}/api/v1/models", timeout=5).json()["data"]
        assert "openai/gpt-5" in {m["id"] for m in models}


def test_fake_upstream_names_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = billing("fake-upstream", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr


def test_version_comes_from_the_installed_distribution() -> None:
    result = billing("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"billing, version {version('llm-billing')}"


PRICE_SET = (
    "prices", "set", "openai/gpt-5", "--prompt", "9", "--completion", "9", "--per-million",
    "--effective-from", "2026-01-01T00:00:00Z", "--reason", "data-dir test",
)  # fmt: skip


def _price_book(data_dir: Path) -> str:
    """The data dir's price-book file ("" when there is none)."""
    path = data_dir / "prices.jsonl"
    return path.read_text() if path.exists() else ""


def test_data_dir_is_taken_by_the_group_the_command_and_the_environment(tmp_path: Path) -> None:
    on_command, on_group, from_env = tmp_path / "cmd", tmp_path / "group", tmp_path / "env"
    assert billing(*PRICE_SET, "--data-dir", str(on_command)).returncode == 0
    assert billing("--data-dir", str(on_group), *PRICE_SET).returncode == 0
    assert billing(*PRICE_SET, env={"BILLING_DATA_DIR": str(from_env)}).returncode == 0
    for data_dir in (on_command, on_group, from_env):
        assert '"prompt":"0.000009"' in _price_book(data_dir), data_dir
    # The command's own --data-dir wins over the group's and the environment's.
    loser, winner = tmp_path / "loser", tmp_path / "winner"
    result = billing(
        "--data-dir", str(loser), *PRICE_SET, "--data-dir", str(winner),
        env={"BILLING_DATA_DIR": str(loser)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"prompt":"0.000009"' in _price_book(winner) and not loser.exists()
    quoted = billing("quote", "-m", "openai/gpt-5", "--data-dir", str(winner))
    assert json.loads(quoted.stdout)["pricing"]["prompt"] == "0.000009"
    for command in (["up"], ["tenants", "create"], ["keys", "list"], ["migrate"], ["reprice"]):
        assert "--data-dir" in billing(*command, "--help").stdout, command


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _write_state(data_dir: Path, pid: int, database_url: str) -> None:
    state = StackState(
        pid=pid,
        data_dir=str(data_dir),
        database_url=database_url,
        kafka_bootstrap="127.0.0.1:9",
        gateway_url="http://127.0.0.1:9",
        topic_prefix="stack-",
    )
    write_state(data_dir, state)


def test_the_state_of_a_running_stack_completes_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BILLING_DATABASE_URL", "BILLING_KAFKA_BOOTSTRAP", "BILLING_TOPIC_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    tmp_path.mkdir(exist_ok=True)
    _write_state(tmp_path, os.getpid(), "postgresql://stack@127.0.0.1:9/billing")
    assert (tmp_path / "stack.json").stat().st_mode & 0o077 == 0  # may hold a password
    # A live pid is not enough (pids are reused after a crash): the stack holds its lock.
    assert read_state(tmp_path) is None
    lock = lock_path(tmp_path).open("w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `billing up` does
    assert read_state(tmp_path) is not None
    settings = Context(tmp_path).settings
    assert settings.database_url == "postgresql://stack@127.0.0.1:9/billing"
    assert (settings.kafka_bootstrap, settings.topic_prefix) == ("127.0.0.1:9", "stack-")
    # The environment wins, field by field.
    monkeypatch.setenv("BILLING_DATABASE_URL", "postgresql://env@127.0.0.1:9/billing")
    monkeypatch.setenv("BILLING_TOPIC_PREFIX", "")
    settings = Context(tmp_path).settings
    assert settings.database_url == "postgresql://env@127.0.0.1:9/billing"
    assert (settings.kafka_bootstrap, settings.topic_prefix) == ("127.0.0.1:9", "")
    assert Context(tmp_path).env_settings.kafka_bootstrap is None  # what `billing up` uses
    lock.close()
    assert read_state(tmp_path) is None  # the stack is gone


def test_a_stale_state_file_is_ignored(tmp_path: Path) -> None:
    data_dir = tmp_path / "stale"
    data_dir.mkdir()
    _write_state(data_dir, _dead_pid(), "postgresql://stale@127.0.0.1:9/billing")
    assert read_state(data_dir) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    result = subprocess.run(
        [BILLING, "tenants", "create", "acme", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert "set BILLING_DATABASE_URL, or start `billing up`" in result.stderr
    # ... and prices go to the file book, as with no stack at all, saying that the stack's
    # database (left in the data dir by an earlier `billing up`) will not read them.
    (data_dir / "postgres").mkdir()
    priced = billing(*PRICE_SET, "--data-dir", str(data_dir))
    assert priced.returncode == 0, priced.stderr
    assert '"prompt":"0.000009"' in _price_book(data_dir)
    assert "no `billing up` is running" in priced.stderr
    assert "the stack's database does not read" in priced.stderr
