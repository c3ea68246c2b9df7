"""The values a query's filters take, in one place for the CLI, the HTTP API and the page; kept free of
numpy and the catalog, so that the CLI can name them in its options without loading either."""
from __future__ import annotations

LATERALITIES = ("L", "R")
VIEW_FILTERS = ("CC", "MLO", "ML", "LM", "XCCL")  # the page's menu offers the same
