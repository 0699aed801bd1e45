"""A synthetic store where an absent modality's class evidence is recoverable only through
cross-modal structure (``make_synthetic_store(..., kind="crossmodal")``).

What the paper argues reconstruction buys (Sec. 1, 3.2): when a modality that carries the
emotion is missing, the others still hold a *code* of it that a model can translate back
(Eq. 7 moves the available modalities' latents to the missing one's, Eq. 8 maps that back
to its feature space), instead of reading the weak evidence the others carry on their own
(Fig. 1: without speech, text and video say "neutral"). This generator builds exactly that
structure, with a known answer:

    z       = a * e_y + c + o_spk                         (utterance latent, width k)
    h_A     = z + sigma_A * eps_A                         (the carrier, speech by default)
    h_B     = R_B z + sigma_B * eps_B                     (every other modality B)
    R_B     = U_B diag(g) Q^T,  g = shrink on the class subspace, spread on the rest

``e_y`` are unit class directions spanning a (C-1)-dimensional class subspace (the first
columns of a random rotation ``Q``), ``c ~ N(0, I)`` is class-free content and ``o_spk`` a
fixed offset per speaker. The carrier sees the class at full strength ``a``. Each coded
modality sees a fixed random invertible linear map of the *same* latent: its class
directions shrunk by ``shrink`` and its content directions stretched by ``spread``, so
its own variance is almost all content (it looks class-independent) and a classifier on it
alone is weak, yet it determines the carrier's latent up to its small noise: a map learned
from B to A's features recovers A, and the class read from that reconstruction is the
carrier's evidence. Speaker offsets are in ``z``, so they are shared by all modalities, as
a speaker's manner is.

Measured on pooled (frame-mean) features with the defaults, 40 utterances per class and
session, sessions 1-4 to fit and 5 to test, mean of seeds 0-3: a least-squares map from a
coded modality to the carrier explains about 60 % of the carrier's variance; classes explain
about 36 % of the carrier's variance and 7 % of a coded modality's; a linear (ridge)
classifier reads 77 % from the carrier and 61 % from a coded modality; a nearest-class-mean
classifier 66 % from the carrier, 45 % from a coded modality directly and 53 % from the
carrier reconstructed from it (the classes' means learned on the real carrier).

Frames, lengths, absent modalities (store errors, never zero matrices), face masks, folds
(= sessions, two speakers each) and the utterance table are made as in
:mod:`cmarr.pipelines.synthetic`: ``x_{m,t} = tanh(W_m (h_m + r_t)) + o_m + frame noise``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from .synthetic import LABELS, SYN_MODALITIES, synthetic_frames


@dataclass(frozen=True)
class CrossModalSpec:
    """Parameters of a cross-modal synthetic store (defaults: small, for tests).

    n_per_class [8], sessions [5], dims [8/8/6], frame_noise [0.3], offset [1.0 each],
    lengths, p_absent, p_no_face_frame: as :class:`cmarr.pipelines.synthetic.SyntheticSpec`.
    latent [6]: width ``k`` of the latent ``z`` (at most the smallest width, so that every
      modality can carry all of it).
    carrier ["speech"]: the modality that sees the class at full strength.
    class_strength [2.0]: ``a``, the norm of the class means in the latent.
    shrink [0.35]: gain of the coded modalities' map on the class subspace.
    spread [1.5]: gain of that map on the content directions.
    carrier_noise [0.3]: ``sigma_A``; code_noise [0.15]: ``sigma_B`` of each coded modality.
    speaker_offset [0.5]: scale of the per-speaker offset ``o_spk`` in the latent.
    frame_gain [0.5]: scale of ``W_m`` (entries ``N(0, 1/k)`` times this): small enough that
      ``tanh`` stays near its linear range, so the cross-modal map is close to linear.
    """

    n_per_class: int = 8
    sessions: int = 5
    dims: Mapping[str, int] = field(default_factory=lambda: {"speech": 8, "text": 8, "video": 6})
    latent: int = 6
    carrier: str = "speech"
    class_strength: float = 2.0
    shrink: float = 0.35
    spread: float = 1.5
    carrier_noise: float = 0.3
    code_noise: float = 0.15
    speaker_offset: float = 0.5
    frame_gain: float = 0.5
    frame_noise: float = 0.3
    offset: Mapping[str, float] = field(default_factory=lambda: {"speech": 1.0, "text": 1.0, "video": 1.0})
    lengths: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: {
        "speech": (40, 8, 120), "text": (12, 3, 40), "video": (16, 4, 48)})
    p_absent: Mapping[str, float] = field(default_factory=lambda: {"speech": 0.0, "text": 0.03, "video": 0.06})
    p_no_face_frame: float = 0.1

    def __post_init__(self) -> None:
        if self.carrier not in SYN_MODALITIES:
            raise ValueError(f"CrossModalSpec.carrier: {self.carrier!r} is not one of {SYN_MODALITIES}")
        if self.latent < len(LABELS):
            raise ValueError(f"CrossModalSpec.latent: needs at least {len(LABELS)} (a class subspace of "
                             f"{len(LABELS) - 1} and content), got {self.latent}")
        if self.shrink <= 0 or self.spread <= 0:
            raise ValueError("CrossModalSpec: shrink and spread must be > 0 (the map must stay invertible)")


def _class_directions(q_class: np.ndarray) -> np.ndarray:
    """(C, k) unit class means spanning the C-1 columns of ``q_class`` (k, C-1): the vertices
    of a regular simplex, centred, so the classes are equally far apart."""
    C = q_class.shape[1] + 1
    simplex = np.eye(C) - 1.0 / C  # (C, C), rows centred, rank C-1
    u, _, _ = np.linalg.svd(simplex)
    coords = simplex @ u[:, :C - 1]  # (C, C-1)
    coords /= np.linalg.norm(coords, axis=1, keepdims=True)
    return coords @ q_class.T  # (C, k)


def make_crossmodal_data(spec: CrossModalSpec = CrossModalSpec(), seed: int = 0,
                         session_sizes: list[int] | None = None, dtype=np.float16,
                         return_latents: bool = False):
    """Generate ``(utterances, features, meta)`` in memory, as
    :func:`cmarr.pipelines.synthetic.make_synthetic_data` does, with the structure of this
    module. ``return_latents``: also return ``{"z": (N, k), "h": {m: (N, k)}, "R": {m: (k, k)}}``
    (row order of the table) for tests of the structure."""
    rng = np.random.default_rng(seed)
    k = spec.latent
    C = len(LABELS)
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))  # random rotation; first C-1 columns: class subspace
    e = _class_directions(Q[:, :C - 1])  # (C, k)
    gains = np.full(k, spec.spread)
    gains[:C - 1] = spec.shrink
    R = {}
    for m in SYN_MODALITIES:
        if m == spec.carrier:
            R[m] = np.eye(k)
        else:
            U, _ = np.linalg.qr(rng.standard_normal((k, k)))
            R[m] = U @ np.diag(gains) @ Q.T  # (k, k), invertible
    W = {m: (spec.frame_gain / np.sqrt(k) * rng.standard_normal((k, spec.dims[m]))).astype(np.float32)
         for m in SYN_MODALITIES}
    offset = {m: (spec.offset[m] * rng.standard_normal(spec.dims[m])).astype(np.float32) for m in SYN_MODALITIES}
    sizes = session_sizes or [spec.n_per_class * C] * spec.sessions
    rows, zs, hs = [], [], {m: [] for m in SYN_MODALITIES}
    feats: dict[str, dict[str, np.ndarray]] = {m: {} for m in SYN_MODALITIES}
    meta: dict[str, dict[str, dict]] = {m: {} for m in SYN_MODALITIES}
    for s, size in enumerate(sizes, start=1):
        labels = np.arange(size) % C
        rng.shuffle(labels)
        speaker_offsets = {spk: spec.speaker_offset * rng.standard_normal(k) for spk in ("F", "M")}
        for i in range(size):
            y = int(labels[i])
            spk = "F" if i % 2 == 0 else "M"
            utt = f"Ses{s:02d}{spk}_syn_{i:05d}"
            z = spec.class_strength * e[y] + rng.standard_normal(k) + speaker_offsets[spk]  # (k,)
            absent = [m for m in SYN_MODALITIES if rng.random() < spec.p_absent[m]]
            if len(absent) == len(SYN_MODALITIES):
                absent = absent[1:]  # keep at least one modality
            rows.append({"utterance_id": utt, "corpus": "synthetic", "session": s, "speaker": f"Ses{s:02d}{spk}",
                         "gender": spk, "label": LABELS[y], "fold": s, "start": 0.0, "end": 0.0})
            zs.append(z)
            duration = 0.0
            for m in SYN_MODALITIES:
                sigma = spec.carrier_noise if m == spec.carrier else spec.code_noise
                h = R[m] @ z + sigma * rng.standard_normal(k)  # h_m
                hs[m].append(h)
                mean, lo, hi = spec.lengths[m]
                T = int(np.clip(rng.lognormal(np.log(mean), 0.45), lo, hi))
                if m in absent:
                    continue
                feats[m][utt], meta[m][utt] = synthetic_frames(m, h, T, W[m], offset[m], spec.frame_noise,
                                                               spec.p_no_face_frame, rng, dtype)
                if m == "speech":
                    duration = T / 50.0
            rows[-1]["end"] = duration or 1.0
    table = pd.DataFrame(rows)
    if return_latents:
        return table, feats, meta, {"z": np.asarray(zs), "h": {m: np.asarray(v) for m, v in hs.items()}, "R": R}
    return table, feats, meta
