"""FastAPI app: text and image search, item metadata, thumbnails, health, metrics, web page.

The index (a directory, or a sharded index: a directory with `shards.json`) and its model load
once, when the app is created. Every search goes through one dynamic batcher (see `batcher`):
concurrent queries share an encoder forward pass and a batched search; past the queue bound the
service answers 503 with `Retry-After` at once. Between batches the index switches to a newer
generation committed by another process (`rshash index add/remove`). A request's filter
(`where`, `bbox`) is checked and resolved to its matching items in a worker thread of its own
before the request joins a batch, so a slow or hostile filter never holds up other queries. Bad
requests get a 4xx answer with a JSON body {"error": "..."}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rshash.data.bbox import check_bbox, parse_bbox
from rshash.errors import RshashError
from rshash.features.backends import AUTO
from rshash.index import CodeIndex, Hit, Searcher
from rshash.index.base import Allowed, StaleFilter
from rshash.index.encoder import MAX_QUERY_PIXELS
from rshash.index.filters import check_text
from rshash.index.opening import OpenConfig
from rshash.index.opening import open_index as open_any_index
from rshash.index.sharded import ShardUnavailable
from rshash.index.time_filter import with_datetime
from rshash.service.batcher import BatchConfig, Batcher, QueueFull
from rshash.service.body_limit import BodyLimit
from rshash.service.geo_routes import geo_router, render, tile_png
from rshash.service.limits import BackgroundThreads
from rshash.service.metrics import MetricsMiddleware, ServiceMetrics
from rshash.service.queries import BBox, SearchRequest, image_view, search_batch
from rshash.service.query_cache import QueryCache
from rshash.service.served_files import ServedFiles
from rshash.service.thumbnails import thumbnail_of

MULTIPART_SLACK = 64 * 1024  # form fields and part headers beside an upload of the size limit
FILTER_TRIES = 3  # resolutions of a filter when the index changes generation in between
IMAGE_TYPES = {"image/jpeg", "image/png", "image/tiff", "image/webp", "image/bmp", "image/gif"}
log = logging.getLogger("rshash.service")


@dataclass(frozen=True)
class ServiceConfig:
    max_query_chars: int = 500
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = MAX_QUERY_PIXELS  # checked from the header, before decoding
    max_body_bytes: int = 64 * 1024  # any other request body (a 4096-character filter fits)
    decode_workers: int = 4  # uploads decoded at once (each up to max_upload_pixels × 3 bytes)
    max_k: int = 200
    thumbnail_size: int = 256
    device: str = "auto"
    max_batch: int = 64  # queries per encoder pass and batched search
    max_wait_ms: float = 2.0  # under load, how long a batch waits to fill
    max_queue: int = 128  # queries waiting beyond this are answered 503 at once
    max_queue_ms: float | None = None  # also 503 when the waiting queries need longer than this
    retry_after_s: int = 1  # the Retry-After of a 503
    refresh_interval_s: float = 1.0  # how often (between batches) to look for a new generation
    shard_timeout_s: float = 10.0  # sharded index: longest wait for a shard's answer
    ray_address: str | None = None  # sharded index: Ray cluster to join (None: local Ray)
    shard_cpus: float = 0.5  # sharded index: CPUs each shard actor reserves
    replicas: int = 1  # sharded index: actors per shard, on different nodes
    torch_threads: int | None = None  # encoder threads (None: torch's default, one per core)
    filter_threads: int = 2  # filters resolved at once (lower-priority threads apart from batches)
    backend: str = AUTO  # inference backend of the query encoders (rshash.features.backends)
    query_cache: int = 4096  # text queries whose codes are kept (LRU); 0: off


class TextQuery(BaseModel):
    query: str = Field(min_length=1, description="What to look for, in words.")
    k: int = Field(default=20, ge=1, description="Number of results.")
    collection: Literal["images", "captions"] = "images"
    where: str | None = Field(default=None, description="Filter expression on item records.")
    bbox: BBox | None = Field(
        default=None,
        description="[minlon, minlat, maxlon, maxlat] (WGS84) the items must touch; minlon >"
        " maxlon crosses the antimeridian.",
    )
    format: Literal["json", "geojson"] = Field(
        default="json", description="geojson: the results as a FeatureCollection (QGIS opens it)."
    )
    datetime: str | None = Field(
        default=None,
        max_length=100,
        description="RFC 3339 instant or START/END interval (open end: ..) the items' time"
        " must meet (STAC-indexed items).",
    )


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    """A JSON response without FastAPI's per-field encoder (records are plain JSON already)."""
    data = json.dumps(body, ensure_ascii=False).encode()
    return Response(data, status_code=status, media_type="application/json")


def _checked_bbox(bbox: str | Sequence[float] | None) -> BBox | None:
    """A request's bbox (form text 'a,b,c,d' or a JSON array), checked; 422 when malformed."""
    if bbox is None or (isinstance(bbox, str) and not bbox.strip()):
        return None
    try:
        if isinstance(bbox, str):
            return parse_bbox(bbox.strip().strip("[]"))
        return check_bbox(bbox)
    except RshashError as exc:
        raise HTTPException(422, str(exc)) from None


