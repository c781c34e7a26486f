"""``billing gateway`` runs uvicorn without its access log (a formatted line per request is
CPU on the hot path; the app logs what goes wrong itself), with one worker or several."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner

from services.cli.main import main

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_gateway_runs_without_an_access_log(
    workers: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: runs.append(options))
    environment = dict(os.environ)
    try:
        result = CliRunner().invoke(
            main,
            ["--data-dir", str(tmp_path), "gateway", "--port", "8123", "--workers", workers],
        )
    finally:  # several workers hand their settings on through the environment
        os.environ.clear()
        os.environ.update(environment)
    assert result.exit_code == 0, result.output
    assert len(runs) == 1
    assert runs[0]["access_log"] is False
    assert runs[0]["log_level"] == "info"  # errors and start-up lines are still logged
