"""multiretrieval: multimodal image-text retrieval for product catalogs.

    import multiretrieval as mr
    cat = mr.Catalog.from_csv("data/demo/catalog.csv")
    r = mr.Retriever()
    r.index(cat, show_progress=True)
    r.search(text="a red armchair", k=10)
"""

from __future__ import annotations

__version__ = "0.1.0"

# Public names load on first access, so `import multiretrieval` and `multiretrieval --help` stay fast.
_EXPORTS = {
    "Catalog": "catalog", "load_image": "catalog", "RetrieverConfig": "config",
    "Retriever": "retriever", "IndexReport": "ingest", "UpdateReport": "ingest", "Embedder": "embedder",
    **{name: "errors" for name in (
        "CatalogError", "ConfigError", "ImageError", "ImageLimitError", "IndexBusyError", "IndexLoadError", "ItemNotFoundError",
        "LimitError", "ModelUnavailableError", "MultiretrievalError", "QueryError", "StorageError")},
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'multiretrieval' has no attribute {name!r}")
