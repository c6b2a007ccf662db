"""Download a public caption dataset, verify it, and lay it out as `load_dataset` expects.

UCM-Captions = the UC Merced Land Use image archive (a zip of `Images/<class>/<class>NN.tif`)
plus the UCM-Captions JSON (`images[]` with `filename` "N.tif"; image N is class (N-1)//100 in
alphabetical order, number (N-1)%100). Downloads are verified (size and MD5 where published,
then content: class and image counts, one JSON entry per image) before anything is laid out;
the dataset folder appears in one rename, so a failed fetch leaves no half-made dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.error import URLError

from tqdm import tqdm

from rshash.errors import DataError
from rshash.fileio import write_json_atomic


@dataclass(frozen=True)
class Source:
    """One downloadable file and what it must be (None: not published, checked by content)."""

    url: str | None
    filename: str
    size: int | None = None
    md5: str | None = None


@dataclass(frozen=True)
class FetchSpec:
    """A class-per-folder image zip plus a caption JSON that numbers the images class by class."""

    name: str
    images: Source
    captions: Source
    classes: int
    images_per_class: int
    captions_hint: str = ""

    def with_mirror(self, base_url: str) -> FetchSpec:
        """Both files from `base_url` (an institutional mirror, or a local server)."""
        base = base_url.rstrip("/") + "/"
        return replace(
            self,
            images=replace(self.images, url=base + self.images.filename),
            captions=replace(self.captions, url=base + self.captions.filename),
        )


UCM_CAPTIONS = FetchSpec(
    name="ucm-captions",
    images=Source(
        url="http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip",
        filename="UCMerced_LandUse.zip",
        md5="5b7ec56793786b6dc8a908e8854ac0e4",  # as published by torchgeo for this archive
    ),
    captions=Source(url=None, filename="dataset.json"),
    classes=21,
    images_per_class=100,
    captions_hint=(
        "the UCM-Captions JSON (Qu et al., 2016) has no stable direct URL: the authors share "
        "it on Google Drive/Baidu (see github.com/201528014227051/RSICD_optimal); download "
        "its dataset.json and pass --captions-url file:///path/to/dataset.json"
    ),
)
SPECS = {UCM_CAPTIONS.name: UCM_CAPTIONS}
_MEMBER = re.compile(r"(?:^|/)Images/([^/]+)/\1(\d+)\.tif$")


def fetch_dataset(spec: FetchSpec, out: Path, progress: bool = True) -> Path:
    """Download, verify and lay out `spec` as `out/<name>`; skips what is already there."""
    target = out / spec.name
    if (target / "FETCH.json").exists():
        return target
    if spec.captions.url is None:
        raise DataError(f"{spec.name}: {spec.captions_hint}")
    downloads = out / ".downloads" / spec.name
    zip_path = download(spec.images, downloads, progress)
    json_path = download(spec.captions, downloads, progress)
    members = _image_members(zip_path, spec)
    captions = _check_captions(json_path, spec)
    partial = out / f".{spec.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        for number, member in tqdm(
            members.items(), desc=f"unpack {spec.name}", unit="img", disable=not progress
        ):
            with zf.open(member) as src, (partial / "images" / f"{number}.tif").open("wb") as dst:
                shutil.copyfileobj(src, dst)
    shutil.copyfile(json_path, partial / spec.captions.filename)
    record = {
        "dataset": spec.name,
        "images": len(members),
        "captions": captions,
        "sources": [
            _describe(s, p) for s, p in ((spec.images, zip_path), (spec.captions, json_path))
        ],
    }
    write_json_atomic(partial / "FETCH.json", record)
    if target.exists():
        raise DataError(f"{target}: exists but holds no FETCH.json; move it away and fetch again")
    partial.rename(target)
    return target


def download(source: Source, folder: Path, progress: bool = True) -> Path:
    """`source` into `folder` (through a .part file), verified; a verified copy is reused."""
    path = folder / source.filename
    if path.exists() and _matches(source, path):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(str(source.url), timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                part.open("wb") as fh,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=source.filename,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"{source.url}: download failed ({exc})") from exc
    problem = _mismatch(source, part)
    if problem:
        part.unlink()
        raise DataError(f"{source.url}: {problem}; nothing was kept")
    part.replace(path)
    return path


def _matches(source: Source, path: Path) -> bool:
    return _mismatch(source, path) is None


def _mismatch(source: Source, path: Path) -> str | None:
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        return f"size {size} bytes, expected {source.size}"
    if source.md5 is not None and (got := _digest(path, "md5")) != source.md5:
        return f"MD5 {got}, expected {source.md5}"
    return None


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _describe(source: Source, path: Path) -> dict[str, Any]:
    return {
        "url": source.url,
        "file": source.filename,
        "size": path.stat().st_size,
        "md5": _digest(path, "md5"),
        "sha256": _digest(path, "sha256"),
    }


def _image_members(zip_path: Path, spec: FetchSpec) -> dict[int, str]:
    """Image number (1-based, class by class in alphabetical order) → zip member."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path}: not a zip archive ({exc})") from exc
    by_class: dict[str, dict[int, str]] = {}
    for name in names:
        if m := _MEMBER.search(name):
            by_class.setdefault(m.group(1), {})[int(m.group(2))] = name
    if len(by_class) != spec.classes:
        raise DataError(
            f"{zip_path}: {len(by_class)} class folders under Images/, expected {spec.classes}"
        )
    members = {}
    for c, cls in enumerate(sorted(by_class)):
        numbers = sorted(by_class[cls])
        if numbers != list(range(spec.images_per_class)):
            raise DataError(
                f"{zip_path}: class {cls!r} holds {len(numbers)} images numbered "
                f"{numbers[:1]}..{numbers[-1:]}, expected {cls}00..{spec.images_per_class - 1}"
            )
        for n in numbers:
            members[c * spec.images_per_class + n + 1] = by_class[cls][n]
    return members


def _check_captions(json_path: Path, spec: FetchSpec) -> int:
    """Number of captions; the JSON must list each image N as "N.tif" with ≥ 1 sentence."""
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{json_path}: not a caption JSON with an 'images' list ({exc})") from exc
    expected = {f"{n}.tif" for n in range(1, spec.classes * spec.images_per_class + 1)}
    names = {str(e.get("filename")) for e in entries if isinstance(e, dict)}
    if names != expected or len(entries) != len(expected):
        raise DataError(
            f"{json_path}: 'images' must name 1.tif..{len(expected)}.tif once each; "
            f"got {len(entries)} entries, {len(names & expected)} of the expected names"
        )
    empty = [e["filename"] for e in entries if not e.get("sentences")]
    if empty:
        raise DataError(f"{json_path}: images {empty[:5]} have no sentences")
    return sum(len(e["sentences"]) for e in entries)
