"""Trained CM-ARR checkpoints applied to a feature store (``cm-arr-predict``,
:mod:`cmarr.pipelines.cli.predict`).

The store may be another corpus, or new media extracted with ``cm-arr-extract features``
the way the training store was (the checkpoint holds that store's provenance). It may lack
a modality for some utterances or altogether: that is what the model is for.

- **Features made the same way.** For every modality of the store, its provenance must
  match the training store's on every setting that defines the features (model and
  revision or checkpoint sha256, layer, rates, tokenizer, marker rule, batching, compute
  dtype, ...). What legitimately differs between two corpora is not compared
  (``NOT_FEATURE_DEFINING``: corpus, manifest, time, host, library and project versions,
  device and batch sizes; the detector's face ``selection``, a rule of the corpus's framing
  like ``video_half``). A mismatch is refused, naming the settings, unless
  ``allow_feature_mismatch`` (the differences are then reported).
- **Conditions.** ``present`` (default): each utterance with every modality the store has
  for it. ``all``: the paper's seven conditions (Table 2 layout when the store is
  labelled). Or a list of condition names (``t s v vt sv st svt``). Under a condition, the
  inputs of unavailable modalities are filled with NaN as in evaluation (a leak would give
  non-finite logits, which is an error). An utterance with no input under a condition gets
  a row with an empty prediction (never dropped).
- **Several checkpoints** (e.g. the five folds of a run) must share one model config and one
  training store; their class probabilities are averaged. A checkpoint holds tensors and
  plain data only (configs, provenance) and is read with ``torch.load(weights_only=True)``:
  a file that would need code to load (a crafted pickle) is refused and nothing in it runs.
- **Shards** of an extraction can be predicted on one by one (rows are per utterance).
- The modalities the requested conditions use are read into memory and their frames checked
  against the checksums recorded when the store was written (as training does): a damaged or
  altered file is refused, and so is one whose frames hold NaN/Inf (naming the utterances).
- **Output**: one CSV row per (utterance, condition): ``utterance_id, condition,
  available`` (the modalities used, e.g. ``s,t``), ``label`` (the store's, "" if not one of
  the four classes), ``prediction``, ``p_ang, p_hap, p_neu, p_sad``, and
  ``seen_in_training`` (whether some checkpoint trained or selected its epoch on an
  utterance of this id: scores on such rows are not test scores; corpus ids name one
  recording, so on another corpus no row is). Written atomically; an existing
  file is not replaced unless ``overwrite``. With labels, WAR/UAR per condition over the
  unseen labelled rows are printed (and written to ``--metrics``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cmarr.extract.base import LABELS, MODALITIES

from .checkpoint import CheckpointError, check_checkpoint, load_checkpoint
from .conditions import CONDITION_MASKS, CONDITION_NAMES, MODALITY_LETTERS
from .data import eager_loader, hide_unavailable, nonfinite_message, nonfinite_utterances
from .errors import TrainError
from .metrics import score, with_average
from .runtime import resolve_device

#: Provenance keys that may differ between the training store and a store to predict on:
#: where and when a store was made, and settings that decide which media become errors
#: (``duration_check``) or how work is batched, not the values of the features.
NOT_FEATURE_DEFINING = frozenset({"created", "host", "corpus", "manifest_sha256", "library_versions",
                                  "cm_arr_version", "device", "batch_size", "face_batch_size", "duration_check"})
#: Detector settings that may differ: which face a frame keeps when it shows several is a
#: rule of the corpus's framing, as the manifest's ``video_half`` is (IEMOCAP: the largest
#: face of the speaker's half; a media folder or a clip: the most probable face of the whole
#: frame), not of how a face becomes features.
NOT_FEATURE_DEFINING_DETECTOR = frozenset({"selection"})


class PredictError(Exception):
    """Inputs that cannot be predicted on; ``str(e)`` names the file and the problem."""


def parse_conditions(text: str) -> list[str]:
    """``present``, ``all`` or comma-separated condition names (letters in any order)."""
    text = text.strip().lower()
    if text in ("present", "all"):
        return ["present"] if text == "present" else list(CONDITION_NAMES)
    canon = {frozenset(c): c for c in CONDITION_NAMES}
    out = []
    for part in (p.strip() for p in text.split(",")):
        c = canon.get(frozenset(part)) if part and len(set(part)) == len(part) else None
        if c is None:
            raise PredictError(f"condition {part!r}: expected present, all, or some of {', '.join(CONDITION_NAMES)} "
                               "(the letters of the available modalities: s speech, t text, v video)")
        if c in out:
            raise PredictError(f"condition {part!r} is given twice")
        out.append(c)
    return out


def feature_differences(trained: Mapping[str, Any], store: Mapping[str, Any]) -> list[str]:
    """The feature-defining provenance settings in which ``store`` differs from ``trained``
    (``NOT_FEATURE_DEFINING`` keys aside; with equal weights sha256, where the model was
    loaded from aside too: ``without_locations``)."""
    from cmarr.extract.store import without_locations

    a, b = without_locations(trained, store)
    a = {k: v for k, v in a.items() if k not in NOT_FEATURE_DEFINING}
    b = {k: v for k, v in b.items() if k not in NOT_FEATURE_DEFINING}
    for d in (a, b):  # which face a frame keeps is a rule of the corpus's framing, as video_half is
        if isinstance(d.get("detector"), Mapping):
            d["detector"] = {k: v for k, v in d["detector"].items() if k not in NOT_FEATURE_DEFINING_DETECTOR}
    return [f"{k}: trained on {a.get(k)!r}, store has {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_checkpoints(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read ``paths`` and check that they can be used together."""
    if not paths:
        raise PredictError("no checkpoint given (--checkpoint RUN_DIR/fold1/best.pt)")
    cks = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise PredictError(f"{p}: no such checkpoint file")
        try:  # tensors and plain data only: a file that would run code when loaded is refused unrun
            ck = load_checkpoint(p)
        except CheckpointError as e:  # a truncated, foreign or crafted file
            raise PredictError(str(e) if e.unsafe
                               else f"{p}: not a readable cm-arr-train checkpoint ({e.detail})") from None
        if not {"model", "model_config", "provenance"} <= set(ck):
            raise PredictError(f"{p}: not a cm-arr-train checkpoint (no model, model_config or provenance)")
        try:
            check_checkpoint(ck, p)
        except TrainError as e:
            raise PredictError(str(e)) from None
        if list(ck["labels"]) != list(LABELS) or list(ck["modalities"]) != list(MODALITIES):
            raise PredictError(f"{p}: predicts classes {ck['labels']} over {ck['modalities']}; this version "
                               f"reads {list(LABELS)} over {list(MODALITIES)}")
        ck["path"] = str(p)
        cks.append(ck)
    first = cks[0]
    for ck in cks[1:]:
        if ck["model_config"] != first["model_config"]:
            raise PredictError(f"{ck['path']}: its model config differs from {first['path']}'s; checkpoints averaged "
                               "together must be of one run")
        diffs = [d for m in MODALITIES for d in feature_differences(first["provenance"].get(m, {}),
                                                                     ck["provenance"].get(m, {}))]
        if diffs:
            raise PredictError(f"{ck['path']}: was trained on features made differently from {first['path']}'s "
                               f"({'; '.join(diffs[:3])})")
    return cks


