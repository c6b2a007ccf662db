"""A sharded index is the same index as a local one: same answers through the CLI and the
service, updated in place (add, remove, compact) with one cluster generation flipped last, and
killed writers rolled back."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from rshash.cli import app
from rshash.data import load_dataset
from rshash.errors import RshashError
from rshash.index import Index, open_index
from rshash.index.cluster import SHARDS, check_cluster, read_cluster, snapshot
from rshash.index.sharded import ShardedIndex
from rshash.service import ServiceConfig
from tests.conftest import cli_in_process, make_caption_dataset, ranked, rshash_cli, shards_of_index
from tests.service_server import running_service


@pytest.fixture(scope="module")
def pristine_shards(tmp_path_factory, ucm_index, ucm_run, ucm_path):
    """Two shards of the UCM test index's own codes (no encoding, no Ray needed to build)."""
    out = tmp_path_factory.mktemp("cluster") / "shards"
    return shards_of_index(ucm_index, ucm_run, ucm_path, out)


@pytest.fixture
def shards(pristine_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(pristine_shards, copy)
    return copy


def _shard_generations(path):
    return {
        n: json.loads((path / n / "index.json").read_text())["generation"]
        for n in ("shard-000", "shard-001")
    }


def test_sharded_add_killed_before_the_flip_is_rolled_back(shards, tmp_path):
    """Guards against a sharded change that readers see half of, or that breaks the index:
    the writer is SIGKILLed after both shards it changed committed their own generations
    (an add to one, a remove from the other) and before shards.json named them. Readers must
    load the old generation of every shard, `index check` must pass, and the next add must
    roll the shards back and succeed, with the killed change's items nowhere."""
    other = Index.open(shards / "shard-001").items()[0]["id"]  # the add goes to shard-000
    before = _shard_generations(shards)
    killed = subprocess.run(
        [sys.executable, "-m", "tests.cluster_writer", str(shards), "0", "30", "flip", other],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    ahead = _shard_generations(shards)
    assert all(ahead[n] == before[n] + 1 for n in before), "both shards committed first"

    index = open_index(shards)
    assert index.generation == 0
    assert index.counts() == {"images": 2100, "captions": 10500}
    cluster = read_cluster(shards)
    for name in ("shard-000", "shard-001"):  # what each shard's replicas would load
        files = snapshot(shards / name, cluster["committed"][name])
        copy = tmp_path / "reader" / name
        for rel, data in files.items():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (copy / rel).write_bytes(data)
        shard = Index.open(copy, model=False)
        assert shard.generation == before[name] and len(shard) == 1050
    assert _item_live(shard, other)
    assert check_cluster(shards)["images"]["shards_ahead"] == 2
    checked = rshash_cli("index", "check", shards)
    assert checked.returncode == 0, checked.stderr
    assert "images: ok, items 2100" in checked.stdout

    index.add("images", np.zeros((5, 8), np.uint8), [{"id": f"next-{i}"} for i in range(5)])
    index.commit()
    assert index.generation == 1
    assert index.counts()["images"] == 2105
    assert _shard_generations(shards)["shard-001"] == before["shard-001"], "rolled back"
    index.check_new_ids("images", [{"id": "img-0"}])  # the killed add's items are gone
    with pytest.raises(Exception, match="already in the index"):
        index.check_new_ids("images", [{"id": other}])  # the killed remove did not happen
    assert check_cluster(shards)["images"]["shards_ahead"] == 0


def _item_live(index, item_id):
    try:
        index.item(item_id)
    except Exception:
        return False
    return True


def test_sharded_add_goes_to_the_smallest_shard_with_global_keys(shards):
    """Guards the routing rule: one add touches one shard (the one with the fewest images),
    keys continue after every shard's, and ids already in another shard are refused (the
    refused change lets go of the writer lock, or the next add would wait for it)."""
    index = open_index(shards)
    taken = Index.open(shards / "shard-001").items()[0]["id"]
    with pytest.raises(Exception, match="already in the index"):
        index.add("images", np.zeros((1, 8), np.uint8), [{"id": taken}])
    keys = index.add("images", np.zeros((3, 8), np.uint8), [{"id": f"a-{i}"} for i in range(3)])
    index.commit()
    assert keys.tolist() == [2100, 2101, 2102]
    assert _shard_generations(shards) == {"shard-000": 2, "shard-001": 1}
    keys = index.add("images", np.zeros((1, 8), np.uint8), [{"id": "b-0"}])
    index.commit()
    assert keys.tolist() == [2103]
    assert _shard_generations(shards) == {"shard-000": 2, "shard-001": 2}
    assert read_cluster(shards)["generation"] == 2


def _renamed(root):
    """The dataset at `root` with its images renamed new-*, so that they are not in UCM."""
    data = json.loads((root / "dataset.json").read_text())
    for entry in data["images"]:
        (root / "images" / entry["filename"]).rename(root / "images" / f"new-{entry['filename']}")
        entry["filename"] = f"new-{entry['filename']}"
    (root / "dataset.json").write_text(json.dumps(data))
    return root


@pytest.mark.slow
def test_sharded_and_local_give_the_same_hits_everywhere(local_ray, shards, ucm_index, tmp_path):
    """Guards against a CLI command or endpoint that works on a local index only, or answers
    differently on a sharded one: search (every format, --where, --bbox), index info, add,
    remove, compact, check, and the service's search, item and health, on a local index and a
    sharded index of the same items, before and after the same changes."""
    local = tmp_path / "local"
    shutil.copytree(ucm_index, local)
    new = _renamed(make_caption_dataset(tmp_path / "new", per_class=1, classes=(3, 9)))
    both = (local, shards)

    def searches(path):
        table = cli_in_process("search", path, "a river", "-k", "8")
        where = cli_in_process(
            "search",
            path,
            "a river",
            "-k",
            "8",
            "--format",
            "json",
            "--where",
            'class = "river" or class = "beach"',
        )
        box = cli_in_process(
            "search", path, "a river", "--format", "geojson", "--bbox", "-10,-10,10,10"
        )
        return table, ranked(where), json.loads(box)["features"]

    assert searches(local) == searches(shards)
    for path in both:
        assert "images: 2100 items" in cli_in_process("index", "info", path)
        assert "added 2 images" in cli_in_process("index", "add", path, new, "--device", "cpu")
        assert "removed 1 images" in cli_in_process("index", "remove", path, "1.jpg")
    assert searches(local) == searches(shards)
    for path in both:
        cli_in_process("index", "compact", path)
        assert "images: ok, items 2101" in cli_in_process("index", "check", path)
    assert searches(local) == searches(shards)
    assert (shards / SHARDS).is_file() and read_cluster(shards)["generation"] == 4

    answers = []
    for path in both:
        cfg = ServiceConfig(device="cpu", shard_timeout_s=120)
        with running_service(path, cfg) as url, httpx.Client(base_url=url, timeout=180) as http:
            body = {"query": "a river", "k": 10, "where": 'class != "river"'}
            found = http.post("/search/text", json=body).json()["results"]
            with open(new / "images" / sorted((new / "images").iterdir())[0].name, "rb") as f:
                image = http.post("/search/image", files={"file": ("q.tif", f, "image/tiff")})
            health = http.get("/healthz").json()
            answers.append(
                (
                    [(h["id"], h["distance"]) for h in found],
                    [(h["id"], h["distance"]) for h in image.json()["results"]],
                    http.get(f"/items/{found[0]['id']}").json()["id"],
                    (health["status"], health["images"], health["captions"]),
                )
            )
    assert answers[0] == answers[1]
    assert answers[0][3] == ("ok", 2101, 10505)


def test_sharded_build_is_the_local_build_in_shards(ucm_run, tmp_path, monkeypatch):
    """Guards against a second, poorer build path: `index build --shards` must take --fields,
    resume from the batches a failed build saved, and give the local build's answers."""
    from rshash.index import sharded

    data = make_caption_dataset(tmp_path / "mini", per_class=2, classes=(0, 8, 16))
    ids = load_dataset(data).image_ids
    fields = tmp_path / "fields.json"
    fields.write_text(json.dumps({i: {"year": 2000 + n} for n, i in enumerate(ids)}))
    common = ["--fields", fields, "--device", "cpu", "--batch-size", "2"]
    cli_in_process("index", "build", ucm_run, data, "--out", tmp_path / "local", *common)

    def dies(*args, **kwargs):
        raise RuntimeError("killed while writing the shards")

    monkeypatch.setattr(sharded, "_write_shards", dies)
    with pytest.raises(RuntimeError):
        CliRunner().invoke(
            app,
            [
                str(a)
                for a in [
                    "index",
                    "build",
                    ucm_run,
                    data,
                    "--out",
                    tmp_path / "sh",
                    "--shards",
                    2,
                    *common,
                ]
            ],
            catch_exceptions=False,
        )
    saved = list((tmp_path / "sh.partial").rglob("images-*.npy"))
    assert len(saved) == 3 and not (tmp_path / "sh" / SHARDS).exists()
    monkeypatch.undo()
    monkeypatch.setattr(sharded, "_ray_encode_batches", dies)  # must not be needed
    shown = cli_in_process(
        "index", "build", ucm_run, data, "--out", tmp_path / "sh", "--shards", 2, *common
    )
    assert "images: 6 items" in shown and not (tmp_path / "sh.partial").exists()
    cluster = read_cluster(tmp_path / "sh")
    assert [m["collections"]["images"]["count"] for m in cluster["committed"].values()] == [3, 3]
    local, built = Index.open(tmp_path / "local"), open_index(tmp_path / "sh")
    assert built.counts() == local.counts()
    for path in (tmp_path / "local", tmp_path / "sh"):
        idx = Index.open(path / "shard-001") if path.name == "sh" else Index.open(path)
        assert idx.item(ids[4])["year"] == 2004
    codes = local.collections["images"].codes
    shard_codes = np.concatenate(
        [Index.open(tmp_path / "sh" / n).collections["images"].codes for n in cluster["shards"]]
    )
    assert (codes == shard_codes).all(), "the same codes under the same global keys"


def test_serve_device_reaches_a_sharded_index_encoder(shards, monkeypatch):
    """Guards against `serve --device` being dropped for a sharded index (its query encoder
    was opened on the default device whatever the flag said)."""
    from rshash.index import sharded
    from rshash.service import create_app

    devices = []
    real = sharded.CodeEncoder

    def recording(run, device="auto", backend="auto"):
        devices.append(device)
        return real(run, device, backend)

    monkeypatch.setattr(sharded, "CodeEncoder", recording)
    monkeypatch.setattr(sharded.ShardedIndex, "health", lambda self: {})  # no replicas needed
    create_app(shards, ServiceConfig(device="cpu", backend="torch"))
    assert devices == ["cpu"]


def test_more_replicas_than_nodes_fails_at_startup(local_ray, shards):
    """Guards against replicas that could never be placed (a STRICT_SPREAD group waiting for
    nodes that do not exist) hanging the service: it must refuse to start, in one line."""
    from rshash.service import create_app

    with pytest.raises(RshashError, match=r"--replicas 2: needs as many Ray nodes, .* has 1$"):
        create_app(shards, ServiceConfig(replicas=2))


def test_a_served_view_switches_once_loaded_and_keeps_its_records(local_ray, shards):
    """Guards against two faults of a sharded reader:
    - a new cluster generation served only at the next look for one (a whole
      `--refresh-interval` after the replicas hold it): it must switch as soon as they load it;
    - hits whose records the driver reads from the shard directories: a writer that removes an
      item and compacts deletes its row, while a reader still at the older generation finds it;
      that hit must keep its record (from the replica, which holds the generation)."""
    reader = ShardedIndex(shards, shard_cpus=0.5)
    writer = open_index(shards)
    shard = Index.open(shards / "shard-000")
    codes, keys = shard.collections["images"].codes, shard.collections["images"].keys
    reader.health()  # replicas up, no record read yet
    gen = reader.generation
    gone = shard.records.by_keys("images", [int(keys[0])])[int(keys[0])]

    writer.remove([gone["id"]])
    writer.commit()
    writer.compact()  # the removed row is deleted from its shard's records.db
    assert not Index.open(shards / "shard-000").records.by_keys("images", [int(keys[0])])
    assert reader.generation == gen  # not refreshed yet: still finds the item
    [again] = reader.search_codes(codes[:1], 1)
    assert again[0].key == keys[0] and again[0].item == gone

    assert reader.refresh() is False  # the replicas start loading the new generation
    reader._loading.join(60)
    assert reader.generation == read_cluster(shards)["generation"]  # switched without a call
    assert reader.refresh() is True  # reported once
    [after] = reader.search_codes(codes[:1], 1)
    assert after[0].item["id"] != gone["id"]


def test_replicas_get_codes_and_records_but_no_model(shards):
    """Guards against shipping the model (29 MB of weights for the test run) to every replica,
    which only searches codes: 29 MB more to send and load per replica at every new
    generation, which delayed the switch to it."""
    cluster = read_cluster(shards)
    files = snapshot(shards / "shard-000", cluster["committed"]["shard-000"])
    assert "index.json" in files and "records.db" in files
    assert not [name for name in files if name.startswith("model")]
