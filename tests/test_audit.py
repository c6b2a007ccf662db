"""`rshash audit` on a small real dataset, with a CHNR run trained from a verified-pairs file."""

import csv

from tests.conftest import rshash_cli


def test_audit_ranks_every_pair(mini_dataset, mini_features, tmp_path):
    feats = mini_features
    verified = tmp_path / "verified.txt"
    images = sorted(p.name for p in (mini_dataset / "images").iterdir())
    verified.write_text("\n".join(images[::2]))
    run = tmp_path / "chnr"
    r = rshash_cli(
        "train",
        "--method",
        "chnr",
        "--features",
        feats,
        "--out",
        run,
        "--bits",
        "16",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--clean-subset",
        verified,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "audit"
    r = rshash_cli("audit", run, mini_dataset, "--features", feats, "--out", out, "--top", "10")
    assert r.returncode == 0, r.stderr
    with (out / "audit.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores) and all(0 <= s <= 1 for s in scores)
    assert [int(r["rank"]) for r in rows] == list(range(1, 61))
    page = (out / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 10
    assert rows[0]["caption"] in page.replace("&#x27;", "'")


def test_audit_needs_a_chnr_run(mini_dataset, mini_features, tmp_path):
    feats = mini_features
    run = tmp_path / "duch"
    r = rshash_cli(
        "train",
        "--features",
        feats,
        "--out",
        run,
        "--bits",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    )
    assert r.returncode == 0, r.stderr
    r = rshash_cli("audit", run, mini_dataset, "--features", feats, "--out", tmp_path / "a")
    assert r.returncode == 2 and "no noise detector" in r.stderr
    assert not (tmp_path / "a").exists()
