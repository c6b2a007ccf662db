"""STAC catalogs as an image source: every Item's image asset cut into tiles like any scene.

`StacTiles("catalog.json", TileConfig(tile=256))` reads a STAC Catalog, Collection or
ItemCollection JSON file (local files; relative hrefs resolve against the file that holds them),
checks every Item before a single tile is served, and then tiles each Item's asset exactly as
`SceneTiles` tiles a GeoTIFF (same windows, footprints, stretch and resume key). Tile ids are
`ITEM/rROW_cCOL`. Each tile's record keeps the Item's id (`stac_item`), `collection`,
`datetime` (or `start_datetime`/`end_datetime`), its `properties` (also one top-level field
each, so `--where 'eo:cloud_cover < 10'` works), the asset's name and absolute href, and
`time_start`/`time_end` for `--datetime` (see `rshash.index.time_filter`).

The image asset: `asset=NAME`, else the first asset that is a GeoTIFF (media type image/tiff,
COG or not; or, untyped, an href ending .tif/.tiff) with the role `visual` or `data`.

Refused, before anything is read from an image and so before anything is added, each with a
one-line error naming the Item (or file) and the field: a file that is not STAC JSON, an Item
without `id`, `geometry` or a time, two Items with one id, an Item without the asset, an asset
href that is remote or does not exist, and links looping back or nested deeper than MAX_DEPTH.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pystac
import rasterio
from tqdm import tqdm

from rshash.data.scenes import Scene, SceneTiles, TileConfig, scan_scene
from rshash.errors import DataError

MAX_JSON_BYTES = 64 * 1024 * 1024  # one catalog, collection, item or item-collection file
MAX_ITEMS = 1_000_000  # Items in one catalog
MAX_DEPTH = 32  # catalog → child → ... levels
GEOTIFF_TYPES = ("image/tiff", "image/geotiff")
IMAGE_ROLES = ("visual", "data")
# record fields a STAC property never replaces (it stays in `properties`)
OWN_FIELDS = frozenset(
    {
        "id", "image", "path", "captions", "text", "dataset", "class", "scene", "window", "bands",
        "stretch", "crs", "footprint", "footprint_wgs84", "bounds_wgs84", "resolution_m",
        "acquired", "collection", "stac_item", "stac_asset", "asset_href", "properties",
        "time_start", "time_end", "geometry", "bbox",
    }
)  # fmt: skip


@dataclass(frozen=True)
class StacEntry:
    """One checked Item: where its image is and what each of its tiles' records keeps."""

    item_id: str
    collection: str | None
    asset: str
    path: Path
    href: str
    fields: dict[str, Any]


