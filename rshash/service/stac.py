"""The STAC API under `/stac`: stac-fastapi's app and models with rshash's index behind its client.

Conformance: core, item-search, collections, ogcapi-features and free-text (`q`). `/stac/search`
(GET and POST) takes `q`, `bbox`, `intersects`, `datetime`, `collections`, `ids`, `limit` and a
paging `token`. With `q` the answer is the tile Items ranked by Hamming distance to the encoded
text (the same batcher, cache and exact top-k as `/search/text`, so the order equals
`Index.search_text` with the same filters); without `q` it is a plain metadata search in index
order. Paging: `next` links carry a token (the offset), up to MAX_DEPTH results deep. Every
filter is resolved to the allowed keys in a worker thread before the query joins a batch;
`intersects` refines its box's candidates by exact geometry (shapely), at most
MAX_INTERSECTS_CANDIDATES of them. A STAC collection is a source Item's collection, else the
record's dataset. An image query ("more like this") stays on `/search/image`: a client posts
the tile asset of an Item there. Errors: 400/404/503 with `code` and `description`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

import attr
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from stac_fastapi.api.app import StacApi
from stac_fastapi.api.models import (
    ItemCollectionUri,
    create_get_request_model,
    create_post_request_model,
    create_request_model,
)
from stac_fastapi.extensions import FreeTextAdvancedExtension, TokenPaginationExtension
from stac_fastapi.extensions.free_text.free_text import FreeTextConformanceClasses
from stac_fastapi.types.config import ApiSettings
from stac_fastapi.types.core import AsyncBaseCoreClient
from stac_fastapi.types.errors import InvalidQueryParameter, NotFoundError, StacApiError
from stac_fastapi.types.requests import get_base_url
from stac_fastapi.types.search import APIRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from rshash.errors import RshashError
from rshash.index import CodeIndex, Hit
from rshash.index.filters import MAX_IN_VALUES
from rshash.index.index import Allowed, StaleFilter
from rshash.index.packing import empty_codes
from rshash.index.time_filter import with_datetime
from rshash.service.batcher import Batcher, QueueFull
from rshash.service.queries import SearchRequest
from rshash.service.stac_items import STAC_VERSION, collection_of, record_ids, tile_item

T = TypeVar("T")
MAX_DEPTH = 10_000  # results reachable by paging (the engines' largest k)
MAX_LIMIT = 1_000  # Items on one page
MAX_INTERSECTS_CANDIDATES = 100_000  # items an intersects geometry's box may hold
MAX_Q_CHARS = 500
FILTER_TRIES = 3
CODES = {400: "InvalidQueryParameter", 404: "NotFoundError", 503: "Busy"}
DESCRIPTION = "Text-to-image search over remote-sensing tiles by learned hash codes (q)."


class Busy(StacApiError):
    """The service sheds load (503)."""


class StacFreeTextPost(BaseModel):
    """`q` as one text (pystac-client sends a string) or a list of terms (joined)."""

    q: str | list[str] | None = Field(None, description="What to look for, in words.")


@attr.s
class FreeText(FreeTextAdvancedExtension):
    """The free-text extension with `q` as one text (GET and POST); declared as the basic
    `#free-text` class: rshash ranks by the whole text's meaning, not by boolean terms."""

    POST = StacFreeTextPost


@dataclass(frozen=True)
class Query:
    """One STAC search, as rshash runs it."""

    q: str | None = None
    collections: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    bbox: tuple[float, ...] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    limit: int = 10
    offset: int = 0

    def filter_key(self) -> str:
        """The filter's identity (batches group requests by it)."""
        parts = [self.collections, self.ids, self.bbox, self.intersects, self.datetime]
        return "stac:" + json.dumps(parts, sort_keys=True)


def _literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _in(field: str, values: list[str]) -> str:
    if len(values) > MAX_IN_VALUES:
        raise InvalidQueryParameter(f"{field}: more than {MAX_IN_VALUES} values")
    return f"{field} in ({', '.join(_literal(v) for v in values)})"


