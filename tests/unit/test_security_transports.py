"""Production transports: Kafka TLS/SASL and PostgreSQL TLS reach every client from the
settings (the environment, as every service process reads them)."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from services.adapters.database import database_connect_options
from services.adapters.errors import ConfigError
from services.adapters.kafka import kafka_client_options, make_admin, make_consumer, make_producer
from services.adapters.settings import Settings
from services.pricer.app import broker_credentials, faust_settings

PASSWORD = "kafka-pa55word-for-tests"


def sasl(monkeypatch: pytest.MonkeyPatch, protocol: str = "SASL_PLAINTEXT") -> None:
    monkeypatch.setenv("BILLING_KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("BILLING_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("BILLING_KAFKA_SASL_USERNAME", "billing")
    monkeypatch.setenv("BILLING_KAFKA_SASL_PASSWORD", PASSWORD)


def test_plaintext_is_the_default() -> None:
    assert kafka_client_options() == {"security_protocol": "PLAINTEXT"}
    assert broker_credentials(kafka_client_options()) is None
    assert database_connect_options() == {}


async def test_sasl_settings_reach_every_kafka_client(monkeypatch: pytest.MonkeyPatch) -> None:
    sasl(monkeypatch)
    clients = [
        make_producer("127.0.0.1:9"),
        make_consumer("127.0.0.1:9", "topic", group_id="g"),
        make_admin("127.0.0.1:9"),
    ]
    try:
        for client in clients:
            kafka_client = getattr(client, "_client", None) or client.client  # admin / others
            assert kafka_client._security_protocol == "SASL_PLAINTEXT"
            assert kafka_client._sasl_mechanism == "SCRAM-SHA-512"
            assert kafka_client._sasl_plain_username == "billing"
            assert kafka_client._sasl_plain_password == PASSWORD
    finally:
        await clients[0].stop()
        await clients[1].stop()
        await clients[2].close()


async def test_explicit_settings_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    sasl(monkeypatch)
    plain = Settings(kafka_security_protocol="PLAINTEXT")
    producer = make_producer("127.0.0.1:9", **kafka_client_options(plain))
    await producer.stop()
    assert producer.client._security_protocol == "PLAINTEXT"


async def test_tls_verifies_the_broker_against_the_configured_ca(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = Path(ssl.get_default_verify_paths().cafile or "")
    if not ca.is_file():
        pytest.skip("no system CA bundle to stand in for a broker's CA")
    sasl(monkeypatch, "SASL_SSL")
    monkeypatch.setenv("BILLING_KAFKA_SSL_CAFILE", str(ca))
    options = kafka_client_options()
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    producer = make_producer("127.0.0.1:9")
    await producer.stop()
    producer_context = producer.client._ssl_context
    assert isinstance(producer_context, ssl.SSLContext) and producer_context.check_hostname
    credentials = broker_credentials(options)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.ssl_context is context
    assert credentials.mechanism.value == "SCRAM-SHA-512"

    monkeypatch.setenv("BILLING_KAFKA_SECURITY_PROTOCOL", "SSL")
    tls_only = broker_credentials(kafka_client_options())
    assert isinstance(tls_only, faust.SSLCredentials) and tls_only.protocol.value == "SSL"


def test_sasl_without_credentials_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BILLING_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="BILLING_KAFKA_SASL_USERNAME"):
        kafka_client_options()


def test_the_faust_app_carries_the_broker_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sasl(monkeypatch)
    app = faust.App("security-test", **faust_settings("127.0.0.1:9", tmp_path))
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "billing" and credentials.password == PASSWORD
    assert credentials.protocol.value == "SASL_PLAINTEXT"
    assert PASSWORD not in repr(credentials)
    # What faust's aiokafka driver would hand its clients:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SASL_PLAINTEXT"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["sasl_plain_username"] == "billing"


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require"])
def test_database_sslmodes_pass_through(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("BILLING_DATABASE_SSLMODE", mode)
    assert database_connect_options() == {"ssl": mode}


@pytest.mark.parametrize(("mode", "hostname"), [("verify-ca", False), ("verify-full", True)])
def test_database_verification_uses_the_root_certificate(
    monkeypatch: pytest.MonkeyPatch, mode: str, hostname: bool
) -> None:
    ca = Path(ssl.get_default_verify_paths().cafile or "")
    if not ca.is_file():
        pytest.skip("no system CA bundle to stand in for the database's CA")
    monkeypatch.setenv("BILLING_DATABASE_SSLMODE", mode)
    monkeypatch.setenv("BILLING_DATABASE_SSLROOTCERT", str(ca))
    context = database_connect_options()["ssl"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is hostname
    assert context.get_ca_certs()  # the bundle was loaded
