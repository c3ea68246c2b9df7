"""mammo_retrieval: similarity search for mammograms.

The public entry point is :class:`mammo_retrieval.app.workspace.Workspace`; the CLI and any server call it.
"""

__version__ = "0.1.0"
