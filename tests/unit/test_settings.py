"""Settings: local defaults, and placeholder secrets refused outside development."""

from __future__ import annotations

import pytest

from services.adapters.errors import ConfigError
from services.adapters.settings import Settings


def test_defaults_work_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENROUTER_BASE_URL")
    settings = Settings()
    assert settings.env == "development"
    assert settings.catalogue_ttl_seconds == 900
    assert settings.openrouter_base_url.endswith("/api/v1")
    assert settings.admin_token is None


def test_openrouter_variables_are_read_without_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test")
    settings = Settings()
    assert settings.openrouter_api_key is not None
    assert settings.openrouter_api_key.get_secret_value() == "sk-or-test"
    assert "sk-or-test" not in repr(settings)


@pytest.mark.parametrize("token", [None, "changeme", "  Secret "])
def test_production_refuses_missing_or_placeholder_admin_token(
    monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    monkeypatch.setenv("BILLING_ENV", "production")
    if token is not None:
        monkeypatch.setenv("BILLING_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError):
        Settings()


def test_production_accepts_a_real_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_ENV", "production")
    monkeypatch.setenv("BILLING_ADMIN_TOKEN", "f3c9a1b27e")
    assert Settings().env == "production"


def test_the_public_url_is_an_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PUBLIC_URL", "https://billing.example.com/")
    assert Settings().public_url == "https://billing.example.com"
    monkeypatch.setenv("BILLING_PUBLIC_URL", "HTTPS://Billing.Example.com:443")
    assert Settings().public_url == "https://billing.example.com"  # as browsers send Origin
    monkeypatch.setenv("BILLING_PUBLIC_URL", "http://gw:8080")
    assert Settings().public_url == "http://gw:8080"
    for wrong in (
        "billing.example.com",
        "ftp://x",
        "https://x/dashboard",
        "https://x/?a=1",
        "https://u:p@x",
    ):
        monkeypatch.setenv("BILLING_PUBLIC_URL", wrong)
        with pytest.raises(ValueError, match="BILLING_PUBLIC_URL|public_url"):
            Settings()


def test_a_production_gateway_needs_a_session_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from services.cli.main import main

    monkeypatch.setenv("BILLING_ENV", "production")
    monkeypatch.setenv("BILLING_ADMIN_TOKEN", "f3c9a1b27e")
    monkeypatch.delenv("BILLING_SESSION_SECRET", raising=False)
    result = CliRunner().invoke(main, ["gateway", "--port", "1"])
    assert result.exit_code == 1
    assert "BILLING_SESSION_SECRET must be set in production" in result.output


def test_the_finance_token_differs_from_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_ADMIN_TOKEN", "f3c9a1b27e")
    monkeypatch.setenv("BILLING_FINANCE_TOKEN", "f3c9a1b27e")
    with pytest.raises(ConfigError, match="must differ"):
        Settings()
    monkeypatch.setenv("BILLING_FINANCE_TOKEN", " ")
    assert Settings().finance_token is None  # blank: unset, never a match for no token
    monkeypatch.delenv("BILLING_ADMIN_TOKEN")
    monkeypatch.setenv("BILLING_FINANCE_TOKEN", "a-finance-token")
    with pytest.raises(ConfigError, match="needs BILLING_ADMIN_TOKEN"):
        Settings()  # /internal would be open: the finance token would limit nothing
    monkeypatch.setenv("BILLING_ADMIN_TOKEN", "f3c9a1b27e")
    monkeypatch.setenv("BILLING_ENV", "production")
    monkeypatch.setenv("BILLING_FINANCE_TOKEN", "changeme")
    with pytest.raises(ConfigError, match="real secret"):
        Settings()


def test_a_bad_setting_is_named_without_a_traceback_and_secrets_are_not_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from services.cli.main import main

    monkeypatch.setenv("BILLING_MAX_HEAD_BYTES", "10")
    monkeypatch.setenv("BILLING_KAFKA_FETCH_MAX_WAIT_MS", "abc")
    result = CliRunner().invoke(main, ["gateway", "--port", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "BILLING_MAX_HEAD_BYTES='10': Input should be greater than or equal to 1024" in (
        result.output
    )
    assert "BILLING_KAFKA_FETCH_MAX_WAIT_MS='abc'" in result.output
    monkeypatch.delenv("BILLING_MAX_HEAD_BYTES")
    monkeypatch.delenv("BILLING_KAFKA_FETCH_MAX_WAIT_MS")
    # A secret's value is never repeated, even when it is what is wrong.
    monkeypatch.setenv("BILLING_SESSION_HOURS", "-1")
    monkeypatch.setenv("BILLING_SESSION_SECRET", "hunter2")  # too short
    result = CliRunner().invoke(main, ["gateway", "--port", "1"])
    assert "BILLING_SESSION_HOURS='-1'" in result.output, result.output
    assert "BILLING_SESSION_SECRET: not a valid value (value_error)" in result.output
    assert "hunter2" not in result.output
