"""Render the README's example invoice: one tenant's November from the tests' usage
generator, priced with the bundled price list, closed with the project's own job logic
(``core.invoices.build_invoice``), as PDF and as a PNG of its first page.

    .venv/bin/python docs/example_invoice.py        # writes docs/example-invoice.{pdf,png}

Needs ``pdftoppm`` (Debian's poppler-utils) for the PNG; the PDF needs nothing else.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.adapters.invoice_documents import render_pdf  # noqa: E402
from services.core.catalogue import apply_catalogue, default_catalogue  # noqa: E402
from services.core.invoices import TOKEN_FIELDS, Usage, build_invoice  # noqa: E402
from services.core.pricebook import InMemoryPriceBook  # noqa: E402
from services.core.rating import rate  # noqa: E402
from tests.integration.test_projector_apply import recorded  # noqa: E402


def main() -> None:
    book = InMemoryPriceBook()
    apply_catalogue(book, default_catalogue(), observed_at=datetime.now(UTC), source="snapshot")
    november = datetime(2026, 11, 1, tzinfo=UTC)
    rng = random.Random(7)
    amounts: dict[str, Decimal] = defaultdict(Decimal)
    requests: dict[str, int] = defaultdict(int)
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TOKEN_FIELDS, 0))
    for n in range(300):
        fact = recorded(n, rng).model_copy(
            update={"tenant_id": "acme", "occurred_at": november + timedelta(hours=n)}
        )
        priced = rate(fact, book, priced_at=november)
        amounts[priced.model] += priced.total_cost
        requests[priced.model] += 1
        usage = priced.usage
        counts = tokens[priced.model]
        counts["uncached_input_tokens"] += usage.uncached_input_tokens
        counts["cache_read_tokens"] += usage.cache_read_tokens
        counts["cache_write_tokens"] += usage.cache_write_tokens + usage.cache_write_1h_tokens
        counts["completion_tokens"] += usage.completion_tokens
        counts["reasoning_tokens"] += usage.reasoning_tokens
    invoice = build_invoice(
        number="INV-2026-11-000042",
        tenant_id="acme",
        period=date(2026, 11, 1),
        issued_at=datetime(2026, 12, 4, 0, 0, tzinfo=UTC),
        usage=[Usage(m, requests[m], tokens[m], amounts[m]) for m in sorted(amounts)],
        adjustments=[(date(2026, 10, 1), "openai/gpt-4o-mini", Decimal("0.003417"))],
        credits=(Decimal("10"), Decimal(0)),
    )
    out = ROOT / "docs"
    pdf = out / "example-invoice.pdf"
    pdf.write_bytes(render_pdf(invoice.document()))
    print(f"wrote {pdf}")
    if shutil.which("pdftoppm") is None:
        print("pdftoppm not found (apt-get install poppler-utils): no PNG")
        return
    subprocess.run(  # noqa: S603
        ["pdftoppm", "-png", "-r", "70", "-f", "1", "-l", "1", "-singlefile", str(pdf),
         str(out / "example-invoice")],
        check=True,
    )  # fmt: skip
    print(f"wrote {out / 'example-invoice.png'}")


if __name__ == "__main__":
    main()
