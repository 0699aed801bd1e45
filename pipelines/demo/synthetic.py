"""Synthetic feature stores for tests, the demo and benchmarks.

Each utterance has a class ``y`` and an instance-level content vector ``c`` (no class
information) shared by its three modalities. Modality ``m`` sees the utterance latent

    h_m = a_m * e_y + c + sigma_m * eps_m          (e_y: a unit class direction, eps_m ~ N(0, I))

with class strength ``a_m`` (speech and text strong, video weak, as on IEMOCAP) and its own
noise. Its frames are ``x_{m,t} = tanh(W_m (h_m + r_t)) + o_m + frame noise`` with a random
projection ``W_m`` to the modality's width, a slow per-frame drift ``r_t`` and a fixed
offset ``o_m`` (real features are not zero-centred). Because ``c``
is shared, a missing modality's latent can be recovered from the others: reconstruction has
something to recover, and a model that ignores missing modalities loses what they carried.

Lengths vary per utterance and modality (speech about 50 frames/s, text one row per "word
piece", video sampled frames with a face mask). A share of utterances has no face (video
absent) or an empty transcript (text absent): those pairs are recorded as store errors,
never as zero matrices. Sessions are folds; each session has two speakers.

This is the ``kind="shared"`` store. ``make_synthetic_store(..., kind="crossmodal")`` writes
one of another kind (:func:`make_crossmodal_data`): one modality carries the class, the
others a shrunk, invertible linear code of its latent, so an absent carrier's class evidence
is recoverable only through the cross-modal map. The store's provenance records the kind.

**The cross-modal kind.** What the paper argues reconstruction buys (Sec. 1, 3.2): when a modality that carries the
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
(= sessions, two speakers each) and the utterance table are made as for the shared kind
(:func:`synthetic_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cmarr.extract.base import LABELS, MODALITIES


@dataclass(frozen=True)
class _StoreShape:
    """What both generators share: corpus size, widths, frame counts and what is absent (see
    :class:`SyntheticSpec` for each field)."""

    n_per_class: int = 8
    sessions: int = 5
    dims: Mapping[str, int] = field(default_factory=lambda: {"speech": 8, "text": 8, "video": 6})
    frame_noise: float = 0.3
    offset: Mapping[str, float] = field(default_factory=lambda: {"speech": 1.0, "text": 1.0, "video": 1.0})
    lengths: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: {
        "speech": (40, 8, 120), "text": (12, 3, 40), "video": (16, 4, 48)})
    p_absent: Mapping[str, float] = field(default_factory=lambda: {"speech": 0.0, "text": 0.03, "video": 0.06})
    p_no_face_frame: float = 0.1


@dataclass(frozen=True)
class SyntheticSpec(_StoreShape):
    """Parameters of a synthetic store (defaults: small, for tests).

    n_per_class [8]: utterances per class per session.
    sessions [5]: sessions (= folds), two speakers each.
    dims [8/8/6]: widths per modality; use 768/768/342 for IEMOCAP-shaped benchmarks.
    latent [8]: width of the shared latent ``c`` and the class directions.
    strength: class strength ``a_m`` per modality (speech 2.0, text 1.8, video 0.7).
    noise: per-utterance modality noise ``sigma_m`` (0.8 each).
    frame_noise [0.3]: noise added to every frame.
    offset [1.0 each]: scale of a fixed random mean vector per modality added to every frame.
      Real features (wav2vec2, BERT, Denseface) are not zero-centred, so an input filled
      with zeros is far from the data, as it is for the baseline on real corpora.
    lengths: (median, min, max) frames per modality (speech 40/8/120, text 12/3/40,
      video 16/4/48); drawn log-normally, clipped.
    p_absent: share of utterances without the modality (speech 0, text 0.03, video 0.06).
    p_no_face_frame [0.1]: share of sampled video frames without a face (masked out).
    """

    latent: int = 8
    strength: Mapping[str, float] = field(default_factory=lambda: {"speech": 2.0, "text": 1.8, "video": 0.7})
    noise: Mapping[str, float] = field(default_factory=lambda: {"speech": 0.8, "text": 0.8, "video": 0.8})


#: Generator kinds of :func:`make_synthetic_store`.
SYNTHETIC_KINDS = ("shared", "crossmodal")

IEMOCAP_SHAPED = dict(dims={"speech": 768, "text": 768, "video": 342},
                      lengths={"speech": (225, 40, 1200), "text": (24, 3, 120), "video": (45, 8, 300)})


def synthetic_frames(m: str, h: np.ndarray, T: int, W: np.ndarray, offset: float, frame_noise: float,
                     p_no_face_frame: float, rng: np.random.Generator, dtype) -> tuple[np.ndarray, dict]:
    """One utterance's ``(T, D_m)`` frames of modality ``m`` from its latent ``h`` (``k``):
    ``tanh((h + drift_t) W) + offset`` plus frame noise, and the meta the store keeps for
    ``m`` (speech: 50 frames/s; text: word pieces; video: 10 frames/s with ``p_no_face_frame``
    of the sampled frames faceless). Shared by both generators."""
    k = h.shape[0]
    drift = np.cumsum(rng.standard_normal((T, k)) * 0.15, axis=0) / np.sqrt(np.arange(1, T + 1))[:, None]
    x = np.tanh((h[None, :] + drift).astype(np.float32) @ W) + offset  # (T, D_m)
    if frame_noise > 0:
        x += frame_noise * rng.standard_normal(x.shape, dtype=np.float32)
    if m == "speech":
        meta = {"frame_rate": 50.0}
    elif m == "text":
        meta = {"tokens": [f"w{j}" for j in range(T)]}
    else:
        n_frames = T + int(rng.binomial(T, p_no_face_frame))
        face = np.zeros(n_frames, dtype=bool)
        face[rng.choice(n_frames, T, replace=False)] = True
        meta = {"frame_times": np.arange(n_frames, dtype=np.float32) / 10.0, "face_mask": face}
    return x.astype(dtype), meta


def make_synthetic_data(spec: SyntheticSpec = SyntheticSpec(), seed: int = 0,
                        session_sizes: list[int] | None = None,
                        dtype=np.float16
                        ) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]], dict[str, dict[str, dict]]]:
    """Generate ``(utterances, features, meta)`` in memory.

    ``features[m][utt]`` is a ``(T, D_m)`` array (absent pairs have no entry);
    ``meta[m][utt]`` the store meta (frame_rate, tokens, frame_times, face_mask).
    ``session_sizes`` (optional) gives the number of utterances per session instead of
    ``4 * n_per_class`` (labels then cycle through the classes).
    """
    rng = np.random.default_rng(seed)
    k = spec.latent
    e = rng.standard_normal((len(LABELS), k))
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # unit class directions e_y
    W = {m: rng.standard_normal((k, spec.dims[m])).astype(np.float32) / np.sqrt(k) for m in MODALITIES}
    offset = {m: (spec.offset[m] * rng.standard_normal(spec.dims[m])).astype(np.float32) for m in MODALITIES}
    sizes = session_sizes or [spec.n_per_class * len(LABELS)] * spec.sessions
    rows = []
    feats: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODALITIES}
    meta: dict[str, dict[str, dict]] = {m: {} for m in MODALITIES}
    for s, size in enumerate(sizes, start=1):
        labels = np.arange(size) % len(LABELS)
        rng.shuffle(labels)
        for i in range(size):
            y = int(labels[i])
            spk = "F" if i % 2 == 0 else "M"
            utt = f"Ses{s:02d}{spk}_syn_{i:05d}"
            c = rng.standard_normal(k)  # shared instance content
            absent = [m for m in MODALITIES if rng.random() < spec.p_absent[m]]
            if len(absent) == len(MODALITIES):
                absent = absent[1:]  # keep at least one modality
            rows.append({"utterance_id": utt, "corpus": "synthetic", "session": s, "speaker": f"Ses{s:02d}{spk}",
                         "gender": spk, "label": LABELS[y], "fold": s, "start": 0.0, "end": 0.0})
            duration = 0.0
            for m in MODALITIES:
                mean, lo, hi = spec.lengths[m]
                T = int(np.clip(rng.lognormal(np.log(mean), 0.45), lo, hi))
                if m in absent:
                    continue
                h = spec.strength[m] * e[y] + c + spec.noise[m] * rng.standard_normal(k)  # h_m
                feats[m][utt], meta[m][utt] = synthetic_frames(m, h, T, W[m], offset[m], spec.frame_noise,
                                                               spec.p_no_face_frame, rng, dtype)
                if m == "speech":
                    duration = T / 50.0
            rows[-1]["end"] = duration or 1.0
    table = pd.DataFrame(rows)
    return table, feats, meta


@dataclass(frozen=True)
class CrossModalSpec(_StoreShape):
    """Parameters of a cross-modal synthetic store (defaults: small, for tests).

    n_per_class [8], sessions [5], dims [8/8/6], frame_noise [0.3], offset [1.0 each],
    lengths, p_absent, p_no_face_frame: as :class:`SyntheticSpec`.
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

    latent: int = 6
    carrier: str = "speech"
    class_strength: float = 2.0
    shrink: float = 0.35
    spread: float = 1.5
    carrier_noise: float = 0.3
    code_noise: float = 0.15
    speaker_offset: float = 0.5
    frame_gain: float = 0.5

    def __post_init__(self) -> None:
        if self.carrier not in MODALITIES:
            raise ValueError(f"CrossModalSpec.carrier: {self.carrier!r} is not one of {MODALITIES}")
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
    :func:`make_synthetic_data` does, with the structure of this
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
    for m in MODALITIES:
        if m == spec.carrier:
            R[m] = np.eye(k)
        else:
            U, _ = np.linalg.qr(rng.standard_normal((k, k)))
            R[m] = U @ np.diag(gains) @ Q.T  # (k, k), invertible
    W = {m: (spec.frame_gain / np.sqrt(k) * rng.standard_normal((k, spec.dims[m]))).astype(np.float32)
         for m in MODALITIES}
    offset = {m: (spec.offset[m] * rng.standard_normal(spec.dims[m])).astype(np.float32) for m in MODALITIES}
    sizes = session_sizes or [spec.n_per_class * C] * spec.sessions
    rows, zs, hs = [], [], {m: [] for m in MODALITIES}
    feats: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODALITIES}
    meta: dict[str, dict[str, dict]] = {m: {} for m in MODALITIES}
    for s, size in enumerate(sizes, start=1):
        labels = np.arange(size) % C
        rng.shuffle(labels)
        speaker_offsets = {spk: spec.speaker_offset * rng.standard_normal(k) for spk in ("F", "M")}
        for i in range(size):
            y = int(labels[i])
            spk = "F" if i % 2 == 0 else "M"
            utt = f"Ses{s:02d}{spk}_syn_{i:05d}"
            z = spec.class_strength * e[y] + rng.standard_normal(k) + speaker_offsets[spk]  # (k,)
            absent = [m for m in MODALITIES if rng.random() < spec.p_absent[m]]
            if len(absent) == len(MODALITIES):
                absent = absent[1:]  # keep at least one modality
            rows.append({"utterance_id": utt, "corpus": "synthetic", "session": s, "speaker": f"Ses{s:02d}{spk}",
                         "gender": spk, "label": LABELS[y], "fold": s, "start": 0.0, "end": 0.0})
            zs.append(z)
            duration = 0.0
            for m in MODALITIES:
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


