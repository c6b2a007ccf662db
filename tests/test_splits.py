"""The validation part of the protocol split (PROTOCOL.md, "Validation")."""

import json

import numpy as np
import pytest

from rshash.data.splits import Split, make_split
from rshash.errors import DataError

IDS = tuple(f"{i}.tif" for i in range(2100))
COUNTS = np.full(2100, 5)


def test_validation_is_a_seeded_tenth_of_train_recorded_in_split_json(tmp_path):
    """Guards against settings chosen on test queries: validation must be training images
    only, seeded, saved, and must not change the published train/query/retrieval split."""
    s = make_split(image_ids=IDS, caption_counts=COUNTS, seed=42)
    assert len(s.validation) == 105 and np.isin(s.validation, s.train).all()
    assert s.validation_seed == 42
    again = make_split(image_ids=IDS, caption_counts=COUNTS, seed=42)
    assert np.array_equal(s.validation, again.validation)
    other = make_split(image_ids=IDS, caption_counts=COUNTS, seed=42, validation_seed=7)
    assert not np.array_equal(s.validation, other.validation)
    for part in ("train", "query", "retrieval", "caption_choice"):
        assert np.array_equal(getattr(s, part), getattr(other, part))
    s.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json")
    assert np.array_equal(loaded.validation, s.validation) and loaded.validation_seed == 42


def test_validation_view_fits_on_the_rest_and_queries_validation():
    s = make_split(image_ids=IDS, caption_counts=COUNTS, seed=1)
    fit = s.fit_images(hold_out_validation=True)
    assert len(fit) == 945 and not np.isin(s.validation, fit).any()
    assert np.array_equal(s.fit_images(hold_out_validation=False), s.train)
    view = s.validation_view()
    assert np.array_equal(view.query, s.validation)
    assert np.array_equal(view.retrieval, s.train)
    assert not np.isin(view.query, s.query).any() and not np.isin(view.retrieval, s.retrieval).any()


def test_old_split_without_validation_cannot_hold_it_out(tmp_path):
    s = make_split(image_ids=IDS, caption_counts=COUNTS, seed=1)
    d = s.to_dict()
    del d["validation"], d["validation_seed"]
    (tmp_path / "split.json").write_text(json.dumps(d))
    old = Split.load(tmp_path / "split.json")
    assert np.array_equal(old.fit_images(False), s.train)
    with pytest.raises(DataError, match="no validation images"):
        old.fit_images(True)
