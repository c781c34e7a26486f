"""An issued invoice's document (``core.invoices.Invoice.document()``) as HTML or PDF (#12).

Both are rendered from the stored JSON document only, so they show what was issued. Money is
shown exactly as the document's decimal strings, never through a float.

- **HTML**: one self-contained page (inline CSS; no external assets, no JavaScript), from a
  Jinja2 template kept in this module, autoescaped: tenant ids, model ids and descriptions
  are data, never markup.
- **PDF**: a text PDF (selectable, searchable) drawn with fpdf2 in the core font Helvetica,
  which only has latin-1: any other character is replaced by a fallback (``→`` becomes
  ``->``, ``…`` becomes ``...``, anything else without one ``?``). The PDF's creation date is
  the invoice's issue time, so the same document always renders to the same bytes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import jinja2
from fpdf import FPDF
from fpdf.enums import Align, TableBordersLayout, XPos, YPos

TOKEN_LABELS = (
    ("uncached_input_tokens", "input"),
    ("cache_read_tokens", "cache read"),
    ("cache_write_tokens", "cache write"),
    ("completion_tokens", "output"),
    ("reasoning_tokens", "reasoning"),
)
"""The token counts of a usage line, in the order shown, with their labels."""

TOTALS = (
    ("subtotal", "Subtotal"),
    ("credits_applied", "Prepaid credits applied"),
)


# -- what both formats show ---------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _issued(document: Mapping[str, Any]) -> datetime | None:
    try:
        issued = datetime.fromisoformat(str(document.get("issued_at", "")))
    except ValueError:
        return None
    return issued if issued.tzinfo else issued.replace(tzinfo=UTC)


def _issued_text(document: Mapping[str, Any]) -> str:
    issued = _issued(document)
    if issued is None:
        return _text(document.get("issued_at"))
    return f"{issued.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _count(value: Any) -> str:
    """A token or request count with thousands separators (as given if not an integer)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _text(value)


def _tokens(line: Mapping[str, Any]) -> list[str]:
    """``["input 1,200", "output 300"]``: the line's non-zero token counts."""
    return [
        f"{label} {_count(line[key])}"
        for key, label in TOKEN_LABELS
        if line.get(key) not in (None, 0)
    ]


