"""Search options beyond the basic query: paging, sorting, a score floor, structured filters,
"more like this", a given vector, batches, and facets (issue 13)."""

import numpy as np
import pytest

import multiretrieval as mr


def ids(frame):
    return frame["id"].tolist()


def test_pages_continue_where_the_last_one_ended(indexed):
    whole = indexed.search(text="a bed", k=8)
    first, second = indexed.search(text="a bed", k=3), indexed.search(text="a bed", k=3, offset=3)
    assert ids(first) + ids(second) == ids(whole)[:6]
    assert second["rank"].tolist() == [4, 5, 6]
    assert first.attrs["has_more"] and not indexed.search(text="a bed", k=3, offset=5).attrs["has_more"]


@pytest.mark.parametrize("sort_by,descending", [("price", False), ("-price", True), ("price desc", True), ("price asc", False)])
def test_sort_by_a_column(indexed, sort_by, descending):
    res = indexed.search(text="furniture", k=8, sort_by=sort_by)
    assert sorted(ids(res)) == sorted(ids(indexed.search(text="furniture", k=8)))  # the same items, reordered
    assert res["price"].tolist() == sorted(res["price"], reverse=descending)
    assert res["rank"].tolist() == list(range(1, 9))


def test_min_score_drops_weak_results(indexed):
    everything = indexed.search(text="a bed", k=8)
    floor = float(everything["score"].iloc[2])
    kept = indexed.search(text="a bed", k=8, min_score=floor)
    # The floor is on the score (the joint space's scale); the order stays the hybrid ranking's.
    assert ids(kept) == ids(everything[everything["score"] >= floor]) and (kept["score"] >= floor).all()
    assert len(kept) >= 3


def test_structured_filters(indexed):
    res = indexed.search(text="a seat", k=8, filters={"category": ["Living room", "Bedroom"], "price": {"max": 700}})
    assert set(res["category"]) <= {"Living room", "Bedroom"} and (res["price"] <= 700).all() and len(res) == 2
    both = indexed.search(text="a seat", k=8, where="price > 200", filters={"category": ["Living room", "Bedroom"]})
    assert set(ids(both)) == {56, 118}


def test_more_like_an_item_leaves_the_item_out(indexed):
    res = indexed.search(like=56, k=3)  # the sofa
    assert 56 not in ids(res) and ids(res)[0] == 47  # the armchair
    assert 56 not in ids(indexed.search(like="56", k=7, mode="image"))
    by_text = indexed.search(like=575, k=1, mode="text")  # "Washing machine. front-loading, 7 kg" reads like the fridge
    assert ids(by_text) == [773]


def test_an_item_photo_plus_words_is_this_but(indexed):
    res = indexed.search(like=56, text="a bed", k=2)  # the sofa's photo + "a bed"
    assert ids(res)[0] == 118 and {"image_score", "text_score"} <= set(res.columns)


def test_a_given_vector_is_searched_and_its_width_checked(indexed):
    v = indexed.encode(texts=["a refrigerator"])[0]
    assert ids(indexed.search(vector=v, k=1)) == ids(indexed.search(text="a refrigerator", k=1))
    with pytest.raises(mr.QueryError, match="dimensions"):
        indexed.search(vector=np.ones(7), k=1)


def test_batches_answer_as_single_searches_do(indexed, catalog):
    photo = catalog.image_sources()[2]
    queries = [{"text": "a car", "k": 2}, {"text": "a lamp"}, {"image": photo, "k": 3}, {"like": 56, "k": 2},
               {"image": photo, "text": "a sofa", "k": 2}, {"text": "a toilet", "mode": "zero-shot", "k": 1}]
    answers = indexed.search_batch(queries)
    for query, answer in zip(queries, answers):
        single = indexed.search(**query)
        assert ids(answer) == ids(single)
        np.testing.assert_allclose(answer["score"], single["score"], atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"text": "x", "offset": -1}, "offset"), ({"text": "x", "sort_by": "colour"}, "sortable columns"),
    ({"text": "x", "min_score": "high"}, "min_score"), ({"text": "x", "filters": {"price": {"lo": 1}}}, "filters"),
    ({"text": "x", "filters": {"colour": "red"}}, r"filters: no column 'colour' in this index; columns: .*price \(number\)"),
    ({"text": "x", "filters": {"price": "cheap"}}, r"filters\['price'\]: 'cheap' is text, but 'price' holds numbers"),
    ({"text": "x", "filters": {"category": [3]}}, r"3 is a number, but 'category' holds text: give it as '3'"),
    ({"text": "x", "colour": "red"}, "unknown search option"), ({"like": 999}, "not in the index"),
    ({"like": 56, "vector": [1.0]}, "give one of"), ({"vector": [1.0, 2.0], "mode": "text"}, "joint space"),
])
def test_bad_options_are_named(indexed, kwargs, message):
    with pytest.raises((mr.QueryError, mr.ItemNotFoundError), match=message):
        indexed.search(**kwargs)