def is_stac_file(path: str | Path) -> bool:
    """Whether SOURCE is a STAC JSON file (a Catalog, Collection or ItemCollection: a JSON
    object with `stac_version` or a FeatureCollection), not a caption-JSON dataset."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    if path.stat().st_size > MAX_JSON_BYTES:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (
        "stac_version" in data or data.get("type") == "FeatureCollection"
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"{what}: {path} does not exist") from None
    if size > MAX_JSON_BYTES:
        raise DataError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB of JSON")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (a STAC Catalog, Collection or Item)")
    return data


def _local(href: str, base: Path, what: str) -> Path:
    """A local href (relative to `base`'s folder, absolute, or file://) as a resolved path."""
    parsed = urlparse(href)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise DataError(f"{what}: href {href!r} is not a local file (only local catalogs)")
    return (base.parent / href).resolve()


def _kind(data: dict[str, Any], path: Path) -> str:
    kind = data.get("type")
    if kind in ("Catalog", "Collection", "FeatureCollection") or (
        kind == "Feature" and "stac_version" in data
    ):
        return str(kind)
    raise DataError(
        f"{path}: not a STAC Catalog, Collection or ItemCollection (type {kind!r}, "
        f"stac_version {data.get('stac_version')!r})"
    )


def _walk(path: Path) -> Iterator[tuple[dict[str, Any], Path, str | None]]:
    """Every Item under the STAC file at `path`: (its JSON, the file its hrefs are relative to,
    the collection it sits in)."""
    seen: set[Path] = set()

    def visit(
        file: Path, depth: int, parent: str | None
    ) -> Iterator[tuple[dict[str, Any], Path, str | None]]:
        if file in seen:
            raise DataError(f"{file}: linked twice (a loop or a shared child in the catalog)")
        if depth > MAX_DEPTH:
            raise DataError(f"{file}: catalog nested deeper than {MAX_DEPTH} levels")
        seen.add(file)
        data = _read_json(file, f"{file.name}")
        kind = _kind(data, file)
        if kind == "Feature":
            yield data, file, parent
            return
        if kind == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise DataError(f"{file}: ItemCollection without a 'features' list")
            for feature in features:
                if not isinstance(feature, dict):
                    raise DataError(f"{file}: a feature is not a JSON object")
                yield feature, file, parent
            return
        here = str(data.get("id")) if kind == "Collection" else parent
        for link in data.get("links") or ():
            if isinstance(link, dict) and link.get("rel") in ("child", "item"):
                href = link.get("href")
                if not isinstance(href, str):
                    raise DataError(f"{file}: a {link.get('rel')} link without an href")
                target = _local(href, file, f"{file.name} link")
                yield from visit(target, depth + 1, here)

    yield from visit(path.resolve(), 0, None)


def pick_asset(item: pystac.Item, name: str | None) -> str:
    """The image asset's name: `name`, else the first GeoTIFF with a visual or data role."""
    if name is not None:
        if name not in item.assets:
            have = ", ".join(item.assets) or "none"
            raise DataError(f"item {item.id!r}: assets: no {name!r} (it has: {have})")
        return name
    for key, asset in item.assets.items():
        media = (asset.media_type or "").lower()
        tiff = media.startswith(GEOTIFF_TYPES) or (
            not media and asset.href.lower().endswith((".tif", ".tiff"))
        )
        if tiff and set(asset.roles or ()) & set(IMAGE_ROLES):
            return key
    raise DataError(
        f"item {item.id!r}: assets: none is a GeoTIFF with role 'visual' or 'data' "
        "(name one with --asset)"
    )


def _check_item(data: dict[str, Any], file: Path) -> None:
    """The fields rshash needs, checked on the JSON so the error names them."""
    item_id = data.get("id")
    if not isinstance(item_id, str) or not item_id:
        raise DataError(f"{file}: an Item without an 'id'")
    if not isinstance(data.get("geometry"), dict):
        raise DataError(f"item {item_id!r}: geometry: missing (rshash places tiles by it)")
    props = data.get("properties")
    if not isinstance(props, dict):
        raise DataError(f"item {item_id!r}: properties: missing")
    if props.get("datetime") is None and not (
        props.get("start_datetime") and props.get("end_datetime")
    ):
        raise DataError(
            f"item {item_id!r}: datetime: missing (nor start_datetime and end_datetime)"
        )
    if not isinstance(data.get("assets"), dict) or not data["assets"]:
        raise DataError(f"item {item_id!r}: assets: none")


def _entry(data: dict[str, Any], file: Path, parent: str | None, asset: str | None) -> StacEntry:
    _check_item(data, file)
    try:
        item = pystac.Item.from_dict(data, preserve_dict=True, migrate=False)
    except Exception as exc:  # pystac raises several kinds on a malformed Item
        raise DataError(f"item {data['id']!r}: not a valid STAC Item ({exc})") from None
    key = pick_asset(item, asset)
    href = item.assets[key].href
    path = _local(href, file, f"item {item.id!r}: assets.{key}")
    if not path.is_file():
        raise DataError(f"item {item.id!r}: assets.{key}.href: {path} does not exist")
    common = item.common_metadata
    start, end = common.start_datetime, common.end_datetime
    time_start, time_end = time_span(item.datetime, start, end)
    props = json.loads(json.dumps(data["properties"]))  # plain JSON, a copy
    fields: dict[str, Any] = {k: v for k, v in props.items() if k not in OWN_FIELDS}
    fields.update(
        collection=item.collection_id or parent,
        stac_item=item.id,
        stac_asset=key,
        asset_href=path.as_uri(),
        properties=props,
        datetime=rfc3339(item.datetime) if item.datetime else None,
        time_start=time_start,
        time_end=time_end,
    )
    if start is not None:
        fields["start_datetime"] = rfc3339(start)
    if end is not None:
        fields["end_datetime"] = rfc3339(end)
    first = item.datetime or start or end
    fields["acquired"] = rfc3339(first)[:10] if first else None
    return StacEntry(item.id, fields["collection"], key, path, href, fields)


# the time helpers live here, not in rshash.index.time_filter: importing rshash.index loads torch,
# and tiling a catalog (Ray workers, benchmarks) must not
def time_span(
    instant: datetime | None, start: datetime | None, end: datetime | None
) -> tuple[float, float]:
    """An item's (time_start, time_end): its instant twice, else its start and end (an open
    end stretches to the far past or future)."""
    if instant is not None:
        t = _utc(instant).timestamp()
        return t, t
    lo = _utc(start).timestamp() if start is not None else -1e12
    hi = _utc(end).timestamp() if end is not None else 1e12
    return lo, hi


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def rfc3339(value: datetime) -> str:
    """`value` in UTC as RFC 3339 with a Z (STAC's form)."""
    return _utc(value).astimezone(UTC).isoformat().replace("+00:00", "Z")


def read_catalog(source: str | Path, asset: str | None = None) -> list[StacEntry]:
    """Every Item of the STAC file `source`, checked (see the module's list of refusals)."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such STAC file")
    entries: list[StacEntry] = []
    where: dict[str, Path] = {}
    for data, file, parent in _walk(path):
        if len(entries) == MAX_ITEMS:
            raise DataError(f"{path}: more than {MAX_ITEMS:,} Items")
        entry = _entry(data, file, parent, asset)
        if entry.item_id in where:
            raise DataError(
                f"item {entry.item_id!r}: id: appears twice ({where[entry.item_id]} and {file})"
            )
        where[entry.item_id] = file
        entries.append(entry)
    if not entries:
        raise DataError(f"{path}: the catalog holds no Items")
    return entries


class StacTiles(SceneTiles):
    """Tiles of a STAC catalog's Item assets as an image source (see the module docstring)."""

    def __init__(
        self,
        source: str | Path,
        cfg: TileConfig | None = None,
        asset: str | None = None,
        name: str | None = None,
        progress: bool = False,
    ) -> None:
        self.cfg = cfg or TileConfig()
        self.cfg.check()
        self.entries = read_catalog(source, asset)
        self.source = Path(source)
        self.name = name or self.source.stem
        self._set_scenes(self._scan(progress))

    def _scan(self, progress: bool) -> list[Scene]:
        """Scan every Item's image (named by the Item's id); a bad one fails the call, naming
        the Item and asset."""
        scenes = []
        bar = tqdm(self.entries, desc="scan items", unit="item", disable=not progress, delay=2.0)
        with warnings.catch_warnings(), bar:
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            for e in bar:
                try:
                    scenes.append(replace(scan_scene(e.path, self.cfg), name=e.item_id))
                except DataError as exc:
                    raise DataError(f"item {e.item_id!r}: assets.{e.asset}: {exc}") from None
        return scenes

    @property
    def root(self) -> Path:
        """The folder holding the catalog and every asset (the service serves files from it)."""
        folders = [str(self.source.resolve().parent), *(str(e.path.parent) for e in self.entries)]
        return Path(os.path.commonpath(folders))

    def image_record(self, i: int) -> dict[str, Any]:
        """Tile i's scene record with its Item's STAC fields."""
        s, _ = self._locate(i)
        return {**super().image_record(i), **self.entries[s].fields}