class _StoreView:
    """What the batching code reads (``get``, ``labels``, ``present``, ``dims``) from a store
    that may lack a modality altogether and may hold labels outside the four classes."""

    def __init__(self, store, dims: Mapping[str, int], features: Mapping[str, Mapping[str, np.ndarray]]):
        self.features = features
        self.ids = store.utterances["utterance_id"].astype(str).tolist()
        raw = store.utterances["label"].astype(str) if "label" in store.utterances else pd.Series([""] * len(self.ids))
        self.label_names = [x if x in LABELS else "" for x in raw]
        self.labels = np.array([LABELS.index(x) if x else -1 for x in self.label_names], dtype=np.int64)
        have = {m: store.ids(m) if m in store.modalities else set() for m in MODALITIES}
        self.present = np.array([[u in have[m] for m in MODALITIES] for u in self.ids], dtype=bool)  # (N, 3)
        self.dims = dict(dims)

    def get(self, i: int, m: str) -> np.ndarray | None:
        if not self.present[i, MODALITIES.index(m)] or m not in self.features:
            return None  # absent, or not read because no requested condition uses it
        return self.features[m][self.ids[i]]


def predict_store(checkpoints: Sequence[str | Path], features: str | Path, conditions: Sequence[str] = ("present",),
                  device: str = "auto", batch_size: int = 256,
                  allow_feature_mismatch: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Predictions of ``checkpoints`` (averaged) on the store ``features``.

    Returns the table described in the module docstring and the list of accepted feature
    differences (empty unless ``allow_feature_mismatch``)."""
    from cmarr.extract.store import FeatureStore, StoreError

    if batch_size < 1:
        raise PredictError(f"batch size {batch_size}: must be >= 1")
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is None:
        raise PredictError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    for c in conditions:
        if c != "present" and c not in CONDITION_NAMES:
            raise PredictError(f"unknown condition {c!r}")
    cks = load_checkpoints(checkpoints)
    try:
        dev = resolve_device(device)
    except TrainError as e:
        raise PredictError(str(e)) from None
    try:
        store = FeatureStore(features)
    except StoreError as e:
        raise PredictError(str(e)) from None
    try:
        mcfg = dict(cks[0]["model_config"])
        dims = {m: int(d) for m, d in mcfg["dims"].items()}
        accepted: list[str] = []
        usable = [m for m in MODALITIES if m in store.modalities and store.ids(m)]
        if not usable:
            raise PredictError(f"{features}: holds no features of any modality")
        for m in usable:
            if int(store.dims[m]) != dims[m]:
                raise PredictError(f"{features}: its {m} features are {store.dims[m]}-d, the model takes {dims[m]}-d")
            diffs = feature_differences(cks[0]["provenance"].get(m, {}), store.provenance.get(m, {}))
            if diffs and not allow_feature_mismatch:
                raise PredictError(f"{features}: its {m} features were made differently from the training store's "
                                   f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); extract them the "
                                   "same way, or accept the difference with --allow-feature-mismatch")
            accepted += [f"{m}: {d}" for d in diffs]
        wanted = [m for m in usable if any(c == "present" or MODALITY_LETTERS[m] in c for c in conditions)]
        try:  # checked against the recorded checksums, as training does: no prediction from altered frames
            loaded = store.load_all(wanted, verify=True)
        except StoreError as e:
            raise PredictError(str(e)) from None
        bad = nonfinite_utterances(loaded)
        if bad:  # named now, not found as non-finite logits halfway through
            raise PredictError(nonfinite_message(str(features), bad))
        view = _StoreView(store, dims, loaded)
        models = build_models(cks, dev)
        probs, _, used = ensemble_probs(models, view, conditions, dev, batch_size, where=str(features))
    finally:
        store.close()
    seen = {u for ck in cks for part in ("train", "val") for u in ck["split"][part]}
    frames = []
    for c in conditions:
        has = ~np.isnan(probs[c]).any(axis=1)
        pred = np.where(has, np.array(LABELS, dtype=object)[np.nan_to_num(probs[c], nan=-1).argmax(axis=1)], "")
        df = pd.DataFrame({
            "utterance_id": view.ids, "condition": c,
            "available": [",".join(MODALITY_LETTERS[m] for m, on in zip(MODALITIES, row) if on) for row in used[c]],
            "label": view.label_names, "prediction": pred})
        for j, name in enumerate(LABELS):
            df[f"p_{name}"] = probs[c][:, j]
        df["seen_in_training"] = [u in seen for u in view.ids]
        frames.append(df)
    return pd.concat(frames, ignore_index=True), accepted


def build_models(cks: Sequence[Mapping[str, Any]], dev: torch.device) -> list[torch.nn.Module]:
    """The models of checkpoints read by :func:`load_checkpoints`, in eval mode on ``dev``."""
    from cmarr.model import CMARR, CMARRConfig

    models = []
    for ck in cks:
        model = CMARR(CMARRConfig(**dict(ck["model_config"]))).to(dev)
        try:
            model.load_state_dict(ck["model"])
        except (RuntimeError, ValueError) as e:
            raise PredictError(f"{ck['path']}: its weights do not fit the model it describes: "
                               f"{str(e).splitlines()[0]}") from None
        model.eval()
        models.append(model)
    return models


def ensemble_probs(models: Sequence[torch.nn.Module], view, conditions: Sequence[str], dev: torch.device,
                   batch_size: int, where: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Class probabilities of ``view``'s utterances under each condition.

    ``view``: what the batching code reads (``ids``, ``get(i, m)``, ``labels``, ``present``
    (N, 3), ``dims``). Returns ``probs[c]`` (N, 4): the mean over ``models`` of their softmax
    (NaN rows: no input under ``c``), ``per_model[c]`` (M, N, 4): each model's, and
    ``used[c]`` (N, 3): the modalities each row was given. ``where`` names the input in
    errors."""
    n = len(view.ids)
    masks = {c: torch.as_tensor(CONDITION_MASKS[CONDITION_NAMES.index(c)], device=dev)
             for c in conditions if c != "present"}
    probs = {c: np.full((n, len(LABELS)), np.nan) for c in conditions}
    per_model = {c: np.full((len(models), n, len(LABELS)), np.nan) for c in conditions}
    used = {c: np.zeros((n, len(MODALITIES)), dtype=bool) for c in conditions}
    nan = float("nan")
    with torch.no_grad():
        for b in eager_loader(view, np.arange(n), batch_size, shuffle=False, seed=0, fill=nan):
            b = b.to(dev)
            avail = [b.present if c == "present" else b.present & masks[c].unsqueeze(0) for c in conditions]
            ok = [a.any(dim=1) for a in avail]
            avail_all = torch.cat([a[k] for a, k in zip(avail, ok)])  # (B', 3)
            idx = b.index.cpu().numpy()
            for c, a in zip(conditions, avail):
                used[c][idx] = a.cpu().numpy()
            if len(avail_all) == 0:
                continue
            feats = {m: torch.cat([b.feats[m][k] for k in ok]) for m in MODALITIES}
            fmasks = {m: torch.cat([b.masks[m][k] for k in ok]) for m in MODALITIES}
            feats = hide_unavailable(feats, avail_all, nan)  # NaN: a leak would show
            each = []
            for model in models:
                logits = model(feats, fmasks, avail_all, present=avail_all).logits.float()
                if not torch.isfinite(logits).all():
                    raise PredictError(f"{where}: non-finite logits (a missing input leaked into the model, "
                                       "or the features hold values the model cannot take)")
                each.append(torch.softmax(logits, dim=1).cpu().numpy())  # (B', 4)
            p = np.mean(each, axis=0)
            s = 0
            for c, k in zip(conditions, ok):
                rows = idx[k.cpu().numpy()]
                probs[c][rows] = p[s:s + len(rows)]
                for j, e in enumerate(each):
                    per_model[c][j, rows] = e[s:s + len(rows)]
                s += len(rows)
    return probs, per_model, used


def prediction_metrics(table: pd.DataFrame) -> dict[str, Any]:
    """WAR/UAR per condition over the labelled rows that have a prediction and were not seen
    in training (``n_no_input``: labelled unseen rows without any input)."""
    out: dict[str, Any] = {}
    for c, rows in table.groupby("condition", sort=False):
        rows = rows[(rows["label"] != "") & ~rows["seen_in_training"]]
        scored = rows[rows["prediction"] != ""]
        if len(scored) == 0:
            continue
        y = np.array([LABELS.index(x) for x in scored["label"]])
        p = np.array([LABELS.index(x) for x in scored["prediction"]])
        out[c] = score(y, p, len(LABELS), n_no_input=len(rows) - len(scored))
    return with_average(out)
