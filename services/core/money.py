"""Money as ``Decimal``: parsing wire values and printing them as plain decimal strings.

Prices arrive as strings (``"0.000003"``), as ``Decimal`` (JSON parsed with
``parse_float=Decimal``) or as integers. A ``float`` is refused: by the time a price is a
float it may already be wrong, and nothing on a money path may round through binary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

ZERO = Decimal(0)

MAX_DIGITS = 9
MAX_AMOUNT = Decimal(10) ** MAX_DIGITS
"""No price or charge on the wire is a billion dollars or more."""
MIN_EXPONENT = -30
"""Amounts are kept to 30 decimal places at most (prices are ~1e-9 per token)."""

_FINEST = Decimal(1).scaleb(MIN_EXPONENT)

EXACT = Context(prec=80, traps=[Inexact, Overflow, InvalidOperation])
"""Arithmetic on money never rounds: with amounts bounded as above and token counts below
``usage.MAX_COUNT``, every product and sum fits in 80 digits, and if one ever did not,
``Inexact`` would be raised rather than a cent silently lost."""


_PLAIN = re.compile(r"-?\d{1,9}(\.\d{0,30})?")
"""A decimal string that is surely in range: at most 9 integer digits and 30 places."""


def to_decimal(value: object) -> Decimal:
    """Convert a wire value to a finite Decimal; raise ``ValueError`` with a short reason."""
    if type(value) is str and _PLAIN.fullmatch(value):
        return Decimal(value)  # the common case on the wire, checked by its spelling alone
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
    if not result:
        return ZERO
    if result.adjusted() >= MAX_DIGITS:  # no arithmetic yet: 1E+999999 must not overflow
        raise ValueError(f"{value!r:.40} is out of range (below {MAX_AMOUNT:,})")
    try:
        result.quantize(_FINEST, context=EXACT)  # traps Inexact when digits would be lost
    except ArithmeticError:
        raise ValueError(f"{value!r:.40} has more than {-MIN_EXPONENT} decimal places") from None
    return result


def fmt(amount: Decimal) -> str:
    """Render a Decimal as a plain (never scientific) decimal string without trailing zeros."""
    if not amount:
        return "0"
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# -- exact arithmetic ---------------------------------------------------------------------------
# Python's default context rounds to 28 significant digits, and amounts here carry up to 30
# decimal places: ``Decimal("1.000000000000000000000000000007") - 0`` is already rounded.
# Every sum, difference and product of money goes through these, so no call site can forget
# the exact context (each traps ``Inexact`` instead of rounding).


def total(amounts: Iterable[Decimal | int]) -> Decimal:
    """The exact sum of ``amounts`` (0 for none)."""
    result = ZERO
    for amount in amounts:
        result = EXACT.add(result, amount)
    return result


def difference(minuend: Decimal | int, subtrahend: Decimal | int) -> Decimal:
    """``minuend − subtrahend``, exactly."""
    return EXACT.subtract(minuend, subtrahend)


def product(amount: Decimal | int, factor: Decimal | int) -> Decimal:
    """``amount × factor``, exactly (a price times a token count)."""
    return EXACT.multiply(amount, factor)
