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
