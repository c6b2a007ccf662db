"""OpenVINO as a peer runtime for the exported ONNX models (is it worth a backend here?).

The same cached ONNX files the `onnx` / `onnx-int8` backends run (exported by running the test
suite or any encode first) are compiled by OpenVINO's CPU plugin and timed beside ONNX Runtime in
the same run: text per query unpadded on 1 thread (as the backends run it), image batch 32 on
2 threads. OpenVINO is not a dependency: `pip install openvino` first.
Usage: python -m benchmarks.openvino_peer
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import markdown_table, write_results
from benchmarks.service_load import text_pool
from rshash.features.backends import cache_dir
from rshash.features.encoders import load_text_encoder

REPEATS = 3


def cached_models() -> dict[tuple[str, str], str]:
    out = {}
    for pointer in cache_dir().glob("*.json"):
        entry = json.loads(pointer.read_text())
        out[(entry["kind"], entry["backend"])] = str(pointer.with_name(entry["file"]))
    return out


def best_rate(fn: Callable[[], int]) -> float:
    fn()
    best = 0.0
    for _ in range(REPEATS):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    import onnxruntime as ort
    import openvino as ov

    models = cached_models()
    tokenizer = load_text_encoder("all-minilm-l6-v2", torch.device("cpu")).model.tokenizer
    texts = random.Random(0).sample(text_pool(random.Random(0)), 256)
    rows = tokenizer(texts, padding=False, truncation=True)["input_ids"]
    feeds = [
        {"input_ids": np.asarray([r], np.int64), "attention_mask": np.ones((1, len(r)), np.int64)}
        for r in rows
    ]
    pixels = np.random.default_rng(0).standard_normal((32, 3, 256, 256)).astype(np.float32)
    core = ov.Core()

    def ort_run(path: str, threads: int) -> Callable[[dict], Any]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(None, feed)

    def ov_run(path: str, threads: int) -> Callable[[dict], Any]:
        compiled = core.compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        return lambda feed: request.infer(feed)

    records = []
    for kind, backend, threads in (
        ("text", "onnx", 1),
        ("text", "onnx-int8", 1),
        ("image", "onnx", 2),
    ):
        path = models[(kind, backend)]
        rates = {}
        for runtime, make in (("onnxruntime", ort_run), ("openvino", ov_run)):
            run = make(path, threads)
            if kind == "text":
                rates[runtime] = best_rate(
                    lambda run=run: sum(1 for f in feeds if run(f) is not None)
                )
            else:
                rates[runtime] = best_rate(
                    lambda run=run: len(pixels) if run({"pixels": pixels}) is not None else 0
                )
        records.append(
            {
                "model": f"{kind}:{backend}",
                "threads": threads,
                "onnxruntime_per_s": round(rates["onnxruntime"], 1),
                "openvino_per_s": round(rates["openvino"], 1),
                "ratio": round(rates["openvino"] / rates["onnxruntime"], 2),
            }
        )
        print(records[-1], flush=True)
    keys = ["model", "threads", "onnxruntime_per_s", "openvino_per_s", "ratio"]
    markdown = (
        "# OpenVINO against ONNX Runtime on the backends' exported models (same run)\n\n"
        + markdown_table(keys, [[str(r[k]) for k in keys] for r in records])
        + f"\n\nOpenVINO {ov.__version__}, ONNX Runtime {ort.__version__}; text: 256 queries of "
        "the load benchmark's pool, one at a time, unpadded; image: batch 32 at 256 px.\n"
    )
    write_results("openvino_peer", records, markdown)


if __name__ == "__main__":
    main()
