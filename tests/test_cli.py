"""The command line end to end on a small real dataset: extract → train → encode → evaluate."""

import json

import numpy as np

from tests.conftest import rshash_cli


def test_cli_pipeline(mini_dataset, tmp_path):
    feats = tmp_path / "f.h5"
    r = rshash_cli("features", "extract", mini_dataset, "--out", feats, "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert "image/plain      12 x 1280" in r.stdout
    run = tmp_path / "run"
    r = rshash_cli(
        "train",
        "--features",
        feats,
        "--out",
        run,
        "--bits",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "model.json", "config.json", "split.json", "history.json"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["bits"] == 16 and "torch" in config["versions"]
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 3
    assert {"inter", "intra", "adversarial", "quantization", "bit_balance", "discriminator"} <= set(
        history[0]
    )
    r = rshash_cli("encode", run, "--features", feats)
    assert r.returncode == 0, r.stderr
    codes = np.load(run / "codes.npz")
    # 16-bit codes packed like every other path: whole 64-bit words (8 bytes)
    assert codes["image_codes"].shape == (12, 8) and codes["text_codes"].shape == (60, 8)
    r = rshash_cli("evaluate", run)
    assert r.returncode == 0, r.stderr
    assert "mAP@20 (DUCH def.)" in r.stdout and "mAP@20 (standard)" in r.stdout
    assert "I→T" in r.stdout and "T→T" in r.stdout
    assert (run / "plots" / "pr_curves.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        ("train", "--features", tmp_path / "missing.h5", "--out", tmp_path / "r"),
        ("evaluate", tmp_path),
        ("data", "inspect", tmp_path / "nowhere"),
        ("train", "--features", "x.h5", "--out", tmp_path / "r", "--method", "chnr"),
        ("train", "--features", "x.h5", "--out", tmp_path / "r", "--bits", "12"),
    ]
    for args in cases:
        r = rshash_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert not (tmp_path / "r").exists()


def test_unknown_encoder_is_named(mini_dataset, tmp_path):
    r = rshash_cli(
        "features",
        "extract",
        mini_dataset,
        "--out",
        tmp_path / "f.h5",
        "--image-encoder",
        "resnet-999",
    )
    assert r.returncode == 2 and "unknown image encoder 'resnet-999'" in r.stderr
    assert not (tmp_path / "f.h5").exists()
