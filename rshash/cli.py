"""The `rshash` command line: data, features, train, encode, evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from rshash.errors import RshashError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
features_app = typer.Typer(no_args_is_help=True, help="Extract encoder features.")
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
datasets_app = typer.Typer(no_args_is_help=True, help="Download public datasets.")
app.add_typer(datasets_app, name="datasets")
index_app = typer.Typer(no_args_is_help=True, help="Build and maintain search indexes.")
app.add_typer(index_app, name="index")

SELF_WARMUP = 10
SkipBad = Annotated[
    bool,
    typer.Option("--skip-bad", help="Skip unreadable images and report them instead of failing."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:1, ...")]
Backend = Annotated[
    str,
    typer.Option(
        help="Inference backend: auto (on a CPU onnx-int8 for codes, onnx for training features;"
        " torch on a GPU), torch, onnx, onnx-int8."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Features = Annotated[
    Path | None,
    typer.Option(help="Feature store of the same archive (skips encoding the images again)."),
]
Fields = Annotated[
    Path | None, typer.Option(help="JSON object {image id: {field: value}} stored with items.")
]
LockTimeout = Annotated[
    float | None,
    typer.Option(
        "--lock-timeout",
        help="Longest wait (seconds) for another writer's lock, then fail naming it (default 60).",
    ),
]


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path, typer.Argument(help="Caption-JSON file/folder or class-folder archive.")],
    skip_bad: SkipBad = False,
    as_json: AsJson = False,
) -> None:
    """Counts, classes, captions per image, caption lengths and image sizes."""
    from rshash.data import load_dataset
    from rshash.data.inspect import describe, format_description

    info = describe(load_dataset(path, skip_bad=skip_bad))
    typer.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@datasets_app.command("fetch")
def datasets_fetch(
    name: Annotated[str, typer.Argument(help="Dataset: ucm-captions.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Datasets folder (default: $RSHASH_DATA, else ./datasets)."),
    ] = None,
    mirror: Annotated[
        str | None, typer.Option(help="Base URL that serves every file of the dataset.")
    ] = None,
    captions_url: Annotated[
        str | None, typer.Option(help="URL (or file:///path) of the caption JSON.")
    ] = None,
) -> None:
    """Download, verify and lay out a public dataset where the loader expects it."""
    import dataclasses
    import os

    from rshash.data.fetch import SPECS, fetch_dataset

    _check_choice("NAME", name, tuple(SPECS))
    spec = SPECS[name].with_mirror(mirror) if mirror else SPECS[name]
    if captions_url:
        spec = dataclasses.replace(
            spec, captions=dataclasses.replace(spec.captions, url=captions_url)
        )
    root = out or Path(os.environ.get("RSHASH_DATA", "datasets"))
    typer.echo(f"{name} ready at {fetch_dataset(spec, root)}")


@features_app.command("extract")
def features_extract(
    dataset: Annotated[Path, typer.Argument(help="Dataset to encode.")],
    out: Annotated[Path, typer.Option("--out", help="Feature store to write (HDF5).")],
    image_encoder: Annotated[str, typer.Option(help="Image encoder name.")] = "efficientnet-lite0",
    text_encoder: Annotated[str, typer.Option(help="Text encoder name.")] = "all-minilm-l6-v2",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
    device: Device = "auto",
    backend: Backend = "auto",
    skip_bad: SkipBad = False,
) -> None:
    """Encode both views of every image and caption; resumes an interrupted run."""
    from rshash.data import load_dataset
    from rshash.features import ExtractConfig, FeatureStore, extract_features
    from rshash.features.backends import check_backend

    check_backend(backend)

    ds = load_dataset(dataset, skip_bad=skip_bad)
    if ds.skipped:
        typer.echo(f"skipped {len(ds.skipped)} unreadable images:", err=True)
        for image_id, reason in ds.skipped:
            typer.echo(f"  {image_id}: {reason}", err=True)
    cfg = ExtractConfig(
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        image_batch=batch_size,
        seed=seed,
        device=device,
        backend=backend,
    )
    path = extract_features(ds, out, cfg)
    store = FeatureStore.open(path)
    typer.echo(f"wrote {path}")
    for view, m in store.image.items():
        typer.echo(f"  image/{view:<10} {m.shape[0]} x {m.shape[1]}")
    for view, m in store.text.items():
        typer.echo(f"  text/{view:<11} {m.shape[0]} x {m.shape[1]}")


@app.command()
def train(
    features: Annotated[Path, typer.Option(help="Feature store from `rshash features extract`.")],
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it holds a checkpoint).")],
    method: Annotated[str, typer.Option(help="duch, chnr, or the baselines djsrh, jdsh.")] = "duch",
    bits: Annotated[int, typer.Option(help="Code length K.")] = 64,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs in all (default: DUCH 100, CHNR 150).")
    ] = None,
    batch_size: Annotated[int, typer.Option()] = 256,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: 1e-4; DJSRH, JDSH 1e-3).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and shuffling.")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/query/retrieval split.")] = 42,
    caption_mode: Annotated[
        str, typer.Option(help="one (paper protocol) or all captions.")
    ] = "one",
    text_view: Annotated[str, typer.Option(help="augmented, perturbed or plain.")] = "augmented",
    image_view: Annotated[str, typer.Option(help="augmented or plain.")] = "augmented",
    alpha: Annotated[float, typer.Option(help="Adversarial weight α.")] = 0.01,
    beta: Annotated[float, typer.Option(help="Quantisation weight β.")] = 0.001,
    gamma: Annotated[float, typer.Option(help="Bit-balance weight γ.")] = 0.01,
    temperature: Annotated[float, typer.Option(help="NT-Xent temperature τ.")] = 1.0,
    intra_modal: Annotated[
        bool, typer.Option(help="Use the intra-modal contrastive terms.")
    ] = True,
    noise: Annotated[
        float | None, typer.Option(help="CHNR experiments: swap training captions with prob. p.")
    ] = None,
    clean_fraction: Annotated[
        float, typer.Option(help="CHNR: protected clean (meta) fraction c of training pairs.")
    ] = 0.3,
    clean_subset: Annotated[
        Path | None, typer.Option(help="CHNR on your own data: file of verified image ids.")
    ] = None,
    weighting: Annotated[
        str,
        typer.Option(
            help="CHNR: soft, cubed, discrete or ones (detector weights), or self: no clean "
            "subset, weights from a 3-component mixture on per-pair losses after warm-up."
        ),
    ] = "discrete",
    detector_negatives: Annotated[
        str,
        typer.Option(
            help="CHNR: the detector's mismatched pairs: random (another pair, no labels "
            "needed) or other-class (needs labels; the authors' code, to reproduce the paper)."
        ),
    ] = "random",
    hold_out_validation: Annotated[
        bool,
        typer.Option(
            "--hold-out-validation",
            help="Fit without the split's validation images (a seeded 10 % of training "
            "images); `rshash evaluate` then also scores them, to choose settings on.",
        ),
    ] = False,
    meta_epochs: Annotated[
        int | None,
        typer.Option(
            help="CHNR: phase-1 epochs (default: half of --epochs); with --weighting self, the "
            "warm-up on every pair (default: 10, before the model memorises wrong pairs)."
        ),
    ] = None,
    device: Device = "auto",
) -> None:
    """Train hash functions and write a run directory."""
    from rshash.training import CHNRConfig, LossConfig, OptimConfig, TrainConfig
    from rshash.training import train as train_run
    from rshash.training.config import default_lr

    _check_choice("--method", method, ("duch", "chnr", "djsrh", "jdsh"))
    _check_choice("--caption-mode", caption_mode, ("one", "all"))
    _check_choice("--text-view", text_view, ("augmented", "perturbed", "plain"))
    _check_choice("--image-view", image_view, ("augmented", "plain"))
    _check_choice("--weighting", weighting, ("soft", "cubed", "discrete", "ones", "self"))
    _check_choice("--detector-negatives", detector_negatives, ("random", "other-class"))
    if weighting == "self" and clean_subset is not None:
        raise RshashError("--weighting self uses no clean subset; drop --clean-subset")
    if method == "chnr" and weighting != "self" and (noise is None) == (clean_subset is None):
        raise RshashError(
            "--method chnr needs exactly one of --noise P (experiments with injected noise) "
            "or --clean-subset FILE (pairs you verified)"
        )
    if method != "chnr" and (noise is not None or clean_subset is not None):
        raise RshashError("--noise and --clean-subset apply to --method chnr only")
    total = epochs or (150 if method == "chnr" else 100)
    cfg = TrainConfig(
        features=str(features),
        method=method,  # type: ignore[arg-type]
        bits=bits,
        seed=seed,
        split_seed=split_seed,
        caption_mode=caption_mode,  # type: ignore[arg-type]
        image_view=image_view,  # type: ignore[arg-type]
        text_view=text_view,  # type: ignore[arg-type]
        device=device,
        hold_out_validation=hold_out_validation,
        loss=LossConfig(
            alpha=alpha, beta=beta, gamma=gamma, temperature=temperature, intra_modal=intra_modal
        ),
        optim=OptimConfig(
            epochs=total,
            batch_size=batch_size,
            lr=lr or default_lr(method),  # type: ignore[arg-type]
        ),
        chnr=CHNRConfig(
            meta_epochs=meta_epochs or (SELF_WARMUP if weighting == "self" else total // 2),
            weighting=weighting,  # type: ignore[arg-type]
            noise=noise or 0.0,
            clean_fraction=clean_fraction,
            clean_subset=str(clean_subset) if clean_subset else None,
            detector_negatives=detector_negatives,  # type: ignore[arg-type]
        ),
    )
    run = train_run(cfg, out)
    typer.echo(f"wrote {run} (evaluate with: rshash evaluate {run})")


@app.command()
def encode(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    features: Annotated[Path, typer.Option(help="Feature store to encode.")],
    out: Annotated[Path | None, typer.Option(help="Output .npz (default RUN/codes.npz).")] = None,
) -> None:
    """Binary codes (packed bits) for every image and caption of a feature store."""
    from rshash.features import FeatureStore
    from rshash.fileio import atomic_path
    from rshash.index.packing import pack_codes
    from rshash.models.run import HashRun

    hash_run = HashRun.open(run)
    store = FeatureStore.open(features)
    hash_run.check_features(store)
    arrays = {
        "image_ids": np.array(store.image_ids),
        "image_codes": pack_codes(hash_run.encode_images(store.image["plain"])),
    }
    if store.text:
        arrays["caption_image"] = store.caption_owner
        arrays["text_codes"] = pack_codes(hash_run.encode_texts(store.text["plain"]))
    target = out or hash_run.path / "codes.npz"
    with atomic_path(target) as tmp, tmp.open("wb") as fh:
        np.savez(fh, bits=np.array(hash_run.bits), **arrays)  # type: ignore[arg-type]
    n_text = len(arrays.get("text_codes", ()))
    typer.echo(
        f"wrote {target}: {store.num_images} image and {n_text} caption codes "
        f"of {hash_run.bits} bits"
    )


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    features: Annotated[
        Path | None, typer.Option(help="Feature store (default: the run's).")
    ] = None,
) -> None:
    """Score a run per PROTOCOL.md; writes metrics.json, plots/ and report.md into it."""
    from rshash.evaluation.report import format_table
    from rshash.evaluation.run_report import evaluate_and_report

    metrics = evaluate_and_report(run, features)
    typer.echo(format_table(metrics))
    typer.echo(f"wrote {run}/metrics.json, {run}/report.md and {run}/plots/")


@app.command()
def audit(
    run: Annotated[Path, typer.Argument(help="CHNR run directory (holds the noise detector).")],
    dataset: Annotated[Path, typer.Argument(help="Dataset whose pairs to score.")],
    features: Annotated[Path, typer.Option(help="Feature store of DATASET.")],
    out: Annotated[Path, typer.Option(help="Output folder for audit.csv and audit.html.")] = Path(
        "audit"
    ),
    top: Annotated[int, typer.Option(help="Pairs shown on the HTML page.")] = 100,
) -> None:
    """Rank every image-caption pair by noise-detector score: CSV and an HTML page."""
    from rshash.data import load_dataset
    from rshash.evaluation.audit import audit_pairs, write_csv, write_html
    from rshash.features import FeatureStore
    from rshash.models.run import HashRun

    if top <= 0:
        raise RshashError(f"--top must be positive, got {top}")
    ds = load_dataset(dataset)
    rows = audit_pairs(HashRun.open(run), ds, FeatureStore.open(features))
    write_csv(rows, out / "audit.csv")
    write_html(rows, ds, out / "audit.html", top)
    typer.echo(f"scored {len(rows)} pairs; wrote {out / 'audit.csv'} and {out / 'audit.html'}")
    for r in rows[:5]:
        typer.echo(f"  {r.score:.3f}  {r.image_id} [{r.class_name}] {r.caption}")


Tile = Annotated[
    int | None,
    typer.Option(
        help="DATA is a GeoTIFF scene or a folder of them: cut into tiles of this many px."
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Sharded index: Ray cluster address (default: a local Ray)."),
]
Stride = Annotated[
    int | None, typer.Option(help="Scenes: px from one tile to the next (default: --tile).")
]
Bands = Annotated[
    str | None,
    typer.Option(
        help="Scenes: 1-based bands shown as red, green, blue, e.g. 3,2,1 (default 1,2,3)."
    ),
]


Asset = Annotated[
    str | None,
    typer.Option(
        help="DATA is a STAC catalog (.json): the image asset of each Item (default: the first"
        " GeoTIFF with role visual or data)."
    ),
]


def _archive(
    data: Path,
    skip_bad: bool,
    tile: int | None,
    stride: int | None,
    bands: str | None,
    features: Path | None,
    asset: str | None = None,
) -> Any:
    """The dataset at DATA, with --tile the tiles of the GeoTIFF scenes at DATA, or the tiles of
    the Items of the STAC catalog DATA (a .json file; --tile defaults to 256 there)."""
    from rshash.data.stac import is_stac_file

    if is_stac_file(data):
        from rshash.data.scenes import TileConfig, parse_bands
        from rshash.data.stac import StacTiles

        if features is not None:
            raise RshashError("--features: not with a STAC catalog (tiles are encoded from it)")
        cfg = TileConfig(tile=tile or 256, stride=stride, bands=parse_bands(bands))
        return StacTiles(data, cfg, asset, progress=True)
    if asset is not None:
        raise RshashError("--asset: only with a STAC catalog (a .json file)")
    if tile is None:
        from rshash.data import load_dataset

        if stride is not None or bands is not None:
            raise RshashError("--stride, --bands: only with --tile (scenes)")
        return load_dataset(data, skip_bad=skip_bad)
    from rshash.data.scenes import SceneTiles, TileConfig, parse_bands

    if features is not None:
        raise RshashError("--features: not with --tile (scene tiles are encoded from the scenes)")
    cfg = TileConfig(tile=tile, stride=stride, bands=parse_bands(bands))
    return SceneTiles(data, cfg, progress=True)


@index_app.command("build")
def index_build(
    run: Annotated[Path, typer.Argument(help="Trained run directory.")],
    data: Annotated[
        Path, typer.Argument(help="Dataset, image folder, scenes, or a STAC catalog (.json).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Index directory to create.")],
    engine: Annotated[
        str,
        typer.Option(
            help="auto (exact scan; multi-index hashing from 2e6 codes of <= 64 bits, k <= 100),"
            " exact, mih (always multi-index hashing), faiss-flat or faiss-ivf."
        ),
    ] = "auto",
    nprobe: Annotated[int, typer.Option(help="faiss-ivf: cells probed per query.")] = 16,
    features: Features = None,
    fields: Fields = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Device = "auto",
    backend: Backend = "auto",
    skip_bad: SkipBad = False,
    tile: Tile = None,
    stride: Stride = None,
    bands: Bands = None,
    asset: Asset = None,
    lock_timeout: LockTimeout = None,
    shards: Annotated[
        int | None,
        typer.Option(help="Write a sharded index of this many shards (served on Ray)."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --shards: encode the images on this Ray cluster's Ray Data workers"
            " ('local': a Ray on this machine); every node must read DATA."
        ),
    ] = None,
) -> None:
    """Encode every image (and caption) of DATA with RUN's model into a new index.

    A killed build resumes from the batches it saved when run again with the same options."""
    from rshash.features.backends import check_backend
    from rshash.index.build import BuildConfig, build_index, read_extra_fields

    check_backend(backend)
    wait = _lock_timeout(lock_timeout)
    ds = _archive(data, skip_bad, tile, stride, bands, features, asset)
    params = {"nprobe": nprobe} if engine == "faiss-ivf" else {}
    cfg = BuildConfig(
        engine=engine,
        engine_params=params,
        image_batch=batch_size,
        device=device,
        backend=backend,
        lock_timeout_s=wait,
    )
    extra = read_extra_fields(fields, ds.image_ids)
    if shards is None:
        if ray_address is not None:
            raise RshashError("--ray-address: only with --shards (a sharded index)")
        _echo_index(build_index(run, ds, out, cfg, features, extra))
        return
    from rshash.index import open_index
    from rshash.index.sharded import build_sharded

    build_sharded(run, ds, out, shards, cfg, features, extra, ray_address=ray_address)
    _echo_index(open_index(out))


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    data: Annotated[
        Path, typer.Argument(help="Dataset, image folder, scenes, or a STAC catalog (.json).")
    ],
    features: Features = None,
    fields: Fields = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    device: Device = "auto",
    backend: Backend = "auto",
    skip_bad: SkipBad = False,
    tile: Tile = None,
    stride: Stride = None,
    bands: Bands = None,
    asset: Asset = None,
    lock_timeout: LockTimeout = None,
) -> None:
    """Encode DATA with the index's own model and add it, without rebuilding."""
    from rshash.features.backends import check_backend
    from rshash.index.build import BuildConfig, add_to_index, read_extra_fields

    check_backend(backend)
    wait = _lock_timeout(lock_timeout)
    ds = _archive(data, skip_bad, tile, stride, bands, features, asset)
    cfg = BuildConfig(image_batch=batch_size, device=device, backend=backend, lock_timeout_s=wait)
    idx, added = add_to_index(index, ds, cfg, features, read_extra_fields(fields, ds.image_ids))
    typer.echo(f"added {added} images")
    _echo_index(idx)


