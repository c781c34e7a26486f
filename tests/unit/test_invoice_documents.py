"""adapters.invoice_documents: an issued invoice as an HTML page and a text PDF (#12)."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pypdf import PdfReader

import services.cli.invoices as cli_invoices
from services.adapters.invoice_documents import latin1, render_html, render_pdf
from services.cli.main import main
from services.core.invoices import Usage, build_invoice

D = Decimal
NOV = date(2026, 11, 1)
TOKENS = {
    "uncached_input_tokens": 120_000,
    "cache_read_tokens": 30_000,
    "cache_write_tokens": 2_000,
    "completion_tokens": 45_000,
    "reasoning_tokens": 1_200,
}


def document(tenant: str = "acme", model: str = "openai/gpt-4o") -> dict[str, Any]:
    invoice = build_invoice(
        number="INV-2026-11-000042",
        tenant_id=tenant,
        period=NOV,
        issued_at=datetime(2026, 12, 4, 0, 5, tzinfo=UTC),
        usage=[
            Usage(model, 1234, TOKENS, D("12.3456789012345")),
            Usage("anthropic/claude-sonnet-4.5", 10, {"completion_tokens": 7}, D("0.000123")),
        ],
        adjustments=[(date(2026, 10, 1), model, D("-0.5000000004"))],
        credits=(D("5"), D(0)),
    )
    doc = invoice.document()
    # The stored document is JSON text: render what reading it back gives.
    return dict(json.loads(json.dumps(doc, ensure_ascii=False)))


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def test_the_fixture_has_every_kind_of_line() -> None:
    doc = document()
    assert {line["kind"] for line in doc["lines"]} == {"usage", "adjustment", "credits", "rounding"}
    assert any(line.get("period") == "2026-10" for line in doc["lines"])


def test_html_shows_the_number_the_lines_and_the_amount_due_exactly() -> None:
    doc = document()
    page = render_html(doc)
    assert page.startswith("<!DOCTYPE html>")
    assert doc["number"] in page and "acme" in page and "2026-11" in page
    assert "2026-12-04" in page
    assert f"<b>{doc['amount_due']}</b>" in page
    assert doc["subtotal"] in page and doc["credits_applied"] in page
    for line in doc["lines"]:
        assert f'<td class="num">{line["amount"]}</td>' in page
    assert "2026-10" in page  # the adjustment names the month it belongs to
    assert "120,000" in page and "reasoning 1,200" in page
    assert doc["rounding"] in page


def test_html_is_self_contained() -> None:
    page = render_html(document()).lower()
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "http://" not in page and "https://" not in page
    assert "<style>" in page


def test_html_escapes_tenant_and_model_ids() -> None:
    page = render_html(document(tenant="<script>alert(1)</script>", model="m<script>x</script>"))
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "m&lt;script&gt;x&lt;/script&gt;" in page


def test_pdf_is_a_text_pdf_with_the_number_and_the_amount_due() -> None:
    doc = document()
    data = render_pdf(doc)
    assert data.startswith(b"%PDF-")
    text = pdf_text(data)
    assert doc["number"] in text
    assert doc["amount_due"] in text
    assert doc["subtotal"] in text
    for line in doc["lines"]:
        assert line["amount"] in text


def test_pdf_renders_the_same_document_to_the_same_bytes() -> None:
    assert render_pdf(document()) == render_pdf(document())


def test_pdf_replaces_what_the_core_font_lacks() -> None:
    doc = document(tenant="acme → ümlaut … 中文 — “q”", model="m\u200bodel\x07")
    text = pdf_text(render_pdf(doc))
    assert 'acme -> ümlaut ... ?? - "q"' in text
    assert latin1("a→b…c—d€ő中\x00") == "a->b...c-dEURo? "


# -- billing invoices show --format ---------------------------------------------------------------


@pytest.fixture
def stored(monkeypatch: pytest.MonkeyPatch) -> str:
    """``show`` reads this as the stored document (no database)."""
    text = json.dumps(document(), indent=2, ensure_ascii=False) + "\n"
    monkeypatch.setattr(cli_invoices, "with_database", lambda obj, work: text)
    return text


def show(*args: str) -> Any:
    return CliRunner().invoke(main, ["invoices", "show", "INV-2026-11-000042", *args])


def test_show_json_is_the_stored_document_byte_for_byte(stored: str, tmp_path: Path) -> None:
    assert show().stdout_bytes == stored.encode()
    out = tmp_path / "i.json"
    assert show("--format", "json", "-o", str(out)).exit_code == 0
    assert out.read_bytes() == stored.encode()


def test_show_html_and_pdf(stored: str, tmp_path: Path) -> None:
    html = show("--format", "html")
    assert html.exit_code == 0 and html.stdout == render_html(json.loads(stored))
    piped = show("--format", "pdf")  # the runner's stdout is no terminal: a pipe
    assert piped.exit_code == 0 and piped.stdout_bytes == render_pdf(json.loads(stored))
    out = tmp_path / "i.pdf"
    assert show("--format", "pdf", "-o", str(out)).exit_code == 0
    assert out.read_bytes() == piped.stdout_bytes


def test_show_pdf_refuses_a_terminal(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(cli_invoices.click, "get_binary_stream", lambda name: Terminal())
    refused = show("--format", "pdf")
    assert refused.exit_code == 2 and "-o FILE" in refused.output
