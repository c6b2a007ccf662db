"""Text table and Markdown report of a run's metrics; every mAP line names its definition."""

from __future__ import annotations

from typing import Any

from rshash.evaluation.protocol import DIRECTION_NAMES

_COLUMNS = (
    ("map@20_duch", "mAP@20 (DUCH def.)"),
    ("map@20_standard", "mAP@20 (standard)"),
    ("map@100_duch", "mAP@100 (DUCH def.)"),
    ("map_all", "mAP (all)"),
)


def _rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, d in metrics["directions"].items():
        p = dict(zip(d["precision_at_k"]["k"], d["precision_at_k"]["precision"], strict=True))
        rows.append(
            [DIRECTION_NAMES[name]]
            + [f"{d[key]:.4f}" for key, _ in _COLUMNS]
            + [f"{p.get(20, float('nan')):.4f}"]
        )
    return rows


def _header() -> list[str]:
    return ["direction", *(label for _, label in _COLUMNS), "P@20"]


def format_table(metrics: dict[str, Any]) -> str:
    header = _header()
    rows = _rows(metrics)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(metrics: dict[str, Any]) -> str:
    header = _header()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(metrics)]
    return "\n".join(lines)


def markdown_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    cfg = config["config"]
    feats = config["features"]
    split = metrics["split"]
    return "\n".join(
        [
            f"# rshash run: {cfg['method'].upper()}, {metrics['bits']} bits",
            "",
            f"- features: {feats['dataset']['name']} — image encoder "
            f"`{feats['image_encoder']['name']}`, text encoder `{feats['text_encoder']['name']}`",
            f"- split: seed {cfg['split_seed']}, train {split['train']} / query {split['query']} / "
            f"retrieval {split['retrieval']} images, caption mode `{metrics['caption_mode']}`",
            f"- training: {cfg['optim']['epochs']} epochs, batch {cfg['optim']['batch_size']}, "
            f"seed {cfg['seed']}, git {config.get('git_revision')}",
            "- relevance: query and item share a class label; ties broken by retrieval-set order",
            "- mAP@K (DUCH def.) = (1/T) Σ_{j≤T} j / r_j with T = min(K, R) over the full ranking "
            "(the definition of the published tables); mAP@K (standard) = AP over the top-K list",
            "",
            markdown_table(metrics),
            "",
            *_validation_lines(metrics),
            *_noise_lines(metrics),
            "![precision-recall](plots/pr_curves.png)",
            "![precision@k](plots/precision_at_k.png)",
            "![loss curves](plots/loss_curves.png)",
            "",
        ]
    )


def _validation_lines(metrics: dict[str, Any]) -> list[str]:
    val = metrics.get("validation")
    if not val:
        return []
    figures = ", ".join(f"{DIRECTION_NAMES[d]} {v['map@20_duch']:.4f}" for d, v in val.items())
    return [
        f"Validation (the {metrics['split']['validation']} held-out training images as queries "
        f"against every training image), mAP@20 (DUCH def.): {figures}.",
        "",
    ]


def _noise_lines(metrics: dict[str, Any]) -> list[str]:
    nd = metrics.get("noise_detection")
    if not nd or nd.get("noise_auc") is None:
        return []
    line = (
        f"Noise detection ({nd['weighting']} weights), over the {nd['scored_pairs']} training "
        f"pairs: ROC-AUC {nd['noise_auc']:.3f}, average precision {nd['noise_ap']:.3f} of the "
        "pair weights against the true flags"
    )
    if nd.get("detector_auc") is not None:
        line += f"; raw detector score ROC-AUC {nd['detector_auc']:.3f}"
    if nd.get("noise_auc_all_pairs") is not None:
        line += f"; ROC-AUC over all pairs (protected included) {nd['noise_auc_all_pairs']:.3f}"
    return [line + ".", "", "![pair weights](plots/pair_weights.png)", ""]
