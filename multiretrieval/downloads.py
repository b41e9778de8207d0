"""Image downloads for URL catalogs: many at once, a few per host, retried with backoff.

    Downloader(config).fetch(url) -> bytes      (raises ImageError; ``transient`` if it may pass)

Each download is one ``catalog.download`` (a whole-download deadline of
``catalog.download_timeout_s``). A transient failure (a timeout, a dropped connection, HTTP
408/425/429/5xx) is tried again up to ``catalog.download_retries`` times, after
``download_backoff_s`` x 2^attempt seconds with jitter (or what the server's Retry-After
asked, up to 60 s); any other failure (404, not an image, too large) is final at once. At most
``catalog.downloads_per_host`` downloads run against one host at a time; the pipeline runs
``catalog.download_workers`` of them in parallel.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from urllib.parse import urlsplit

from .config import CatalogConfig
from .errors import ImageError
from .catalog import download

logger = logging.getLogger(__name__)
MAX_WAIT_S = 60.0  # the longest a Retry-After header may make a download wait


class Downloader:
    """Fetches URLs with retries and a per-host limit; safe to share between threads."""

    def __init__(self, config: CatalogConfig | None = None, seed: int | None = None) -> None:
        self.config = config or CatalogConfig()
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.attempts = 0  # downloads started, retries included (for reports and tests)

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        host = urlsplit(url).netloc.lower()
        with self._lock:
            if host not in self._hosts:
                self._hosts[host] = threading.BoundedSemaphore(max(1, self.config.downloads_per_host))
            return self._hosts[host]

    def fetch(self, url: str) -> bytes:
        """The bytes at ``url``; ImageError after the last attempt (``transient`` says whether it may pass)."""
        cfg = self.config
        slot = self._host_slot(url)
        for attempt in range(cfg.download_retries + 1):
            with slot:
                with self._lock:
                    self.attempts += 1
                try:
                    return download(url, cfg.max_image_bytes, cfg.download_timeout_s)
                except ImageError as exc:
                    if not exc.transient or attempt == cfg.download_retries:
                        if exc.transient and cfg.download_retries:
                            raise ImageError(f"{exc} (gave up after {attempt + 1} attempts)", transient=True) from exc
                        raise
                    wait = self._wait(attempt, exc.retry_after)
                    logger.info("%s; trying again in %.1f s (attempt %d of %d)", exc, wait, attempt + 2, cfg.download_retries + 1)
            time.sleep(wait)  # outside the host slot: others may use it meanwhile
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_WAIT_S)
        with self._lock:
            jitter = 0.5 + self._random.random()  # spread retries of many downloads over time
        return self.config.download_backoff_s * 2 ** attempt * jitter
