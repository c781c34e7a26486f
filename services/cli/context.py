"""The object every command receives: the data dir, settings and the price book.

A ``billing up`` running on the same data dir is found through its state file
(``<data-dir>/stack.json``): its database and broker are used whenever
``BILLING_DATABASE_URL`` / ``BILLING_KAFKA_BOOTSTRAP`` are not set (the environment wins).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from services.adapters.errors import ConfigError, DatabaseError, PriceBookCorrupt
from services.adapters.paths import price_book_path
from services.adapters.pricebook_file import FilePriceBook
from services.core.pricebook import PriceBook
from services.local.state import StackState, read_state

if TYPE_CHECKING:
    import asyncpg

    from services.adapters.settings import Settings

T = TypeVar("T")

# Settings (pydantic), the HTTP client and the web stack are imported by the commands that
# need them: ``billing quote --batch`` starts in a fraction of the time without them.

_UNREAD: Any = object()


class Context:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @data_dir.setter
    def data_dir(self, value: Path) -> None:
        """Set by the group's ``--data-dir`` and again by a command's own: forget what was
        read from the previous one."""
        self._data_dir = value
        self._book: PriceBook | None = None
        self._env_settings: Settings | None = None
        self._settings: Settings | None = None
        self._stack: StackState | None = _UNREAD

    @property
    def stack(self) -> StackState | None:
        """The ``billing up`` running on this data dir, if any."""
        if self._stack is _UNREAD:
            self._stack = read_state(self.data_dir)
        return self._stack

    @property
    def env_settings(self) -> Settings:
        """Settings from the environment alone (``billing up`` itself: it *is* the stack)."""
        if self._env_settings is None:
            from pydantic import ValidationError

            from services.adapters.settings import Settings

            try:
                self._env_settings = Settings(data_dir=self.data_dir)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from exc
            except ValidationError as exc:  # a value out of range, of the wrong type …
                raise click.ClickException(settings_problems(exc)) from None
        return self._env_settings

    @property
    def settings(self) -> Settings:
        """The environment's settings, completed from the running stack's state file."""
        if self._settings is None:
            settings, stack = self.env_settings, self.stack
            if stack is not None:
                given = settings.model_fields_set
                update: dict[str, object] = {
                    name: value
                    for name, value in (
                        ("database_url", stack.database_url),
                        ("kafka_bootstrap", stack.kafka_bootstrap),
                        ("topic_prefix", stack.topic_prefix),
                    )
                    if name not in given and value
                }
                if stack.broker_storage == "s3" and "kafka_fetch_max_wait_ms" not in given:
                    # Fetch as the stack's services do on its s3 log; the Kafka clients read
                    # the environment (``make_consumer``), so it goes there too.
                    from services.adapters.settings import S3_FETCH_MAX_WAIT_MS

                    update["kafka_fetch_max_wait_ms"] = S3_FETCH_MAX_WAIT_MS
                    os.environ["BILLING_KAFKA_FETCH_MAX_WAIT_MS"] = str(S3_FETCH_MAX_WAIT_MS)
                settings = settings.model_copy(update=update)
            self._settings = settings
        return self._settings

    @property
    def book(self) -> PriceBook:
        """The shared PostgreSQL price book when a database is configured or a stack runs on
        this data dir; else the file."""
        if self._book is None:
            try:
                if os.environ.get("BILLING_DATABASE_URL") or self.stack is not None:
                    from services.adapters.wiring import open_price_book

                    self._book = open_price_book(self.settings)
                else:
                    self._warn_if_stack_database()
                    self._book = FilePriceBook.open(price_book_path(self.data_dir))
            except (PriceBookCorrupt, DatabaseError) as exc:
                raise click.ClickException(str(exc)) from exc
        return self._book

    def _warn_if_stack_database(self) -> None:
        # The file book and the embedded database's book are two books: a price written to
        # the file now is never seen by the next `billing up` on this data dir.
        if (self.data_dir / "postgres").is_dir():
            click.echo(
                f"note: no `billing up` is running on {self.data_dir}; using the price-book "
                f"file {price_book_path(self.data_dir)}, which the stack's database does not "
                "read (start `billing up` first, or set BILLING_DATABASE_URL)",
                err=True,
            )


def _set_data_dir(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
    obj = ctx.find_object(Context)
    if value is not None and obj is not None:
        obj.data_dir = value


def data_dir_option() -> click.Option:
    """``--data-dir`` on a command, as well as on the group (the command's wins)."""
    return click.Option(
        ["--data-dir"],
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_set_data_dir,
        help="Where the price book, database, logs and stack.json live (default: the "
        "group's --data-dir, $BILLING_DATA_DIR or .billing).",
    )


def add_data_dir_option(group: click.Group, skip: frozenset[str] = frozenset()) -> None:
    """Give every command under ``group`` (but those named in ``skip``) a ``--data-dir``."""
    for name, command in group.commands.items():
        if name in skip:
            continue
        if isinstance(command, click.Group):
            add_data_dir_option(command, skip)
        elif not any(p.name == "data_dir" for p in command.params):
            command.params.append(data_dir_option())


def on_database(
    url: str,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    migrated: bool = True,
    codecs: bool = False,
) -> T:
    """Run ``work(connection)`` on one connection to ``url`` (migrated first unless told
    otherwise) in a fresh event loop: the connect / try / close / ``asyncio.run`` of every
    command that talks to the database."""
    import asyncio

    from services.adapters.database import connection_to

    async def run() -> T:
        async with connection_to(url, migrated=migrated, codecs=codecs) as connection:
            return await work(connection)

    return asyncio.run(run())


_SECRET_WORDS = ("token", "secret", "password", "url", "key")


def settings_problems(error: Any) -> str:
    """A pydantic ``ValidationError`` of the settings as the variables to fix, one per line:
    ``BILLING_MAX_HEAD_BYTES='10': Input should be greater than or equal to 1024``."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = field if field.isupper() else f"BILLING_{field.upper()}"  # aliases as they are
        if any(word in field.lower() for word in _SECRET_WORDS):  # neither value nor message
            lines.append(f"{name}: not a valid value ({problem['type']})")
            continue
        given = problem.get("input")
        shown = f"={given!r}" if isinstance(given, str | int | float) else ""
        lines.append(f"{name}{shown}: {problem['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)
