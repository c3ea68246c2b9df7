"""`mretrieve`: a thin click front end over mammo_retrieval.app.workspace. Errors become exit codes here, once."""
from __future__ import annotations

import os
import sys

import click

from mammo_retrieval.core.errors import (MammoRetrievalError, database_corrupt, is_database_corrupt, is_disk_full,
                                         storage_full)
from mammo_retrieval.app.cli import config as config_commands
from mammo_retrieval.app.cli._common import render_error
from mammo_retrieval.app.cli import db as db_commands
from mammo_retrieval.app.cli import index as index_commands
from mammo_retrieval.app.cli.analysis import evaluate, export, report
from mammo_retrieval.app.cli.ingest import ingest
from mammo_retrieval.app.cli.qc import qc
from mammo_retrieval.app.cli.reindex import reindex
from mammo_retrieval.app.cli.serve import serve
from mammo_retrieval.app.cli.listen import listen
from mammo_retrieval.app.cli.adapt import adapt
from mammo_retrieval.app.cli.query import query
from mammo_retrieval.app.cli.status import status
from mammo_retrieval.app.cli.train import train


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MammoRetrievalError as exc:
            _exit_with(exc)
        except Exception as exc:
            known = _package_error(exc, ctx.obj)
            if known is None:
                raise
            _exit_with(known)


def _exit_with(exc: MammoRetrievalError) -> None:
    click.echo(render_error(exc), err=True)
    sys.exit(exc.exit_code)


def _package_error(exc: Exception, config) -> MammoRetrievalError | None:
    """A full disk or a damaged database file, from wherever it surfaced (a file write, SQLite, SQLAlchemy,
    faiss), as one clear error naming the file; anything else is left alone (a bug: keep its traceback)."""
    database = _sqlite_path(config)
    if is_disk_full(exc):
        where = getattr(exc, "filename", None)
        if where is None:
            is_sqlite = any(type(e).__module__ in ("sqlite3", "sqlalchemy.exc") for e in (exc, exc.__cause__))
            where = database if is_sqlite and database else (config.index_dir if config else os.getcwd())
        return storage_full(where, exc)
    if is_database_corrupt(exc):
        return database_corrupt(database or "the database", exc)
    return None


def _sqlite_path(config) -> str | None:
    if config is None:
        return None
    try:
        from sqlalchemy.engine.url import make_url
        url = make_url(config.database_url)
    except Exception:
        return None
    return url.database if url.get_backend_name() == "sqlite" and url.database else None


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="MRETRIEVE_CONFIG",
              help="YAML file overriding configs/default.yaml (or $MRETRIEVE_CONFIG).")
@click.option("-v", "--verbose", count=True, help="Log progress (-v) or details (-vv) to stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object a line, for log collectors.")
@click.version_option(package_name="mammo_retrieval")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, log_format: str) -> None:
    """Similarity search for mammograms. State lives under $MRETRIEVE_HOME (default: the current folder)."""
    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.app.cli.logs import configure_logging
    configure_logging(verbose, log_format)
    ctx.obj = load_config(config_path)


cli.add_command(ingest)
cli.add_command(query)
cli.add_command(status)
cli.add_command(qc)
cli.add_command(report)
cli.add_command(evaluate)
cli.add_command(export)
cli.add_command(train)
cli.add_command(reindex)
cli.add_command(serve)
cli.add_command(listen)
cli.add_command(adapt)
cli.add_command(db_commands.db)
cli.add_command(index_commands.index)
cli.add_command(config_commands.config)


def main() -> None:
    # The home holds patient images and metadata: everything the CLI creates (database, -wal/-shm, cache,
    # index, reports, exports) is private to the user. Only here, never in the library: the process is ours.
    os.umask(0o077)
    cli(prog_name="mretrieve")
