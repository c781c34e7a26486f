"""The live read-model tables beside their rebuilt copies: compared, then swapped in.

``billing rebuild`` (``services.jobs.rebuild``, whose docstring tells the whole story)
fills ``<table>_rebuild`` next to each live table; this module holds what it does with the
pair. Comparing: counts, sums and the ``EXCEPT ALL`` difference both ways on every column
that says what a row holds (``IGNORED`` leaves out when it was written, ``EMPTIABLE`` the
live aggregate rows a revision emptied), with a few differing rows shown by key. Swapping,
in the caller's transaction: inbound foreign keys dropped, the live table dropped or kept,
the rebuilt one renamed into its place with the live indexes' names, owner and grants, and
the foreign keys added back and validated. A partitioned table's partitions follow its name
(``<table>_yYYYYmMM``), and their indexes are named after the partition and the parent
index (``<partition>_pkey``, …).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from services.adapters.partitions import name_indexes, partition_names
from services.adapters.readmodels import SUMMARY_VALUES

if TYPE_CHECKING:
    import asyncpg


LIVE = ("billing_transactions", "tenant_billing_summary", "billing_spend_minutes")
SUFFIX = "_rebuild"
SUMMARY_KEY_SQL = {
    "tenant_id": "tenant_id",
    "day": "(occurred_at AT TIME ZONE 'UTC')::date",
    "model": "model",
    "api_key_id": "coalesce(api_key_id, '')",
}
"""``readmodels.summary_key`` (tenant, UTC day of occurred_at, model, api key or '') as SQL
over billing_transactions, in ``readmodels.SUMMARY_KEY``'s order."""
MINUTE_KEY_SQL = {"tenant_id": "tenant_id", "minute": "date_trunc('minute', occurred_at, 'UTC')"}
"""``readmodels.minute_key`` (tenant, UTC minute of occurred_at) as SQL over
billing_transactions."""
MINUTE_VALUES = ("requests", "total_cost")
"""What ``billing_spend_minutes`` holds at each minute key."""


class RebuildError(Exception):
    """The rebuild was refused or failed; the live tables are as they were."""


IGNORED = {
    "billing_transactions": ("projected_at",),
    "tenant_billing_summary": ("updated_at",),
    "billing_spend_minutes": (),
}
"""Columns that say when a row was written, not what it holds: left out of every comparison."""
KEYS = {
    "billing_transactions": ("request_id",),
    "tenant_billing_summary": tuple(SUMMARY_KEY_SQL),
    "billing_spend_minutes": tuple(MINUTE_KEY_SQL),
}
"""Each table's row key: the differing rows of both sides are paired and shown by it."""
EMPTIABLE = {"tenant_billing_summary": SUMMARY_VALUES, "billing_spend_minutes": MINUTE_VALUES}
"""The aggregates the projector keeps by deltas, and their values: a live row whose every
value is zero is a group a revision emptied (it moved its request to another key), so it
counts as absent."""


@dataclass(slots=True)
class TableDiff:
    """The live table against the rebuilt one (on the compared columns)."""

    table: str
    live_rows: int = 0
    rebuilt_rows: int = 0
    only_live: int = 0
    only_rebuilt: int = 0
    live_sums: dict[str, Decimal] = field(default_factory=dict)
    rebuilt_sums: dict[str, Decimal] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.only_live == 0 and self.only_rebuilt == 0

    def lines(self) -> list[str]:
        sums = "; ".join(
            f"{name} {self.live_sums[name]} / {self.rebuilt_sums[name]}" for name in self.live_sums
        )
        head = f"{self.table}: live {self.live_rows} rows / rebuilt {self.rebuilt_rows}; {sums}; "
        if self.equal:
            return [head + "equal"]
        head += (
            f"{self.only_live} live rows not in the rebuilt table, "
            f"{self.only_rebuilt} rebuilt rows not in the live one"
        )
        return [head, *(f"  {line}" for line in self.samples)]


# -- comparing ----------------------------------------------------------------------------------


