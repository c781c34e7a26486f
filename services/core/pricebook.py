"""The price book: every price a model has had, as effective-dated versions.

A price is never overwritten. Each change is a new :class:`PriceVersion` with a book-wide,
increasing ``version`` number and an ``effective_from`` time; a lookup takes (model, at) and
returns the version in effect then. Two layers exist: ``catalogue`` (OpenRouter's list, the
bundled snapshot) and ``override`` (negotiated or corrected prices), and an override in
effect always wins over the catalogue.

:class:`PriceBook` is the port; :class:`InMemoryPriceBook` is the pure adapter that the
file and database adapters build on.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, Protocol

from services.core.errors import PriceNotFound
from services.core.pricing import ModelPricing

Layer = Literal["catalogue", "override"]
LAYERS: tuple[Layer, ...] = ("override", "catalogue")  # lookup order: overrides win


@dataclass(frozen=True, slots=True, eq=False)
class PriceVersion:
    """One price of one model, in effect from ``effective_from`` (identity is ``version``)."""

    model: str
    version: int
    pricing: ModelPricing
    effective_from: datetime
    recorded_at: datetime
    layer: Layer = "catalogue"
    source: str = "catalogue"
    """Where the price came from: snapshot, openrouter, file, override, correction."""
    reason: str = ""
    pricing_json: Mapping[str, Any] = field(init=False, repr=False)
    """``pricing.to_json()``, rendered once: every quote repeats it. Read-only."""
    effective_from_iso: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pricing_json", MappingProxyType(self.pricing.to_json()))
        object.__setattr__(self, "effective_from_iso", self.effective_from.isoformat())

    def to_json(self) -> dict[str, Any]:
        """The version as the CLI and the API show it (who/why/when included)."""
        return {
            "model": self.model,
            "version": self.version,
            "layer": self.layer,
            "source": self.source,
            "effective_from": self.effective_from_iso,
            "recorded_at": self.recorded_at.isoformat(),
            "reason": self.reason,
            "pricing": dict(self.pricing_json),
        }


class PriceLookup(Protocol):
    """Anything that can answer "what did model M cost at time T"."""

    def lookup(self, model: str, at: datetime | None = None) -> PriceVersion: ...


class PriceBook(PriceLookup, Protocol):
    """The port every price-book adapter implements (in-memory, file, PostgreSQL)."""

    def record(
        self,
        model: str,
        pricing: ModelPricing,
        *,
        effective_from: datetime,
        layer: Layer = "catalogue",
        source: str = "catalogue",
        reason: str = "",
        recorded_at: datetime | None = None,
    ) -> PriceVersion | None:
        """Add a version; return ``None`` when it equals the price already in effect then."""
        ...

    def add_alias(self, alias: str, model: str) -> None:
        """Make ``alias`` resolve to ``model``."""
        ...

    def resolve(self, model: str) -> str | None:
        """The canonical id for a model id, alias or spelling variant; ``None`` if unknown."""
        ...

    def history(self, model: str) -> list[PriceVersion]:
        """Every version of a model, oldest recorded first."""
        ...

    def models(self) -> list[str]:
        """Canonical ids of every model with at least one version."""
        ...

    def reload(self) -> None:
        """Pick up versions another process stored (a no-op for books held in memory)."""
        ...

    @property
    def last_version(self) -> int:
        """The highest version number the book holds (0 when empty)."""
        ...


_DIGIT_DASH_DIGIT = re.compile(r"(?<=\d)-(?=\d)")


def prices_in_effect(book: PriceBook, at: datetime) -> Iterator[PriceVersion]:
    """The version in effect at ``at`` of every model priced then, by model id."""
    for model in book.models():
        try:
            yield book.lookup(model, at)
        except PriceNotFound:
            continue  # priced only from a later date


def spelling_key(model: str) -> str:
    """A loose key under which spellings of one model id coincide.

    ``Anthropic/claude-sonnet-4-5`` and ``anthropic/claude-sonnet-4.5`` share one. Nothing
    else is loosened: a dated id (``openai/gpt-4o-2024-05-13``) or a variant
    (``…:batch``, ``…:free``) can carry another price, so it resolves only through an
    explicit alias such as OpenRouter's ``canonical_slug``.
    """
    return _DIGIT_DASH_DIGIT.sub(".", model.strip().lower())


class InMemoryPriceBook:
    """A price book held in dictionaries; the reference adapter of the :class:`PriceBook` port."""

    def __init__(self) -> None:
        self._versions: dict[tuple[Layer, str], list[PriceVersion]] = {}
        self._history: dict[str, list[PriceVersion]] = {}
        self._aliases: dict[str, str] = {}
        self._loose: dict[str, set[str]] = {}
        self._last_version = 0

    # -- writing --------------------------------------------------------------------------

    def record(
        self,
        model: str,
        pricing: ModelPricing,
        *,
        effective_from: datetime,
        layer: Layer = "catalogue",
        source: str = "catalogue",
        reason: str = "",
        recorded_at: datetime | None = None,
    ) -> PriceVersion | None:
        return self._write(
            lambda: self._prepare(
                model,
                pricing,
                effective_from=effective_from,
                layer=layer,
                source=source,
                reason=reason,
                recorded_at=recorded_at,
            )
        )

    def _write(self, prepare: Callable[[], PriceVersion | None]) -> PriceVersion | None:
        """Make the version ``prepare`` builds (``None``: nothing changes) and index it.

        The one step a storage adapter overrides: it calls ``prepare`` under its write lock,
        after catching up with other writers, and persists the version before applying it."""
        version = prepare()
        if version is not None:
            self._apply(version)
        return version

    def _prepare(
        self,
        model: str,
        pricing: ModelPricing,
        *,
        effective_from: datetime,
        layer: Layer,
        source: str,
        reason: str,
        recorded_at: datetime | None,
    ) -> PriceVersion | None:
        """The version ``record`` would add (not yet applied), or ``None`` if unchanged."""
        _require_aware(effective_from, "effective_from")
        current = self._in_effect(layer, model, effective_from)
        if current is not None and current.pricing == pricing:
            return None
        return PriceVersion(
            model=model,
            version=self._last_version + 1,
            pricing=pricing,
            effective_from=effective_from,
            recorded_at=recorded_at or datetime.now(UTC),
            layer=layer,
            source=source,
            reason=reason,
        )

    def _apply(self, version: PriceVersion) -> None:
        """Index an existing version (used by adapters replaying their storage).

        Copy-on-write: each index entry is replaced by a new list or set, never changed in
        place, so a reader on another thread (the PostgreSQL adapter catches up on its own
        thread) sees either the old entry or the new one, never one half-changed."""
        key = (version.layer, version.model)
        versions = list(self._versions.get(key, ()))
        bisect.insort(versions, version, key=lambda v: (v.effective_from, v.version))
        self._versions[key] = versions
        self._history[version.model] = [*self._history.get(version.model, ()), version]
        loose = spelling_key(version.model)
        self._loose[loose] = self._loose.get(loose, set()) | {version.model}
        self._last_version = max(self._last_version, version.version)

    def add_alias(self, alias: str, model: str) -> None:
        if alias != model:
            self._aliases[alias] = model
            loose = spelling_key(alias)
            self._loose[loose] = self._loose.get(loose, set()) | {model}

    # -- reading --------------------------------------------------------------------------

    def resolve(self, model: str) -> str | None:
        if model in self._history:
            return model
        target = self._aliases.get(model)
        if target is not None:
            return target
        candidates = self._loose.get(spelling_key(model))
        if candidates and len(candidates) == 1:  # ambiguous spellings resolve to nothing
            return next(iter(candidates))
        return None

    def lookup(self, model: str, at: datetime | None = None) -> PriceVersion:
        canonical = self.resolve(model)
        if canonical is None:
            raise PriceNotFound(model, suggestions=self.suggest(model))
        when = at or datetime.now(UTC)
        _require_aware(when, "at")
        for layer in LAYERS:
            found = self._in_effect(layer, canonical, when)
            if found is not None:
                return found
        raise PriceNotFound(model, at=when, suggestions=[canonical])

    def _in_effect(self, layer: Layer, model: str, at: datetime) -> PriceVersion | None:
        versions = self._versions.get((layer, model))
        if not versions:
            return None
        index = bisect.bisect_right(versions, at, key=lambda v: v.effective_from)
        return versions[index - 1] if index else None

    def history(self, model: str) -> list[PriceVersion]:
        canonical = self.resolve(model)
        return list(self._history.get(canonical, [])) if canonical else []

    def models(self) -> list[str]:
        return sorted(self._history)

    def suggest(self, model: str, limit: int = 5) -> list[str]:
        """Known model ids that look like ``model`` (for "did you mean" answers)."""
        known = self.models()
        tail = model.rsplit("/", 1)[-1].lower()
        close = difflib.get_close_matches(model.lower(), known, n=limit, cutoff=0.6)
        containing = [m for m in known if tail and tail in m.lower()]
        return list(dict.fromkeys([*close, *containing]))[:limit]

    def reload(self) -> None:
        """Nothing to do: this book has no storage another process could write."""

    @property
    def last_version(self) -> int:
        return self._last_version

    def all_versions(self) -> Iterable[PriceVersion]:
        for versions in list(self._history.values()):
            yield from versions

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)


def _require_aware(value: datetime, name: str) -> None:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
