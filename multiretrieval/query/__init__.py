"""The query engine: a search's options declared once, checked, embedded a batch at a time, ranked, paged.

    options.py    SearchOptions: every option with its type, default, bound or choices and help; MODES, HYBRID_METHODS
    checks.py     SearchOptions -> Query: every bound of config.search, the mode resolved, the photo decoded
    embedding.py  a batch of queries through each encoder once -> per query its vectors (and its photo alone)
    scores.py     the score readings: calibration, the zero-shot scale, composed readings, not_text, the parts of a score
    ranking.py    how rankings meet: an index's top-k, the best reading, the merge of spaces, rank fusion, ties
    searcher.py   Searcher(embedder, collection)(queries) -> result frames: filter, embed, rank, page

Data flows one way: options -> checks -> embedding -> scores/ranking -> searcher. ``options`` is light (the command
line builds its parser from it); the rest loads on first use.
"""

from __future__ import annotations

from .options import HYBRID_METHODS, MODES, SearchOptions

_LAZY = {"Query": "checks", "make_query": "checks", "batch_query": "checks", "Searcher": "searcher"}
__all__ = ["HYBRID_METHODS", "MODES", "Query", "SearchOptions", "Searcher", "batch_query", "make_query"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'multiretrieval.query' has no attribute {name!r}")
