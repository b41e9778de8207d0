"""The query engine (multiretrieval/query): one declaration of the search options (SearchOptions), from which the
command line's flags, the service's request model and the table of options come; a Searcher that embeds a batch in
one pass per encoder; an unknown option refused naming the nearest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval import cli
from multiretrieval.config import SearchConfig
from multiretrieval.query.options import HYBRID_METHODS, MODES, SearchOptions, declared, option_names, options_table

# ---------------------------------------------------------------- a batch: one pass per encoder


@pytest.fixture()
def with_a_photo_only(retriever_copy, fixtures):
    """The fixture items and one without text: auto-mode text queries search its image through the zero-shot space."""
    retriever_copy.add(pd.DataFrame({"id": [9001], "image": [str(fixtures / "images" / "refrigerator.png")]}), show_progress=False)
    return retriever_copy


def mixed_batch(fixtures) -> list[dict]:
    photo = fixtures / "images" / "bed1.png"
    return [{"text": "a sofa"},  # auto: item texts, and the photo-only item through the zero-shot space
            {"text": "a lamp", "not_text": "metal"},  # the concept subtracted in both spaces
            {"image": photo}, {"image": photo, "text": "in blue"},
            {"text": "a fridge", "mode": "zero-shot"}, {"image": photo, "mode": "zero-shot", "not_text": "wood"},
            {"like": 56, "text": "a bed"}, {"like": 47, "not_text": "a chair"}]


def count_calls(monkeypatch, owner, name: str, calls: dict) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def test_a_mixed_batch_runs_each_encoder_once(with_a_photo_only, fixtures, monkeypatch):
    """Joint texts and photos, the zero-shot texts of auto and zero-shot queries, the photos of zero-shot ones and the
    not_text concepts: the text encoder and the image encoder each run once for the whole batch, the zero-shot space's
    text head once for the queries' texts and once for the concepts, its image head once (the text encoder ran once
    per kind of query, again for each concept and for each auto-mode query's zero-shot side before)."""
    r = with_a_photo_only
    embedder, calls = r.embedder, {}
    zero_shot = embedder.zero_shot  # loaded before counting: building it runs no query
    count_calls(monkeypatch, embedder.text_encoder, "forward", calls)
    count_calls(monkeypatch, embedder.image_encoder, "forward_images", calls)
    count_calls(monkeypatch, zero_shot, "text_batch", calls)
    count_calls(monkeypatch, zero_shot, "image_batch", calls)
    answers = r.search_batch(mixed_batch(fixtures))
    assert calls == {"forward": 1, "forward_images": 1, "text_batch": 2, "image_batch": 1}
    assert 9001 in answers[0]["id"].tolist() and "image" in answers[0]["matched"].tolist()  # the zero-shot side ran


def test_a_batch_answers_as_its_queries_alone(with_a_photo_only, fixtures):
    r = with_a_photo_only
    queries = mixed_batch(fixtures)
    for query, answer in zip(queries, r.search_batch(queries)):
        alone = r.search(**query)
        assert answer["id"].tolist() == alone["id"].tolist() and list(answer.columns) == list(alone.columns)
        np.testing.assert_allclose(answer["score"], alone["score"], atol=1e-6)  # zero-shot heads: a matrix product


def test_a_query_of_an_image_loads_no_text_model(indexed, fixtures, monkeypatch):
    """The passes run only the encoders a batch has work for: a photo query never calls the text encoder."""
    calls = {}
    count_calls(monkeypatch, indexed.embedder.text_encoder, "forward", calls)
    indexed.search(image=fixtures / "images" / "bed1.png", k=2)
    assert calls == {}


# ---------------------------------------------------------------- one declaration: the command line and the service

def search_parser():
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices["search"]


def test_every_option_is_a_command_line_flag_and_a_request_field():
    from multiretrieval.server.schemas import search_request_model

    actions = {a.dest: a for a in search_parser()._actions}
    model = search_request_model(SearchConfig(), vector_dim=16)
    for d in declared():
        assert actions[d.name].option_strings == [d.flag] and actions[d.name].default == d.default, d.name
        assert tuple(actions[d.name].choices or ()) == (d.option.choices or ()), d.name
        assert (d.name in model.model_fields) == d.option.served, d.name
        assert d.option.help and "\n" not in d.option.help, d.name
    assert set(model.model_fields) - set(option_names()) == {"image_url", "facets"}  # the service's own fields
    assert {d.name for d in declared() if not d.option.served} == {"image", "unsafe_where"}
    assert dict(zip(("mode", "hybrid"), (MODES, HYBRID_METHODS))) == {d.name: d.option.choices for d in declared() if d.option.choices}