def query_where(query: Query, fields: frozenset[str]) -> str | None:
    """The `where` expression of a query's collections, ids and datetime."""
    parts = []
    if query.collections is not None:
        cols = list(query.collections)
        if "collection" in fields:
            parts.append(f"({_in('collection', cols)} or (collection = null and "
                         f"{_in('dataset', cols)}))")  # fmt: skip
        else:
            parts.append(_in("dataset", cols))
    if query.ids is not None:
        parts.append(_in("id", [r for i in query.ids for r in record_ids(i)]))
    where = " and ".join(parts) or None
    return with_datetime(where, query.datetime, fields)


def _token(token: str | None) -> int:
    if token is None:
        return 0
    if not token.isdigit() or int(token) > MAX_DEPTH:
        raise InvalidQueryParameter(f"token: expected one from a next link, got {token[:40]!r}")
    return int(token)


def _limit(limit: int | None) -> int:
    """A page's size; above MAX_LIMIT, MAX_LIMIT (the STAC API's rule for a large limit)."""
    limit = 10 if limit is None else int(limit)
    if limit < 1:
        raise InvalidQueryParameter(f"limit: expected a positive number, got {limit}")
    return min(limit, MAX_LIMIT)


def _bbox(bbox: Any) -> tuple[float, ...] | None:
    """A 2D bbox; a 3D one (6 numbers) loses its heights."""
    if not bbox:
        return None
    values = tuple(float(v) for v in bbox)
    return values[:2] + values[3:5] if len(values) == 6 else values


def _q(q: str | list[str] | None) -> str | None:
    if q is None:
        return None
    text = ",".join(q) if isinstance(q, list) else q
    if len(text) > MAX_Q_CHARS:
        raise InvalidQueryParameter(f"q: longer than {MAX_Q_CHARS} characters")
    return text if text.strip() else None