async def compare(connection: asyncpg.Connection, table: str, samples: int = 10) -> TableDiff:
    """Counts, sums and the EXCEPT ALL difference both ways, with a few rows shown."""
    names = await connection.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum",
        table,
    )
    columns = ", ".join(r["attname"] for r in names if r["attname"] not in IGNORED[table])
    live = f"SELECT {columns} FROM {table}"  # noqa: S608  # catalogue names
    if table in EMPTIABLE:
        live += f" WHERE NOT ({' AND '.join(f'{c} = 0' for c in EMPTIABLE[table])})"
    rebuilt = f"SELECT {columns} FROM {table}{SUFFIX}"  # noqa: S608
    sides = {"live": (live, rebuilt), "rebuilt": (rebuilt, live)}
    diffs = {side: f"rebuild_diff_{table}_{side}" for side in sides}
    figures = {}
    for side, (first, second) in sides.items():
        await connection.execute(
            f"CREATE TEMP TABLE {diffs[side]} ON COMMIT DROP AS {first} EXCEPT ALL {second}"
        )
        figures[side] = await connection.fetchrow(
            "SELECT count(*) AS rows, coalesce(sum(total_cost), 0) AS total_cost,"  # noqa: S608
            f" coalesce(sum(requests), 0)::bigint AS requests,"
            f" (SELECT count(*) FROM {diffs[side]}) AS different FROM ({first}) s"
        )
    key, order = KEYS[table], ", ".join(KEYS[table])
    live_diff, rebuilt_diff = diffs["live"], diffs["rebuilt"]
    first_keys = (  # the same keys from both sides, so a changed row shows as one line
        f"SELECT {order} FROM {live_diff} UNION SELECT {order} FROM {rebuilt_diff}"  # noqa: S608
        f" ORDER BY {order} LIMIT {samples}"
    )
    only: dict[str, dict[tuple[Any, ...], asyncpg.Record]] = {}
    for side, diff_table in diffs.items():
        rows = await connection.fetch(
            f"SELECT * FROM {diff_table} WHERE ({order}) IN ({first_keys})"  # noqa: S608
        )
        only[side] = {tuple(r[k] for k in key): r for r in rows}
    live_figures, rebuilt_figures = figures["live"], figures["rebuilt"]
    diff = TableDiff(
        table,
        live_rows=live_figures["rows"],
        rebuilt_rows=rebuilt_figures["rows"],
        only_live=live_figures["different"],
        only_rebuilt=rebuilt_figures["different"],
        live_sums={c: live_figures[c] for c in ("total_cost", "requests")},
        rebuilt_sums={c: rebuilt_figures[c] for c in ("total_cost", "requests")},
    )
    for k in sorted({*only["live"], *only["rebuilt"]}, key=str):
        name = "(" + ", ".join(str(v) for v in k) + ")"
        old, new = only["live"].get(k), only["rebuilt"].get(k)
        if old is None:
            diff.samples.append(f"{name}: only in the rebuilt table")
        elif new is None:
            diff.samples.append(f"{name}: only in the live table")
        else:
            changed = [
                f"{c} live {_show(old[c])} rebuilt {_show(new[c])}"
                for c in old.keys()
                if old[c] != new[c]
            ]
            diff.samples.append(f"{name}: {'; '.join(changed)}")
    return diff


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


# -- swapping -----------------------------------------------------------------------------------


async def swap(connection: asyncpg.Connection, keep_old: bool, stamp: str) -> list[str]:
    """Put the rebuilt tables in the live ones' place (in the caller's transaction)."""
    kept: list[str] = []
    inbound: list[tuple[str, str, str]] = []
    for table in LIVE:
        inbound += [
            (r["source"], r["conname"], r["definition"])
            for r in await connection.fetch(
                "SELECT conrelid::regclass::text AS source, conname,"
                " pg_get_constraintdef(oid) AS definition FROM pg_constraint"
                " WHERE contype = 'f' AND confrelid = $1::regclass AND conrelid <> confrelid",
                table,
            )
        ]
    for source, name, _ in inbound:
        await connection.execute(f'ALTER TABLE {source} DROP CONSTRAINT "{name}"')
    for table in LIVE:
        outbound = await connection.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint"
            " WHERE contype = 'f' AND conrelid = $1::regclass",
            table,
        )
        names = await _index_names(connection, table, f"{table}{SUFFIX}")
        access = await _access(connection, table)
        if keep_old:
            old = _name(table, f"_before_rebuild_{stamp}")
            await _rename_partitions(connection, table, table, old)
            await connection.execute(f"ALTER TABLE {table} RENAME TO {old}")
            for live_index in names.values():
                renamed = _name(live_index, f"_before_rebuild_{stamp}")
                await connection.execute(f'ALTER INDEX "{live_index}" RENAME TO "{renamed}"')
            kept.append(old)
        else:
            await connection.execute(f"DROP TABLE {table}")
        await connection.execute(f"ALTER TABLE {table}{SUFFIX} RENAME TO {table}")
        for rebuilt_index, live_index in names.items():
            await connection.execute(f'ALTER INDEX "{rebuilt_index}" RENAME TO "{live_index}"')
        await _rename_partitions(connection, table, f"{table}{SUFFIX}", table)
        for r in outbound:
            await connection.execute(
                f'ALTER TABLE {table} ADD CONSTRAINT "{r["conname"]}" {r["definition"]}'
            )
        for statement in access:
            await connection.execute(statement)
    for source, name, definition in inbound:
        await connection.execute(
            f'ALTER TABLE {source} ADD CONSTRAINT "{name}" {definition} NOT VALID'
        )
        await connection.execute(f'ALTER TABLE {source} VALIDATE CONSTRAINT "{name}"')
    return kept


