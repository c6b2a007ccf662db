"""Hostile `where` filters and bboxes: every one is a one-line error naming the limit it breaks,
through the Python API, the CLI and HTTP; unknown fields are named with the fields an index has;
a filter being resolved never holds up other queries."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from rshash.errors import RshashError
from rshash.index import Index, filters, store
from rshash.index import records as records_module
from rshash.index.filters import compile_where, tokenize
from rshash.index.index import StaleFilter
from rshash.service import ServiceConfig
from tests.conftest import rshash_cli
from tests.index_writer import codes_for
from tests.service_server import running_service

UCM_IMAGE_FIELDS = "class, dataset, id, path"

# (filter, fragment of the error): each breaks one limit and used to give a 500 / traceback /
# a silent empty answer, or to take seconds.
HOSTILE = [
    ("class = " + "9" * 5000, "longer than 4096 characters"),
    ("class = 9223372036854775808", "does not fit 64 bits"),
    ("class = -9223372036854775809", "does not fit 64 bits"),
    ("class = " + "1" * 70, "longer than 64 characters"),
    ("class = 1e999", "not finite"),
    ("(" * 330 + "class = 'x'" + ")" * 330, "nested deeper than 24 levels"),
    ("not " * 40 + "class = 'x'", "nested deeper than 24 levels"),
    ("class in (" + ", ".join(["1"] * 300) + ")", "more than 256 values"),
    ("class = 1 or " * 400 + "class = 1", "longer than 4096"),
    ("class = 1 or " * 260 + "class = 1", "more than 1024 tokens"),
    ('class = "\ud800"', "not valid UTF-8 text"),
    ("clas = 'river'", "unknown field 'clas'"),
]


def test_hostile_filters_are_one_line_errors_naming_the_limit():
    """Guards against the 500s of the issue (OverflowError, int conversion ValueError,
    RecursionError, UnicodeEncodeError) and against any limit being left unchecked."""
    for text, fragment in HOSTILE:
        with pytest.raises(RshashError, match=fragment) as err:
            compile_where(text, {"class", "year"})
        assert "\n" not in str(err.value) and str(err.value).startswith("where: ")


def test_limits_still_accept_filters_at_the_limits():
    """Guards against off-by-one limits that refuse what the documentation allows."""
    deep = "(" * filters.MAX_DEPTH + "year = 1" + ")" * filters.MAX_DEPTH
    listed = "year in (" + ", ".join(["1"] * filters.MAX_IN_VALUES) + ")"
    edge = f"year >= {-(2**63)} and year <= {2**63 - 1} and year < 1e308"
    for text in (deep, listed, edge, "not " * filters.MAX_DEPTH + "year = 1"):
        sql, params = compile_where(text, {"year"})
        assert sql and params is not None


def test_deepest_filters_run_in_sqlite():
    """Guards against a depth limit SQLite's parser cannot take ("parser stack overflow", found
    by the fuzzer at 32 levels of `or (... and (`): every shape at the limit must run."""
    db = sqlite3.connect(":memory:")
    store.init_db(db)
    d = filters.MAX_DEPTH
    shapes = [
        "".join("w.r = 1 or (w.r = 2 and (" for _ in range(d // 2)) + "w.r = 3" + "))" * (d // 2),
        "".join("year = 1 or (" for _ in range(d)) + "year = 3" + ")" * d,
        "".join("not (year = 1 or " for _ in range(d // 2)) + "year = 3" + ")" * (d // 2),
        "".join("year = 1 and year = 2 or not " for _ in range(d)) + "year in (1, 2)",
    ]
    for text in shapes:
        sql, params = compile_where(text)
        db.execute(f"SELECT rid FROM items WHERE {sql}", params).fetchall()


def test_tokenizer_is_linear(monkeypatch):
    """Guards against the quadratic tokenizer (a copy of the rest of the text per token: 27 s
    for a 1.28 MB filter): with the limits lifted, 1.3 MB must tokenize in a generous 10 s."""
    monkeypatch.setattr(filters, "MAX_CHARS", 10**7)
    monkeypatch.setattr(filters, "MAX_TOKENS", 10**7)
    text = "class = 'river' and " * 65_000 + "year > 3"
    start = time.perf_counter()
    tokens = tokenize(text)
    assert time.perf_counter() - start < 10
    assert len(tokens) == 65_000 * 4 + 4 and tokens[-2].text == "3"


def test_token_positions_skip_leading_space():
    """Error positions must point at the token, not at the space before it."""
    assert [t.at for t in tokenize("  a =  1 ")] == [2, 4, 7, 9]


# --- fields an index knows -------------------------------------------------------------------


def _records(start: int, n: int, extra: str) -> list[dict]:
    return [
        {"id": f"i{i}", "class": "river", "window": {"row": i}, extra: i} for i in range(start, n)
    ]


def test_unknown_field_lists_the_index_fields_and_manifest_keeps_their_union(ucm_run, tmp_path):
    """Guards against a misspelled field silently matching nothing, and against the manifest's
    field list losing fields of earlier commits or counting `captions` (never filterable)."""
    index = Index.create(tmp_path / "i", ucm_run)
    index.add("images", codes_for(0, 10), _records(0, 10, "year"))
    index.commit()
    index.add("images", codes_for(10, 10), _records(10, 20, "cloud"))
    index.add("captions", codes_for(20, 1), [{"id": "c", "text": "t", "captions": []}])
    index.commit()
    manifest = json.loads((tmp_path / "i" / "index.json").read_text())
    assert manifest["fields"] == {
        "images": ["class", "cloud", "id", "window", "year"],
        "captions": ["id", "text"],
    }
    q = codes_for(0, 1)
    with pytest.raises(RshashError) as err:
        index.search_codes(q, 5, where="clas = 'river'")
    assert str(err.value) == (
        "where: unknown field 'clas' at 0; this index has: class, cloud, id, window, year"
    )
    with pytest.raises(RshashError, match="unknown field 'text'"):
        index.search_codes(q, 5, where="text = 'x'")  # a caption field, not an image field
    assert len(index.search_codes(q, 20, where="window.row >= 5 and year < 3")[0]) == 0
    assert len(index.search_codes(q, 20, where="window.row >= 5 and cloud >= 15")[0]) == 5
    with pytest.raises(RshashError, match="unknown field 'windows'"):
        index.search_codes(q, 5, where="windows.row = 1")


def _legacy_copy(ucm_index: Path, to: Path) -> Path:
    """A copy of the UCM index as written before manifests listed their fields."""
    shutil.copytree(ucm_index, to, ignore=shutil.ignore_patterns("thumbnails"))
    manifest = json.loads((to / "index.json").read_text())
    manifest.pop("fields", None)
    (to / "index.json").write_text(json.dumps(manifest))
    return to


def test_index_without_field_list_reads_it_once_from_its_records(ucm_index, tmp_path, monkeypatch):
    """An index written before manifests listed fields: the list comes from SQLite, once."""
    calls = []
    real = records_module.record_fields
    monkeypatch.setattr(records_module, "record_fields", lambda *a: calls.append(a[1:]) or real(*a))
    index = Index.open(_legacy_copy(ucm_index, tmp_path / "index"))
    q = codes_for(0, 1)
    for _ in range(3):
        with pytest.raises(RshashError) as err:
            index.search_codes(q, 5, where="clas = 'river'")
    assert str(err.value).endswith(f"this index has: {UCM_IMAGE_FIELDS}")
    assert calls == [("images",)]
    assert index.search_codes(q, 5, where="class = 'river'")[0]


def test_a_filter_query_past_its_time_limit_is_an_error(ucm_index, monkeypatch):
    """Guards against one filter's SQL query running unbounded (a valid filter at the limits
    costs time per item; on a large archive, minutes)."""
    monkeypatch.setattr(records_module, "FILTER_SECONDS", 0.0)
    monkeypatch.setattr(records_module, "PROGRESS_STEPS", 1000)  # look at the clock early
    index = Index.open(ucm_index)
    with pytest.raises(RshashError, match=r"where: took longer than 0 s"):
        index.search_codes(codes_for(0, 1), 5, "captions", where="text != 'x' or class = 'y'")
    monkeypatch.setattr(records_module, "FILTER_SECONDS", 60.0)
    assert len(index.search_codes(codes_for(0, 1), 5, "captions", where="class = 'river'")[0])


def test_filter_resolved_at_an_older_generation_is_refused(ucm_run, tmp_path):
    """Guards against a search using matching keys of an older generation (missing items
    added since): the service resolves again on StaleFilter."""
    index = Index.create(tmp_path / "i", ucm_run)
    index.add("images", codes_for(0, 10), _records(0, 10, "year"))
    index.commit()
    allowed = index.resolve_filter("images", "year >= 5", None)
    assert allowed.keys.tolist() == [5, 6, 7, 8, 9]
    q = codes_for(0, 1)
    assert {h.key for h in index.search_codes(q, 20, allowed=allowed)[0]} == {5, 6, 7, 8, 9}
    index.add("images", codes_for(10, 2), _records(10, 12, "year"))
    index.commit()
    with pytest.raises(StaleFilter):
        index.search_codes(q, 20, allowed=allowed)
    again = index.resolve_filter("images", "year >= 5", None)
    assert len(index.search_codes(q, 20, allowed=again)[0]) == 7


# --- Python API, CLI, HTTP -------------------------------------------------------------------


def test_python_api_rejects_hostile_filters(ucm_index):
    index = Index.open(ucm_index)
    q = codes_for(0, 1)
    for text, fragment in HOSTILE:
        with pytest.raises(RshashError, match=fragment):
            index.search_codes(q, 5, where=text)
    for box in [(float("nan"), 0, 1, 1), (0, 0, 1), ("a", 0, 1, 1), (0, 10**400, 1, 1)]:
        with pytest.raises(RshashError, match="bbox"):
            index.search_codes(q, 5, bbox=box)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("class = 9223372036854775808", "does not fit 64 bits"),
        ("(" * 330 + "class = 'x'" + ")" * 330, "nested deeper than 24"),
        ("class = '\udcff'", "not valid UTF-8 text"),  # a non-UTF-8 byte in argv
        ("clas = 'x'", "unknown field 'clas'"),
    ],
)
def test_cli_search_rejects_hostile_filters_on_one_line(ucm_index, where, fragment):
    r = rshash_cli("search", ucm_index, "a river", "--where", where, "--device", "cpu")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()  # the model's loading bar may come first
    errors = [line for line in lines if "error" in line or "Error" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("error: where: "), r.stderr
    assert fragment in lines[-1]


@pytest.fixture(scope="module")
def service(ucm_index):
    with (
        running_service(ucm_index, ServiceConfig(max_k=100)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _raw_json(client: httpx.Client, body: str) -> httpx.Response:
    return client.post(
        "/search/text", content=body.encode(), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(("where", "fragment"), HOSTILE)
def test_http_text_search_rejects_hostile_filters(service, where, fragment):
    r = _raw_json(service, json.dumps({"query": "a river", "where": where}))  # \ud800 escaped
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_http_rejects_hostile_json_bodies_and_keeps_serving(service):
    """Guards against 500s from a lone surrogate (sqlite UnicodeEncodeError, or encoding the
    answer), oversized bodies, bad bboxes and huge numbers in the JSON body."""
    cases = [
        ('{"query": "a river", "where": "class = \\"\\ud800\\""}', 400, "where: not valid UTF-8"),
        ('{"query": "a \\udfff river"}', 422, "query: "),  # pydantic or check_text
        ('{"query": "a river", "bbox": [0, 0, 1]}', 422, "bbox"),
        ('{"query": "a river", "bbox": [NaN, 0, 1, 1]}', 422, "bbox"),
        ('{"query": "a river", "bbox": [0, 0, 1, 1e999]}', 422, "bbox"),
        ('{"query": "a river", "k": 1' + "0" * 5000 + "}", 400, ""),
        ('{"query": "a river", "where": "' + "x" * 70_000 + '"}', 413, "larger than 65536"),
    ]
    for body, status, fragment in cases:
        r = _raw_json(service, body)
        assert r.status_code == status, (body[:80], r.text)
        assert fragment in r.json()["error"]
    assert service.get("/healthz").status_code == 200


def test_http_image_search_rejects_hostile_filter_form_field(service):
    from tests.conftest import RSSCN7

    path = RSSCN7 / "gParking" / "g001.jpg"
    files = {"file": ("g001.jpg", path.read_bytes(), "image/jpeg")}
    for where, fragment in HOSTILE[:6]:
        r = service.post("/search/image", files=files, data={"k": "5", "where": where})
        assert r.status_code == 400, r.text
        assert fragment in r.json()["error"]
    r = service.post("/search/image", files=files, data={"k": "5", "bbox": "0,0,1"})
    assert r.status_code == 422 and "bbox" in r.json()["error"]


def _ids(body: dict) -> list[tuple[str, int]]:
    return [(h["id"], h["distance"]) for h in body["results"]]


def test_http_filters_give_the_python_api_answers(service, ucm_index):
    """Guards against the service dropping or mangling `where`/`bbox` on its way to the index
    (no service test sent them before), for text and image queries."""
    from tests.conftest import RSSCN7

    index = Index.open(ucm_index)
    where = "class in ('river', 'forest') and not (id = 'river/river01.tif')"
    r = service.post("/search/text", json={"query": "a river", "k": 12, "where": where})
    assert r.status_code == 200, r.text
    want = index.search_text("a river", 12, where=where)
    assert _ids(r.json()) == [(h.id, h.distance) for h in want] and len(want) == 12
    assert {h["class"] for h in r.json()["results"]} <= {"river", "forest"}
    # UCM has no footprints: a bbox keeps nothing, through both ways
    r = service.post("/search/text", json={"query": "a river", "bbox": [-10, -10, 10, 10]})
    assert r.status_code == 200 and r.json()["count"] == 0
    assert index.search_text("a river", 20, bbox=(-10, -10, 10, 10)) == []
    path = RSSCN7 / "gParking" / "g001.jpg"
    files = {"file": ("g001.jpg", path.read_bytes(), "image/jpeg")}
    r = service.post("/search/image", files=files, data={"k": "7", "where": "class = 'airplane'"})
    assert r.status_code == 200, r.text
    want = index.search_image(path, 7, where="class = 'airplane'")
    assert _ids(r.json()) == [(h.id, h.distance) for h in want]


def test_batched_filtered_answers_equal_one_at_a_time(ucm_index):
    """Guards against resolved filters breaking batching: requests with the same filter must
    share a group yet each get its own k, and different filters must not mix."""
    index = Index.open(ucm_index)
    wheres = ["class = 'river'", "class != 'river' and dataset = 'ucm-captions'", None]
    calls, want = [], []
    for i in range(18):
        where, k = wheres[i % 3], 1 + (5 * i) % 17
        body = {"query": ["a river", "planes", "houses"][i % 3 - 1], "k": k, "where": where}
        calls.append(lambda http, body=body: http.post("/search/text", json=body))
        hits = index.search_text(body["query"], k, where=where)  # type: ignore[arg-type]
        want.append([(h.id, h.distance) for h in hits])

    async def concurrently(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(call(http) for call in calls))

    with running_service(ucm_index, ServiceConfig(max_wait_ms=20, max_batch=16)) as url:
        got = asyncio.run(concurrently(url))
    for r, w in zip(got, want, strict=True):
        assert r.status_code == 200, r.text
        assert _ids(r.json()) == w


def test_a_filter_being_resolved_does_not_hold_up_other_queries(ucm_index, monkeypatch):
    """Guards against filters compiled and resolved in the single batch thread (the issue: an
    unrelated query waited 23.6 s behind a slow filter). The filter's resolution is held on an
    Event while a plain query must be answered; then the filter request completes."""
    entered, release = threading.Event(), threading.Event()
    real = Index._allowed

    def held(self, state, collection, where, bbox):  # type: ignore[no-untyped-def]
        if where is not None and "held" in where:
            entered.set()
            assert release.wait(60), "never released"
        return real(self, state, collection, where, bbox)

    monkeypatch.setattr(Index, "_allowed", held)
    slow: dict[str, httpx.Response] = {}
    with running_service(ucm_index) as url:
        http = httpx.Client(base_url=url, timeout=60)
        assert http.post("/search/text", json={"query": "warm up", "k": 1}).status_code == 200
        where = "class != 'held'"

        def filtered() -> None:
            body = {"query": "a river", "k": 5, "where": where}
            slow["r"] = httpx.post(url + "/search/text", json=body, timeout=60)

        thread = threading.Thread(target=filtered)
        thread.start()
        try:
            assert entered.wait(30), "the filter was never resolved"
            plain = http.post("/search/text", json={"query": "dense houses", "k": 5}, timeout=20)
            assert plain.status_code == 200
            image_free = http.post("/search/text", json={"query": "a beach", "k": 3}, timeout=20)
            assert image_free.status_code == 200
            assert thread.is_alive() and "r" not in slow  # the filter is still held
        finally:
            release.set()
            thread.join(60)
    assert slow["r"].status_code == 200, slow["r"].text
    assert slow["r"].json()["count"] == 5


def test_legacy_copy_gets_its_field_list_at_the_next_commit(ucm_index, ucm_run, tmp_path):
    """An old index (no field list) that gets an add must list the old records' fields too."""
    copy = _legacy_copy(ucm_index, tmp_path / "index")
    index = Index.open(copy)
    index.add("images", codes_for(0, 1), [{"id": "new-1", "year": 2020}])
    index.commit()
    fields = json.loads((copy / "index.json").read_text())["fields"]
    assert fields["images"] == ["class", "dataset", "id", "path", "year"]
    assert fields["captions"] == ["class", "id", "image", "text"]
    assert np.array_equal(index.matching_keys(where="year = 2020"), [2100])


