"""Configuration: frozen dataclasses loaded from YAML (``configs/*.yaml``).

Override single values with :func:`dataclasses.replace` or :meth:`RetrieverConfig.with_overrides`::

    cfg = RetrieverConfig.from_yaml("configs/default.yaml").with_overrides({"index": {"factory": "HNSW32"}})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class CatalogConfig:
    """How catalog rows become model inputs."""

    text_columns: tuple[str, ...] = ("title", "description")  # joined with ". " into the item's text
    # The column of image paths or URLs; null: found by its name (image, image_url, photo, ...) or its values (catalog.py)
    image_column: str | None = None
    keyword_columns: tuple[str, ...] = ()  # more columns the keyword index reads besides the text columns (sku, brand)
    max_image_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding
    max_image_bytes: int = 50_000_000
    download_timeout_s: float = 30.0  # an image URL must arrive whole within this (a trickling server is cut off)
    download_workers: int = 16  # image downloads in parallel while indexing a URL catalog
    downloads_per_host: int = 8  # of which at most this many against one host
    download_retries: int = 3  # more attempts after a transient failure (timeout, dropped connection, 408/425/429/5xx)
    download_backoff_s: float = 0.5  # wait before retry n: this x 2^n, with jitter (or the server's Retry-After)
    text_when_image_fails: bool = True  # an item whose image fails is indexed by its text (a warning), if it has one
    max_new_columns: int = 64  # columns one write (add, upsert, an item sent to the service) may add to an index
    max_columns: int = 256  # columns an index may hold in all (each is in every result row and the filter table)


@dataclass(frozen=True)
class EncoderConfig:
    """Which pretrained encoders embed images and texts (names from the encoder registries)."""

    image: str = "efficientnet-lite0"
    image_weights: str | None = None  # local weights file, instead of the packaged or hub weights
    text: str = "minilm-l6"
    text_weights: str | None = None  # local Hugging Face model folder
    batch_size: int = 32
    max_text_tokens: int = 128
    runtime: str = "auto"  # torch | onnx (ONNX Runtime, ~4x faster images on CPU) | auto (onnx when installed)
    # int8: ONNX Runtime on a CPU with int8 dot products runs the image CNN's int8 export where a calibration table
    # ships for its weights (encoders/quantize.py; ~2x faster images, mean cosine 0.998 to fp32); fp32 elsewhere
    # (PyTorch, GPUs, other CPUs). The text encoder runs fp32. Not the default: compared with an fp32 run, int8 moved
    # some `evaluate` figures by more than 0.01 (benchmarks/compare_evaluations.py).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp32"):
            raise ConfigError(f"precision: {self.precision!r} is not one of 'int8', 'fp32'")  # the caller names the section


@dataclass(frozen=True)
class FusionConfig:
    """The module that turns image and text features into one joint embedding."""

    kind: str = "late"  # "late" (parameter-free) or "attention"
    image_weight: float = 0.5  # late fusion: share of the image similarity in a fused score
    dim: int = 256  # attention: common token width d
    heads: int = 4
    out_dim: int = 256  # attention: width of the learned part (the output adds the late-fusion skip path)
    image_grid: int = 0  # image tokens: pooled vector + a grid x grid map of pooled regions
    text_chunks: int = 0  # text tokens: pooled sentence vector + this many pooled token chunks
    weights: str | None = None  # folder of a trained fusion module (fusion.json + safetensors)
    # "This, but X" (fusion.compose_text): a fused query's words are read together with the text of the
    # item nearest its photo, so they move the query from that item to the variant they name. Both numbers
    # were chosen by cross-validation on the training data sets (README, "Fused queries").
    compose: bool = True
    compose_words: float = 2.0  # the words' weight against the nearest item's text (unit vectors)
    compose_image_share: float = 0.25  # a composed query's image share of the score (weights= overrides it)
    # Words that name a phrase of item texts (a category, a tag, a colour after a comma) pick items among the
    # photo's 10 nearest: those first, in the photo's order (search.word_filter; chosen by cross-validation on
    # the training data sets).
    word_filter: bool = True


@dataclass(frozen=True)
class ZeroShotConfig:
    """The cross-modal space for mode="zero-shot" (see multiretrieval/encoders/clip.py)."""

    kind: str = "lit+conse"  # conse | lit | lit+conse | openclip
    top_k: int = 10  # ConSE: how many ImageNet labels make up an image's text-space embedding
    temperature: float = 1.0  # ConSE: the labels' probabilities flattened (> 1) or sharpened (< 1) before they weight
    label_template: str = "{}"
    weights: str | None = None  # lit: projection weights (default: the ones that ship with the package)
    conse_weight: float = 0.3  # lit+conse: share of the ConSE similarity (training.LIT_CONSE_WEIGHT: cross-validated)
    model: str | None = None  # openclip: model name, e.g. ViT-B-32
    pretrained: str | None = None  # openclip: pretrained tag (needs the hub) or a local checkpoint file


@dataclass(frozen=True)
class IndexConfig:
    """FAISS index choice: "auto" or any index_factory string ("Flat", "HNSW32", "IVF1024,PQ32")."""

    factory: str = "auto"  # auto: Flat up to 100k items, then HNSW or IVF-PQ by memory_budget_gb (index.py)
    memory_budget_gb: float = 8.0  # auto: memory one vector index may use
    # Approximate indexes: search parameters tuned to this recall@10 against exact search, and for reads as deep as
    # search.hybrid_depth to this recall there. 0.999, not 0.99: at 0.99 about one top-10 list in 100 of a 100k HNSW
    # index lost an item, so a nightly upsert and a fresh build answered some queries differently (README, upsert
    # benchmark); the wider search costs a few ms of a 40+ ms text query.
    target_recall: float = 0.999
    exact_filter_below: int = 20_000  # filtered queries matching fewer ids than this are scored exactly
    compact_deleted_share: float = 0.2  # graph indexes (HNSW) keep removed items marked deleted; rebuilt past this share
    # Each item photo also indexed by region vectors (regions.REGION_RECIPES: none | grid4 | grid13 | salient6); an
    # image query scores an item by its whole photo or its best region, whichever is higher (docs/queries.md).
    image_regions: str = "none"

    def __post_init__(self) -> None:
        from .regions import REGION_RECIPES

        if self.image_regions not in REGION_RECIPES:
            raise ConfigError(f"image_regions: {self.image_regions!r} is not one of {', '.join(map(repr, REGION_RECIPES))}")


@dataclass(frozen=True)
class IngestConfig:
    """The indexing pipeline (pipeline.py): reader threads, shard size, engine."""

    workers: int = 0  # threads that hash, decode and resize images ahead of the encoder; 0: a third of the cores, at least 2
    shard_size: int = 1024  # items per shard of encoded arrays (a multiple of encoders.batch_size)
    engine: str = "local"  # local | ray (Ray Data map_batches over model-holding actors)
    ray_actors: int = 2  # ray: encoder actors (one per node's worth of cores is a good start)


@dataclass(frozen=True)
class TrainingConfig:
    """Training the attention fusion on a catalog's own image/text pairs (``multiretrieval train``)."""

    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05  # InfoNCE
    val_share: float = 0.1  # items held out (by id hash) for early stopping on validation recall@1
    patience: int = 6  # epochs without a better validation recall before stopping
    seed: int = 0
    image_views: int = 2  # augmented copies of each image, encoded once and cached
    text_views: int = 4  # fragments of each item's text, encoded once and cached


