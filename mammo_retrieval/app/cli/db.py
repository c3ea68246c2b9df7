from __future__ import annotations

import click


@click.group()
def db() -> None:
    """Database schema (alembic migrations)."""


@db.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Apply pending migrations to the configured database."""
    from mammo_retrieval.storage.catalog import Database
    database = Database(ctx.obj.database_url)
    before = database.current_revision()
    after = database.upgrade()
    click.echo(f"database at revision {after} (was {before or 'empty'})")