@index_app.command("remove")
def index_remove(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    ids: Annotated[list[str], typer.Argument(help="Image ids (their captions go too).")],
    lock_timeout: LockTimeout = None,
) -> None:
    """Remove images by id (from the shards that hold them, for a sharded index)."""
    from rshash.index import OpenConfig, open_index

    idx = open_index(index, OpenConfig(lock_timeout_s=_lock_timeout(lock_timeout)))
    removed = idx.remove(ids)
    if removed < len(set(ids)):
        idx.close()
        missing = next(i for i in ids if not _has_image(idx, i))
        raise RshashError(f"{index}: no image with id {missing!r}; nothing removed")
    idx.commit({"removed": ids})
    typer.echo(f"removed {removed} images")
    _echo_index(idx)


def _lock_timeout(seconds: float | None) -> float:
    """--lock-timeout, checked; the library's default when not given."""
    from rshash.index.store import LOCK_TIMEOUT_S

    if seconds is None:
        return LOCK_TIMEOUT_S
    if not 0 <= seconds <= 7 * 86400:
        raise RshashError(f"--lock-timeout: expected seconds between 0 and 604800, got {seconds}")
    return seconds


def _has_image(index: Any, image_id: str) -> bool:
    """Whether the image is live (asked of the records, so a sharded index needs no Ray)."""
    try:
        index.check_new_ids("images", [{"id": image_id}])
    except RshashError:
        return True
    return False


