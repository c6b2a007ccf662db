"""Shared fixtures: the real datasets (RSHASH_DATA overrides ../shared/datasets) and cached
real UCM features, extracted once and reused across tests and runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("RSHASH_DATA", REPO.parent / "shared" / "datasets"))
CACHE = REPO / ".cache" / "tests"
UCM = DATA_ROOT / "ucm-captions"
RSSCN7 = DATA_ROOT / "rsscn7"
# ONNX models exported by the backends: once per cache, shared by tests and their subprocesses
os.environ.setdefault("RSHASH_CACHE", str(CACHE / "rshash"))


@pytest.fixture(scope="session")
def ucm_path() -> Path:
    assert UCM.is_dir(), f"real UCM data missing at {UCM} (set RSHASH_DATA)"
    return UCM


@pytest.fixture(scope="session")
def ucm_features(ucm_path: Path) -> Path:
    """Default-encoder features of all of UCM-Captions (a few minutes on 2 CPU cores, cached)."""
    from rshash.data import load_dataset
    from rshash.features import ExtractConfig, extract_features

    out = CACHE / "ucm-features.h5"
    if not out.exists():
        extract_features(load_dataset(ucm_path), out, ExtractConfig(), progress=False)
    return out


def shards_of_index(index: Path, run: Path, data: Path, out: Path, shards: int = 2) -> Path:
    """`shards` shards of a built index's own codes over the archive at `data` (no encoding, no
    Ray needed to build)."""
    from rshash.data import load_dataset
    from rshash.index import Index
    from rshash.index.sharded import ray_build_shards

    single = Index.open(index)
    ray_build_shards(
        run,
        load_dataset(data, check_images=False),
        out,
        shards=shards,
        image_codes=single.collections["images"].codes,
        caption_codes=single.collections["captions"].codes,
    )
    return out


def make_caption_dataset(
    root: Path, per_class: int = 4, classes: tuple[int, ...] = (0, 8, 16)
) -> Path:
    """A small caption-JSON dataset of real UCM images and captions (copied into `root`)."""
    src = json.loads((UCM / "dataset.json").read_text())
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for entry in src["images"]:
        if (
            entry["classcode"] in classes
            and sum(1 for e in images if e["classcode"] == entry["classcode"]) < per_class
        ):
            shutil.copy(UCM / "images" / entry["filename"], root / "images" / entry["filename"])
            images.append(entry)
    (root / "dataset.json").write_text(json.dumps({"dataset": "ucm-mini", "images": images}))
    return root


@pytest.fixture
def mini_dataset(tmp_path: Path, ucm_path: Path) -> Path:
    return make_caption_dataset(tmp_path / "mini")


@pytest.fixture(scope="session")
def mini_features(tmp_path_factory: pytest.TempPathFactory, ucm_path: Path) -> Path:
    """Default-encoder features of a 12-image dataset laid out like `mini_dataset`."""
    from rshash.data import load_dataset
    from rshash.features import ExtractConfig, extract_features

    root = make_caption_dataset(tmp_path_factory.mktemp("mini-features") / "mini")
    out = root.parent / "features.h5"
    extract_features(load_dataset(root), out, ExtractConfig(image_batch=8), progress=False)
    return out


def rshash_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the `rshash` command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "rshash.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="session")
def ucm_run(ucm_features: Path) -> Path:
    """A 64-bit DUCH run trained on all of UCM's training split (about a minute on CPU, cached)."""
    from rshash.training import OptimConfig, TrainConfig, train

    run = CACHE / "ucm-duch64"
    if not (run / "model.json").exists():
        cfg = TrainConfig(features=str(ucm_features), bits=64, optim=OptimConfig(epochs=60))
        train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory, ucm_features: Path):
    """`short_run(bits)`: a run of that code length trained for two epochs on UCM (seconds):
    for tests of how code widths are handled, not of retrieval quality."""
    from rshash.training import OptimConfig, TrainConfig, train

    root = tmp_path_factory.mktemp("short-runs")

    def make(bits: int) -> Path:
        run = root / f"run{bits}"
        if not (run / "model.json").exists():
            cfg = TrainConfig(features=str(ucm_features), bits=bits, optim=OptimConfig(epochs=2))
            train(cfg, run, progress=False)
        return run

    return make


@pytest.fixture(scope="session")
def rsscn7_index(ucm_run: Path) -> Path:
    """Every RSSCN7 image encoded with the UCM-trained run (a minute or two on CPU, cached)."""
    from rshash.data import load_dataset
    from rshash.index.build import build_index

    out = CACHE / "rsscn7-index"
    if not _index_of(out, ucm_run):
        shutil.rmtree(out, ignore_errors=True)
        build_index(ucm_run, load_dataset(RSSCN7), out, progress=False)
    return out