# Each option as the command line takes it and the value Retriever.search gets for it: the same as from Python.
CLI_SAMPLES = {
    "image": (["photo.png"], "photo.png"), "text": (["a bed"], "a bed"), "mode": (["zero-shot"], "zero-shot"),
    "k": (["5"], 5), "where": (["price < 200"], "price < 200"), "hybrid": (["weighted"], "weighted"),
    "keyword_weight": (["0.3"], 0.3), "offset": (["20"], 20),
    "filters": (['{"category": ["Kitchen"], "price": {"max": 200}}'], {"category": ["Kitchen"], "price": {"max": 200}}),
    "sort_by": (["price desc"], "price desc"), "min_score": (["0.25"], 0.25),
    "weights": (["image=0.7,text=0.3"], {"image": 0.7, "text": 0.3}), "not_text": (["metal legs"], "metal legs"),
    "like": (["56"], "56"), "vector": (["[0.5, 0.25]"], [0.5, 0.25]), "crop": (["0.5,0,1,1"], [0.5, 0.0, 1.0, 1.0]),
    "unsafe_where": ([], True),
}


@pytest.fixture()
def recorded(monkeypatch):
    """Retriever.load gives a stand-in whose search records its arguments."""
    calls = []

    class Stub:
        def search(self, **kwargs):
            calls.append(kwargs)
            return pd.DataFrame({"rank": [], "id": [], "score": []})

    monkeypatch.setattr(mr.Retriever, "load", classmethod(lambda cls, *args, **kwargs: Stub()))
    return calls


def test_each_flag_reaches_search_with_the_value_python_would_pass(recorded):
    assert set(CLI_SAMPLES) == set(option_names())  # a new option needs a sample here
    argv = ["search", "idx", "--format", "json"]
    for name, (values, _) in CLI_SAMPLES.items():
        argv += ["--" + name.replace("_", "-"), *values]
    assert cli.main(argv) == 0
    assert recorded[-1] == {name: value for name, (_, value) in CLI_SAMPLES.items()}
    assert cli.main(["search", "idx", "--text", "a bed", "--format", "json"]) == 0  # none given: the declared defaults
    assert recorded[-1] == {**{d.name: d.default for d in declared()}, "text": "a bed"}
    assert recorded[-1] == vars(SearchOptions.of(text="a bed"))  # Retriever.search's own defaults


def test_min_score_takes_a_number_or_a_word_on_the_command_line(recorded):
    for given, passed in (("0.3", 0.3), ("auto", "auto"), ("off", "off")):
        assert cli.main(["search", "idx", "--text", "a bed", "--min-score", given, "--format", "json"]) == 0
        assert recorded[-1]["min_score"] == passed


def test_weights_also_take_json_and_bad_json_is_refused_naming_the_flag(recorded, capsys):
    assert cli.main(["search", "idx", "--text", "a bed", "--weights", '{"image": 1}', "--format", "json"]) == 0
    assert recorded[-1]["weights"] == {"image": 1}
    with pytest.raises(SystemExit):
        cli.main(["search", "idx", "--text", "a bed", "--filters", "{category: Kitchen}"])
    assert "--filters: expected JSON" in capsys.readouterr().err


def test_the_service_passes_each_option_as_python_would(indexed):
    """A request's fields reach Retriever.search as the same values (like=0 kept: it is an item)."""
    from multiretrieval.server.app import _search_arguments
    from multiretrieval.server.schemas import search_request_model

    model = search_request_model(SearchConfig())
    served = {name: value for name, (_, value) in CLI_SAMPLES.items() if name not in ("image", "unsafe_where")}
    assert _search_arguments(model.model_validate(served, strict=True)) == served
    # The service's own default floor is "auto" (the declaration's service_default); Python's is None, every result.
    assert _search_arguments(model.model_validate({"like": 0}, strict=True)) == {"like": 0, "mode": "auto", "k": 10, "offset": 0,
                                                                                  "min_score": "auto"}


def test_the_command_line_pages_sorts_filters_and_finds_more_like_an_item(indexed, tmp_path, capsys):
    """The flags the command line lacked (issue 30): each gives what Retriever.search gives."""
    indexed.save(tmp_path / "idx")
    asks = [{"text": "a seat", "filters": {"category": ["Living room", "Bedroom"]}, "sort_by": "-price", "k": 2},
            {"text": "furniture", "offset": 3, "k": 3}, {"like": 56, "k": 3}, {"like": 56, "text": "a bed", "k": 2}]
    for ask in asks:
        argv = ["search", str(tmp_path / "idx"), "--format", "json"]
        for name, value in ask.items():
            argv.append(f"--{name.replace('_', '-')}={json.dumps(value) if isinstance(value, dict) else value}")  # "=-price"
        assert cli.main(argv) == 0
        shown = json.loads(capsys.readouterr().out)
        expected = indexed.search(**ask)
        assert [row["id"] for row in shown] == expected["id"].tolist() and [row["rank"] for row in shown] == expected["rank"].tolist()