def open_index(path: str | Path, cfg: ServiceConfig) -> CodeIndex:
    """The index at `path` (local or sharded), its query encoder on `cfg.device`."""
    opening = OpenConfig(
        device=cfg.device,
        backend=cfg.backend,
        ray_address=cfg.ray_address,
        shard_timeout_s=cfg.shard_timeout_s,
        shard_cpus=cfg.shard_cpus,
        replicas=cfg.replicas,
    )
    return open_any_index(path, opening)


def create_app(index_path: str | Path, config: ServiceConfig | None = None) -> FastAPI:
    cfg = config or ServiceConfig()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    index = open_index(index_path, cfg)
    index.health()  # a sharded index starts its replicas here: a bad setting fails at startup
    searcher = Searcher(index)
    thumbs = Path(index_path) / "thumbnails"
    metrics = ServiceMetrics()
    filter_threads = BackgroundThreads(cfg.filter_threads, cfg.max_queue)
    filters_supported = "where" in inspect.signature(index.search_codes).parameters
    last_refresh = [time.monotonic()]

    def between_batches() -> None:
        """Runs in the batch thread before each batch: pick up a newly committed generation."""
        if time.monotonic() - last_refresh[0] < cfg.refresh_interval_s:
            return
        last_refresh[0] = time.monotonic()
        try:
            if index.refresh():
                log.info("switched to index generation %d", index.generation)
        except Exception:  # a failed look must not fail the batch; the next one tries again
            log.exception("index refresh failed")

    scope = (str(index.manifest["model"]["fingerprint"]), index.encoder.backend)
    cache = QueryCache(cfg.query_cache, scope, metrics.cache_lookup)
    batcher: Batcher[SearchRequest, list[Hit]] = Batcher(
        lambda requests: search_batch(searcher, requests, cache),
        BatchConfig(cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, cfg.max_queue_ms),
        between=between_batches,
        on_batch=metrics.batch_size.observe,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.close()
        filter_threads.close()

    app = FastAPI(
        title="rshash search",
        description="Hash-code search over a remote-sensing archive.",
        lifespan=lifespan,
    )
    upload_body = cfg.max_upload_bytes + MULTIPART_SLACK
    app.add_middleware(BodyLimit, limits={"/search/image": upload_body}, default=cfg.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    decode_slots = asyncio.Semaphore(cfg.decode_workers)

    def item_of(item_id: str) -> dict[str, Any]:
        try:
            return index.item(item_id)
        except RshashError:
            raise HTTPException(404, f"no image with id {item_id!r}") from None

    served = ServedFiles(index.sources)

    def file_item_of(item_id: str) -> dict[str, Any]:
        """The item, its path checked to be a file under the index's source roots (else 404)."""
        return served.checked(item_of(item_id))

    def result(hit: Hit) -> dict[str, Any]:
        image_id = hit.item.get("image", hit.id)
        url = f"/items/{quote(str(image_id))}"
        return {**hit.to_dict(), "thumbnail": f"{url}/thumbnail", "image_url": f"{url}/image"}

    def check_options(k: int, where: str | None, bbox: BBox | None) -> None:
        if not 1 <= k <= cfg.max_k:
            raise HTTPException(422, f"k: expected 1 to {cfg.max_k}, got {k}")
        if (where is not None or bbox is not None) and not filters_supported:
            field = "where" if where is not None else "bbox"
            raise HTTPException(422, f"{field}: this index does not support filters")

    def timed_where(where: str | None, datetime: str | None, collection: str) -> str | None:
        """`where` joined with the request's time filter (see `index.time_filter`)."""
        if datetime is None or not datetime.strip():
            return where
        return with_datetime(where, datetime, index.fields(collection))

    def busy(exc: QueueFull) -> HTTPException:
        metrics.shed.inc()
        return HTTPException(
            503,
            f"service busy ({exc}); retry in {cfg.retry_after_s} s",
            headers={"Retry-After": str(cfg.retry_after_s)},
        )

    async def resolve(request: SearchRequest) -> Allowed | None:
        """The request's filter checked (RshashError: 400) and resolved, in a worker thread."""
        if request.where is None and request.bbox is None:
            return None
        return await filter_threads.run(
            index.resolve_filter, request.collection, request.where, request.bbox
        )

    async def search(request: SearchRequest) -> list[Hit]:
        for _ in range(FILTER_TRIES):
            try:
                resolved = replace(request, allowed=await resolve(request))
                return await batcher.submit(resolved)
            except QueueFull as exc:
                raise busy(exc) from None
            except StaleFilter:  # the index switched generation in between: resolve again
                continue
        raise HTTPException(
            503,
            f"index kept changing under the filter; retry in {cfg.retry_after_s} s",
            {"Retry-After": str(cfg.retry_after_s)},
        )

    async def decoded(data: bytes, name: str) -> Image.Image:
        """The upload in the encoder's view, decoded only once admitted (shed first, not after)
        and at most `decode_workers` at a time."""
        try:
            with batcher.preparing():
                async with decode_slots:
                    return await run_in_threadpool(
                        image_view, data, name, index.encoder, cfg.max_upload_pixels
                    )
        except QueueFull as exc:
            raise busy(exc) from None

    def answer(hits: list[Hit], output: str, **query: Any) -> Response:
        body = {**query, "count": len(hits), "results": [result(h) for h in hits]}
        return _json(render(body, output))

    @app.exception_handler(StarletteHTTPException)  # also FastAPI's own (a body it cannot parse)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(ShardUnavailable)
    async def shard_down(request: Request, exc: ShardUnavailable) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(cfg.retry_after_s)})

    @app.exception_handler(RshashError)
    async def rshash_error(request: Request, exc: RshashError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return files("rshash.service").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz() -> Response:
        n = index.counts()
        body: dict[str, Any] = {
            "status": "ok",
            "images": n.get("images", 0),
            "captions": n.get("captions", 0),
            "bits": index.bits,
            "engine": index.manifest["engine"]["name"],
            "model": index.manifest["model"]["method"],
            "generation": index.generation,
        }
        extra = await run_in_threadpool(index.health)
        down = extra.pop("degraded", None)
        body.update(extra)
        if down:
            metrics.degraded.set(len(down))
            body.update(status="degraded", degraded_shards=down)
            return _json(body, 503)
        metrics.degraded.set(0)
        return _json(body)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        metrics.generation.set(index.generation)
        for name, count in index.counts().items():
            metrics.items.labels(name).set(count)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search/text")
    async def search_text(q: TextQuery) -> Response:
        check_text(q.query, "query")
        if len(q.query) > cfg.max_query_chars:
            raise HTTPException(422, f"query: longer than {cfg.max_query_chars} characters")
        if not q.query.strip():
            raise RshashError("empty text query")
        box = _checked_bbox(q.bbox)
        where = timed_where(q.where, q.datetime, q.collection)
        check_options(q.k, where, box)
        hits = await search(SearchRequest(q.k, q.collection, None, where, box, text=q.query))
        given = (("where", q.where), ("bbox", box), ("datetime", q.datetime))
        extra = {n: v for n, v in given if v is not None}
        return answer(hits, q.format, query=q.query, k=q.k, collection=q.collection, **extra)

    @app.post("/search/image")
    async def search_image(
        file: Annotated[UploadFile, File(description="Query image (JPEG, PNG, TIFF, ...)")],
        k: Annotated[int, Form()] = 20,
        collection: Annotated[Literal["images", "captions"], Form()] = "images",
        where: Annotated[str | None, Form(description="Filter expression.")] = None,
        bbox: Annotated[str | None, Form(description="minlon,minlat,maxlon,maxlat")] = None,
        format: Annotated[Literal["json", "geojson"], Form()] = "json",
        datetime: Annotated[str | None, Form(description="RFC 3339 instant or interval")] = None,
    ) -> Response:
        box = _checked_bbox(bbox)
        where = timed_where(where, datetime, collection)
        check_options(k, where, box)
        if file.content_type not in IMAGE_TYPES:
            raise HTTPException(
                415,
                f"upload {file.filename!r}: content type "
                f"{file.content_type!r} is not an image type",
            )
        data = await file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise HTTPException(
                413, f"upload {file.filename!r}: larger than {cfg.max_upload_bytes} bytes"
            )
        view = await decoded(data, repr(file.filename))
        hits = await search(SearchRequest(k, collection, None, where, box, image=view))
        extra = {n: v for n, v in (("where", where), ("bbox", box)) if v is not None}
        return answer(hits, format, k=k, collection=collection, filename=file.filename, **extra)

    @app.get("/items/{item_id:path}/thumbnail", response_class=FileResponse)
    def item_thumbnail(item_id: str) -> FileResponse:
        item = file_item_of(item_id)
        path = thumbnail_of(item, thumbs, cfg.thumbnail_size)
        return FileResponse(
            path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"}
        )

    @app.get("/items/{item_id:path}/image", response_model=None)
    def item_image(item_id: str) -> FileResponse | Response:
        item = file_item_of(item_id)
        return tile_png(item) if "window" in item else FileResponse(item["path"])

    @app.get("/items/{item_id:path}")
    def item(item_id: str) -> dict[str, Any]:
        return item_of(item_id)

    app.include_router(geo_router(file_item_of, thumbs))
    # stac-fastapi warns at import that its default settings are used; mount_stac sets them
    logging.getLogger("stac_fastapi.types.config").setLevel(logging.ERROR)
    from rshash.service.stac import mount_stac

    mount_stac(app, index, batcher, filter_threads.run)
    return app
