"""`jointrag serve`: the HTTP server (`app.py`), its request batcher (`batcher.py`) and its page (`page.html`)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
