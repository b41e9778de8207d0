"""The encoder stage on Ray: Ray Data ``map_batches`` over actors that hold the models.

Each actor builds the models (an Embedder) once, then turns every batch of ``shard_size``
rows into one shard in the same store the local engine uses (pipeline.ShardStore), so
the driver merges them exactly as it merges local shards. On a cluster, the store folder
and the catalog's image paths must be on storage every node reads and writes (NFS, a
mounted bucket); ``ray.init`` connects to the cluster in ``$RAY_ADDRESS``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pandas as pd

from .config import RetrieverConfig
from .pipeline import Row, ShardEncoder, ShardStore

logger = logging.getLogger(__name__)


class ShardWriter:
    """A Ray Data actor: rows in, one written shard out."""

    def __init__(self, config: dict[str, Any], store: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from concurrent.futures import ThreadPoolExecutor

        from .embedder import Embedder

        self.encoder = ShardEncoder(Embedder(RetrieverConfig.from_dict(config)))
        self.store = ShardStore(store)
        self.pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [Row(int(r), h, _value(s), _value(t)) for r, h, s, t in zip(batch["row"], batch["hash"], batch["source"], batch["text"])]
        outcomes, arrays = self.encoder.encode(rows, self.pool)
        name = self.store.write([r.hash for r in rows], outcomes, arrays)
        return pd.DataFrame({"shard": [name], "items": [len(rows)]})


def _value(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and v != v) else str(v)


def encode_with_ray(config: RetrieverConfig, todo: list[Row], store: ShardStore, shard_size: int,
                    show_progress: bool | None) -> int:
    """Encode ``todo`` into ``store`` on Ray; returns the number of shards written."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        from .errors import ConfigError

        raise ConfigError("engine 'ray' needs Ray Data: pip install 'ray[data]'") from exc
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = bool(show_progress)
    frame = pd.DataFrame({"row": [r.row for r in todo], "hash": [r.hash for r in todo],
                          "source": pd.Series([r.source for r in todo], dtype=object),
                          "text": pd.Series([r.text for r in todo], dtype=object)})
    # One block per shard: each map_batches call gets one shard's rows, as the local engine cuts them.
    ds = ray.data.from_pandas([frame.iloc[i:i + shard_size] for i in range(0, len(frame), shard_size)])
    written = ds.map_batches(ShardWriter, batch_size=shard_size, batch_format="pandas",
                             compute=ray.data.ActorPoolStrategy(size=config.ingest.ray_actors), num_cpus=1, fn_constructor_kwargs={"config": config.to_dict(), "store": str(store.folder)})
    shards = written.to_pandas()
    logger.info("ray wrote %d shards with %d items", len(shards), int(shards["items"].sum()))
    return len(shards)
