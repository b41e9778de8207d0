"""The search service: a FastAPI app over a saved index, and a page to search it from a browser."""

from .app import create_app

__all__ = ["create_app"]
