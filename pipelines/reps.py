"""Pooled real and reconstructed representations of a trained fold, for the t-SNE of Fig. 5.

The paper's Fig. 5 compares the reconstruction ``X^_m`` of a missing modality with the real
``X_m`` of the same utterances. :func:`collect_reps` reads them from a fold's checkpoint on
its own test (or training, validation) part; :mod:`cmarr.pipelines.plots` draws them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmarr.extract.base import MODALITIES

from .checkpoint import check_checkpoint, load_checkpoint
from .conditions import CONDITION_NAMES, condition_available
from .config import TrainConfig
from .data import StoreData, eager_loader, fill_value
from .errors import TrainError
from .run_dir import store_difference, store_fingerprint


def collect_reps(checkpoint: str | Path, store: str | Path | StoreData, fold: int | None = None,
                 condition: str = "t", part: str = "test", device: str = "cpu",
                 batch_size: int = 256) -> dict[str, np.ndarray]:
    """Pooled real and reconstructed representations of one fold's ``part`` under ``condition``.

    Returns ``{"labels": (N,), "utterance_ids": (N,), "real_<m>": (N, d), "recon_<m>": (N, d),
    "recon_mask": (N, 3), "present_mask": (N, 3)}``: ``real_m`` is the pooled ``X_m`` of the
    true features (NaN where the store lacks ``m``), ``recon_m`` the pooled reconstruction
    ``X^_m`` where ``m`` was not available under ``condition`` (else NaN). Utterances with no
    input in the condition are left out (their count is ``n_no_input``). ``fold`` (optional)
    is checked against the checkpoint's fold; the split is the one stored in the checkpoint.
    Unlike evaluation, the true features of unavailable modalities are passed in (as
    ``present``) so that ``real_m`` can be compared with ``recon_m`` (Fig. 5); the logits
    are not used.
    """
    from cmarr.model import CMARR, CMARRConfig

    ck = load_checkpoint(checkpoint)
    check_checkpoint(ck, checkpoint)
    if fold is not None and int(fold) != int(ck["fold"]):
        raise TrainError(f"{checkpoint}: is the checkpoint of fold {ck['fold']}, not fold {fold}")
    if condition not in CONDITION_NAMES:
        raise TrainError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITION_NAMES)}")
    data = store if isinstance(store, StoreData) else StoreData(store)
    diff = store_difference(ck["store"], store_fingerprint(data))
    if diff:
        raise TrainError(f"{checkpoint}: was trained on another store than {data.path} ({diff})")
    model = CMARR(CMARRConfig(**dict(ck["model_config"]))).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    ids = ck["split"][part]
    pos = {u: i for i, u in enumerate(data.ids)}
    idx = np.array([pos[u] for u in ids], dtype=np.int64)
    out: dict[str, list] = {"labels": [], "utterance_ids": [], "recon_mask": [], "present_mask": []}
    for m in MODALITIES:
        out[f"real_{m}"], out[f"recon_{m}"] = [], []
    n_no_input = 0
    fill = fill_value(TrainConfig().data.fill_absent)
    with torch.no_grad():
        for b in eager_loader(data, idx, batch_size, shuffle=False, seed=0, fill=fill):
            b = b.to(device)
            avail = condition_available(b.present, condition)
            ok = avail.any(dim=1)
            n_no_input += int((~ok).sum())
            feats = {m: b.feats[m][ok] for m in MODALITIES}
            masks = {m: b.masks[m][ok] for m in MODALITIES}
            res = model(feats, masks, avail[ok], present=b.present[ok], reps=True).reps
            out["labels"].append(b.labels[ok].cpu().numpy())
            out["utterance_ids"].append(np.array([data.ids[i] for i in b.index[ok].cpu().numpy()]))
            out["recon_mask"].append(res["recon_mask"].cpu().numpy())
            out["present_mask"].append(res["present_mask"].cpu().numpy())
            for m in MODALITIES:
                out[f"real_{m}"].append(res["real"][m].float().cpu().numpy())
                out[f"recon_{m}"].append(res["recon"][m].float().cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["n_no_input"] = np.array(n_no_input)
    return arrays
