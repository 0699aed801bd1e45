"""The seven conditions of the protocol (which modalities are available), and how a training
sample's condition is drawn.

A condition is named by the letters of its available modalities (s speech, t text, v video),
in the row order of Table 2: the six missing conditions, then the full one. Its mask is a
row of three booleans in ``MODALITIES`` order. ``tests/test_train_data.py`` pins these to
the model's own table (``cmarr.model.CONDITIONS``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from cmarr.extract.base import MODALITIES

#: The six missing conditions, in Table 2's row order.
MISSING_CONDITIONS: tuple[str, ...] = ("t", "s", "v", "vt", "sv", "st")
#: Every modality available.
FULL_CONDITION = "svt"
#: The seven conditions, in Table 2's row order.
CONDITION_NAMES: tuple[str, ...] = (*MISSING_CONDITIONS, FULL_CONDITION)
#: The letter of each modality in a condition's name.
MODALITY_LETTERS: dict[str, str] = {m: m[0] for m in MODALITIES}
#: The seven conditions as (7, 3) booleans in ``MODALITIES`` order.
CONDITION_MASKS = np.array([[MODALITY_LETTERS[m] in n for m in MODALITIES] for n in CONDITION_NAMES], dtype=bool)
FULL_INDEX = CONDITION_NAMES.index(FULL_CONDITION)


def resolve_train_conditions(setting: str, train_missing: bool) -> str:
    """``ProtocolConfig.train_conditions`` with "auto" resolved from the model config."""
    if setting == "auto":
        return "missing" if train_missing else "full"
    return setting


@functools.lru_cache(maxsize=None)
def _condition_masks(device: torch.device) -> torch.Tensor:
    """``CONDITION_MASKS`` on ``device``, copied once: a host-to-device copy per training step
    would make the host wait for the GPU every step."""
    return torch.as_tensor(CONDITION_MASKS, device=device)


def sample_conditions(present: torch.Tensor, mode: str = "missing",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the available modalities of each training sample. The one place this is decided.

    The trainer's mode is the config field ``protocol.train_conditions`` (default "auto":
    "missing" unless the model config sets ``train_missing=False``, as the baseline does; see
    :func:`resolve_train_conditions`).

    Args:
        present: (B, 3) bool, which modalities the store has for each sample.
        mode: "missing" (default, the MMIN scheme): one of the six missing conditions
            {t}, {s}, {v}, {v,t}, {s,v}, {s,t}, uniformly among those whose modalities are all
            present (a sample without video draws from {t}, {s}, {s,t}); "missing+full": the
            same among all seven conditions; "full": every present modality (the baseline,
            trained on full modalities only).
        generator: torch generator on ``present``'s device (seeded per epoch by the trainer).

    Returns:
        available: (B, 3) bool, a non-empty subset of ``present`` per sample. The true
        features of present-but-unavailable modalities remain the reconstruction targets.
    """
    if mode == "full":
        return present.clone()
    if mode not in ("missing", "missing+full"):
        raise ValueError(f"sample_conditions: unknown mode {mode!r}")
    conds = _condition_masks(present.device)  # (7, 3)
    # a condition is allowed when all its modalities are present: (B, 7)
    allowed = (~conds.unsqueeze(0) | present.unsqueeze(1)).all(dim=-1)
    if mode == "missing":
        allowed[:, FULL_INDEX] = False
    # a sample with a single present modality can only use that one (its "full" condition)
    allowed[:, FULL_INDEX] |= ~allowed.any(dim=1)
    scores = torch.rand(present.shape[0], len(CONDITION_NAMES), generator=generator, device=present.device)
    scores = torch.where(allowed, scores, torch.full_like(scores, -1.0))
    choice = scores.argmax(dim=1)  # (B,) uniform among allowed conditions
    return conds[choice] & present


def condition_available(present: torch.Tensor, condition: str) -> torch.Tensor:
    """(B, 3) inputs available under a test condition: the condition's modalities that exist."""
    mask = _condition_masks(present.device)[CONDITION_NAMES.index(condition)]
    return present & mask.unsqueeze(0)
