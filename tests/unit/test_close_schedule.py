"""``billing up`` closes the latest month over for ``BILLING_CLOSE_GRACE``, hourly, as a child
running ``billing invoices close``; ``off`` never does."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.adapters.settings import Settings
from services.local import supervisor
from services.local.supervisor import Stack


class Started:
    pid = None  # a fake: nothing to record in pids/

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, args: list[str], **_: Any) -> Started:
        self.commands.append(args)
        return self

    def poll(self) -> int:
        return 0  # finished at once


def test_the_month_over_for_the_grace_is_closed_once_an_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = Started()
    monkeypatch.setattr(supervisor.subprocess, "Popen", started)
    clock = [1000.0]
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: clock[0])
    stack = Stack(Settings(data_dir=tmp_path, close_grace="72h"), 9000, lambda _: None)
    stack.logs.mkdir(parents=True)

    stack.close_due_month(datetime(2026, 12, 3, 23, 0, tzinfo=UTC))  # November not yet
    stack.close_due_month(datetime(2026, 12, 3, 23, 30, tzinfo=UTC))  # within the hour: no
    clock[0] += supervisor.CLOSE_EVERY_SECONDS
    stack.close_due_month(datetime(2026, 12, 4, 0, 30, tzinfo=UTC))
    months = [args[args.index("--month") + 1] for args in started.commands]
    assert months == ["2026-10", "2026-11"]
    assert all(args[-4:-2] == ["invoices", "close"] for args in started.commands)


def test_off_never_closes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = Started()
    monkeypatch.setattr(supervisor.subprocess, "Popen", started)
    stack = Stack(Settings(data_dir=tmp_path, close_grace="off"), 9000, lambda _: None)
    stack.close_due_month(datetime(2027, 6, 1, tzinfo=UTC))
    assert started.commands == []