@pytest.fixture(scope="session")
def ucm_index(ucm_run: Path, ucm_features: Path, ucm_path: Path) -> Path:
    """All of UCM (images and captions) indexed from the cached features (seconds)."""
    from rshash.data import load_dataset
    from rshash.index.build import build_index

    out = CACHE / "ucm-index"
    if not _index_of(out, ucm_run):
        shutil.rmtree(out, ignore_errors=True)
        build_index(ucm_run, load_dataset(ucm_path), out, features=ucm_features, progress=False)
    return out


def _index_of(path: Path, run: Path) -> bool:
    """Whether `path` holds an index of the current format built with `run`'s current model."""
    from rshash.index.index import model_fingerprint
    from rshash.index.store import FORMAT

    manifest = path / "index.json"
    if not manifest.exists():
        return False
    info = json.loads(manifest.read_text())
    return info.get("format") == FORMAT and info["model"]["fingerprint"] == model_fingerprint(run)


@pytest.fixture(scope="session")
def scene_files(tmp_path_factory: pytest.TempPathFactory, ucm_path: Path) -> dict[str, Path]:
    """Real GeoTIFFs of real UCM images (tests/scenes_data.py), good and bad (seconds)."""
    from tests import scenes_data as sd

    root = tmp_path_factory.mktemp("scenes")
    mosaic = sd.mosaic_layout()
    return {
        "mosaic": sd.write_mosaic(root / "mosaic.tif", mosaic),
        "mosaic16": sd.write_mosaic(root / "mosaic16.tif", mosaic, sixteen_bit=True),
        "cog": sd.write_cog(root / "mosaic-cog.tif", mosaic),
        "munich": sd.write_mosaic(
            root / "munich.tif", sd.mosaic_layout(4, shift=1), **sd.MUNICH, acquired=None
        ),
        "rotated": sd.write_mosaic(root / "rotated.tif", sd.mosaic_layout(3), rotation=30.0),
        "plain": sd.write_mosaic(root / "plain.tif", sd.mosaic_layout(2), crs=None),
        "small": sd.write_small(root / "small.tif"),
        "truncated": sd.write_truncated(root / "truncated.tif", root / "mosaic-cog.tif"),
        "cut_header": sd.write_truncated(root / "cut.tif", root / "mosaic.tif"),
        "corrupt": sd.write_corrupt(root / "corrupt.tif", root / "mosaic-cog.tif"),
        "not_tiff": sd.write_not_a_tiff(root / "broken.tif"),
    }


@pytest.fixture(scope="session")
def scene_index(ucm_run: Path, scene_files: dict[str, Path]) -> Path:
    """The 10 x 10 mosaic (UTM 11N) and the 4 x 4 one (UTM 32N) as 256-px tiles (a minute)."""
    from rshash.data.scenes import SceneTiles
    from rshash.index.build import build_index
    from tests.scenes_data import scene_folder

    root = scene_files["mosaic"].parent
    folder = scene_folder(root, "archive", scene_files["mosaic"], scene_files["munich"])
    out = root / "index"
    if not (out / "index.json").exists():
        build_index(ucm_run, SceneTiles(folder), out, progress=False)
    return out


@pytest.fixture(scope="session")
def fiji_scene(tmp_path_factory: pytest.TempPathFactory, ucm_path: Path) -> Path:
    """A 4 x 4 mosaic across the antimeridian (tests/scenes_data.py FIJI)."""
    from tests.scenes_data import FIJI, mosaic_layout, write_mosaic

    return write_mosaic(tmp_path_factory.mktemp("fiji") / "fiji.tif", mosaic_layout(4, 2), **FIJI)


@pytest.fixture(scope="session")
def fiji_scene_index(ucm_run: Path, fiji_scene: Path) -> Path:
    """The Fiji mosaic as 256-px tiles (seconds)."""
    from rshash.data.scenes import SceneTiles
    from rshash.index.build import BuildConfig, build_index

    out = fiji_scene.parent / "index"
    build_index(ucm_run, SceneTiles(fiji_scene), out, BuildConfig(device="cpu"), progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of this machine for the module (`address="local"`: never another session's)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cli_in_process(*args) -> str:
    """The CLI in this process (one Ray for every sharded search, instead of one per call)."""
    from typer.testing import CliRunner

    from rshash.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def ranked(output: str) -> list[tuple[str, int]]:
    """(id, distance) of each hit of `rshash search --format json` output."""
    return [(h["id"], h["distance"]) for h in json.loads(output)]
