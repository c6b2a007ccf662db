"""`duch_ucm --choose`: which settings are tried at which code length."""

import pytest

from benchmarks.duch_ucm import candidates


def test_a_code_length_prefix_limits_an_option_to_that_length():
    # Bug guarded: a 16-bit-only option (τ) applied at every code length, training runs
    # nobody asked for and reporting τ as "chosen" at 64 bits.
    choose = ["loss.alpha=0,0.01", "16:loss.temperature=1,2"]
    assert candidates(choose, 16) == [
        ["loss.alpha=0", "loss.temperature=1"],
        ["loss.alpha=0", "loss.temperature=2"],
        ["loss.alpha=0.01", "loss.temperature=1"],
        ["loss.alpha=0.01", "loss.temperature=2"],
    ]
    assert candidates(choose, 64) == [["loss.alpha=0"], ["loss.alpha=0.01"]]


@pytest.mark.parametrize("spec", ["loss.alpha", "x:loss.alpha=0,1", "16:loss.alpha="])
def test_a_malformed_option_is_refused_before_training(spec):
    with pytest.raises(SystemExit, match="--choose: expected"):
        candidates([spec], 16)