@pytest.mark.slow
def test_sharded_filters_check_fields_of_the_union(ucm_run, tmp_path):
    """Guards against a sharded index answering otherwise than one index over the union: a
    field only one shard holds (there `year`, in a shard whose manifest predates field lists)
    is valid and matches nothing elsewhere; an unknown one fails before any shard is asked."""
    ray = pytest.importorskip("ray")
    from rshash.fileio import write_json_atomic
    from rshash.index.sharded import SHARDS, ShardedIndex

    root, single = tmp_path / "shards", Index.create(tmp_path / "single", ucm_run)
    parts = [
        [{"id": f"a{i}", "class": "river", "year": 2000 + i} for i in range(20)],
        [{"id": f"b{i}", "class": "forest"} for i in range(20)],
    ]
    for s, recs in enumerate(parts):
        shard = Index.create(root / f"shard-{s:03d}", ucm_run)
        shard.add("images", codes_for(s * 20, 20), recs, first_key=s * 20)
        shard.commit()
        shard.close()
        single.add("images", codes_for(s * 20, 20), recs, first_key=s * 20)
    single.commit()
    _legacy_copy(root / "shard-000", tmp_path / "legacy")  # shard 0 without a field list
    shutil.rmtree(root / "shard-000")
    shutil.move(tmp_path / "legacy", root / "shard-000")
    names = ["shard-000", "shard-001"]
    write_json_atomic(root / SHARDS, {"format": "rshash-shards/1", "shards": names})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sharded = ShardedIndex(root, timeout=600)  # the first filtered search compiles kernels
        assert sharded.fields("images") == {"class", "id", "year"}
        q = codes_for(7, 2)
        for where in ("year >= 2010 or class = 'forest'", "year = null", "not (year < 2005)"):
            assert sharded.resolve_filter("images", where, None) is None
            want = single.search_codes(q, 30, where=where)
            got = sharded.search_codes(q, 30, where=where)
            assert [[(h.key, h.distance) for h in g] for g in got] == [
                [(h.key, h.distance) for h in w] for w in want
            ], where
        for call in (sharded.resolve_filter, lambda *a: sharded.search_codes(q, 5, where=a[1])):
            with pytest.raises(RshashError, match=r"unknown field 'yeer'.*has: class, id, year$"):
                call("images", "yeer = 2001", None)
    finally:
        ray.shutdown()


def test_filter_threads_run_at_lower_priority_and_shed_past_their_queue():
    """Guards against filter work competing with the batches at full CPU priority, and against
    an unbounded pile of waiting filters: past `max_waiting`, QueueFull (503) at once."""
    import os

    from rshash.service.batcher import QueueFull
    from rshash.service.limits import BackgroundThreads

    pool = BackgroundThreads(threads=1, max_waiting=1, nice=5)
    gate = threading.Event()

    def held() -> int:
        assert gate.wait(30)
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(pool.run(held))
        second = asyncio.ensure_future(pool.run(held))
        await asyncio.sleep(0.05)  # both submitted: one running, one waiting
        with pytest.raises(QueueFull):
            await pool.run(held)
        gate.set()
        return list(await asyncio.gather(first, second))

    try:
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert asyncio.run(scenario()) == [min(base + 5, 19)] * 2
    finally:
        pool.close()
