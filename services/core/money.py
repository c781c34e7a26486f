"""Money as ``Decimal``: parsing wire values and printing them as plain decimal strings.

Prices arrive as strings (``"0.000003"``), as ``Decimal`` (JSON parsed with
``parse_float=Decimal``) or as integers. A ``float`` is refused: by the time a price is a
float it may already be wrong, and nothing on a money path may round through binary.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

ZERO = Decimal(0)


def to_decimal(value: object) -> Decimal:
    """Convert a wire value to a finite Decimal; raise ``ValueError`` with a short reason."""
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, bool):
        raise ValueError("must be a decimal number, not a boolean")
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    elif isinstance(value, float):
        raise ValueError("must be a decimal string, not a binary float")
    else:
        raise ValueError(f"must be a decimal number, got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    return result


def fmt(amount: Decimal) -> str:
    """Render a Decimal as a plain (never scientific) decimal string without trailing zeros."""
    if not amount:
        return "0"
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