@pytest.mark.parametrize("value", ["", "price", "-price", "price desc", " price  ASC ", "price\u3000desc", "price\tDeSc\n",
                                   "0 0", "a b c", "   ", "price desc x", "price\ndesc\nx"])
def test_the_schema_states_the_sort_key_grammar(value):
    """The service's schema says which sort_by values the query stage reads: the fuzz test's generated "0 0" was a
    request the schema called valid and the service refused (400)."""
    import re

    from multiretrieval.query.checks import _sort_key
    from multiretrieval.server.schemas import search_request_model

    pattern = search_request_model(SearchConfig()).model_json_schema()["properties"]["sort_by"]["pattern"]
    try:
        _sort_key(value)
        read = True
    except mr.QueryError:
        read = False
    assert bool(re.search(pattern, value)) == read


# ---------------------------------------------------------------- an unknown option: did you mean

def test_an_unknown_option_names_the_nearest_in_python(indexed):
    with pytest.raises(mr.QueryError, match=r"unknown search option 'ofset'; did you mean 'offset'\?"):
        indexed.search(text="a bed", ofset=2)
    with pytest.raises(mr.QueryError, match=r"unknown search option 'sortby'; did you mean 'sort_by'\?"):
        indexed.search_batch([{"text": "a bed"}, {"text": "a bed", "sortby": "price"}])
    with pytest.raises(mr.QueryError, match=r"unknown search options \['colour', 'size'\]; known: \['image', 'text'"):
        indexed.search(text="a bed", colour="red", size=3)


def test_an_unknown_flag_names_the_nearest_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", "idx", "--text", "a bed", "--ofset", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --ofset 3; did you mean '--offset'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["search", "idx", "--text", "a bed", "--sort_by=price"])
    assert "did you mean '--sort-by'?" in capsys.readouterr().err


# ---------------------------------------------------------------- the table of options

def test_the_table_of_options_has_every_option_with_its_bound_at_the_index_value():
    table = options_table(SearchConfig(max_k=77, max_text_chars=55))
    rows = {row.split("|")[1].strip().strip("`"): row for row in table.splitlines()[2:]}
    assert list(rows) == list(option_names())
    assert "`search.max_k`" in rows["k"] and "1 to 77 (search.max_k)" in rows["k"] and "`10`" in rows["k"]
    assert "at most 55 characters" in rows["text"] and "`search.max_text_chars`" in rows["not_text"]
    assert "`auto`, `image`, `text`, `fused`, `zero-shot`" in rows["mode"]
    assert "not in the service" in rows["unsafe_where"] and "not in the service" not in rows["like"]
    assert all(row.count(" | ") == 4 for row in rows.values())  # a "|" in a help is escaped


def test_the_docs_table_of_options_is_the_rendered_one():
    """The pages that hold the table (after the marker ``<!-- search-options -->``; Queries and scores does) hold it as
    options_table renders it: an option added, renamed or re-bounded in SearchOptions changes the docs with it."""
    from pathlib import Path

    marker = "<!-- search-options -->\n"
    pages = [p for p in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md")) if marker in p.read_text()]
    assert "queries.md" in [p.name for p in pages]
    for page in pages:
        text = page.read_text().split(marker, 1)[1]
        assert text.startswith(options_table()), f"{page.name}: the table of options differs from options_table()"


# ---------------------------------------------------------------- evaluation ranks as search does

def test_evaluation_orders_fused_queries_as_search_does(indexed, fixtures):
    """The word filter's order (the items the words name first, by the photo alone) is the query engine's: the
    evaluation's scores of a fused query sort the items as search returns them."""
    from multiretrieval import evaluation
    from multiretrieval.catalog import load_image

    photos = [fixtures / "images" / name for name in ("bed1.png", "washing_machine.png")]
    texts = ["Seat", "a sofa", "bed", "Kitchen"]
    photo_of, text_of = np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])
    features = evaluation._QueryFeatures(indexed.embedder, [load_image(p) for p in photos], texts, photo_of, text_of)
    scores = evaluation._scores(indexed, features)["fused"]
    ids = indexed.items["id"].to_numpy()
    named = 0
    for i, (p, t) in enumerate(zip(photo_of, text_of)):
        found = indexed.search(image=photos[p], text=texts[t], k=len(ids))
        assert ids[np.argsort(-scores[i], kind="stable")].tolist() == found["id"].tolist()
        named += int(found["word_match"].any())
    assert named == 3  # the word filter ran (not for "Kitchen")
