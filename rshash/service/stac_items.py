"""Index records as STAC Items (one per tile or image) and search hits as an ItemCollection.

Shared by the service's STAC API (`rshash.service.stac`) and `rshash search --format stac`.
A tile Item has its WGS84 footprint as geometry, its bounds as bbox, the source Item's time and
properties (less the source's pixel-grid `proj:` fields, which describe the whole scene), and,
for a search hit, `rshash:distance` and `rshash:rank`. Its assets: `source` (the COG or image
file), and with a service URL `tile` (the tile as PNG) and `thumbnail`.

STAC ids travel in URL paths (`/collections/{c}/items/{id}`), so an id's `/` (tile ids are
`SCENE/rROW_cCOL`) becomes `~`; `record_ids` maps back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rshash.index import Hit

STAC_VERSION = "1.1.0"
GRID_FIELDS = ("proj:shape", "proj:transform", "proj:bbox", "proj:geometry", "proj:centroid")
ANY_TIME = ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z")  # items with no time at all
MEDIA = {".tif": "image/tiff; application=geotiff", ".tiff": "image/tiff; application=geotiff"}


def stac_id(record_id: str) -> str:
    return record_id.replace("/", "~")


def record_ids(item_id: str) -> list[str]:
    """The record ids a STAC id may stand for: as given, then with `~` back to `/`."""
    back = item_id.replace("~", "/")
    return [item_id] if back == item_id else [item_id, back]


def collection_of(record: Mapping[str, Any]) -> str:
    """The STAC collection of a record: its source Item's, else its dataset's name."""
    return str(record.get("collection") or record.get("dataset") or "default")


def _times(record: Mapping[str, Any]) -> dict[str, Any]:
    """datetime, or start/end; a record without any time spans all time (STAC needs one)."""
    props: dict[str, Any] = {"datetime": record.get("datetime")}
    for name in ("start_datetime", "end_datetime"):
        if record.get(name):
            props[name] = record[name]
    if props["datetime"] is None and len(props) == 1:
        if record.get("acquired"):
            props["datetime"] = f"{record['acquired']}T00:00:00Z"
        else:
            props["start_datetime"], props["end_datetime"] = ANY_TIME
    return props


def _assets(record: Mapping[str, Any], base_url: str | None) -> dict[str, Any]:
    href = record.get("asset_href") or Path(str(record["path"])).as_uri()
    suffix = Path(str(record["path"])).suffix.lower()
    source: dict[str, Any] = {"href": href, "title": "source image", "roles": ["data"]}
    if suffix in MEDIA:
        source["type"] = MEDIA[suffix]
    assets = {"source": source}
    if base_url is not None:
        image_id = quote(str(record.get("image", record["id"])), safe="")
        url = f"{base_url.rstrip('/')}/items/{image_id}"
        assets["tile"] = {
            "href": f"{url}/image",
            "type": "image/png" if "window" in record else source.get("type", "image/jpeg"),
            "title": "the tile's pixels",
            "roles": ["visual"],
        }
        assets["thumbnail"] = {
            "href": f"{url}/thumbnail",
            "type": "image/jpeg",
            "title": "thumbnail",
            "roles": ["thumbnail"],
        }
    return assets


def tile_item(
    record: Mapping[str, Any],
    distance: int | None = None,
    rank: int | None = None,
    base_url: str | None = None,
    stac_url: str | None = None,
) -> dict[str, Any]:
    """A record as a STAC Item. `base_url`: the service (for the tile and thumbnail assets);
    `stac_url`: its STAC API root (for the Item's links)."""
    props: dict[str, Any] = {
        k: v for k, v in (record.get("properties") or {}).items() if k not in GRID_FIELDS
    }
    props.update(_times(record))
    if record.get("class"):
        props["rshash:class"] = record["class"]
    if record.get("stac_item"):
        props["rshash:source_item"] = record["stac_item"]
    if distance is not None:
        props["rshash:distance"] = distance
    if rank is not None:
        props["rshash:rank"] = rank
    ring = record.get("footprint_wgs84")
    bounds = record.get("bounds_wgs84")
    collection = collection_of(record)
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": stac_id(str(record["id"])),
        "geometry": {"type": "Polygon", "coordinates": [ring]} if ring else None,
        "properties": props,
        "links": [],
        "assets": _assets(record, base_url),
        "collection": collection,
    }
    if ring and bounds:
        item["bbox"] = list(bounds)
    if stac_url is not None:
        root = stac_url.rstrip("/")
        col_url = f"{root}/collections/{quote(collection, safe='')}"
        item["links"] = [
            {"rel": "self", "href": f"{col_url}/items/{quote(item['id'], safe='')}",
             "type": "application/geo+json"},
            {"rel": "parent", "href": col_url, "type": "application/json"},
            {"rel": "collection", "href": col_url, "type": "application/json"},
            {"rel": "root", "href": f"{root}/", "type": "application/json"},
        ]  # fmt: skip
    return item


def item_collection(
    hits: Iterable[Hit],
    base_url: str | None = None,
    stac_url: str | None = None,
    first_rank: int = 1,
) -> dict[str, Any]:
    """Search hits, best first, as a STAC ItemCollection (ranks from `first_rank`)."""
    features = [
        tile_item(h.item, h.distance, first_rank + i, base_url, stac_url)
        for i, h in enumerate(hits)
    ]
    return {"type": "FeatureCollection", "features": features, "numberReturned": len(features)}