@index_app.command("compact")
def index_compact(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    lock_timeout: LockTimeout = None,
) -> None:
    """Merge each collection's segments into one and drop removed items' codes."""
    from rshash.index import OpenConfig, open_index

    idx = open_index(index, OpenConfig(lock_timeout_s=_lock_timeout(lock_timeout)))
    dropped = idx.compact()
    for name, n in dropped.items():
        typer.echo(f"{name}: dropped {n} removed codes")
    _echo_index(idx)


@index_app.command("check")
def index_check(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Fix what loses no data (dead writers' leftovers).")
    ] = False,
) -> None:
    """Verify checksums, files, and that every code has a record and counts match."""
    from rshash.index.maintenance import inspect_index
    from rshash.index.opening import is_sharded

    if is_sharded(index):
        _check_sharded(index, repair)
        return
    report = inspect_index(index, repair=repair)
    for name, counts in report.collections.items():
        state = "ok, " if report.clean else ""
        typer.echo(f"{name}: {state}" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for kind, lines in (
        ("repaired", report.repaired),
        ("note", report.leftovers),
        ("problem", report.fixable + report.damage),
    ):
        for line in lines:
            typer.echo(f"{kind}: {line}")
    if not report.clean:
        n = len(report.fixable) + len(report.damage)
        raise RshashError(f"{index}: {n} problem{'s' * (n > 1)} found (listed above)")
    typer.echo(f"{index}: ok")


def _check_sharded(index: Path, repair: bool) -> None:
    """`index check` of a sharded index: every shard checked, counts as `shards.json` names
    them; --repair rolls back what a killed change left in shards past it."""
    from rshash.index.cluster import ShardWriter, check_cluster

    if repair:
        ShardWriter(index).repair()
        typer.echo("repaired: shards brought back to the generations shards.json names")
    for name, counts in check_cluster(index).items():
        typer.echo(f"{name}: ok, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    typer.echo(f"{index}: ok")


@index_app.command("upgrade")
def index_upgrade(
    index: Annotated[Path, typer.Argument(help="Index or run directory of an older rshash.")],
) -> None:
    """Convert an older index (rshash-index/1, or a pickled model.pt) or run, in place."""
    from rshash.index.maintenance import upgrade_index

    upgraded = upgrade_index(index)
    if upgraded is None:
        typer.echo(f"run {index}: model converted to model.safetensors + model.json")
    else:
        _echo_index(upgraded)


@index_app.command("info")
def index_info(index: Annotated[Path, typer.Argument(help="Index directory.")]) -> None:
    """Model, engine, collections and build reports of an index (local or sharded)."""
    from rshash.index import open_index

    _echo_index(open_index(index))


def _echo_index(index: Any) -> None:
    m = index.manifest
    typer.echo(
        f"index {index.path}: {m['bits']}-bit codes, engine {m['engine']['name']}, "
        f"generation {m['generation']}"
    )
    typer.echo(f"model: {m['model']['method']} from {m['model']['source_run']}")
    typer.echo(f"encoded with backend: {m['model'].get('backend', 'torch')}")
    for name, info in m["collections"].items():
        report = ", ".join(f"{k} {v:.3f}" for k, v in info.get("report", {}).items())
        parts = f"{info['count']} items, {info['tombstones']} removed, "
        parts += f"{len(info['segments'])} segments"
        typer.echo(f"  {name}: {parts}" + (f" ({report})" if report else ""))
        col = getattr(index, "collections", {}).get(name)
        if col is not None:
            mem = col.engine.memory()
            held = ", ".join(f"{part} {size / 2**20:.1f} MiB" for part, size in mem.items())
            typer.echo(f"    served by {col.engine.describe()}; memory: {held}")


@app.command()
def search(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    text: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="Search with this image instead.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 20,
    radius: Annotated[
        int | None, typer.Option(help="Return every item within this Hamming radius instead.")
    ] = None,
    target: Annotated[str, typer.Option(help="Collection to search: images or captions.")] = (
        "images"
    ),
    where: Annotated[
        str | None,
        typer.Option(help="Filter, e.g. 'class = \"river\" and year >= 2010' (see README)."),
    ] = None,
    bbox: Annotated[
        str | None,
        typer.Option(
            help="Keep items whose bounds meet MINLON,MINLAT,MAXLON,MAXLAT (MINLON > MAXLON: the"
            " box crosses ±180°)."
        ),
    ] = None,
    datetime: Annotated[
        str | None,
        typer.Option(
            help="Keep items whose time meets this RFC 3339 instant or START/END interval (open"
            " end: ..), e.g. 2021-06-01/.. (STAC-indexed items)."
        ),
    ] = None,
    as_json: AsJson = False,
    device: Device = "auto",
    backend: Backend = "auto",
    output: Annotated[
        str,
        typer.Option(
            "--format",
            help="table, json, geojson (a FeatureCollection for QGIS) or stac (an ItemCollection).",
        ),
    ] = "table",
    ray_address: RayAddress = None,
) -> None:
    """Nearest images (or captions) to a text or an image query, by Hamming distance."""
    from rshash.features.backends import check_backend
    from rshash.index import OpenConfig, Searcher, open_index

    if (text is None) == (image is None):
        raise RshashError("give either a text query or --image FILE")
    _check_choice("--target", target, ("images", "captions"))
    _check_choice("--format", output, ("table", "json", "geojson", "stac"))
    if radius is None and k <= 0:
        raise RshashError(f"-k: expected a positive number of results, got {k}")
    box = _bbox(bbox) if bbox is not None else None
    opening = OpenConfig(device=device, backend=check_backend(backend), ray_address=ray_address)
    idx = Searcher(open_index(index, opening))
    if image is not None:
        hits = idx.search_image(image, k, target, radius, where=where, bbox=box, datetime=datetime)
    else:
        assert text is not None
        hits = idx.search_text(text, k, target, radius, where=where, bbox=box, datetime=datetime)
    if output == "stac":
        from rshash.service.stac_items import item_collection

        typer.echo(json.dumps(item_collection(hits), ensure_ascii=False))
        return
    if output == "geojson":
        from rshash.service.geojson import feature_collection

        typer.echo(json.dumps(feature_collection(h.to_dict() for h in hits), ensure_ascii=False))
        return
    if as_json or output == "json":
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    for rank, h in enumerate(hits, 1):
        what = h.item.get("text") or h.item.get("path")
        cls = h.item.get("class") or "-"
        typer.echo(f"{rank:4d}  d={h.distance:3d}  {cls:20s}  {h.id}  {what}")


@app.command()
def serve(
    index: Annotated[
        Path, typer.Argument(help="Index directory, or a sharded index (folder with shards.json).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Device = "auto",
    max_batch: Annotated[int, typer.Option(help="Most queries in one encoder pass.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="Under load, how long a batch waits to fill (ms).")
    ] = 2.0,
    max_queue: Annotated[
        int, typer.Option(help="Queries waiting beyond this are answered 503 at once.")
    ] = 128,
    max_queue_ms: Annotated[
        float | None,
        typer.Option(help="Also 503 when the batches ahead of a query would take longer (ms)."),
    ] = None,
    refresh_interval: Annotated[
        float, typer.Option(help="Seconds between looks for a new index generation.")
    ] = 1.0,
    shard_timeout: Annotated[
        float, typer.Option(help="Sharded index: longest wait for a shard's answer (s).")
    ] = 10.0,
    ray_address: RayAddress = None,
    replicas: Annotated[
        int, typer.Option(help="Sharded index: actors per shard, each on its own Ray node.")
    ] = 1,
    torch_threads: Annotated[
        int | None, typer.Option(help="Encoder threads (default: one per core).")
    ] = None,
    backend: Backend = "auto",
    query_cache: Annotated[
        int, typer.Option(help="Text queries whose codes are kept (LRU); 0 turns the cache off.")
    ] = 4096,
) -> None:
    """Serve search over INDEX: JSON API, OpenAPI at /docs, metrics at /metrics, a web page at /."""
    import uvicorn

    from rshash.features.backends import check_backend
    from rshash.service import ServiceConfig, create_app
    from rshash.service.query_cache import MAX_QUERY_CACHE

    check_backend(backend)
    if not 0 <= query_cache <= MAX_QUERY_CACHE:
        raise RshashError(
            f"--query-cache: expected 0 (off) to {MAX_QUERY_CACHE:,} entries, got {query_cache}"
        )
    positive: dict[str, int | None] = {"--max-batch": max_batch, "--max-queue": max_queue}
    positive["--torch-threads"] = torch_threads
    positive["--replicas"] = replicas
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise RshashError(f"{flag}: expected a positive number, got {value}")
    for flag, seconds in (
        ("--max-wait-ms", max_wait_ms),
        ("--max-queue-ms", max_queue_ms or 0.0),
        ("--refresh-interval", refresh_interval),
        ("--shard-timeout", shard_timeout),
    ):
        if seconds < 0:
            raise RshashError(f"{flag}: expected a number ≥ 0, got {seconds}")
    cfg = ServiceConfig(
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_queue_ms=max_queue_ms,
        refresh_interval_s=refresh_interval,
        shard_timeout_s=shard_timeout,
        ray_address=ray_address,
        replicas=replicas,
        torch_threads=torch_threads,
        backend=backend,
        query_cache=query_cache,
    )
    app_ = create_app(index, cfg)
    typer.echo(f"serving {index} at http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def _bbox(text: str) -> tuple[float, float, float, float]:
    from rshash.data.bbox import parse_bbox

    return parse_bbox(text, "--bbox")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RshashError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except RshashError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = exc.exit_code if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
