"""FastAPI app: text and image search, item metadata, thumbnails, health, and the web page.

The index and its model load once, when the app is created; requests only encode the query and
search. Bad requests get a 4xx answer with a JSON body {"error": "..."}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from rshash.errors import RshashError
from rshash.index import Hit, Index
from rshash.service.geo_routes import bbox_filter, geo_router, render, tile_png
from rshash.service.thumbnails import thumbnail_of

IMAGE_TYPES = {"image/jpeg", "image/png", "image/tiff", "image/webp", "image/bmp", "image/gif"}


@dataclass(frozen=True)
class ServiceConfig:
    max_query_chars: int = 500
    max_upload_bytes: int = 10 * 1024 * 1024
    max_k: int = 200
    thumbnail_size: int = 256
    device: str = "auto"


class TextQuery(BaseModel):
    query: str = Field(min_length=1, description="What to look for, in words.")
    k: int = Field(default=20, ge=1, description="Number of results.")
    collection: Literal["images", "captions"] = "images"
    bbox: list[float] | None = Field(
        default=None,
        description="Keep items whose WGS84 bounds meet [minlon, minlat, maxlon, maxlat].",
    )
    format: Literal["json", "geojson"] = Field(
        default="json", description="geojson: the results as a FeatureCollection (QGIS opens it)."
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def create_app(index_path: str | Path, config: ServiceConfig | None = None) -> FastAPI:
    cfg = config or ServiceConfig()
    index = Index.open(index_path, device=cfg.device)
    thumbs = Path(index_path) / "thumbnails"
    # One query at a time (it uses every core; encoders are not re-entrant). asyncio.Lock
    # queues waiters first come, first served, which keeps tail latency near queue length.
    lock = asyncio.Lock()
    app = FastAPI(
        title="rshash search", description="Hash-code search over a remote-sensing archive."
    )
    images = index.collections.get("images")

    def item_of(item_id: str) -> dict[str, Any]:
        try:
            return index.item(item_id)
        except RshashError:
            raise HTTPException(404, f"no image with id {item_id!r}") from None

    def result(hit: Hit) -> dict[str, Any]:
        image_id = hit.item.get("image", hit.id)
        url = f"/items/{quote(str(image_id))}"
        return {
            **hit.to_dict(),
            "thumbnail": f"{url}/thumbnail",
            "image_url": f"{url}/image",
        }

    def check_k(k: int) -> None:
        if not 1 <= k <= cfg.max_k:
            raise HTTPException(422, f"k: expected 1 to {cfg.max_k}, got {k}")

    def answer(hits: list[Hit], **query: Any) -> dict[str, Any]:
        return {**query, "count": len(hits), "results": [result(h) for h in hits]}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(RshashError)
    async def rshash_error(request: Request, exc: RshashError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return files("rshash.service").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "images": len(images) if images else 0,
            "captions": len(index.collections["captions"])
            if "captions" in index.collections
            else 0,
            "bits": index.bits,
            "engine": index.manifest["engine"]["name"],
            "model": index.manifest["model"]["method"],
        }

    @app.post("/search/text")
    async def search_text(q: TextQuery) -> dict[str, Any]:
        if len(q.query) > cfg.max_query_chars:
            raise HTTPException(422, f"query: longer than {cfg.max_query_chars} characters")
        check_k(q.k)
        filters = bbox_filter(q.bbox)
        async with lock:
            hits = await run_in_threadpool(index.search_text, q.query, q.k, q.collection, **filters)
        return render(answer(hits, query=q.query, k=q.k, collection=q.collection), q.format)

    @app.post("/search/image")
    async def search_image(
        file: Annotated[UploadFile, File(description="Query image (JPEG, PNG, TIFF, ...)")],
        k: Annotated[int, Form()] = 20,
        collection: Annotated[Literal["images", "captions"], Form()] = "images",
        bbox: Annotated[str | None, Form(description="minlon,minlat,maxlon,maxlat")] = None,
        format: Annotated[Literal["json", "geojson"], Form()] = "json",
    ) -> dict[str, Any]:
        check_k(k)
        filters = bbox_filter(bbox)
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
        async with lock:
            hits = await run_in_threadpool(index.search_image, data, k, collection, **filters)
        return render(answer(hits, k=k, collection=collection, filename=file.filename), format)

    @app.get("/items/{item_id:path}/thumbnail", response_class=FileResponse)
    def item_thumbnail(item_id: str) -> FileResponse:
        item = item_of(item_id)
        path = thumbnail_of(item, thumbs, cfg.thumbnail_size)
        return FileResponse(
            path, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"}
        )

    @app.get("/items/{item_id:path}/image", response_model=None)
    def item_image(item_id: str) -> FileResponse | Response:
        item = item_of(item_id)
        return tile_png(item) if "window" in item else FileResponse(item["path"])

    @app.get("/items/{item_id:path}")
    def item(item_id: str) -> dict[str, Any]:
        return item_of(item_id)

    app.include_router(geo_router(item_of, thumbs))
    return app