def make_synthetic_store(path: str | Path, n_per_class: int = 8, sessions: int = 5, seed: int = 0,
                         dims: Mapping[str, int] | None = None, spec: SyntheticSpec | None = None,
                         session_sizes: list[int] | None = None, modalities=MODALITIES,
                         absent_folds: Mapping[str, Sequence[int]] | None = None, kind: str = "shared") -> Path:
    """Write a synthetic store at ``path`` through :class:`cmarr.extract.store.StoreWriter`.

    ``n_per_class`` utterances per class per session; ``dims`` overrides the widths
    (default 8/8/6; 768/768/342 for IEMOCAP-shaped stores). ``modalities`` lets tests write
    a store that lacks one entirely; ``absent_folds`` (modality -> folds) one whose given folds
    lack it. ``kind``: "shared" (:func:`make_synthetic_data`, ``spec`` a :class:`SyntheticSpec`)
    or "crossmodal" (:func:`make_crossmodal_data`, ``spec`` a :class:`CrossModalSpec`); the
    provenance of every modality records it.
    """
    import dataclasses

    from cmarr.extract.store import StoreWriter

    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"make_synthetic_store: kind {kind!r} is not one of {SYNTHETIC_KINDS}")
    kw = {"n_per_class": n_per_class, "sessions": sessions}
    if dims is not None:
        kw["dims"] = dict(dims)
    if kind == "crossmodal":
        base = spec or CrossModalSpec()
        if not isinstance(base, CrossModalSpec):
            raise TypeError(f"make_synthetic_store(kind='crossmodal'): spec must be a CrossModalSpec, got "
                            f"{type(base).__name__}")
        spec = dataclasses.replace(base, **kw)
        table, feats, meta = make_crossmodal_data(spec, seed=seed, session_sizes=session_sizes)
        about = {m: {"generator": "cmarr.pipelines.demo.synthetic", "latent": spec.latent,
                     "role": "carrier" if m == spec.carrier else "code"} for m in MODALITIES}
    else:
        base = spec or SyntheticSpec()
        spec = SyntheticSpec(**{**base.__dict__, **kw})
        table, feats, meta = make_synthetic_data(spec, seed=seed, session_sizes=session_sizes)
        about = {m: {"generator": "cmarr.pipelines.demo.synthetic", "strength": float(spec.strength[m]),
                     "latent": spec.latent} for m in MODALITIES}
    provenance = {m: {"model": "synthetic", "dim": int(spec.dims[m]), "seed": seed, "kind": kind, **about[m]}
                  for m in modalities}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = StoreWriter(path, table, provenance, chunk_size=512)
    absent_folds = {m: set(v) for m, v in (absent_folds or {}).items()}
    for m in modalities:
        for utt, fold in zip(table["utterance_id"], table["fold"]):
            if utt in feats[m] and int(fold) not in absent_folds.get(m, ()):
                writer.add(utt, m, feats[m][utt], **meta[m][utt])
            else:
                writer.add_error(utt, m, "no face found" if m == "video" else
                                 "empty transcript" if m == "text" else "no audio")
    return writer.finalize()
