"""No sequence of index / add / remove / update / save / load loses or duplicates an item (hypothesis, stateful).

The retriever is checked after every step against a plain model: a dict of id -> which version of
the item it holds. Each version's joint vector comes from a reference retriever that indexed all of
them once, so the model's exact search (dot products) is what a correct retriever must answer:
the same ids, each once, with the same scores; filters select the model's rows.

``Retriever.upsert`` (issue 12) gets one more rule, run only where the method exists.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import multiretrieval as mr

from .conftest import FIXTURES

QUERY = "a comfortable bed"


def versions() -> dict[tuple[int, int], dict]:
    """Two versions of each fixture item: as in the catalog, and with another title and price."""
    catalog = mr.Catalog.from_csv(FIXTURES / "catalog.csv")
    rows = catalog.df.assign(image=catalog.image_sources()).to_dict("records")
    out = {}
    for row in rows:
        out[(row["id"], 0)] = row
        out[(row["id"], 1)] = {**row, "title": f"{row['title']} deluxe edition", "price": row["price"] * 3}
    return out


VERSIONS = versions()
IDS = sorted({i for i, _ in VERSIONS})


@pytest.fixture(scope="module")
def reference():
    """Each version's joint vector, and the query's, from one retriever that indexed them all."""
    r = mr.Retriever()
    keys = list(VERSIONS)
    r.index(pd.DataFrame([{**VERSIONS[k], "id": f"{k[0]}-{k[1]}"} for k in keys]), show_progress=False)
    vectors = dict(zip(keys, r.vectors("joint", [f"{i}-{v}" for i, v in keys])))
    query = r.embedder.query_vectors(r.embedder.features(texts=[QUERY]))[0]  # on the score scale, as search scales it
    return vectors, query, r.embedder


class RetrieverModel(RuleBasedStateMachine):
    """Rules change the retriever and the model alike; invariants compare them."""

    vectors: dict = {}
    query: np.ndarray
    embedder = None
    folder = None

    def __init__(self) -> None:
        super().__init__()
        self.retriever: mr.Retriever | None = None
        self.model: dict[int, int] = {}  # id -> version
        self.saves = 0

    def rows(self, chosen: dict[int, int]) -> pd.DataFrame:
        return pd.DataFrame([VERSIONS[(i, v)] for i, v in chosen.items()])

    @rule(chosen=st.dictionaries(st.sampled_from(IDS), st.integers(0, 1), min_size=1, max_size=4))
    def index(self, chosen):
        r = mr.Retriever(embedder=self.embedder)
        r.index(self.rows(chosen), show_progress=False)
        self.retriever, self.model = r, dict(chosen)

    @precondition(lambda self: self.retriever is not None and len(self.model) < len(IDS))
    @rule(data=st.data())
    def add(self, data):
        absent = [i for i in IDS if i not in self.model]
        chosen = data.draw(st.dictionaries(st.sampled_from(absent), st.integers(0, 1), min_size=1, max_size=3))
        self.retriever.add(self.rows(chosen), show_progress=False)
        self.model.update(chosen)

    @precondition(lambda self: self.retriever is not None)
    @rule(data=st.data())
    def add_an_indexed_id(self, data):
        if not self.model:
            return
        taken = data.draw(st.sampled_from(sorted(self.model)))
        with pytest.raises(mr.CatalogError, match="already indexed"):
            self.retriever.add(self.rows({taken: 1 - self.model[taken]}), show_progress=False)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data):
        gone = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3, unique=True))
        assert self.retriever.remove(gone) == len(gone)
        for i in gone:
            del self.model[i]

    @precondition(lambda self: self.retriever is not None)
    @rule(unknown=st.sampled_from([10**9, -1]))
    def remove_an_unknown_id(self, unknown):
        with pytest.raises(mr.ItemNotFoundError):
            self.retriever.remove([unknown])

    @precondition(lambda self: self.retriever is not None)
    @rule()
    def save_and_load(self):
        self.saves += 1
        folder = self.folder / f"save-{id(self)}"  # the same folder each time: a save replaces the last one
        self.retriever.save(folder)
        self.retriever = mr.Retriever.load(folder)

    @precondition(lambda self: self.retriever is not None and hasattr(mr.Retriever, "upsert"))
    @rule(chosen=st.dictionaries(st.sampled_from(IDS), st.integers(0, 1), min_size=1, max_size=4))
    def upsert(self, chosen):
        self.retriever.upsert(self.rows(chosen), prune=False)  # new ids added, changed ones re-encoded, the rest kept
        self.model.update(chosen)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def update(self, data):
        item = data.draw(st.sampled_from(sorted(self.model)))
        version = data.draw(st.integers(0, 1))
        row = VERSIONS[(item, version)]
        report = self.retriever.update(item, title=row["title"], price=row["price"])  # the other values stay
        assert report.reencoded == (version != self.model[item])  # a new title: encoded again
        self.model[item] = version

    @invariant()
    def same_items_each_once(self):
        if self.retriever is None:
            return
        ids = self.retriever.items["id"].tolist()
        assert sorted(ids) == sorted(self.model) and len(self.retriever) == len(self.model)
        titles = dict(zip(self.retriever.items["id"], self.retriever.items["title"]))
        assert titles == {i: VERSIONS[(i, v)]["title"] for i, v in self.model.items()}

    @invariant()
    def exact_search_agrees_with_the_model(self):
        if self.retriever is None or not self.model:
            return
        results = self.retriever.search(text=QUERY, k=len(IDS), hybrid="off")  # the model is exact vector search
        assert results["id"].is_unique and sorted(results["id"]) == sorted(self.model)
        expected = {i: float(self.vectors[(i, v)] @ self.query) for i, v in self.model.items()}
        np.testing.assert_allclose(results["score"], [expected[i] for i in results["id"]], atol=1e-4)
        cheap = self.retriever.search(text=QUERY, k=len(IDS), where="price < 500", hybrid="off")
        assert sorted(cheap["id"]) == sorted(i for i, v in self.model.items() if VERSIONS[(i, v)]["price"] < 500)


def test_no_sequence_of_writes_loses_or_duplicates_an_item(reference, tmp_path):
    RetrieverModel.vectors, RetrieverModel.query, RetrieverModel.embedder = reference
    RetrieverModel.folder = tmp_path
    run_state_machine_as_test(RetrieverModel, settings=settings(
        max_examples=8, stateful_step_count=8, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck)))