@attr.s
class RshashStacClient(AsyncBaseCoreClient):
    """stac-fastapi's core client over an rshash index: searches go through the service's
    batcher (`submit`), filters through its filter threads (`run_filter`)."""

    index: CodeIndex = attr.ib(default=None)
    batcher: Batcher[SearchRequest, list[Hit]] = attr.ib(default=None)
    run_filter: Callable[..., Awaitable[Any]] = attr.ib(default=None)
    landing_page_id: str = attr.ib(default="rshash")
    _summaries: dict[str, Any] = attr.ib(factory=dict)
    _lock: threading.Lock = attr.ib(factory=threading.Lock)

    async def landing_page(self, **kwargs: Any) -> Any:
        """stac-fastapi's landing page, its OpenAPI links pointed at this mount's own."""
        page = await super().landing_page(**kwargs)
        base = _base(kwargs["request"])
        for link in page["links"]:
            if link["rel"] == "service-desc":
                link["href"] = f"{base}api"
            elif link["rel"] == "service-doc":
                link["href"] = f"{base}api.html"
        return page

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one of the service's filter threads (never in the event loop);
        503 when too many wait for one."""
        try:
            return cast(T, await self.run_filter(fn, *args))
        except QueueFull as exc:
            raise Busy(f"service busy ({exc}); retry") from None

    # --- collections ---------------------------------------------------------------------

    def _collections(self) -> dict[str, dict[str, Any]]:
        """Per collection: item count, bbox union and time span, kept per index generation."""
        gen = self.index.generation
        with self._lock:
            if self._summaries.get("generation") == gen:
                return self._summaries["collections"]
        found: dict[str, dict[str, Any]] = {}
        for record in self.index.items():
            c = found.setdefault(collection_of(record), {"count": 0, "boxes": [], "times": []})
            c["count"] += 1
            if record.get("bounds_wgs84"):
                c["boxes"].append(record["bounds_wgs84"])
            for name in ("datetime", "start_datetime", "end_datetime"):
                if record.get(name):
                    c["times"].append(record[name])
        with self._lock:
            self._summaries = {"generation": gen, "collections": found}
        return found

    def _collection(self, cid: str, base: str) -> dict[str, Any]:
        info = self._collections()[cid]
        boxes = np.array(info["boxes"], dtype=float) if info["boxes"] else None
        if boxes is None:
            bbox = [-180.0, -90.0, 180.0, 90.0]
        elif (boxes[:, 0] > boxes[:, 2]).any():  # some cross the antimeridian: the whole width
            bbox = [-180.0, float(boxes[:, 1].min()), 180.0, float(boxes[:, 3].max())]
        else:
            bbox = [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]
        times = sorted(info["times"])
        interval = [times[0], times[-1]] if times else [None, None]
        url = f"{base}collections/{cid}"
        return {
            "type": "Collection",
            "stac_version": STAC_VERSION,
            "stac_extensions": [],
            "id": cid,
            "title": cid,
            "description": f"{info['count']} image tiles indexed by rshash",
            "license": "other",
            "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
            "links": [
                {"rel": "self", "href": url, "type": "application/json"},
                {"rel": "parent", "href": base, "type": "application/json"},
                {"rel": "root", "href": base, "type": "application/json"},
                {"rel": "items", "href": f"{url}/items", "type": "application/geo+json"},
            ],
        }

    async def all_collections(self, **kwargs: Any) -> Any:
        base = _base(kwargs["request"])
        names = await self._off_loop(lambda: sorted(self._collections()))
        cols = [self._collection(c, base) for c in names]
        links = [
            {"rel": "root", "href": base, "type": "application/json"},
            {"rel": "parent", "href": base, "type": "application/json"},
            {"rel": "self", "href": f"{base}collections", "type": "application/json"},
        ]
        return _answer({"collections": cols, "links": links}, "application/json")

    async def get_collection(self, collection_id: str, **kwargs: Any) -> Any:
        names = await self._off_loop(lambda: set(self._collections()))
        if collection_id not in names:
            raise NotFoundError(f"collection {collection_id!r}: not in this index")
        body = self._collection(collection_id, _base(kwargs["request"]))
        return _answer(body, "application/json")

    async def get_item(self, item_id: str, collection_id: str, **kwargs: Any) -> Any:
        request = kwargs["request"]
        for rid in record_ids(item_id):
            try:
                record = await self._off_loop(self.index.item, rid)
            except RshashError:
                continue
            if collection_of(record) == collection_id:
                item = tile_item(record, None, None, _service(request), _base(request))
                return _answer(item)
        raise NotFoundError(f"item {item_id!r}: not in collection {collection_id!r}")

    # --- search ----------------------------------------------------------------------------

    async def get_search(
        self,
        collections: list[str] | None = None,
        ids: list[str] | None = None,
        bbox: Any = None,
        intersects: Any = None,
        datetime: str | None = None,
        limit: int | None = 10,
        **kwargs: Any,
    ) -> Any:
        if isinstance(intersects, str):
            try:
                intersects = json.loads(intersects)
            except ValueError:
                raise InvalidQueryParameter("intersects: not a GeoJSON geometry") from None
        if intersects is not None and bbox:
            raise InvalidQueryParameter("bbox and intersects: give one, not both")
        query = Query(
            q=_q(kwargs.get("q")),
            collections=_tuple(collections),
            ids=_tuple(ids),
            bbox=_bbox(bbox),
            intersects=intersects,
            datetime=datetime,
            limit=_limit(limit),
            offset=_token(kwargs.get("token")),
        )
        return await self._search(query, kwargs["request"], "GET")

    async def post_search(self, search_request: Any, **kwargs: Any) -> Any:
        s = search_request
        geometry = s.intersects.model_dump(exclude_none=True) if s.intersects else None
        query = Query(
            q=_q(getattr(s, "q", None)),
            collections=_tuple(s.collections),
            ids=_tuple(s.ids),
            bbox=_bbox(s.bbox),
            intersects=geometry,
            datetime=s.datetime,
            limit=_limit(s.limit),
            offset=_token(getattr(s, "token", None)),
        )
        return await self._search(query, kwargs["request"], "POST")

    async def item_collection(
        self,
        collection_id: str,
        bbox: Any = None,
        datetime: str | None = None,
        limit: int | None = 10,
        token: str | None = None,
        **kwargs: Any,
    ) -> Any:
        request = kwargs["request"]
        await self.get_collection(collection_id, request=request)
        query = Query(
            collections=(collection_id,),
            bbox=_bbox(bbox),
            datetime=datetime,
            limit=_limit(limit),
            offset=_token(token),
        )
        return await self._search(query, request, "GET")

    async def _search(self, query: Query, request: Request, method: str) -> Response:
        if query.offset >= MAX_DEPTH:
            raise InvalidQueryParameter(f"token: paging stops at {MAX_DEPTH} results")
        want = min(query.offset + query.limit + 1, MAX_DEPTH)  # one more: is there a next page
        for _ in range(FILTER_TRIES):
            try:
                allowed = await self._off_loop(self._allowed, query)
                if query.q is None:
                    hits = await self._off_loop(self._listed, allowed, want)
                else:
                    hits = await self.batcher.submit(_request(query, allowed, want))
                break
            except StaleFilter:
                continue
            except QueueFull as exc:
                raise Busy(f"service busy ({exc}); retry") from None
            except RshashError as exc:
                raise InvalidQueryParameter(str(exc)) from None
        else:
            raise Busy("the index kept changing under the filter; retry")
        page = hits[query.offset : query.offset + query.limit]
        base = _base(request)
        features = [
            tile_item(h.item, h.distance if query.q else None, query.offset + i + 1,
                      _service(request), base)
            for i, h in enumerate(page)
        ]  # fmt: skip
        links: list[dict[str, Any]] = [
            {"rel": "root", "href": base, "type": "application/json"},
            {"rel": "self", "href": str(request.url), "type": "application/geo+json"},
        ]
        if len(hits) > query.offset + query.limit and query.offset + query.limit < MAX_DEPTH:
            links.append(_next(request, method, query.offset + query.limit))
        body = {
            "type": "FeatureCollection",
            "features": features,
            "links": links,
            "numberReturned": len(features),
        }
        return _answer(body)

    def _allowed(self, query: Query) -> Allowed | None:
        """The query's filter resolved (in a filter thread); None: every item."""
        where = query_where(query, self.index.fields("images"))
        box = query.bbox
        if query.intersects is not None:
            box = _geometry_box(query.intersects)
        if where is None and box is None and query.q is not None:
            return None
        allowed = self.index.resolve_filter("images", where, box)  # type: ignore[arg-type]
        if query.intersects is not None:
            allowed = self._intersecting(allowed, query.intersects)
        return allowed

    def _intersecting(self, allowed: Allowed, geometry: dict[str, Any]) -> Allowed:
        """The allowed items whose footprint meets `geometry` exactly."""
        import shapely.geometry

        if len(allowed.keys) > MAX_INTERSECTS_CANDIDATES:
            raise InvalidQueryParameter(
                f"intersects: the geometry's box holds more than {MAX_INTERSECTS_CANDIDATES:,}"
                " items; narrow it"
            )
        shape = shapely.geometry.shape(geometry)
        keep = [
            h.key
            for h in self._records(allowed)
            if h.item.get("footprint_wgs84")
            and shape.intersects(shapely.geometry.Polygon(h.item["footprint_wgs84"]))
        ]
        return Allowed(allowed.collection, allowed.generation, np.array(sorted(keep), np.int64))

    def _records(self, allowed: Allowed) -> list[Hit]:
        """The allowed items' records, in key order."""
        if len(allowed.keys) == 0:
            return []
        codes = empty_codes(1, self.index.bits)
        hits = self.index.search_codes(codes, len(allowed.keys), "images", allowed=allowed)[0]
        return sorted(hits, key=lambda h: h.key)

    def _listed(self, allowed: Allowed | None, want: int) -> list[Hit]:
        """A metadata search: the first `want` matching items in index order."""
        if allowed is None:
            allowed = self.index.resolve_filter("images", None, None)
        head = Allowed(allowed.collection, allowed.generation, allowed.keys[:want])
        return self._records(head)


