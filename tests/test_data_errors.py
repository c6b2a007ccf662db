"""Each bad input gives a one-line error naming the file and the problem, and writes nothing."""

import json
import re

import pytest

from rshash.data import load_dataset
from rshash.errors import DataError
from tests.conftest import rshash_cli


def _edit_json(root, edit):
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("images"), "no 'images' key"),
        (lambda d: d["images"][1].pop("filename"), "images[1] has no 'filename' key"),
        (lambda d: d["images"][2].pop("sentences"), "images[2] has no 'sentences' key"),
        (lambda d: d["images"][0]["sentences"][0].pop("raw"), "has no 'raw' key"),
        (lambda d: d["images"][3].update(sentences=[]), "empty caption list"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate filename"),
        (lambda d: d["images"][4].update(filename="missing.jpg"), "missing.jpg"),
    ],
)
def test_bad_json_is_named(mini_dataset, edit, message):
    path = _edit_json(mini_dataset, edit)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_dataset(mini_dataset)
    assert "\n" not in str(err.value)
    assert str(path.parent) in str(err.value)


def test_not_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON"):
        load_dataset(tmp_path / "dataset.json")


def _break_images(root):
    first, second = sorted((root / "images").iterdir())[:2]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 3])  # truncated JPEG
    second.write_bytes(b"this is not an image")
    return first, second


def test_truncated_and_unreadable_images(mini_dataset):
    first, _ = _break_images(mini_dataset)
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset(mini_dataset)
    assert first.name in str(err.value) and "1 more" in str(err.value)


def test_skip_bad_reports_which(mini_dataset):
    first, second = _break_images(mini_dataset)
    ds = load_dataset(mini_dataset, skip_bad=True)
    assert len(ds) == 10
    assert {s[0] for s in ds.skipped} == {first.name, second.name}
    result = rshash_cli("data", "inspect", mini_dataset, "--skip-bad")
    assert result.returncode == 0
    assert "skipped      2 unreadable images" in result.stdout and first.name in result.stdout


def test_cli_bad_input_one_line_nonzero_and_nothing_written(mini_dataset, tmp_path):
    _break_images(mini_dataset)
    out = tmp_path / "features.h5"
    result = rshash_cli("features", "extract", mini_dataset, "--out", out)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "images/" in lines[0]
    assert list(tmp_path.glob("features.h5*")) == []


def test_one_class_where_labels_are_needed(tmp_path, ucm_path):
    import shutil

    (tmp_path / "only").mkdir()
    for name in ("1.jpg", "2.jpg", "3.jpg"):
        shutil.copy(ucm_path / "images" / name, tmp_path / "only" / name)
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("only",)
    with pytest.raises(DataError, match="single class"):
        ds.require_labels()


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no caption JSON and no images"):
        load_dataset(tmp_path)
