"""Metadata in SQL (SQLAlchemy 2). The alembic migrations in migrations/ are the schema's source."""
from mammo_retrieval.storage.catalog.database import Database

__all__ = ["Database"]
