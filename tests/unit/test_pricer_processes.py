"""``BILLING_PRICER_PROCESSES``: ``billing up`` runs that many pricers, each with its own
log and metrics port, and checks every port before starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.adapters.settings import Settings
from services.local.supervisor import Stack


def stack(tmp_path: Path, processes: int) -> Stack:
    settings = Settings(data_dir=tmp_path, pricer_processes=processes)
    return Stack(settings, 9000, lambda _: None)


def test_one_pricer_by_default(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).pricer_processes == 1
    pricers = stack(tmp_path, 1).pricers()
    assert [(p.name, p.log.name, p.env) for p in pricers] == [
        ("pricer", "pricer.log", {"BILLING_METRICS_PORT": "9001"})
    ]


def test_three_pricers_get_their_own_logs_and_metrics_ports(tmp_path: Path) -> None:
    running = stack(tmp_path, 3)
    pricers = running.pricers()
    assert [p.name for p in pricers] == ["pricer", "pricer-2", "pricer-3"]
    assert [p.log.name for p in pricers] == ["pricer.log", "pricer-2.log", "pricer-3.log"]
    assert all(p.args == ["pricer", "--log-level", "warning"] for p in pricers)
    ports = [int(p.env["BILLING_METRICS_PORT"]) for p in pricers]
    assert ports == [9001, 9003, 9004]
    listened = [port for _, _, port in running.listeners()]
    # every one checked, no clash; the quota service after the last pricer
    assert sorted(listened) == [9000, 9001, 9002, 9003, 9004, 9005]
    assert running.quota_metrics_port == 9005


def test_the_setting_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BILLING_PRICER_PROCESSES", "2")
    assert Settings(data_dir=tmp_path).pricer_processes == 2
    monkeypatch.setenv("BILLING_PRICER_PROCESSES", "0")
    with pytest.raises(ValueError, match="pricer_processes"):
        Settings(data_dir=tmp_path)
