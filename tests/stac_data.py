"""STAC catalogs of real-UCM mosaics (tests/scenes_data.py), made with rio-stac and pystac as an
archive operator would: a root Catalog with two Collections, each with Items on two dates, saved
self-contained (every href relative), and variants broken one field at a time."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pystac
from rio_stac import create_stac_item

from tests.scenes_data import ORIGIN, mosaic_layout, write_mosaic

GRID = 3  # cells per side: 9 image tiles per Item (the nodata margin's tiles are skipped)


@dataclass(frozen=True)
class ItemSpec:
    item_id: str
    collection: str
    when: datetime
    cloud: float
    shift: int  # which UCM images fill the mosaic (mosaic_layout's shift)
    east: float  # metres east of scenes_data.ORIGIN: the Items lie side by side


SPECS = (
    ItemSpec("harbour-2019", "aerial-a", datetime(2019, 5, 2, 10, 0, tzinfo=UTC), 5.0, 0, 0.0),
    ItemSpec("harbour-2021", "aerial-a", datetime(2021, 7, 20, 10, 0, tzinfo=UTC), 40.0, 1, 0.0),
    ItemSpec("coast-2019", "aerial-b", datetime(2019, 8, 9, 11, 0, tzinfo=UTC), 12.0, 2, 2000.0),
    ItemSpec("coast-2021", "aerial-b", datetime(2021, 3, 1, 11, 0, tzinfo=UTC), 0.0, 3, 2000.0),
)


def write_catalog(root: Path, specs: tuple[ItemSpec, ...] = SPECS) -> Path:
    """A self-contained STAC catalog at root/stac/catalog.json over COG-like mosaics in
    root/images; returns the catalog file."""
    images = root / "images"
    catalog = pystac.Catalog("ucm-mosaics", "Real UCM mosaics on two dates", href=None)
    collections: dict[str, pystac.Collection] = {}
    for spec in specs:
        tif = write_mosaic(
            images / f"{spec.item_id}.tif",
            mosaic_layout(GRID, spec.shift),
            origin=(ORIGIN[0] + spec.east, ORIGIN[1]),
            acquired=None,
        )
        item = create_stac_item(
            str(tif),
            input_datetime=spec.when,
            id=spec.item_id,
            collection=spec.collection,
            properties={"eo:cloud_cover": spec.cloud, "platform": "ucm-aerial", "gsd": 0.3},
            asset_name="visual",
            asset_roles=["visual"],
            asset_media_type=pystac.MediaType.GEOTIFF,
            with_proj=True,
        )
        if spec.collection not in collections:
            collections[spec.collection] = pystac.Collection(
                spec.collection,
                f"Mosaics {spec.collection}",
                pystac.Extent(
                    pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                    pystac.TemporalExtent([[None, None]]),
                ),
                license="CC-BY-4.0",
            )
            catalog.add_child(collections[spec.collection])
        collections[spec.collection].add_item(item)
    for col in collections.values():
        col.update_extent_from_items()
    out = root / "stac"
    catalog.normalize_hrefs(str(out))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return out / "catalog.json"


def item_files(catalog: Path) -> dict[str, Path]:
    """Item id → its JSON file in a catalog written by `write_catalog`."""
    return {p.parent.name: p for p in catalog.parent.glob("*/*/*.json")}


def broken_copy(catalog: Path, dest: Path, item_id: str, change: dict | None = None) -> Path:
    """A copy of the catalog in `dest` (images shared), Item `item_id`'s JSON updated by
    `change` (dotted keys; a key set to None is removed); returns the copy's catalog file."""
    shutil.copytree(catalog.parent, dest / catalog.parent.name)
    (dest / "images").symlink_to(catalog.parent.parent / "images")  # relative hrefs still resolve
    copy = dest / catalog.parent.name / catalog.name
    path = item_files(copy)[item_id]
    data = json.loads(path.read_text())
    for key, value in (change or {}).items():
        target, name = data, key
        for part in key.split(".")[:-1]:
            target = target[part]
        name = key.split(".")[-1]
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    path.write_text(json.dumps(data))
    return copy
