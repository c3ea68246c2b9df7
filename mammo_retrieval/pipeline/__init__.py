"""Ingest: walker -> reader/preprocessor (worker processes) -> encoder (batches) -> writer, wired by a runner."""
