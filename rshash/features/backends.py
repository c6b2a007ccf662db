"""Inference backends for the encoders: PyTorch eager, or ONNX Runtime (fp32, int8).

`torch` runs the encoder as loaded. `onnx` runs the same weights exported to ONNX and executed by
ONNX Runtime on the CPU: same features (cosine ≥ 0.9999 to torch), several times the image
rate on a small CPU. `onnx-int8` runs the text encoder with dynamically quantized int8 weights
(MatMul, per channel) and the image encoder as `onnx` fp32: int8 convolutions, dynamic or
statically calibrated, lose too much of the image features (measured in
benchmarks/encoders.py).

Models are exported from the packaged weights on first use (never downloaded) into
`$RSHASH_CACHE/onnx` (default `~/.cache/rshash/onnx`), keyed by the sha256 of the weights, the
backend and the library versions. A key's pointer file `KEY.json` names the model file and its
sha256; the model's bytes are hashed before every load, and a missing, corrupt or stale entry is
exported again, never trusted. Both files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rshash.errors import RshashError
from rshash.features.encoders import (
    ImageEncoder,
    SentenceTransformerText,
    TextEncoder,
    TransformersText,
)
from rshash.fileio import atomic_path

BACKENDS = ("torch", "onnx", "onnx-int8")
AUTO = "auto"
# "auto" on the CPU, measured by benchmarks/encoders.py: the fastest backend whose UCM mAP@20
# stays within 0.005 of torch in all four directions. Codes (queries and index builds) use
# onnx-int8; extracted training features use onnx, which gives torch's features (cosine ≥ 0.9999)
# so that training and the published tables see the same inputs, several times faster.
DEFAULT_CPU_BACKEND = "onnx-int8"
FEATURES_CPU_BACKEND = "onnx"
EXPORT_FORMAT = 1  # bump when the exported graphs change
OPSET = 17
MAX_MODEL_BYTES = 2 * 1024**3  # an ONNX file larger than this in the cache is not read
log = logging.getLogger("rshash.features")


def check_backend(name: str) -> str:
    """`name` if it is a backend or "auto", else a one-line error."""
    if name not in (AUTO, *BACKENDS):
        raise RshashError(
            f"unknown backend {name!r}; expected one of: {AUTO}, {', '.join(BACKENDS)}"
        )
    return name


def resolve_backend(name: str, device: torch.device, default: str = DEFAULT_CPU_BACKEND) -> str:
    """The backend "auto" stands for: `default` on the CPU, torch on an accelerator (ONNX Runtime
    runs here on the CPU only)."""
    check_backend(name)
    if name != AUTO:
        return name
    return default if device.type == "cpu" else "torch"


def check_encoded_with(built: str, where: str) -> None:
    """Refuse an archive or feature store whose recorded backend is none of ours. Any backend may
    query or extend an archive encoded by any other: mixed, UCM mAP@20 stays within 0.0001 of
    torch in all four directions (benchmarks/encoders.py), far inside the 0.005 we allow."""
    if built not in BACKENDS:
        raise RshashError(
            f"{where}: manifest field model.backend: expected one of {', '.join(BACKENDS)},"
            f" got {built!r}"
        )


def cache_dir() -> Path:
    root = os.environ.get("RSHASH_CACHE") or Path.home() / ".cache" / "rshash"
    return Path(root) / "onnx"


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's parameters and buffers."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(json.dumps([name, list(t.shape), str(t.dtype)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    return {p: metadata.version(p) for p in ("torch", "onnx", "onnxruntime")}


def _cache_key(kind: str, name: str, backend: str, weights: str) -> str:
    blob = {
        "kind": kind,
        "name": name,
        "backend": backend,
        "weights": weights,
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _verified(pointer: Path) -> bytes | None:
    """The model bytes `pointer` names, if its file is there and hashes to the recorded sha256."""
    try:
        entry = json.loads(pointer.read_text())
        model = pointer.parent / str(entry["file"])
        if model.parent != pointer.parent or model.stat().st_size > MAX_MODEL_BYTES:
            return None
        data = model.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        log.warning("%s: cached model does not match its sha256; exporting it again", model)
        return None
    return data


def cached_model(
    kind: str, name: str, backend: str, weights: str, export: Callable[[Path], None]
) -> bytes:
    """The verified bytes of the exported model for this key, exporting it first when the cache
    has no valid copy. `export(path)` writes a fresh model to `path`."""
    root = cache_dir()
    key = _cache_key(kind, name, backend, weights)
    pointer = root / f"{key[:32]}.json"
    data = _verified(pointer)
    if data is not None:
        return data
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".export-") as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            export(out)
        except RshashError:
            raise
        except Exception as exc:  # exporters raise many types; one line names the model
            raise RshashError(
                f"{kind} encoder {name!r}: cannot export to ONNX for backend {backend!r}"
                f" ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''});"
                " use --backend torch"
            ) from None
        data = out.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    model = root / f"{key[:32]}-{digest[:16]}.onnx"
    with atomic_path(model) as tmp_model:
        Path(tmp_model).write_bytes(data)
    entry = {"file": model.name, "sha256": digest, "kind": kind, "name": name, "backend": backend}
    with atomic_path(pointer) as tmp_pointer:
        Path(tmp_pointer).write_text(json.dumps(entry, indent=1))
    return data


def _session(data: bytes, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )


def _torch_export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings say nothing to a user
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=["features"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, handles these models
        )


class _ImageGraph(torch.nn.Module):
    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.model = getattr(encoder, "model", None)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward(pixels)


def image_model(torch_encoder: ImageEncoder) -> bytes:
    """The verified fp32 ONNX model of an image encoder (exported on first use). The image side
    of onnx-int8 uses it too: int8 convolutions lose the image features."""
    graph = _ImageGraph(torch_encoder).cpu().float()

    def export(path: Path) -> None:
        example = torch.zeros(2, 3, 224, 224)
        axes = {"pixels": {0: "n", 2: "h", 3: "w"}, "features": {0: "n"}}
        _torch_export(graph, (example,), path, ["pixels"], axes)

    return cached_model("image", torch_encoder.name, "onnx", weights_hash(graph), export)


class OnnxImageEncoder(ImageEncoder):
    """A torch image encoder's exported graph, run by ONNX Runtime (fp32)."""

    def __init__(self, torch_encoder: ImageEncoder, backend: str, threads: int | None = None):
        super().__init__(torch.device("cpu"))
        self.name, self.dim = torch_encoder.name, torch_encoder.dim
        self.mean, self.std = torch_encoder.mean, torch_encoder.std
        self.backend = backend
        data = image_model(torch_encoder)
        self.session = _session(data, threads)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixels": batch.numpy()})[0]
        return torch.from_numpy(out)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = np.ascontiguousarray(self.to_tensor(images).numpy())
        return np.asarray(self.session.run(None, {"pixels": pixels})[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend}


class _TextGraph(torch.nn.Module):
    """Token ids and mask → masked mean of the last hidden state (L2-normalised if asked)."""

    def __init__(self, model: torch.nn.Module, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled


def _text_parts(enc: TextEncoder) -> tuple[Any, torch.nn.Module, int | None]:
    """(tokenizer, graph, max_length) of a text encoder the ONNX backends can export."""
    if isinstance(enc, SentenceTransformerText):
        modules = list(enc.model)
        pooling = modules[1] if len(modules) > 1 else None
        mode = getattr(pooling, "pooling_mode", None)  # sentence-transformers ≥ 5
        if mode is None:
            mode = "mean" if getattr(pooling, "pooling_mode_mean_tokens", False) else "other"
        if mode != "mean" or len(modules) > 3:
            raise RshashError(
                f"text encoder {enc.name!r}: the ONNX backends export mean-pooled models only;"
                " use --backend torch"
            )
        normalize = len(modules) == 3 and type(modules[2]).__name__ == "Normalize"
        model: Any = modules[0].auto_model
        graph = _TextGraph(model, normalize)
        return enc.model.tokenizer, graph, enc.model.max_seq_length
    if isinstance(enc, TransformersText):
        return enc.tokenizer, _TextGraph(enc.model, False), None
    raise RshashError(
        f"text encoder {enc.name!r}: no ONNX export for this kind of model; use --backend torch"
    )


class OnnxTextEncoder(TextEncoder):
    """A torch text encoder's transformer and pooling exported, run by ONNX Runtime.

    Each text runs on its own, unpadded: a query's code never depends on the texts batched with
    it (dynamic int8 scales its activations over the whole input, so a padded batch would move
    about one query in eight by a bit), and a short query does not pay for a long neighbour's
    padding. A batch's texts are spread over `threads` single-threaded runs of one session, which
    on a small CPU beats one multi-threaded run of the padded batch."""

    def __init__(self, torch_encoder: TextEncoder, backend: str, threads: int | None = None):
        super().__init__(torch.device("cpu"))
        self.name, self.dim, self.backend = torch_encoder.name, torch_encoder.dim, backend
        self.tokenizer, graph, self.max_length = _text_parts(torch_encoder)
        graph = graph.cpu().float()

        def export(path: Path) -> None:
            ids = torch.ones(2, 8, dtype=torch.int64)
            axes = {"input_ids": {0: "n", 1: "t"}, "attention_mask": {0: "n", 1: "t"}}
            axes["features"] = {0: "n"}
            if backend == "onnx":
                _torch_export(graph, (ids, ids), path, ["input_ids", "attention_mask"], axes)
                return
            fp32 = path.with_name("fp32.onnx")
            _torch_export(graph, (ids, ids), fp32, ["input_ids", "attention_mask"], axes)
            _quantize_dynamic(fp32, path)

        data = cached_model("text", self.name, backend, weights_hash(graph), export)
        self.session = _session(data, 1)
        self.workers = max(1, threads or torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rshash-text")

    def _run(self, rows: Sequence[list[int]]) -> list[np.ndarray]:
        out = []
        for ids in rows:
            feeds = {
                "input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            }
            out.append(self.session.run(None, feeds)[0])
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        kwargs: dict[str, Any] = {"padding": False, "truncation": True}
        if self.max_length:
            kwargs["max_length"] = self.max_length
        # Tokenised here, in the caller's thread: a fast tokenizer is not safe to share.
        rows = self.tokenizer([str(t).strip() for t in texts], **kwargs)["input_ids"]
        step = -(-len(rows) // self.workers)
        chunks = [rows[i : i + step] for i in range(0, len(rows), step)]
        done = self._pool.map(self._run, chunks) if len(chunks) > 1 else [self._run(rows)]
        return np.concatenate([f for chunk in done for f in chunk]).astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend}


def with_backend(encoder: Any, backend: str) -> Any:
    """`encoder` itself for torch, else its ONNX Runtime counterpart."""
    check_backend(backend)
    if backend == "torch":
        return encoder
    if isinstance(encoder, ImageEncoder):
        return OnnxImageEncoder(encoder, backend)
    return OnnxTextEncoder(encoder, backend)
