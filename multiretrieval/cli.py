"""Command-line interface, one sub-command per API call, with the API's argument names.

    multiretrieval index CATALOG|FOLDER --out DIR [--update [--prune]] [--image-column NAME] [--title-from-filename]
                                               [--config FILE] [--cache DIR] ...
    multiretrieval search DIR [--text T] [--image PATH] [--crop x0,y0,x1,y1] [--mode M] [--k N] [--where COND] [--offset N]
                              [--sort-by COL] [--filters JSON] [--like ID] [--weights image=0.7,text=0.3] [--not-text T]
                              [--min-score S] ... (every option of Retriever.search: query/options.py) [--show out.png]
    multiretrieval cache prune INDEX_DIR... [--cache DIR] [--dry-run]
    multiretrieval train CATALOG --out DIR [--config FILE] [--epochs N] [--seed S]
    multiretrieval evaluate BENCH_DIR --out DIR [--config FILE] [--no-train] [--only NAME ...]
    multiretrieval serve DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--config FILE] [--no-access-log]
    multiretrieval demo [--catalog CSV] [--out DIR]

Heavy libraries are imported inside the commands, so --help answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _load_config(path: str | None, factory: str | None = None, fusion: str | None = None, memory_gb: float | None = None):
    from .config import RetrieverConfig

    config = RetrieverConfig.from_yaml(path) if path else RetrieverConfig()
    if factory:
        config = config.with_overrides({"index": {"factory": factory}})
    if memory_gb is not None:
        config = config.with_overrides({"index": {"memory_budget_gb": memory_gb}})
    if fusion:
        config = config.with_overrides({"fusion": {"kind": "attention", "weights": fusion}})
    return config


def cmd_index(args: argparse.Namespace) -> int:
    from .errors import StorageError
    from .persistence import FolderLock

    try:
        with FolderLock(args.out, "index") as lock:  # one writer per folder: not while a service serves it or a save writes it
            return _index(args, lock)
    except StorageError as exc:  # a full disk, under the shard cache or the index: one line, not a library's traceback
        before = "the previous index is intact" if (Path(args.out) / "manifest.json").is_file() else "nothing was saved"
        print(f"error: {exc}; {args.out} is as it was ({before})", file=sys.stderr)
        return 1


def _index(args: argparse.Namespace, lock) -> int:
    from .catalog import Catalog
    from .collection import saved_ids
    from .persistence import journal_path
    from .retriever import Retriever

    journal = journal_path(Path(args.out))
    if journal.is_file() and journal.stat().st_size:  # a service's writes the folder does not hold yet
        print(f"error: {journal} holds writes that a service (multiretrieval serve) acknowledged and has not saved into "
              f"{args.out} yet; indexing here would lose them, or be undone when it saves. Stop the service (it saves them "
              "on the way out; if none runs, one left them: start and stop it once), then index; or send the changes to "
              "the service (PUT /items/ID).", file=sys.stderr)
        return 2
    config = _load_config(args.config, args.factory, args.fusion, args.memory_gb)
    source = Path(args.catalog).expanduser()
    if source.is_dir():
        if args.image_column:
            print(f"error: --image-column names a column of a catalog file; {args.catalog} is a folder, whose images are "
                  "its files", file=sys.stderr)
            return 2
        catalog = Catalog.from_folder(source, recursive=not args.no_recursive, title_from_filename=args.title_from_filename,
                                      text_columns=config.catalog.text_columns)
    else:  # a bad row is reported with the rows that fail to encode, not a stop
        catalog = Catalog.read(args.catalog, text_columns=config.catalog.text_columns, bad_rows="skip",
                               image_column=args.image_column or config.catalog.image_column)
        print(f"{args.catalog}: {catalog.images_note()}", file=sys.stderr)  # before the models load: a wrong guess shows at once
    if not len(catalog) and not catalog.dropped:  # before the models load; with --prune it would empty the index
        print(f"error: {args.catalog} has no rows; {args.out} is as it was", file=sys.stderr)
        return 1
    cache = args.cache or f"{Path(args.out).resolve()}.cache"
    if args.update and (Path(args.out) / "manifest.json").is_file():
        retriever = Retriever.load(args.out, _load_config(args.config) if args.config else None)
        report = retriever.upsert(catalog, prune=args.prune, show_progress=not args.no_progress, cache=cache, engine=args.engine)
    else:
        retriever = Retriever(config)
        report = retriever.index(catalog, show_progress=not args.no_progress, cache=cache, engine=args.engine)
    # Saved before anything is printed: a closed pipe (`| head`) must not cost the run.
    dropped = 0 if args.update or not len(retriever) else len(saved_ids(args.out) - {str(i) for i in retriever.items["id"]})
    saved = retriever.save(args.out, lock=lock) if len(retriever) else None
    if dropped:  # a nightly file indexed without --update replaces the whole index: say so (stderr, before stdout)
        print(f"note: {args.out} held {dropped} item{'s' * (dropped != 1)} not in {args.catalog}; the new index replaces it "
              "without them (--update adds to an index instead)", file=sys.stderr)
    print(report)
    print(f"encoded shards kept in {cache} (a re-run encodes only new or changed items; "
          f"`multiretrieval cache prune {args.out}` drops the shards the index no longer uses)")
    if saved is None:
        print("error: no item could be indexed; nothing saved", file=sys.stderr)
        return 1
    print(f"saved to {saved}")
    rows = len(catalog) + len(catalog.dropped)
    if rows and len(report.skipped) == rows:  # a nightly file of nothing but bad rows: a job must hear of it
        print(f"error: no row of {args.catalog} could be used (all {rows} skipped); the index is as it was", file=sys.stderr)
        return 1
    if report.no_image_used:  # saved, but answers text queries only: a job must hear of it too
        first = next(iter(report.warnings or report.skipped), None)
        outcome = (f"the {report.indexed} items indexed are indexed by their text only, and image queries will not find "
                   "them" if report.indexed else "no item was indexed with a new image")
        print(f"error: none of the {report.images} images could be used{f' (first: {first})' if first else ''}; {outcome}",
              file=sys.stderr)
        return 3
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from .collection import saved_hashes
    from .pipeline import prune_store

    referenced: set[str] = set()
    for index_dir in args.index_dirs:
        referenced |= saved_hashes(index_dir)
    cache = args.cache or f"{Path(args.index_dirs[0]).resolve()}.cache"
    counts = prune_store(cache, referenced, dry_run=args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    print(f"{cache}: {verb} {counts['dropped']} shards ({counts['bytes'] / 2**20:.1f} MiB) that no given index uses; "
          f"kept {counts['kept']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import pandas as pd

    from .query.options import option_names
    from .retriever import Retriever

    retriever = Retriever.load(args.index_dir, _load_config(args.config) if args.config else None)
    results = retriever.search(**{name: getattr(args, name) for name in option_names()})
    if args.format == "json":
        print(results.to_json(orient="records", indent=2))
    elif args.format == "csv":
        print(results.to_csv(index=False), end="")
    else:
        with pd.option_context("display.width", 200, "display.max_columns", 12, "display.max_colwidth", 40):
            print(results.to_string(index=False) if len(results) else "no results")
    if args.show:
        from .catalog import load_image
        from .visualize import SheetRow, contact_sheet

        label = " + ".join(p for p in (f"image: {args.image}" if args.image else "", f'text: "{args.text}"' if args.text else "") if p)
        from .regions import crop_image

        query_image = crop_image(load_image(args.image), args.crop) if args.image else None
        print(f"contact sheet: {contact_sheet([SheetRow(label, results, query_image)], retriever.image_source, args.show)}")
    return 0


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """Every option of ``Retriever.search``, one flag each, generated from its declaration (query.SearchOptions):
    the same names (``--sort-by`` for sort_by), defaults, choices and help; dicts and lists as JSON."""
    from .query.options import declared

    readers = {"int": int, "float": float, "text": str, "json": parse_json, "pairs": parse_weights, "numbers": parse_numbers,
               "number_or_word": parse_number_or_word}
    for d in declared():
        shown = "" if d.default in (None, False) else f" (default {d.default})"
        kwargs = {"dest": d.name, "default": d.default, "help": (d.option.text() + shown).replace("%", "%%")}
        if d.reader == "flag":
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=readers[d.reader], choices=d.option.choices, metavar=d.option.metavar)
        parser.add_argument(d.flag, **kwargs)


def parse_json(value: str):
    """A JSON value on the command line (``--filters '{"category": ["Kitchen"]}'``)."""
    try:
        return json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected JSON, got {value!r}: {exc}") from None


def parse_number_or_word(value: str) -> float | str:
    """``0.3`` -> 0.3; a word (``auto``, ``off``) as it is, for the API to check."""
    try:
        return float(value)
    except ValueError:
        return value


def parse_numbers(value: str) -> list[float]:
    """``0.1,0.2,0.6,0.9`` (or the same as a JSON list) -> [0.1, 0.2, 0.6, 0.9], as the service gets them (the API
    checks how many and what they are)."""
    if value.lstrip().startswith("["):
        return parse_json(value)
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from None


def parse_weights(value: str) -> dict[str, float]:
    """``image=0.7,text=0.3`` (or the same as JSON) -> {"image": 0.7, "text": 0.3} (the API checks the names and values)."""
    if value.lstrip().startswith("{"):
        return parse_json(value)
    weights = {}
    for part in value.split(","):
        name, sep, number = part.partition("=")
        try:
            if not sep:
                raise ValueError(part)
            weights[name.strip()] = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected image=A,text=B with numbers, got {value!r}") from None
    return weights


def cmd_train(args: argparse.Namespace) -> int:
    from .catalog import Catalog
    from .training import fit

    config = _load_config(args.config)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    if overrides:
        config = config.with_overrides({"training": overrides})
    catalog = Catalog.read(args.catalog, text_columns=config.catalog.text_columns, image_column=config.catalog.image_column)
    report = fit(catalog, args.out, config, show_progress=not args.no_progress, resume=not args.no_resume)
    last = report["history"][-1] if report["history"] else {}
    print(f"trained on {report['train_items']} items ({report['val_items']} held out), {len(report['history'])} epochs; "
          f"best validation fused recall@1 {report['best_val_fused_R@1']:.3f}; last epoch {last}")
    print(f"saved to {args.out}; use it with `multiretrieval index CATALOG --out DIR --fusion {args.out}`")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    evaluate(args.bench_dir, args.out, _load_config(args.config), train=not args.no_train, show_progress=not args.no_progress,
             only=args.only)
    print((Path(args.out) / "report.md").read_text())
    print(f"written to {args.out}: report.md, results.json, recall_at_k.png")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CATALOG, run_demo

    run_demo(args.catalog or DEMO_CATALOG, args.out, k=args.k, show_progress=not args.no_progress)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .server import create_app
    from .server.guards import LOOPBACK_HOSTS
    from .utils import limit_malloc_arenas

    limit_malloc_arenas()  # before the model and request threads start
    api_key = args.api_key or os.environ.get("MULTIRETRIEVAL_API_KEY") or None
    hosts = list(LOOPBACK_HOSTS) + (args.allowed_host or [])
    if args.host not in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind names no host
        hosts.append(args.host)
    app = create_app(args.index_dir, api_key=api_key, max_upload_bytes=int(args.max_upload_mb * 2**20),
                     allowed_hosts=hosts, allowed_origins=args.allowed_origin, checkpoint_every=args.checkpoint_every,
                     config=_load_config(args.config) if args.config else None, max_concurrent=args.max_concurrent,
                     image_folders=args.image_folder)
    print(f"serving {args.index_dir} at http://{args.host}:{args.port}/ (API docs at /docs)"
          + ("" if api_key else "; write endpoints are open: set --api-key or MULTIRETRIEVAL_API_KEY"))
    if args.host in ("0.0.0.0", "::") and not args.allowed_host:  # noqa: S104
        print("note: requests must name this machine as localhost or 127.0.0.1 unless --allowed-host NAME "
              "(the name clients use, or '*') is given")
    uvicorn.run(app, host=args.host, port=args.port, log_config=_serve_logging(not args.no_access_log), log_level=None,
                access_log=not args.no_access_log, timeout_keep_alive=args.keep_alive)
    return 0


def _serve_logging(access: bool) -> dict:
    """uvicorn's logging: its own messages from warnings up, and (``access``) one line per request on stdout
    (client, request line, status): uvicorn's log_level would set both at once."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["uvicorn"]["level"] = config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if access else "WARNING"
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiretrieval", description="Multimodal image-text retrieval for product catalogs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index a catalog (CSV, Excel, parquet, JSON Lines) or a folder of images, and save it",
                       epilog="exit status: 0 indexed and saved; 1 nothing usable: no row could be indexed (the index at "
                              "--out is as it was), or it could not be written; 2 refused before indexing: the catalog or "
                              "the config is malformed (a missing column, a file that is not a table), or a service's writes "
                              "are not saved yet; 3 indexed and saved, but none of the images the catalog names could be "
                              "used: every item is indexed by its text only (the first reason is printed).")
    p.add_argument("catalog", help="catalog file (columns id, image, title, description, metadata...; CSV separated by "
                                   "commas, semicolons, tabs or bars; .xlsx with openpyxl) or a folder of images "
                                   "(id = the path in the folder; metadata.csv/.jsonl beside them joins by file_name)")
    p.add_argument("--image-column", metavar="NAME",
                   help="the column of image paths or URLs (default: catalog.image_column, else found by its name: image, "
                        "image_url, photo, ..., or by its values; the choice is printed)")
    p.add_argument("--out", required=True, help="folder to save the index to (replaced atomically)")
    p.add_argument("--update", action="store_true", help="upsert into the index at --out, if there is one: encode only new "
                                                         "and changed items, change the index in place")
    p.add_argument("--prune", action="store_true", help="with --update: remove indexed items missing from the catalog")
    p.add_argument("--title-from-filename", action="store_true", help="a folder: title each image by its file name")
    p.add_argument("--no-recursive", action="store_true", help="a folder: only its own images, not its subfolders'")
    p.add_argument("--config", help="YAML config (default: the packaged offline models)")
    p.add_argument("--factory", help="FAISS index_factory string, e.g. Flat, HNSW32, IVF1024,PQ32 (default: auto)")
    p.add_argument("--memory-gb", type=float, help="memory budget for each vector index when --factory is auto (default 8)")
    p.add_argument("--fusion", metavar="DIR", help="a trained fusion module (from `multiretrieval train`) instead of late fusion")
    p.add_argument("--cache", metavar="DIR", help="folder of encoded shards, reused by re-runs and resumed after a kill "
                                                  "(default: OUT.cache beside the index)")
    p.add_argument("--engine", choices=("local", "ray"), help="encode here (default) or on Ray "
                                                              "(local, or the cluster in $RAY_ADDRESS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("train", help="train the attention fusion on a catalog's own image/text pairs")
    p.add_argument("catalog", help="catalog file (CSV or parquet)")
    p.add_argument("--out", required=True, help="folder for the trained module and checkpoints (a rerun resumes)")
    p.add_argument("--config", help="YAML config: fusion sizes and the training section")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds an interrupted run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="query a saved index",
                       description="Query a saved index: every option of Retriever.search, with its name (the bounds "
                                   "shown are config.search's defaults; an index's config may set others).")
    p.add_argument("index_dir", help="folder written by `multiretrieval index`")
    add_search_options(p)
    p.add_argument("--show", metavar="PNG", help="also draw the query and its results into this PNG")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--config", help="YAML config; must name the encoders the index was built with")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="run the benchmarks built by scripts/build_benchmarks.py")
    p.add_argument("bench_dir", help="folder written by scripts/build_benchmarks.py")
    p.add_argument("--out", required=True, help="folder for report.md, results.json and recall_at_k.png")
    p.add_argument("--config", help="YAML config (encoders, zero-shot weights, training settings)")
    p.add_argument("--no-train", action="store_true", help="skip training the attention fusion")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these benchmarks: tuxpaint, unseen, sweethome3d, exact_names, regions, composed, fused, "
                        "composed/<data set>, fused/<data set> (default: all found)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="serve a saved index over HTTP, with a search page at /")
    p.add_argument("index_dir", help="folder written by `multiretrieval index`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="key that POST/PUT/PATCH/DELETE of items require (default: $MULTIRETRIEVAL_API_KEY)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger request bodies get 413 (default 10)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name clients may use besides localhost/127.0.0.1 (repeatable; '*' for any)")
    p.add_argument("--allowed-origin", action="append", metavar="URL",
                   help="a web origin (https://shop.example) whose pages may POST/DELETE (repeatable)")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                   help="save the index folder after this many writes (each write is in the write log before it is "
                        "answered; default 1000)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="searches that run at once (default: the usable CPUs); the rest wait their turn, first come first served")
    p.add_argument("--keep-alive", type=float, default=30.0, metavar="S",
                   help="seconds an idle connection stays open (default 30; uvicorn's 5 s closes connections that "
                        "busy clients are about to reuse, and they see a dropped request)")
    p.add_argument("--image-folder", action="append", metavar="DIR",
                   help="a folder whose image files a write (PATCH /items/ID with an `image` path) may name (repeatable; "
                        "default: none, and image paths are refused)")
    p.add_argument("--config", help="YAML config (search bounds, display, ...); must name the encoders the index was built with "
                                    "(default: the config saved with the index)")
    p.add_argument("--no-access-log", action="store_true",
                   help="do not log each request (by default one line a request on stdout: client, method, path, status)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cache", help="manage a folder of encoded shards")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    q = cache_sub.add_parser("prune", help="drop the shards that none of the given indexes uses")
    q.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR", help="the indexes whose items the cache must keep")
    q.add_argument("--cache", metavar="DIR", help="the shard folder (default: the first INDEX_DIR.cache)")
    q.add_argument("--dry-run", action="store_true", help="only say what would be dropped")
    q.set_defaults(func=cmd_cache_prune)

    p = sub.add_parser("demo", help="index the bundled demo catalog and run one query of each kind")
    p.add_argument("--catalog", help="catalog to use instead of data/demo/catalog.csv")
    p.add_argument("--out", default="demo-output", help="folder for the contact sheet (default demo-output)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command's arguments; a flag it does not have is refused naming its nearest flag."""
    from .errors import did_you_mean

    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser
        while command._subparsers is not None:  # down to the (sub-)command that ran
            chooser = command._subparsers._group_actions[0]
            command = chooser.choices[getattr(args, chooser.dest)]
        flags = [flag for action in command._actions for flag in action.option_strings]
        wrong = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), "")
        command.error(f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(wrong, flags) if wrong else ''}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if getattr(args, "prune", False) and not args.update:
        parser.error("--prune goes with --update")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The packaged models need no network; say so before transformers is imported, so that
    # it does not try the hub. A user who names a hub model can set HF_HUB_OFFLINE=0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .errors import MultiretrievalError

    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit, where nothing could catch it
        return status
    except BrokenPipeError:  # the reader went away (`| head`): no traceback; what was saved stays saved
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MultiretrievalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(exc, "details", None) and args.verbose:  # e.g. a refused filter's whole grammar
            print(exc.details, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
