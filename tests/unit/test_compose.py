"""docker-compose.yml cannot run here (no Docker engine): check it against the code instead."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.adapters.settings import Settings
from services.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def _billing_commands(service: dict[str, Any]) -> list[list[str]]:
    """The `billing ...` invocations a service runs (via the image's entrypoint or a shell)."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(part)[1:] for part in command[2].split("&&")]
    return [command]


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "kafka",
        "postgres",
        "init",
        "gateway",
        "pricer",
        "projector",
        "quota",
    }
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert services["postgres"]["image"].startswith("postgres:")
    for name in ("init", "gateway", "pricer", "projector", "quota"):
        assert services[name]["build"] == "."


def test_every_command_is_a_real_cli_command(compose: dict[str, Any]) -> None:
    services = compose["services"]
    seen = set()
    for name in ("init", "gateway", "pricer", "projector"):
        for args in _billing_commands(services[name]):
            command = main.commands.get(args[0])
            assert command is not None, f"{name}: billing {args[0]} does not exist"
            command.make_context(args[0], args[1:], parent=None)  # options parse
            seen.add(args[0])
    assert {"migrate", "topics", "gateway", "pricer", "projector"} <= seen


def test_environment_names_settings_that_exist(compose: dict[str, Any]) -> None:
    fields = {f"BILLING_{name.upper()}" for name in Settings.model_fields}
    fields |= {"OPENROUTER_BASE_URL", "OPENROUTER_API_KEY"}
    for name in ("init", "gateway", "pricer", "projector"):
        env = compose["services"][name]["environment"]
        assert set(env) <= fields, set(env) - fields
        assert env["BILLING_ENV"] == "production"
        assert env["BILLING_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["BILLING_DATABASE_URL"].startswith("postgresql://billing:billing@postgres:5432/")
    settings = Settings(
        env="production",
        admin_token="not-a-placeholder-7f3a",
        kafka_bootstrap=compose["services"]["gateway"]["environment"]["BILLING_KAFKA_BOOTSTRAP"],
        partitions=int(compose["services"]["gateway"]["environment"]["BILLING_PARTITIONS"]),
    )
    assert settings.partitions == 6


def test_services_wait_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("kafka", "postgres", "gateway"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("gateway", "pricer", "projector"):
        depends = services[name]["depends_on"]
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_the_image_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["billing"]' in dockerfile
    assert "COPY migrations" in dockerfile