@dataclass(frozen=True)
class SearchConfig:
    """Bounds on queries, checked before any model runs (a query over one gets a LimitError, 422 from the
    service), and how text queries combine keywords and vectors."""

    max_text_chars: int = 1000  # characters of a query text
    max_text_tokens: int = 256  # word pieces of a query text (the text encoder reads the first encoders.max_text_tokens)
    max_k: int = 1000  # results one query may ask for: k (plus offset, where a query pages)
    max_batch: int = 64  # queries in one batch call
    max_where_chars: int = 2000  # characters of a where filter
    max_filter_columns: int = 64  # columns one query's structured filters may name
    max_filter_values: int = 5000  # values one column's list in structured filters may hold
    filter_timeout_s: float = 2.0  # a filter still running after this is interrupted (LimitError)
    hybrid: str = "rrf"  # text queries: rrf (reciprocal-rank fusion of vectors and BM25) | weighted | off
    keyword_weight: float = 0.5  # the keyword (BM25) ranking's share in a hybrid text query
    hybrid_depth: int = 100  # how deep each ranking is read before they are combined (at least k)
    sort_candidates: int = 200  # sort_by reorders this many of the most relevant items (or offset + k if more)
    not_text_weight: float = 0.5  # beta: a not_text subtracts beta x the score it would get as a text query


@dataclass(frozen=True)
class DisplayConfig:
    """What a shop shows of an item (the search page, GET /info), and which columns it offers as filters."""

    title: str = "title"  # the product's name
    price: str | None = "price"  # shown as the price, and offered for sorting, when the catalog has it
    currency: str | None = None  # the prices' ISO 4217 code (EUR, USD, JPY): shown with the shopper's number format
    brand: str | None = None  # shown under the name, e.g. "brand" or "creator"
    columns: tuple[str, ...] = ()  # more columns shown on result cards (default: none)
    facets: tuple[str, ...] = ()  # columns offered as filters (default: chosen from the columns' types and values)

    def __post_init__(self) -> None:
        if self.currency is not None:
            if not (len(self.currency) == 3 and self.currency.isascii() and self.currency.isalpha()):
                raise ConfigError(f"currency: expected an ISO 4217 code of three letters (EUR, USD, JPY), got {self.currency!r}")
            object.__setattr__(self, "currency", self.currency.upper())


@dataclass(frozen=True)
class RetrieverConfig:
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    display: DisplayConfig = field(default_factory=DisplayConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> RetrieverConfig:
        return _build(cls, data or {}, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RetrieverConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> RetrieverConfig:
        merged = self.to_dict()
        for section, values in overrides.items():
            if section not in merged or not isinstance(values, dict):
                raise ConfigError(f"override: unknown section {section!r}{did_you_mean(section, merged)}")
            merged[section].update(values)
        return RetrieverConfig.from_dict(merged, source="override")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) config dataclass from a mapping; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        near = did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown key(s) {unknown}{near + ' Allowed' if near else '; allowed'}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(default, tuple):
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}.{name}: expected a list, got {value!r}")
            kwargs[name] = tuple(value)
        elif default is None:  # optional paths
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}.{name}: expected a path or null, got {value!r}")
            kwargs[name] = value
        elif type(default) is float and type(value) is int:
            kwargs[name] = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a section's own check (display.currency), named where it is
        raise ConfigError(f"{where}.{exc}") from None