def _request(query: Query, allowed: Allowed | None, k: int) -> SearchRequest:
    """The text search the batcher runs; its `where` names the filter (batches group requests
    by it) while `allowed` carries it, resolved."""
    where = None if allowed is None else query.filter_key()
    return SearchRequest(k, "images", None, where, None, text=query.q, allowed=allowed)


def _answer(body: dict[str, Any], media_type: str = "application/geo+json") -> Response:
    """A JSON answer as is: the records are plain JSON already, and FastAPI's per-field encoder
    (which stac-fastapi's `enable_direct_response` cannot bypass on this FastAPI) would cost
    more than the search."""
    return Response(json.dumps(body, ensure_ascii=False).encode(), media_type=media_type)


def _tuple(values: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in values) if values else None


def _geometry_box(geometry: dict[str, Any]) -> tuple[float, float, float, float]:
    import shapely.geometry

    try:
        shape = shapely.geometry.shape(geometry)
    except Exception:
        raise InvalidQueryParameter("intersects: not a GeoJSON geometry") from None
    if shape.is_empty:
        raise InvalidQueryParameter("intersects: an empty geometry")
    west, south, east, north = shape.bounds
    return (west, south, east, north)


def _base(request: Request) -> str:
    """The STAC API's root URL, with a trailing slash (stac-fastapi's own rule)."""
    return get_base_url(request)