def _rows(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    lines: Sequence[Mapping[str, Any]] = document.get("lines") or ()
    return [
        {
            "kind": _text(line.get("kind")),
            "description": _text(line.get("description")),
            "period": _text(line.get("period")),
            "requests": _count(line["requests"]) if "requests" in line else "",
            "tokens": _tokens(line),
            "amount": _text(line.get("amount")),
        }
        for line in lines
    ]


def _context(document: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "number": _text(document.get("number")),
        "tenant_id": _text(document.get("tenant_id")),
        "period": _text(document.get("period")),
        "issued": _issued_text(document),
        "currency": _text(document.get("currency") or "USD"),
        "rows": _rows(document),
        "totals": [(label, _text(document.get(key))) for key, label in TOTALS],
        "amount_due": _text(document.get("amount_due")),
        "rounding": _text(document.get("rounding")),
    }


# -- HTML ---------------------------------------------------------------------------------------

TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Invoice {{ number }}</title>
<style>
  @page { size: A4; margin: 15mm; }
  * { box-sizing: border-box; }
  body {
    font-family: "Helvetica Neue", Helvetica, Arial, sans-serif;
    font-size: 10.5pt; line-height: 1.4; color: #111; background: #fff;
    max-width: 190mm; margin: 0 auto; padding: 12mm 10mm;
  }
  h1 { font-size: 20pt; margin: 0 0 4mm; letter-spacing: 0.02em; }
  dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 1mm 6mm; margin: 0 0 8mm; }
  dl.meta dt { color: #555; }
  dl.meta dd { margin: 0; font-weight: 600; word-break: break-all; }
  table { width: 100%; border-collapse: collapse; }
  th, td { padding: 1.6mm 2mm; vertical-align: top; text-align: left; }
  thead th {
    border-bottom: 1.5px solid #111; font-size: 9pt; color: #333;
    text-transform: uppercase; letter-spacing: 0.04em;
  }
  tbody td { border-bottom: 1px solid #ddd; }
  td.description { word-break: break-word; }
  td.tokens { font-size: 9pt; color: #333; }
  td.tokens span { display: block; white-space: nowrap; }
  .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  tr.credits td, tr.rounding td { color: #444; font-style: italic; }
  table.totals { width: auto; margin: 6mm 0 0 auto; }
  table.totals th { text-align: left; font-weight: normal; padding-right: 8mm; }
  table.totals tr.due th, table.totals tr.due td {
    font-weight: bold; font-size: 12pt; border-top: 1.5px solid #111;
  }
  p.rounding { margin-top: 10mm; font-size: 8pt; color: #555; }
  @media print { body { padding: 0; max-width: none; } }
</style>
</head>
<body>
<h1>Invoice</h1>
<dl class="meta">
  <dt>Invoice number</dt><dd>{{ number }}</dd>
  <dt>Tenant</dt><dd>{{ tenant_id }}</dd>
  <dt>Period</dt><dd>{{ period }}</dd>
  <dt>Issued</dt><dd>{{ issued }}</dd>
  <dt>Currency</dt><dd>{{ currency }}</dd>
</dl>
<table class="lines">
  <thead>
    <tr>
      <th>Description</th><th>Period</th><th class="num">Requests</th><th>Tokens</th>
      <th class="num">Amount ({{ currency }})</th>
    </tr>
  </thead>
  <tbody>
  {%- for row in rows %}
    <tr class="{{ row.kind }}">
      <td class="description">{{ row.description }}</td>
      <td>{{ row.period }}</td>
      <td class="num">{{ row.requests }}</td>
      <td class="tokens">{% for t in row.tokens %}<span>{{ t }}</span>{% endfor %}</td>
      <td class="num">{{ row.amount }}</td>
    </tr>
  {%- endfor %}
  </tbody>
</table>
<table class="totals">
  {%- for label, amount in totals %}
  <tr><th>{{ label }}</th><td class="num">{{ amount }}</td></tr>
  {%- endfor %}
  <tr class="due">
    <th>Amount due ({{ currency }})</th><td class="num"><b>{{ amount_due }}</b></td>
  </tr>
</table>
<p class="rounding">Rounding: {{ rounding }}.</p>
</body>
</html>
"""

_ENVIRONMENT = jinja2.Environment(
    autoescape=True,  # every value is data: a tenant or model id never becomes markup
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_TEMPLATE = _ENVIRONMENT.from_string(TEMPLATE)


def render_html(document: Mapping[str, Any]) -> str:
    """The invoice ``document`` as one self-contained, printable HTML page."""
    return _TEMPLATE.render(_context(document))


# -- PDF ----------------------------------------------------------------------------------------

FALLBACKS = {
    "→": "->",
    "←": "<-",
    "↔": "<->",
    "⇒": "=>",
    "…": "...",
    "–": "-",
    "—": "-",
    "‐": "-",
    "‑": "-",
    "−": "-",
    "‘": "'",
    "’": "'",
    "‚": ",",
    "“": '"',
    "”": '"',
    "„": '"',
    "•": "*",
    "€": "EUR",
    "≤": "<=",
    "≥": ">=",
    "≠": "!=",
    "≈": "~",
    "™": "(TM)",
    "\u00a0": " ",
    "\u2009": " ",
    "\u202f": " ",
}
"""Stand-ins for characters the core fonts lack (they only have latin-1)."""


def latin1(text: str) -> str:
    """``text`` with every character Helvetica cannot show replaced by a stand-in."""
    out = []
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F or 0xA0 <= code <= 0xFF or char == "\n":
            out.append(char)
        elif char in FALLBACKS:
            out.append(FALLBACKS[char])
        elif unicodedata.category(char).startswith("C") or char.isspace():
            out.append(" ")  # control and format characters, other spaces
        else:
            decomposed = unicodedata.normalize("NFKD", char)
            kept = "".join(c for c in decomposed if ord(c) <= 0xFF and not unicodedata.combining(c))
            out.append(kept if kept.isprintable() and kept else "?")
    return "".join(out)


PAGE_MARGIN = 15.0  # mm, on A4: 180 mm of text width
COLUMNS = (
    ("Description", 60.0, Align.L),
    ("Period", 18.0, Align.L),
    ("Requests", 20.0, Align.R),
    ("Tokens", 44.0, Align.L),
    ("Amount", 38.0, Align.R),
)


PAGES = "\x01pages\x01"
"""Where the page count goes (fpdf2 replaces it in the whole page text at the end): control
characters, which ``latin1`` turns into spaces in every text shown, so no tenant or model
name can contain it (fpdf2's default, ``{nb}``, could be part of one)."""


class _InvoicePDF(FPDF):
    def __init__(self, number: str) -> None:
        super().__init__(orientation="portrait", unit="mm", format="A4")
        self._number = number
        self.alias_nb_pages(PAGES)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font("Helvetica", size=8)
        self.set_text_color(110)
        self.cell(0, 5, f"{self._number}  -  page {self.page_no()}/{PAGES}", align=Align.C)


def render_pdf(document: Mapping[str, Any]) -> bytes:
    """The invoice ``document`` as a text PDF (A4, Helvetica); the same document always
    gives the same bytes."""
    c = _context(document)
    pdf = _InvoicePDF(latin1(c["number"]))
    pdf.set_margins(PAGE_MARGIN, PAGE_MARGIN, PAGE_MARGIN)
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.set_title(latin1(f"Invoice {c['number']}"))
    pdf.set_author("llm-billing")
    pdf.set_creator("llm-billing")
    issued = _issued(document)
    pdf.set_creation_date(issued or datetime(1970, 1, 1, tzinfo=UTC))
    pdf.add_page()

    pdf.set_font("Helvetica", style="B", size=20)
    pdf.cell(0, 10, "Invoice", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    for label, value in (
        ("Invoice number", c["number"]),
        ("Tenant", c["tenant_id"]),
        ("Period", c["period"]),
        ("Issued", c["issued"]),
        ("Currency", c["currency"]),
    ):
        pdf.set_font("Helvetica", size=10)
        pdf.set_text_color(85)
        pdf.cell(35, 6, label)
        pdf.set_font("Helvetica", style="B", size=10)
        pdf.set_text_color(0)
        pdf.multi_cell(0, 6, latin1(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(6)

    pdf.set_font("Helvetica", size=9)
    headings = [name for name, _, _ in COLUMNS]
    headings[-1] = f"Amount ({c['currency']})"
    with pdf.table(
        col_widths=tuple(width for _, width, _ in COLUMNS),
        text_align=tuple(align for _, _, align in COLUMNS),
        borders_layout=TableBordersLayout.HORIZONTAL_LINES,
        line_height=4.6,
        padding=1.2,
        first_row_as_headings=True,
        repeat_headings=1,
    ) as table:
        header = table.row()
        for heading in headings:
            header.cell(latin1(heading))
        for r in c["rows"]:
            row = table.row()
            row.cell(latin1(r["description"]))
            row.cell(latin1(r["period"]))
            row.cell(latin1(r["requests"]))
            row.cell(latin1("\n".join(r["tokens"])))
            row.cell(latin1(r["amount"]))

    pdf.ln(6)
    label_width, amount_width = 60.0, 45.0
    left = pdf.w - PAGE_MARGIN - label_width - amount_width
    for label, amount in c["totals"]:
        pdf.set_x(left)
        pdf.set_font("Helvetica", size=10)
        pdf.cell(label_width, 6, label)
        pdf.cell(
            amount_width, 6, latin1(amount), align=Align.R, new_x=XPos.LMARGIN, new_y=YPos.NEXT
        )
    pdf.set_x(left)
    pdf.set_font("Helvetica", style="B", size=12)
    pdf.cell(label_width, 8, latin1(f"Amount due ({c['currency']})"), border="T", new_x=XPos.RIGHT)
    pdf.cell(
        amount_width,
        8,
        latin1(c["amount_due"]),
        border="T",
        align=Align.R,
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )

    pdf.ln(10)
    pdf.set_font("Helvetica", size=7.5)
    pdf.set_text_color(85)
    pdf.multi_cell(0, 3.8, latin1(f"Rounding: {c['rounding']}."))
    return bytes(pdf.output())
