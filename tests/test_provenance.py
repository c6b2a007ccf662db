"""Benchmark result caches are keyed by the training code and the config; records say where."""

import shutil

from benchmarks import common


def test_cache_key_changes_with_the_training_code_and_the_config(tmp_path, monkeypatch):
    """Guards against a cached benchmark result reused after the training code changed (the
    caches were keyed by p, seed and epochs only, so old-code records sat in new tables)."""
    for root in common.TRAINING_CODE:
        src = common.REPO / root
        dst = tmp_path / root
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    monkeypatch.setattr(common, "REPO", tmp_path)
    config = {"p": 0.5, "seed": 0, "epochs": 100}
    before = common.cache_key(config)
    assert common.cache_key(config) == before
    assert common.cache_key({**config, "seed": 1}) != before
    loss = tmp_path / "rshash" / "losses" / "adversarial.py"
    loss.write_text(loss.read_text().replace("fake_scores.sum()", "fake_scores.mean()"))
    assert common.cache_key(config) != before


def test_each_record_says_where_it_trained():
    record = common.run_provenance()
    assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1
    assert "cuda" in record["machine"] and len(record["code"]) == 12
