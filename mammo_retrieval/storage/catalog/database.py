"""Engine, sessions and schema upgrades (alembic) for one database URL.

First-time setup is atomic and serialised: the whole ``upgrade head``, version stamp included, runs in one
transaction (SQLite gets transactional DDL by driving BEGIN itself, see ``_transactional_engine``), under a
file lock beside a SQLite database or ``pg_advisory_xact_lock`` on PostgreSQL. A kill at any point leaves
either no schema or the whole schema, and commands started together on a fresh home wait for each other.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from mammo_retrieval.core.errors import BusyError, ConfigError, DatabaseError, NoDatabaseError, NotFoundError, Remedy

POSTGRES_HINT = ("install the PostgreSQL driver: pip install 'mammo_retrieval[postgres]' "
                 "(and name that driver in the URL, e.g. postgresql+psycopg://...)")
SETUP_LOCK_TIMEOUT_S = 120.0
# the tables the migrations create; a database holding only these, all empty, and no alembic version is
# one whose first-time setup was interrupted (by a release before setup became atomic)
OWN_TABLES = {"model_versions", "studies", "images", "embeddings", "rejected_files", "qc_runs", "qc_scores"}
# arbitrary constants naming this package's setup and writer locks on PostgreSQL ("mammo", "mretr" in ASCII)
_PG_SETUP_LOCK = 0x6D616D6D6F
_PG_WRITER_LOCK = 0x6D72657472


def mask_url(url: str) -> str:
    """The URL with its passwords replaced by ***, for every message and log line: the user's part and
    any query parameter that is one (``?password=``, libpq's ``sslpassword``)."""
    try:
        parsed = make_url(url)
        hidden = {key: "***" for key in parsed.query if _is_password(key)}
        rendered = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
        return rendered.replace("%2A%2A%2A", "***")
    except Exception:  # unparseable: show nothing of it that could be a secret
        return "<unparseable database URL>"


def url_secrets(url: str) -> list[str]:
    """The passwords a database URL holds (its user's part, password query parameters)."""
    try:
        parsed = make_url(url)
    except Exception:
        return []
    secrets = [parsed.password]
    for key, value in parsed.query.items():
        if _is_password(key):  # a parameter given twice holds a tuple
            secrets += [value] if isinstance(value, str) else list(value)
    return [str(secret) for secret in secrets if secret]


def _is_password(query_key: str) -> bool:
    return query_key.lower().endswith("password")


def migrations_dir() -> Path:
    """The repository's migrations/ (shipped in the package as mammo_retrieval._migrations)."""
    return Path(str(resources.files("mammo_retrieval._migrations")))


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")  # first: the WAL switch below may have to wait too
    cursor.execute("PRAGMA foreign_keys=ON")
    # before WAL, and only effective on a new file: a 2 KB vector row fits once in a 4 KB page (half of it
    # wasted), seven times in a 16 KB one (README "An index past memory": 4.3 -> 2.4 KB a vector)
    cursor.execute("PRAGMA page_size=16384")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (queries) keep working during an ingest
    cursor.close()


def _driver_error(url: str, exc: BaseException) -> DatabaseError:
    backend = make_url(url).get_backend_name()
    hint = POSTGRES_HINT if backend.startswith("postgres") else "install the driver named in the URL"
    return DatabaseError(f"no database driver for {mask_url(url)}: {exc}", hint=hint)


class Database:
    """One database. ``ensure_schema`` sets up an empty one (when asked to) and refuses an outdated one."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.display_url = mask_url(url)
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"invalid database URL {self.display_url}: {exc}",
                              hint="check paths.database_url or $MRETRIEVE_DATABASE_URL") from None
        self.backend = parsed.get_backend_name()
        self.sqlite_path: Path | None = (Path(parsed.database) if self.backend == "sqlite"
                                         and parsed.database not in (None, "", ":memory:") else None)
        connect_args = {}
        if self.backend.startswith("postgres"):  # names this process in pg_stat_activity (a busy writer's holder)
            connect_args["application_name"] = f"mretrieve pid {os.getpid()} on {socket.gethostname()}"[:63]
        try:
            self.engine: Engine = create_engine(url, future=True, connect_args=connect_args,
                                                hide_parameters=True)  # row values are patient data
        except ImportError as exc:
            raise _driver_error(url, exc) from None
        except Exception as exc:
            raise DatabaseError(f"cannot open database {self.display_url}: {exc}",
                                hint="check paths.database_url or $MRETRIEVE_DATABASE_URL") from None
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer_depth = 0

    # --- existence and schema ---------------------------------------------------------------------
    def file_exists(self) -> bool:
        """False only for a SQLite file that is not there (connecting would create it)."""
        return self.sqlite_path is None or self.sqlite_path.exists()

    def head_revision(self) -> str:
        return ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()

    def current_revision(self) -> str | None:
        if not self.file_exists():
            return None
        with self._wrap_errors(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def has_schema(self) -> bool:
        """True if the database holds this package's schema (at any revision)."""
        return self.file_exists() and self.current_revision() is not None

    def upgrade(self) -> str:
        """Apply every pending migration, atomically and one process at a time; returns the revision reached."""
        with self._wrap_errors(), self._setup_lock(), self._transactional_engine() as engine:
            with engine.begin() as conn:
                if self.backend.startswith("postgres"):
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SETUP_LOCK})
                self._check_not_foreign(conn, repair=True)
                cfg = alembic_config(self.url)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        return self.head_revision()

    def ensure_schema(self, *, create: bool = True) -> None:
        """Empty database: create it (or, with create=False, raise NoDatabaseError). Outdated schema: refuse,
        and say how to upgrade. Read-only commands pass create=False so that they never create a database."""
        if not create and not self.file_exists():
            raise NoDatabaseError(f"no database at {self.display_url}",
                                remedies=[Remedy("ingest an archive first (or check paths.database_url)", "ingest")])
        current = self.current_revision()
        if current is None:
            if not create:
                with self._wrap_errors(), self.engine.connect() as conn:
                    self._check_not_foreign(conn, repair=False)
                raise NoDatabaseError(f"the database {self.display_url} is empty (no mammo_retrieval schema)",
                                      remedies=[Remedy("ingest an archive first (or check paths.database_url)", "ingest")])
            self.upgrade()
            return
        head = self.head_revision()
        if current != head:
            raise DatabaseError(f"database schema is at revision {current}, this version needs {head}",
                                remedies=[Remedy("upgrade the schema (back the database up first)", "db_upgrade")])

    def _check_not_foreign(self, conn: Connection, *, repair: bool) -> None:
        """Tables but no alembic version: another program's database (refused), or ours from an interrupted
        first-time setup of an older release (only our tables, all empty: dropped, so setup starts over)."""
        if MigrationContext.configure(conn).get_current_revision() is not None:
            return
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
        if not tables:
            return
        ours_and_empty = tables <= OWN_TABLES and not any(
            conn.execute(text(f'SELECT 1 FROM "{t}" LIMIT 1')).first() for t in tables)
        if not ours_and_empty:
            raise DatabaseError(f"{self.display_url} holds tables but no alembic version "
                                f"({', '.join(sorted(tables))})",
                                hint="point paths.database_url at a mammo_retrieval database (or a new path)")
        if not repair:
            raise DatabaseError(f"{self.display_url} holds an unfinished schema (an interrupted first-time "
                                "setup)", remedies=[Remedy("set it up again (it holds no data)", "db_upgrade")])
        for table in ("qc_scores", "qc_runs", "embeddings", "images", "studies", "rejected_files",
                      "model_versions"):
            if table in tables:
                conn.execute(text(f'DROP TABLE "{table}"'))

    @contextmanager
    def _setup_lock(self) -> Iterator[None]:
        """A file lock beside a SQLite database (nothing elsewhere: PostgreSQL takes an advisory lock)."""
        if self.sqlite_path is None:
            yield
            return
        self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        path = self.sqlite_path.with_name(f".{self.sqlite_path.name}.setup.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + SETUP_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BusyError(f"another process has been setting up {self.display_url} for "
                                        f"{SETUP_LOCK_TIMEOUT_S:.0f} s", hint="try again when it is done") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def _transactional_engine(self) -> Iterator[Engine]:
        """An engine whose transactions cover DDL too. pysqlite commits implicitly before DDL; with its own
        transaction handling off (isolation_level None) and BEGIN IMMEDIATE emitted here, CREATE TABLE and
        the alembic stamp commit or vanish together (the SQLAlchemy docs' pysqlite recipe)."""
        if self.backend != "sqlite":
            yield self.engine
            return
        engine = create_engine(self.url, future=True, poolclass=NullPool, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, record):
            dbapi_connection.isolation_level = None
            _sqlite_pragmas(dbapi_connection, record)

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            yield engine
        finally:
            engine.dispose()

    @contextmanager
    def _wrap_errors(self) -> Iterator[None]:
        """Driver and connection failures as DatabaseError, with the password masked."""
        try:
            yield
        except (DatabaseError, NotFoundError, BusyError, ConfigError):
            raise
        except ImportError as exc:
            raise _driver_error(self.url, exc) from None
        except Exception as exc:
            raise self.database_error(exc, "cannot open database") from None

    def database_error(self, exc: Exception, doing: str) -> "DatabaseError":
        """A driver's failure as the package's error (disk full, corrupt, or ``doing`` the database), its
        message with every password masked."""
        from mammo_retrieval.core.errors import database_corrupt, is_database_corrupt, is_disk_full, storage_full
        if is_disk_full(exc):
            return storage_full(self.sqlite_path or self.display_url, exc)
        if is_database_corrupt(exc):
            return database_corrupt(self.sqlite_path or self.display_url, exc)
        message = str(exc).replace(self.url, self.display_url)
        for secret in url_secrets(self.url):
            message = message.replace(secret, "***")
        return DatabaseError(f"{doing} {self.display_url}: {message}",
                             hint="check that the database is up, and paths.database_url or $MRETRIEVE_DATABASE_URL")

    @contextmanager
    def _connection_lost(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:  # the server went away, or the file broke
            raise self.database_error(exc, "lost the database") from None

    # --- sessions ---------------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error. A connection lost on the way
        (the server stopped) is a DatabaseError, not the driver's own."""
        with self._connection_lost(), self._sessions() as session:
            with session.begin():
                yield session

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only session in which every statement sees the same committed state.

        pysqlite runs SELECTs outside any transaction, so two SELECTs of one session may see two different
        commits of a concurrent writer; an explicit BEGIN makes SQLite keep one read snapshot (WAL) from the
        first SELECT to the end. Other backends: a REPEATABLE READ transaction."""
        with self._connection_lost(), self._sessions() as session:
            if self.backend == "sqlite":
                conn = session.connection()
                conn.exec_driver_sql("BEGIN")
            else:
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """One writer per PostgreSQL database, whatever machine or index folder it writes from: a session
        advisory lock, taken without waiting; a second writer gets BusyError naming the holder. Two writers
        would otherwise race on the same (image, model) vectors. Released when the block ends or when the
        process dies (its connection closes). Nests. SQLite: nothing here (the index folder's lock serves)."""
        if not self.backend.startswith("postgres") or self._writer_depth:
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
            return
        with self._wrap_errors():
            conn = self.engine.connect()
        try:
            with self._wrap_errors():
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_WRITER_LOCK}).scalar()
                conn.commit()
            if not got:
                raise BusyError(f"another mretrieve process is writing to {self.display_url}: "
                                f"{self._writer_holder(conn)}",
                                hint="wait for it to finish, then rerun (nothing is lost or doubled)")
            self._writer_depth = 1
            try:
                yield
            finally:
                self._writer_depth = 0
                with self._wrap_errors():
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_WRITER_LOCK})
                    conn.commit()
        finally:
            conn.close()

    @staticmethod
    def _writer_holder(conn: Connection) -> str:
        row = conn.execute(text(
            "SELECT a.application_name, host(a.client_addr), a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid = :hi AND l.objid = :lo"), {"hi": _PG_WRITER_LOCK >> 32,
                                                       "lo": _PG_WRITER_LOCK & 0xFFFFFFFF}).first()
        conn.rollback()
        if row is None:
            return "its holder has just finished"
        name, address, since = row
        return f"{name or 'an unnamed client'}" + (f" from {address}" if address else "") + f", since {since:%Y-%m-%d %H:%M:%S}"

    def dispose(self) -> None:
        self.engine.dispose()
