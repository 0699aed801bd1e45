"""Hugging Face models as the speech and text extractors (and Denseface's device) load them.

Where a model name points (a local folder or a hub id), what pins a checkpoint down for
provenance (``model_identity``: the hub commit and the sha256 of the weight and config
files), the device, the compute precision (``autocast``; the speech module's docstring says
why float32 is the default) and which transformer block's output is taken.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from cmarr.extract.base import ExtractError
from cmarr.extract.files import file_sha256

DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(device: str) -> str:
    """``"auto"`` is the first CUDA device when one is present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"--device {device}: CUDA is not available on this machine")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ExtractError(f"--device {device}: not a device torch knows ({e})") from None
    return device


def check_dtype(dtype: str) -> str:
    """``dtype``, checked (``cmarr.extract.speech`` says what each precision costs)."""
    if dtype not in DTYPES:
        raise ExtractError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def autocast(device: str, dtype: str):
    """The autocast context for ``dtype``. For float32 on CUDA it turns off TF32 in cuDNN
    convolutions (PyTorch enables it by default), so that float32 means float32."""
    if dtype == "float32":
        if torch.device(device).type != "cuda":
            return contextlib.nullcontext()
        b = torch.backends.cudnn
        return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False)
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


#: Files besides the weights whose content decides the features: the architecture
#: (``config.json``: layers, norms, ...), the audio preprocessing (``preprocessor_config.json``:
#: normalisation) and the tokenizer.
DEFINING_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                  "vocab.txt", "special_tokens_map.json", "added_tokens.json")


def hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The hub-cache folder (``.../snapshots/<commit>``) that hub id ``name`` at ``revision``
    was loaded from, or None (not in the cache, not a hub id)."""
    try:
        from transformers.utils import cached_file

        found = cached_file(name, "config.json", revision=revision, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:
        return None
    return Path(found).parent if found else None


def model_identity(name: str, revision: str | None, folder: Path | None = None) -> dict[str, Any]:
    """What pins a checkpoint down: the name as given, the requested revision, the commit it
    resolved to (for a hub id, the hub-cache snapshot it was loaded from), and for the folder
    its files are in (``folder``, ``name`` when it is one, or that snapshot) the sha256 of its
    weight files (``weights_sha256``) and of the other files that decide the features
    (``files_sha256``: ``DEFINING_FILES``)."""
    out: dict[str, Any] = {"model": str(name), "revision": revision}
    commit = None
    path = folder if folder is not None else Path(name)
    if not path.is_dir():
        snapshot = hub_snapshot(name, revision)
        if snapshot is not None:
            path = snapshot
            commit = snapshot.name
    out["commit_hash"] = commit
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        out["weights_sha256"] = {f.name: file_sha256(f) for f in files}
        out["files_sha256"] = {n: file_sha256(path / n) for n in DEFINING_FILES if (path / n).is_file()}
    return out


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def model_folder(name: str, what: str) -> Path | None:
    """The local folder that the model name ``name`` stands for, or ``None`` for a hub id.

    ``transformers`` loads any existing folder as a local model and takes every other name
    for a hub id, so a mistyped path would come back as a complaint about hub-id syntax. The
    rule here, under which hub ids (``bert-base-uncased``, ``facebook/wav2vec2-base``) stay hub ids:

    - an existing folder (after ``~`` expansion) is a local model;
    - an existing file is an error: a model is a folder;
    - a name no hub id can have (absolute, starting with ``.`` or ``~``, holding a
      backslash or more than one ``/``) is a path, and it does not exist: "no such folder";
    - anything else is a hub id (a relative ``org/name`` that is not a folder here included).

    ``what`` names the model in messages (``"speech model"``, ``"text model"``).
    """
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if path.exists():
        raise ExtractError(f"{name}: cannot load the {what}: it is a file, not a model folder")
    if (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or (os.sep != "/" and os.sep in name)):
        raise ExtractError(f"{name}: cannot load the {what}: no such folder")
    return None


def read_model_config(folder: Path, what: str) -> dict[str, Any]:
    """The ``config.json`` of a local model folder, checked to name a ``model_type`` and
    to sit beside weight files; ``ExtractError`` naming the folder and what is wrong."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ExtractError(f"{folder}: cannot load the {what}: no config.json in this folder (a model folder "
                           "holds the config.json and weights that transformers' save_pretrained writes)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExtractError(f"{cfg}: cannot load the {what}: config.json is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise ExtractError(f"{cfg}: cannot load the {what}: config.json names no model_type")
    if not any(next(folder.glob(g), None) for g in _WEIGHT_FILES):
        raise ExtractError(f"{folder}: cannot load the {what}: no weight file in this folder "
                           "(model.safetensors or pytorch_model.bin)")
    return data


def resolve_layer(layer: int, num_layers: int, what: str) -> int | None:
    """``None`` for the model's last hidden state (``layer == -1``), else the 1-based block."""
    if layer == -1:
        return None
    k = layer if layer > 0 else num_layers + 1 + layer
    if not 1 <= k <= num_layers:
        raise ExtractError(f"{what}: layer {layer} does not exist (the model has {num_layers} "
                           f"blocks: use 1..{num_layers}, or -1..-{num_layers} from the end)")
    return k


class BlockOutput:
    """Keeps the output of one transformer block (a forward hook)."""

    def __init__(self, module):
        self.value = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def pop(self):
        value, self.value = self.value, None
        return value
