"""The HTTP results API (``inferq api``): FastAPI over the same broker and result store."""
