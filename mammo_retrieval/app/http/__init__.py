"""The HTTP edge: a FastAPI app over one warm Workspace (``api``), and the uvicorn runner (``server``)."""
