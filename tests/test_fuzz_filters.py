"""Seeded fuzzing (hypothesis, derandomized, bounded) of the `where` language and of the JSON
bodies of `POST /search/text`: whatever the input, a filter compiles to SQL that SQLite runs or
is an RshashError, and the service answers 200 or 4xx, never 5xx. Each test records the number
of inputs, the failures and the p99 time to reject (junit properties; printed with -s)."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rshash.errors import RshashError
from rshash.index import store
from rshash.index.filters import compile_where
from rshash.service import ServiceConfig
from tests.service_server import running_service

FIELDS = {"id", "class", "dataset", "year", "window", "cloud"}
WORDS = [
    *("and", "or", "not", "in", "AND", "Not", "true", "false", "null"),
    *("(", ")", ",", "=", "==", "!=", "<", "<=", ">", ">=", "~", ";", "--", "'", '"', "\\"),
    *("class", "year", "window.row", "window..row", "clas", "id", "cloud", "_x-1", "9lives"),
]
_SURROGATES_TOO = st.characters(exclude_categories=())  # lone surrogates included


def _quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


TOKENS = st.one_of(
    st.sampled_from(WORDS),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(_SURROGATES_TOO, max_size=12).map(_quoted),
    st.integers(30, 120).map(lambda n: "9" * n),
    st.text(_SURROGATES_TOO, max_size=5),
)
SOUP = st.lists(TOKENS, max_size=40).map(" ".join)
NESTS = ["(", "not ", "not (", "year = 1 or (", "class = 'a' and (", "x = 1 or (y = 2 and ("]
DEEP = st.tuples(st.integers(0, 400), st.sampled_from(NESTS)).map(
    lambda d: d[1] * d[0] + "year = 1" + ")" * (d[0] * d[1].count("("))
)
LONG = st.tuples(st.integers(3900, 4300), st.sampled_from(["'", "9", "x = 1 or ", "("])).map(
    lambda d: ("class = " + d[1] * d[0])[: d[0]]
)
FILTERS = st.one_of(SOUP, DEEP, LONG, st.text(_SURROGATES_TOO, max_size=60))


class Tally:
    """Inputs tried, failures (any outcome but the allowed ones) and rejection times."""

    def __init__(self) -> None:
        self.inputs = 0
        self.failures: list[str] = []
        self.reject_s: list[float] = []

    def record(self, record_property: Any, name: str) -> None:
        p99 = float(np.percentile(self.reject_s, 99)) * 1000 if self.reject_s else 0.0
        summary = {
            "inputs": self.inputs,
            "failures": len(self.failures),
            "rejected": len(self.reject_s),
            "p99_reject_ms": round(p99, 2),
        }
        record_property(name, json.dumps(summary))
        print(name, summary)


def test_fuzz_filter_language_compiles_or_is_an_rshash_error(record_property):
    """Guards against any input reaching another exception (RecursionError, OverflowError,
    ValueError, UnicodeEncodeError, sqlite3 errors) or being slow to reject."""
    db = sqlite3.connect(":memory:")
    store.init_db(db)
    tally = Tally()

    @settings(
        max_examples=500,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(FILTERS)
    def one(text: str) -> None:
        tally.inputs += 1
        start = time.perf_counter()
        try:
            sql, params = compile_where(text, FIELDS)
        except RshashError as exc:
            tally.reject_s.append(time.perf_counter() - start)
            if "\n" in str(exc) or not str(exc).startswith("where: "):
                tally.failures.append(f"{text[:60]!r}: {exc}")
            return
        except Exception as exc:
            tally.failures.append(f"{text[:60]!r}: {type(exc).__name__}: {exc}")
            return
        try:
            db.execute(f"SELECT rid FROM items WHERE {sql}", params).fetchall()
        except Exception as exc:
            tally.failures.append(f"{text[:60]!r}: SQLite {type(exc).__name__}: {exc}")

    one()
    tally.record(record_property, "fuzz_filters")
    assert tally.inputs >= 500
    assert not tally.failures, tally.failures[:5]
    assert tally.reject_s and float(np.percentile(tally.reject_s, 99)) < 1.0  # generous


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(_SURROGATES_TOO, max_size=30),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "query": st.one_of(st.sampled_from(["a river", "planes", " "]), JSON_VALUE),
        "k": st.one_of(st.integers(-5, 300), JSON_VALUE),
        "collection": st.one_of(st.sampled_from(["images", "captions", "Images"]), JSON_VALUE),
        "where": st.one_of(FILTERS, st.sampled_from(["class = 'river'", "class = 'nope'"])),
        "bbox": st.one_of(
            st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6), JSON_VALUE
        ),
        "format": st.one_of(st.sampled_from(["json", "geojson", "xml"]), JSON_VALUE),
        "extra": JSON_VALUE,
    },
)


@pytest.fixture(scope="module")
def service_url(ucm_index):
    with running_service(ucm_index, ServiceConfig(max_k=100)) as url:
        yield url


def test_fuzz_search_text_bodies_never_give_5xx(service_url, record_property):
    """Guards against request bodies that make the service fail (500) instead of telling the
    client what is wrong (4xx), field by field and with extra fields and wrong types."""
    tally = Tally()
    http = httpx.Client(base_url=service_url, timeout=60)

    @settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(BODIES, JSON_VALUE))
    def one(body: Any) -> None:
        tally.inputs += 1
        data = json.dumps(body).encode()  # NaN/Infinity and \\ud800 escapes: Python's JSON
        start = time.perf_counter()
        r = http.post("/search/text", content=data, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - start
        if r.status_code >= 500 or r.status_code not in (200, 400, 413, 422):
            tally.failures.append(f"{data[:80]!r}: {r.status_code} {r.text[:100]}")
        elif r.status_code != 200:
            tally.reject_s.append(elapsed)
            if not isinstance(r.json().get("error"), str):
                tally.failures.append(f"{data[:80]!r}: no JSON error in {r.text[:100]}")

    one()
    tally.record(record_property, "fuzz_search_text")
    assert tally.inputs >= 300
    assert not tally.failures, tally.failures[:5]
    assert http.get("/healthz").status_code == 200