def test_a_batch_is_bounded(indexed):
    with pytest.raises(mr.LimitError, match="max_batch"):
        indexed.search_batch([{"text": "x"}] * (indexed.config.search.max_batch + 1))


def test_facets_count_each_column_without_its_own_filter(indexed):
    facets = indexed.facets(["category", "price"], filters={"category": ["Kitchen"], "price": {"min": 100}})
    counts = {v["value"]: v["count"] for v in facets["category"]["values"]}
    assert counts == {"Kitchen": 2, "Living room": 2, "Bathroom": 1, "Bedroom": 1, "Vehicles": 1}  # price >= 100 only
    price = facets["price"]
    assert (price["min"], price["max"]) == (39.0, 12000.0)  # the slider's scale: all items
    assert sum(price["histogram"]["counts"]) == 2 and len(price["histogram"]["edges"]) == 11  # the two kitchen items
    assert set(indexed.facets()) == set(indexed.facet_columns())


def test_facets_are_counted_once_per_filter_and_again_after_a_write(retriever_copy):
    r = retriever_copy
    first = r.facets(["category"])
    first["category"]["values"].clear()  # a caller's change stays in its copy
    counts = {v["value"]: v["count"] for v in r.facets(["category"])["category"]["values"]}
    assert sum(counts.values()) == len(r)
    kitchen = counts["Kitchen"]
    narrowed = r.facets(["category"], where="price >= 100")["category"]["values"]  # another filter: counted anew
    assert sum(v["count"] for v in narrowed) < len(r)
    r.remove([r.items.loc[r.items["category"] == "Kitchen", "id"].iloc[0]])
    after = {v["value"]: v["count"] for v in r.facets(["category"])["category"]["values"]}
    assert after.get("Kitchen", 0) == kitchen - 1 and sum(after.values()) == len(r)


def test_facets_refuse_unknown_columns(indexed):
    with pytest.raises(mr.QueryError, match="no column"):
        indexed.facets(["colour"])


def test_facet_columns_come_from_the_config(catalog):
    r = mr.Retriever(mr.RetrieverConfig().with_overrides({"display": {"facets": ["category", "price"]}}))
    r.index(catalog, show_progress=False)
    assert r.facet_columns() == ["category", "price"] and list(r.facets()) == ["category", "price"]


def test_structured_filters_quote_names_and_pass_values_as_parameters():
    from multiretrieval.filters import compile_filters

    sql, params = compile_filters({"the 'col'": ["it's", 3], "price": {"min": 1.5}}, leave_out="none")
    assert sql == """("the 'col'" IN (SELECT unnest(?)) OR "the 'col'" IN (SELECT unnest(?))) AND "price" >= ?"""
    assert params == [[3], ["it's"], 1.5]  # no value is SQL text
    assert compile_filters({"a": [1]}, leave_out="a") == (None, []) and compile_filters({"a": []}) == (None, [])
    with pytest.raises(mr.QueryError):
        compile_filters({"a": [object()]})
    sql, params = compile_filters({"a": [np.int64(4)]})
    assert (sql, params) == ('"a" IN (SELECT unnest(?))', [[4]]) and type(params[0][0]) is int  # DuckDB takes no numpy scalars
    assert compile_filters({"color": "red", "n": 2}) == ('"color" = ? AND "n" = ?', ["red", 2])  # one value needs no list
    assert compile_filters({"n": "2", "x": {"min": " 1.5"}}, {"n": "integer", "x": "number"}) == ('"n" = ? AND "x" >= ?', [2, 1.5])
    dates = compile_filters({"day": ["2024-01-31"]}, {"day": "timestamp"}, lambda column: "TIMESTAMP")
    assert dates == ('"day" IN (SELECT unnest(CAST(? AS TIMESTAMP[])))', [["2024-01-31"]])  # texts compared as literals are