def _service(request: Request) -> str:
    """The service's root URL (the STAC API is mounted under it)."""
    return str(request.base_url)


def _next(request: Request, method: str, offset: int) -> dict[str, Any]:
    url = f"{_base(request)}search"
    if method == "POST":
        return {"rel": "next", "href": url, "type": "application/geo+json", "method": "POST",
                "body": {"token": str(offset)}, "merge": True}  # fmt: skip
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    params.append(("token", str(offset)))
    href = f"{str(request.url).split('?')[0]}?{urlencode(params)}"
    return {"rel": "next", "href": href, "type": "application/geo+json", "method": "GET"}


def mount_stac(
    app: FastAPI,
    index: CodeIndex,
    batcher: Batcher[SearchRequest, list[Hit]],
    run_filter: Callable[..., Awaitable[Any]],
) -> None:
    """Serve the STAC API over `index` at /stac of `app` (searches share its batcher)."""
    client = RshashStacClient(index=index, batcher=batcher, run_filter=run_filter)
    stac = stac_app(client, "rshash STAC API")
    # stac-fastapi logs every 4xx with a traceback: a client's mistake is answered, not logged
    logging.getLogger("stac_fastapi.api.errors").setLevel(logging.CRITICAL)
    # a mounted app's request.base_url is the outer app's; links need the mount's prefix
    stac.state.router_prefix = "/stac"
    app.mount("/stac", stac)


def stac_app(client: RshashStacClient, title: str) -> FastAPI:
    """stac-fastapi's app over `client`, to mount at /stac (its own error handlers: STAC's
    {code, description} JSON)."""
    free_text = FreeText(conformance_classes=[FreeTextConformanceClasses.SEARCH])
    paging = TokenPaginationExtension()
    extensions = [free_text, paging]
    settings = ApiSettings(
        stac_fastapi_title=title,
        stac_fastapi_description=DESCRIPTION,
        stac_fastapi_landing_id="rshash",
        stac_fastapi_version=version("rshash"),
        openapi_url="/api",
        docs_url="/api.html",
        enable_response_models=False,
    )
    api = StacApi(
        settings=settings,
        client=client,
        extensions=extensions,
        exceptions={NotFoundError: 404, InvalidQueryParameter: 400, Busy: 503},
        title=title,
        description=DESCRIPTION,
        stac_version=STAC_VERSION,
        search_get_request_model=create_get_request_model(extensions),
        search_post_request_model=create_post_request_model(extensions),
        items_get_request_model=cast(
            type[APIRequest],
            create_request_model(
                "ItemCollectionUri",
                base_model=ItemCollectionUri,
                extensions=[paging],
                request_type="GET",
            ),
        ),
        middlewares=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                allow_methods=["OPTIONS", "POST", "GET"],
                allow_headers=["Content-Type"],
                max_age=600,
            )
        ],
    )

    @api.app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return JSONResponse(
            {"code": "InvalidQueryParameter", "description": f"{where}: {first.get('msg')}"},
            status_code=400,
        )

    @api.app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"code": CODES.get(exc.status_code, "Error"), "description": str(exc.detail)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    return api.app
