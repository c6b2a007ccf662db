"""Noise injection per PROTOCOL.md and the verified clean-subset file."""

import numpy as np
import pytest

from rshash.data.noise import inject_noise, read_clean_subset
from rshash.errors import DataError

LABELS = np.repeat(np.arange(10), 300)


def test_effective_rate_and_flags():
    inj = inject_noise(len(LABELS), p=0.5, clean_fraction=0.3, seed=1, labels=LABELS)
    assert inj.clean.sum() == 900
    assert inj.effective_rate == pytest.approx(0.5 * 0.7, abs=0.03)
    assert np.array_equal(inj.noisy, inj.caption_source != np.arange(len(LABELS)))
    assert "effective noise rate" in inj.summary()


def test_clean_subset_never_corrupted_and_swaps_cross_classes():
    inj = inject_noise(len(LABELS), p=1.0, clean_fraction=0.2, seed=2, labels=LABELS)
    assert not (inj.noisy & inj.clean).any()
    assert inj.noisy.sum() == len(LABELS) - inj.clean.sum()
    swapped = np.flatnonzero(inj.noisy)
    assert (LABELS[inj.caption_source[swapped]] != LABELS[swapped]).all()


def test_label_free_swaps_to_another_pair():
    inj = inject_noise(500, p=0.4, clean_fraction=0.1, seed=3)
    swapped = np.flatnonzero(inj.noisy)
    assert len(swapped) > 100
    assert (inj.caption_source[swapped] != swapped).all()


def test_deterministic_per_seed():
    a = inject_noise(len(LABELS), 0.3, 0.3, seed=5, labels=LABELS)
    b = inject_noise(len(LABELS), 0.3, 0.3, seed=5, labels=LABELS)
    c = inject_noise(len(LABELS), 0.3, 0.3, seed=6, labels=LABELS)
    assert np.array_equal(a.caption_source, b.caption_source) and np.array_equal(a.clean, b.clean)
    assert not np.array_equal(a.caption_source, c.caption_source)


def test_bad_parameters_and_clean_file(tmp_path):
    with pytest.raises(DataError, match="must lie in"):
        inject_noise(10, p=1.5, clean_fraction=0.3, seed=0)
    with pytest.raises(DataError, match="two classes"):
        inject_noise(10, p=1.0, clean_fraction=0.0, seed=0, labels=np.zeros(10, int))
    ids = ["1.jpg", "2.jpg", "3.jpg"]
    f = tmp_path / "verified.txt"
    f.write_text("2.jpg\n\n3.jpg#1\n")
    assert read_clean_subset(f, ids).tolist() == [False, True, False]
    f.write_text("nothing-matches.jpg\n")
    with pytest.raises(DataError, match="none of its 1 ids"):
        read_clean_subset(f, ids)


def test_all_captions_mode_protects_whole_images_and_never_swaps_within_one():
    """Guards against `--caption-mode all` noise that is not noise (a swap onto another
    caption of the same image, flagged noisy) and a clean subset drawn per caption (some
    captions of an image protected, others corrupted)."""
    owners = np.repeat(np.arange(200), 5)
    labels = np.repeat(np.arange(200) % 10, 5)
    for lab in (None, labels):
        inj = inject_noise(
            len(owners), p=0.8, clean_fraction=0.3, seed=4, labels=lab, owners=owners
        )
        per_image = inj.clean.reshape(200, 5)
        assert (per_image.all(axis=1) | ~per_image.any(axis=1)).all()
        assert per_image.all(axis=1).sum() == 60
        swapped = np.flatnonzero(inj.noisy)
        assert len(swapped) > 400
        assert (owners[inj.caption_source[swapped]] != owners[swapped]).all()