def test_facets_give_a_numeric_columns_quantiles_over_all_items(indexed):
    """A slider on the quantile scale moves by shares of the products: the facet gives the 101 percentiles (values of
    the column), over all items whatever the filters, as min and max are."""
    prices = indexed.items["price"].to_numpy()
    quantiles = indexed.facets(["price"])["price"]["quantiles"]
    assert len(quantiles) == 101 and quantiles[0] == prices.min() and quantiles[-1] == prices.max()
    assert quantiles == sorted(quantiles) and set(quantiles) <= set(prices.tolist())
    for p, value in enumerate(quantiles):  # at least p% of the items cost at most that, and at most p% less
        assert (prices < value).mean() <= p / 100 <= (prices <= value).mean()
    assert indexed.facets(["price"], filters={"category": ["Kitchen"]})["price"]["quantiles"] == quantiles


@pytest.fixture(scope="module")
def mixed(catalog, fixtures):
    """The fixture items, 24 listings without a photo and 3 photos without a text: more items than a short page's
    ranking reads, and items that a zero-shot or text-only query does not compare."""
    import pandas as pd

    rows = catalog.df.assign(image=catalog.image_sources())
    texts = pd.DataFrame({"id": range(1000, 1024), "title": [f"Oak dining chair no. {i}" for i in range(24)],
                          "category": ["Kitchen", "Office"] * 12, "price": [10.0 * (i + 1) for i in range(24)]})
    photos = pd.DataFrame({"id": [2000, 2001, 2002], "category": ["Bedroom"] * 3,
                           "image": [str(fixtures / "images" / n) for n in ("bed1.png", "desk_lamp1.png", "smart-car.png")]})
    retriever = mr.Retriever()
    report = retriever.index(pd.concat([rows, texts, photos], ignore_index=True), show_progress=False)
    assert report.indexed == 35 and not report.skipped
    return retriever


def test_a_search_counts_the_items_it_matches_on_every_page(mixed, fixtures):
    """attrs["total"]: the items the query ranks (those the filters let through that have what its mode compares;
    the `like` item left out), however short the page; paging to the end gives exactly that many."""
    items = mixed.items
    photo = fixtures / "images" / "bed1.png"
    kitchen = int((items["category"] == "Kitchen").sum())
    cases = [({"text": "a chair"}, 35), ({"text": "a chair", "mode": "text"}, 32),  # items with a text
             ({"text": "a chair", "mode": "zero-shot"}, 11), ({"image": photo, "mode": "zero-shot"}, 32),  # photos; texts
             ({"image": photo}, 35), ({"image": photo, "text": "blue"}, 35), ({"like": 575}, 34), ({"like": 575, "text": "blue"}, 34),
             ({"text": "a chair", "filters": {"category": ["Kitchen"]}}, kitchen), ({"text": "a chair", "where": "price < 100"}, 10)]
    for query, expected in cases:
        assert mixed.search(k=2, **query).attrs["total"] == expected, query
        assert len(mixed.search(k=1000, **query)) == expected, query


def test_with_a_score_floor_the_count_is_exact_where_the_ranking_settles_it(mixed, fixtures):
    photo = fixtures / "images" / "bed1.png"
    everything = mixed.search(image=photo, k=35)
    floor = float(everything["score"].iloc[4])
    # an image query's ranking is read best first: its last read item scores under the floor, and so does every other
    assert mixed.search(image=photo, k=2, min_score=floor).attrs["total"] == int((everything["score"] >= floor).sum())
    assert mixed.search(image=photo, k=2, min_score=-1.0).attrs["total"] is None  # all it read pass: the rest uncounted
    # a text query's ranking (keywords and vectors) has no such bound: its vector ranking is read deeper to count
    every = mixed.search(text="a chair", k=1000, hybrid="off")
    for floor in (0.9, float(every["score"].iloc[20])):
        expected = int((every["score"] >= floor).sum())
        assert mixed.search(text="a chair", k=2, min_score=floor).attrs["total"] == expected, floor
    assert mixed.search(text="a chair", k=100, min_score=-1.0).attrs["total"] == 35  # it read every item