async def _rename_partitions(
    connection: asyncpg.Connection, parent: str, old_prefix: str, new_prefix: str
) -> None:
    """Rename the partitions of ``parent`` from ``old_prefix…`` to ``new_prefix…``, and their
    indexes after them (``partitions.name_indexes``)."""
    for child in await partition_names(connection, parent):
        if child.startswith(old_prefix):
            renamed = _name(new_prefix, child[len(old_prefix) :])
            await connection.execute(f'ALTER TABLE "{child}" RENAME TO "{renamed}"')
            await name_indexes(connection, renamed, parent)


async def _access(connection: asyncpg.Connection, table: str) -> list[str]:
    """The statements that give the new ``table`` the live one's owner and grants (LIKE
    copies neither; a service role reading the old table must read the new one)."""
    owner = await connection.fetchval(
        "SELECT quote_ident(pg_get_userbyid(relowner)) FROM pg_class WHERE oid = $1::regclass",
        table,
    )
    statements = []
    if owner != await connection.fetchval("SELECT quote_ident(current_user)"):
        statements.append(f"ALTER TABLE {table} OWNER TO {owner}")
    for grant in await connection.fetch(
        "SELECT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee))"
        " END AS grantee, a.privilege_type, a.is_grantable"
        " FROM pg_class c, aclexplode(c.relacl) a"
        " WHERE c.oid = $1::regclass AND a.grantee <> c.relowner ORDER BY 1, 2",
        table,
    ):
        option = " WITH GRANT OPTION" if grant["is_grantable"] else ""
        statements.append(
            f"GRANT {grant['privilege_type']} ON {table} TO {grant['grantee']}{option}"
        )
    return statements


async def name_rebuilt_indexes(connection: asyncpg.Connection, table: str) -> None:
    """Name the indexes of ``<table>_rebuild`` (made by ``LIKE … INCLUDING ALL``, whose own
    names are cut at 63 bytes) ``<table>_rebuild<what follows the live name's table>``, so
    its partitions' indexes can be named after them (``partitions.name_indexes``)."""
    rebuilt = f"{table}{SUFFIX}"
    for index, live_index in (await _index_names(connection, table, rebuilt)).items():
        name = _name(rebuilt, live_index.removeprefix(table))
        if name != index:
            await connection.execute(f'ALTER INDEX "{index}" RENAME TO "{name}"')


async def _index_names(connection: asyncpg.Connection, live: str, rebuilt: str) -> dict[str, str]:
    """rebuilt index name → the live index it copies (matched by definition)."""

    async def shapes(table: str) -> dict[str, str]:
        rows = await connection.fetch(
            "SELECT c.relname AS name, i.indisunique AS uniq,"
            " split_part(pg_get_indexdef(i.indexrelid), ' USING ', 2) AS shape"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = $1::regclass",
            table,
        )
        return {r["name"]: f"{r['uniq']} {r['shape']}" for r in rows}

    live_shapes, rebuilt_shapes = await shapes(live), await shapes(rebuilt)
    by_shape = {shape: name for name, shape in live_shapes.items()}
    if len(by_shape) != len(live_shapes) or sorted(by_shape) != sorted(rebuilt_shapes.values()):
        raise RebuildError(f"the indexes of {rebuilt} do not match those of {live}")
    return {name: by_shape[shape] for name, shape in rebuilt_shapes.items()}


def _name(base: str, suffix: str) -> str:
    """``base + suffix`` within PostgreSQL's 63-byte identifiers."""
    return base[: 63 - len(suffix)] + suffix
