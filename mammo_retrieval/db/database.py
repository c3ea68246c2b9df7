"""Engine, sessions and schema upgrades (alembic) for one database URL."""
from __future__ import annotations

from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker

from ..errors import DatabaseError


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
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (queries) keep working during an ingest
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    """One database. ``ensure_schema`` sets up an empty one and refuses an outdated one."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(url, future=True)
        except Exception as exc:
            raise DatabaseError(f"cannot open database {url}: {exc}",
                                hint="check paths.database_url or $MRETRIEVE_DATABASE_URL") from None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def head_revision(self) -> str:
        return ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> str:
        """Apply every pending migration; returns the revision reached."""
        cfg = alembic_config(self.url)
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return self.head_revision()

    def ensure_schema(self) -> None:
        """Empty database: create it. Outdated schema: refuse, and say how to upgrade."""
        try:
            current = self.current_revision()
            if current is None:
                if inspect(self.engine).get_table_names():
                    raise DatabaseError(f"{self.url} holds tables but no alembic version",
                                        hint="point paths.database_url at a mammo_retrieval database")
                self.upgrade()
                return
        except DatabaseError:
            raise
        except Exception as exc:
            raise DatabaseError(f"cannot open database {self.url}: {exc}") from None
        head = self.head_revision()
        if current != head:
            raise DatabaseError(f"database schema is at revision {current}, this version needs {head}",
                                hint="run `mretrieve db upgrade` (back the database up first)")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        with self._sessions() as session:
            with session.begin():
                yield session

    def dispose(self) -> None:
        self.engine.dispose()
