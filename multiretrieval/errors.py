"""Exceptions raised by multiretrieval. Each names the row, file or setting at fault and why."""

from __future__ import annotations

from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], quote: bool = True) -> str:
    """"; did you mean 'category'?" for a misspelt name among ``choices`` (the same name in another case first, else
    difflib's nearest), or "" when none is near."""
    options = [c for c in choices if isinstance(c, str)]
    same = [c for c in options if c.lower() == str(name).lower() and c != name]
    if not same:
        import difflib

        by_lower = {c.lower(): c for c in options}
        same = [by_lower[c] for c in difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)]
    if not same:
        return ""
    shown = [repr(c) if quote else c for c in same]
    return f"; did you mean {' or '.join(shown)}?"


class MultiretrievalError(Exception):
    """Base class of every error this package raises on purpose."""


class CatalogError(MultiretrievalError, ValueError):
    """The catalog is malformed: a missing column, a duplicate id, a row with neither image nor text."""


class ImageError(MultiretrievalError, ValueError):
    """An image cannot be used: missing, unreadable, corrupt, truncated or too large.

    ``transient``: the failure may pass (a download that timed out, a 5xx or 429 answer, a
    dropped connection): it is retried, and never remembered by the shard cache.
    ``retry_after``: seconds the server asked to wait (a Retry-After header), if it did.
    """

    def __init__(self, message: str = "", transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after


class ImageLimitError(ImageError):
    """An image over a configured bound: too many pixels (decompression bomb guard) or bytes; the service answers 413."""


class ConfigError(MultiretrievalError, ValueError):
    """A configuration file or value is invalid, or does not match a saved index."""


class QueryError(MultiretrievalError, ValueError):
    """A query is invalid: empty text, unknown mode, bad k, a malformed filter, wrong dimension.

    ``details``: more than the one-line message, where there is more to say (a refused filter: the whole grammar);
    the command line prints it with --verbose."""

    def __init__(self, message: str = "", details: str | None = None) -> None:
        super().__init__(message)
        self.details = details


class LimitError(QueryError):
    """A query exceeds a configured bound (text length, k, batch size): the service answers 422."""


class IndexLoadError(MultiretrievalError):
    """A saved index folder is missing files, corrupt, or was written by an incompatible setup."""


class IndexBusyError(MultiretrievalError):
    """An index folder is in use by another process: a running service, or another ``index`` into it."""


class StorageError(MultiretrievalError, OSError):
    """A file could not be written (a full disk, a quota, a failing or read-only filesystem): the message names
    what, where and why. What was saved before is intact: every writer writes a temporary copy, removed on failure.
    ``errno``: the cause's (ENOSPC, EDQUOT, EIO, ...) where known; ``disk_full``: no space (or quota) left."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:  # OSError would print "[Errno N] ..."
        return str(self.args[0])

    @property
    def disk_full(self) -> bool:
        import errno

        return self.errno in (errno.ENOSPC, errno.EDQUOT)


class ModelUnavailableError(MultiretrievalError):
    """A model's weights cannot be found locally and cannot be downloaded."""


class ItemNotFoundError(MultiretrievalError, KeyError):
    """An id named in a request is not in the index."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "item not found"
