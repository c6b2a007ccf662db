"""`rshash train` then `rshash evaluate`, as a user runs them, for every CHNR weighting."""

import json

import pytest

from tests.conftest import rshash_cli


@pytest.mark.parametrize("weighting", ["soft", "cubed", "discrete", "ones", "self"])
def test_train_then_evaluate_every_weighting(weighting, mini_features, tmp_path):
    """Guards against `rshash evaluate` crashing on a run of some weighting (it printed a
    traceback and wrote no metrics.json for every `--weighting self` run: no detector
    scores to plot)."""
    run = tmp_path / weighting
    trained = rshash_cli(
        "train", "--method", "chnr", "--features", mini_features, "--noise", "0.6",
        "--weighting", weighting, "--epochs", "2", "--meta-epochs", "1", "--bits", "16",
        "--device", "cpu", "--out", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = rshash_cli("evaluate", run)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    detection = metrics["noise_detection"]
    assert detection["weighting"] == weighting
    assert detection["scored_pairs"] == "unprotected"
    assert (run / "plots" / "pair_weights.png").stat().st_size > 0
    assert "Noise detection" in (run / "report.md").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["machine"]["device"] == "cpu" and config["machine"]["cpu"]


def test_hold_out_validation_is_scored_beside_the_test_queries(ucm_features, tmp_path):
    """Guards against settings chosen without a validation figure: a run that held out the
    split's validation images reports them (and did not train on them)."""
    run = tmp_path / "val"
    trained = rshash_cli(
        "train", "--features", ucm_features, "--epochs", "1", "--bits", "16",
        "--device", "cpu", "--hold-out-validation", "--out", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert rshash_cli("evaluate", run).returncode == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["validation"]) == {"i2t", "t2i", "i2i", "t2t"}
    split = json.loads((run / "split.json").read_text())
    assert split["validation_seed"] == 42 and set(split["validation"]) <= set(split["train"])
