"""The saved model of a run: tensors in `model.safetensors`, everything else in `model.json`.

Neither file can execute code when read (safetensors is a JSON header plus raw tensor bytes), so
a run or an index copied from someone else is safe to open. Runs saved by older versions hold a
pickled `model.pt`; it is never loaded implicitly: `convert_legacy_model` (behind `rshash index
upgrade`) reads it with PyTorch's restricted `weights_only` unpickler, which builds only tensors
and plain containers, and rewrites it in the new form.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rshash.errors import RshashError
from rshash.fileio import atomic_path, write_json_atomic

MODEL = "model.safetensors"
MODEL_INFO = "model.json"
MODEL_FILES = (MODEL, MODEL_INFO)
LEGACY_MODEL = "model.pt"
_SEP = "."  # tensor names: "<part>.<state-dict key>", e.g. "image_net.net.0.weight"


def save_model(run_dir: Path, model: dict[str, Any]) -> None:
    """Write `model` (state dicts and plain values) as model.safetensors + model.json.

    The tensors go first and the JSON last, each by an atomic rename, so `model.json` only
    exists once the tensors it describes do.
    """
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    for name, value in model.items():
        if isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            tensors.update(
                {f"{name}{_SEP}{k}": v.detach().cpu().contiguous() for k, v in value.items()}
            )
            info.setdefault("state_dicts", []).append(name)
        elif torch.is_tensor(value):
            raise RshashError(f"model field {name!r}: a bare tensor; store it in a state dict")
        else:
            info[name] = value
    with atomic_path(run_dir / MODEL) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(run_dir / MODEL_INFO, info)


def load_model(run_dir: Path) -> dict[str, Any]:
    """The model dict `save_model` wrote (state dicts rebuilt), or a one-line error."""
    info_path, tensor_path = run_dir / MODEL_INFO, run_dir / MODEL
    if not info_path.is_file() or not tensor_path.is_file():
        if (run_dir / LEGACY_MODEL).is_file():
            raise RshashError(
                f"{run_dir}: the model is a pickled {LEGACY_MODEL} from an older rshash, which is "
                f"not loaded because unpickling can run code; convert it with "
                f"`rshash index upgrade {run_dir}`"
            )
        missing = info_path if not info_path.is_file() else tensor_path
        raise RshashError(f"{missing}: missing (not a finished training run, or a damaged copy)")
    try:
        info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        raise RshashError(f"{run_dir}: model files are damaged ({exc})") from None
    if not isinstance(info, dict):
        raise RshashError(f"{info_path}: expected a JSON object")
    model = {k: v for k, v in info.items() if k != "state_dicts"}
    for part in info.get("state_dicts", []):
        prefix = f"{part}{_SEP}"
        model[part] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    for key in ("bits", "hidden", "image_dim", "text_dim", "image_net", "text_net"):
        if key not in model:
            raise RshashError(f"{info_path}: no {key!r} (a damaged or foreign model)")
    return model


def model_fingerprint(run_dir: Path) -> str:
    """SHA-256 over the model's files: which model encoded an archive."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        path = run_dir / name
        if not path.is_file():
            load_model(run_dir)  # raises the error that says what is wrong
        h.update(path.read_bytes())
    return h.hexdigest()


def load_restricted(path: Path, refused: str, fix: str) -> Any:
    """A pickle file read by PyTorch's restricted `weights_only` loader (tensors and plain
    containers only); anything else is refused in one line, never executed."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's restricted loader raises several types
        raise RshashError(
            f"{path}: {refused}: it holds more than tensors and plain values "
            f"({exc.__class__.__name__}); {fix}"
        ) from None


def convert_legacy_model(run_dir: Path) -> bool:
    """Rewrite a pickled model.pt as model.safetensors + model.json; False if there is none.

    Read with `weights_only=True`, PyTorch's restricted unpickler (tensors, dicts, lists and
    plain values only: a file that needs anything else is refused, never executed).
    """
    legacy = run_dir / LEGACY_MODEL
    if not legacy.is_file():
        return False
    model = load_restricted(legacy, "not converted", "retrain the model")
    if not isinstance(model, dict):
        raise RshashError(f"{legacy}: not converted: expected a dict, got {type(model).__name__}")
    save_model(run_dir, model)
    legacy.unlink()
    return True
