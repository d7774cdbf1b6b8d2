"""Opening a registry database: URL resolution, engines, schema checks and migrations.

The schema is created and changed only by Alembic (``registry/migrations``),
driven from code (no alembic.ini). :func:`open_registry` refuses a database
whose schema is missing, older or newer than this code's, with the command
that fixes it; it never writes anything.

SQLite is the embedded default: WAL journal (readers never block the writer),
a busy timeout, foreign keys on, and write transactions opened with
``BEGIN IMMEDIATE`` so two processes queue for the write lock instead of
failing on a lock upgrade.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    InterfaceError,
    InternalError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.orm import Session

from registry.errors import (
    DatabaseUnavailable,
    InvalidDatabaseUrl,
    RegistryNotInitialised,
    SchemaOutdated,
    SchemaTooNew,
)

__all__ = [
    "ENV_URL",
    "Registry",
    "SchemaStatus",
    "default_url",
    "head_revision",
    "init_registry",
    "migrate",
    "open_registry",
    "resolve_url",
    "schema_status",
    "upgrade_registry",
]

ENV_URL = "TREELM_REGISTRY_URL"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 5


def default_url() -> str:
    return f"sqlite:///{Path.home() / '.treelm' / 'registry.db'}"


def resolve_url(url: str | None = None) -> str:
    """The registry URL: the argument, else ``$TREELM_REGISTRY_URL``, else ``~/.treelm/registry.db``."""
    chosen = url or os.environ.get(ENV_URL) or default_url()
    parsed = _parse(chosen)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database.startswith("~"):
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    return parsed.render_as_string(hide_password=False)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise InvalidDatabaseUrl(
            f"cannot parse database URL {url!r}: {exc} (e.g. sqlite:///path/registry.db or "
            "postgresql+psycopg://user@host:5432/db)"
        ) from None


def _masked(url: str | URL) -> str:
    return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _make_engine(url: str) -> Engine:
    parsed = _parse(url)
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise InvalidDatabaseUrl(f"cannot use database URL {_masked(parsed)}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy (not pysqlite) emit BEGIN, so we can choose IMMEDIATE for writes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("treelm_write") else "BEGIN")


def _alembic_config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # the package always ships migrations
    return head


def _known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands against this code's migrations."""

    url: str  # password masked
    current: str | None  # None: no registry schema yet
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _unavailable(url: str | URL, exc: Exception, doing: str = "cannot reach") -> DatabaseUnavailable:
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(f"{doing} the registry database at {_masked(url)}: {reason}")


def _status_of(engine: Engine) -> SchemaStatus:
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            if current is None and inspect(conn).has_table("nodes"):
                raise RegistryNotInitialised(
                    f"{_masked(engine.url)} has registry tables but no migration record; "
                    "it was not created by `treelm registry init`"
                )
    except (OperationalError, SADatabaseError) as exc:
        raise _unavailable(engine.url, exc) from None
    return SchemaStatus(url=_masked(engine.url), current=current, head=head_revision())


def schema_status(url: str | None = None) -> SchemaStatus:
    """The schema revision of the database at ``url`` (never creates a SQLite file)."""
    resolved = resolve_url(url)
    file = _sqlite_file(make_url(resolved))
    if file is not None and not file.exists():
        return SchemaStatus(url=_masked(resolved), current=None, head=head_revision())
    engine = _make_engine(resolved)
    try:
        return _status_of(engine)
    finally:
        engine.dispose()


def _check(status: SchemaStatus, db_hint: str) -> None:
    if status.current is None:
        raise RegistryNotInitialised(f"no registry at {status.url}: run `treelm registry init{db_hint}`")
    if status.current == status.head:
        return
    if status.current in _known_revisions():
        raise SchemaOutdated(
            f"the registry at {status.url} has schema {status.current}, this treelm needs {status.head}: "
            f"run `treelm registry upgrade{db_hint}`"
        )
    raise SchemaTooNew(
        f"the registry at {status.url} has schema {status.current}, newer than this treelm knows "
        f"(head {status.head}): upgrade treelm"
    )


def migrate(url: str | None = None, revision: str = "head") -> SchemaStatus:
    """Run migrations up to ``revision`` (creating a SQLite file and its folder if needed)."""
    resolved = resolve_url(url)
    file = _sqlite_file(make_url(resolved))
    if file is not None:
        _create_private(file)
    engine = _make_engine(resolved)
    try:
        with engine.connect().execution_options(treelm_write=True) as conn, conn.begin():
            command.upgrade(_alembic_config(conn), revision)
        return _status_of(engine)
    except (OperationalError, SADatabaseError) as exc:
        raise _unavailable(resolved, exc) from None
    finally:
        engine.dispose()


def _create_private(file: Path) -> None:
    """The SQLite file (and a folder made for it) private to this user: 0600 and 0700. SQLite gives
    its journal and WAL files the database file's mode, so they stay private too."""
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot create the registry's folder {file.parent}: {exc.strerror}") from None
    try:
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # an existing database keeps the mode its owner chose
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot create the registry file {file}: {exc.strerror}") from None


def init_registry(url: str | None = None) -> tuple[SchemaStatus, bool]:
    """Create the registry schema; returns (status, created). An older schema must be upgraded instead."""
    before = schema_status(url)
    if before.current is not None:
        _check(before, _db_hint(url))  # raises for older / newer schemas
        return before, False
    return migrate(url), True


def upgrade_registry(url: str | None = None) -> tuple[SchemaStatus, SchemaStatus]:
    """Migrate an initialised registry to this code's head; returns (before, after)."""
    before = schema_status(url)
    if before.current is None:
        raise RegistryNotInitialised(f"no registry at {before.url}: run `treelm registry init{_db_hint(url)}`")
    if before.current not in _known_revisions():
        _check(before, _db_hint(url))
    return before, (before if before.up_to_date else migrate(url))


def _db_hint(url: str | None) -> str:
    return f" --db {_masked(url)}" if url else ""


# Driver errors that mean "this database cannot serve us" (down, damaged, wrong schema), not a bug of ours.
_USE_ERRORS = (OperationalError, ProgrammingError, InterfaceError, InternalError)


class Registry:
    """An open registry database. Sessions are short: one per repository call."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url  # password masked

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except _USE_ERRORS as exc:
            raise _unavailable(self.engine.url, exc, "cannot use") from None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: committed at the end, rolled back (nothing written) on any error."""
        try:
            with (
                self.engine.connect().execution_options(treelm_write=True) as conn,
                Session(bind=conn, expire_on_commit=False) as session,
                session.begin(),
            ):
                yield session
        except _USE_ERRORS as exc:
            raise _unavailable(self.engine.url, exc, "cannot use") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_registry(url: str | None = None) -> Registry:
    """Open an initialised, up-to-date registry; raise with the fixing command otherwise."""
    resolved = resolve_url(url)
    file = _sqlite_file(make_url(resolved))
    if file is not None and not file.exists():  # never create an empty file just to look
        raise RegistryNotInitialised(f"no registry at {_masked(resolved)}: run `treelm registry init{_db_hint(url)}`")
    engine = _make_engine(resolved)
    try:
        _check(_status_of(engine), _db_hint(url))
    except BaseException:
        engine.dispose()
        raise
    return Registry(engine, _masked(resolved))
