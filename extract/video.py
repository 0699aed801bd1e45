"""Video features: Denseface features of the speaker's face, frame by frame.

For each utterance: frames sampled from its clip (``cmarr.extract.video_decode``), MTCNN on every
sampled frame (``cmarr.extract.faces.BatchedMTCNN``), one face per frame cropped to 64x64
grayscale and normalised as in training, Denseface's 342-d pooled feature per face frame.

Result per utterance: ``matrix`` (n_face_frames, 342), the features of the frames WITH a
face, in time order; ``meta`` ``frame_times`` (seconds from the clip start, every sampled
frame), ``face_mask`` (bool per sampled frame; ``face_mask.sum() == len(matrix)``) and
``frames_missing`` (sampled times past the end of a short video; 0 normally). An utterance
without any face frame, without a video, or whose video cannot be read gets
``Result.error`` (a missing modality), never zeros.

**Short videos.** A video that ends before the utterance's span does, by more than
``VideoConfig.max_missing_seconds``, is a per-utterance error (``"short video: ..."``,
naming the file, the span and where the video ends), not features of part of the
utterance: the rule the speech extractor applies to a wav shorter than its span. Within the
tolerance the frames that exist are kept and ``frames_missing`` counts the rest.

Each video file is decoded once, in background threads (several files at a time) while
the device detects faces;
frames of all clips are batched together (``batch_size`` frames of one size per detector
call).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from cmarr.extract.base import ExtractError, Extractor, Result
from cmarr.extract.faces import BatchedMTCNN, DetectorConfig, normalise
from cmarr.extract.video_decode import HALVES, ClipEnd, ClipFrame, ClipRequest, decode_parallel
from cmarr.model.denseface import DenseFace, DenseFaceConfig

RANDOM_SEED = 0


@dataclass(frozen=True)
class VideoConfig:
    """Settings of the video extractor.

    - ``checkpoint``: Denseface checkpoint written by ``cm-arr-denseface train``. Required
      unless ``allow_random_weights`` (tests and demos only: seeded random weights,
      normalisation mean 0 / std 1, both recorded in provenance).
    - ``sample_fps``: frames sampled per second of clip (10, as the paper's lineage).
    - ``detector``: the face detector's settings (``DetectorConfig``: min face size 20 px,
      thresholds (0.6, 0.7, 0.7), factor 0.709, selection "largest", margin 0.1); its
      ``half`` and ``crop_size`` are set from this config.
    - ``batch_size``: frames per detector call (64); ``face_batch_size``: faces per
      Denseface call (256); ``device``: None or "auto" = CUDA when present, else CPU; ``half``:
      float16 MTCNN and Denseface on CUDA (default off).
    - ``prefetch``: decoded frames buffered ahead of the detector (256);
      ``decode_workers``: video files decoded at the same time, one thread each (4; each
      file is still decoded once, front to back).
    - ``max_missing_seconds``: a video that ends more than this before the end of the
      utterance's span (a truncated or wrong file) is a per-utterance error, never
      features of part of the utterance; within it the frames that exist are kept and
      ``frames_missing`` counts the sampled times past the end. Default 0.2 s (two sampled
      frames at 10/s): room for a video track that stops a few frames before its audio
      (containers end their tracks separately; the spans come from the audio's label
      times) and for the rounding of those times, while a cut that loses a word (a few
      hundred ms) fails, as it does for speech. The speech check's own 50 ms would be finer
      than the 0.1 s between sampled frames. Recorded in provenance.
    """

    checkpoint: str | None = None
    allow_random_weights: bool = False
    sample_fps: float = 10.0
    detector: DetectorConfig = DetectorConfig()
    batch_size: int = 64
    face_batch_size: int = 256
    device: str | None = None
    half: bool = False
    prefetch: int = 256
    decode_workers: int = 4
    max_missing_seconds: float = 0.2

    def detector_config(self) -> DetectorConfig:
        return dataclasses.replace(self.detector, crop_size=64, half=self.half)


class _Clip:
    """Per-utterance accumulation while its frames are in flight."""

    __slots__ = ("times", "feats", "face", "done", "end")

    def __init__(self):
        self.times: dict[int, float] = {}
        self.feats: dict[int, np.ndarray] = {}
        self.face: dict[int, bool] = {}
        self.done = 0
        self.end: ClipEnd | None = None


def require_weights(config: "VideoConfig | None") -> None:
    """Raise ``ExtractError`` unless ``config`` names a Denseface checkpoint or allows random
    weights: checked before anything else of a run (it needs no file and no model)."""
    if config is None or (config.checkpoint is None and not config.allow_random_weights):
        # The message names the command-line flags (how most users get here) and the
        # matching VideoConfig fields (for callers from Python).
        raise ExtractError(
            "video: no Denseface checkpoint. Train one with "
            "`cm-arr-denseface train --fer2013 fer2013.csv --ferplus fer2013new.csv --out CKPT` "
            "and pass it with --denseface-checkpoint CKPT (from Python: VideoConfig(checkpoint=...)); "
            "random weights are only for tests and demos: --random-denseface "
            "(VideoConfig(allow_random_weights=True)), recorded in provenance.")


class VideoExtractor(Extractor):
    """Denseface features of face frames (see module doc); implements ``Extractor``.

    ``dim``: the width the trainer's video input expects (342, the paper's Denseface); a
    checkpoint whose Denseface has another output width is refused. The instance's ``dim``
    is read from the loaded model and recorded in provenance, so that a store in which no
    utterance has video still says how wide its video features are.
    """

    modality = "video"
    dim = 342

    def __init__(self, config: VideoConfig = VideoConfig()):
        from cmarr.extract.denseface_train import load_checkpoint
        from cmarr.extract.files import file_sha256

        self.config = config
        if config.sample_fps <= 0:
            raise ExtractError(f"sample_fps must be > 0, got {config.sample_fps}")
        if config.batch_size < 1 or config.face_batch_size < 1:
            raise ExtractError("batch_size and face_batch_size must be >= 1")
        if not config.max_missing_seconds >= 0:  # NaN fails too
            raise ExtractError(f"video max_missing_seconds {config.max_missing_seconds}: must be >= 0")
        try:
            det_cfg = config.detector_config()
        except ValueError as e:
            raise ExtractError(f"video detector settings: {e}") from None
        from cmarr.extract.hf import resolve_device

        self.device = torch.device(resolve_device(config.device or "auto"))  # ExtractError: bad or absent device
        if config.checkpoint is None:
            require_weights(config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                self.model = DenseFace(DenseFaceConfig()).eval()
            self.record: dict[str, Any] = {}
            self.sha256 = None
            self.mean, self.std = 0.0, 1.0
        else:
            self.model, self.record = load_checkpoint(config.checkpoint)
            self.sha256 = file_sha256(config.checkpoint)
            norm = self.record.get("normalisation", {})
            self.mean, self.std = float(norm.get("mean", math.nan)), float(norm.get("std", math.nan))
            if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
                raise ExtractError(f"{config.checkpoint}: checkpoint records no usable normalisation ({norm})")
            if self.record.get("input", {}).get("size", 64) != 64:
                raise ExtractError(f"{config.checkpoint}: checkpoint input size {self.record['input']['size']}, "
                                   "expected 64")
        self.dtype = torch.float16 if (config.half and self.device.type == "cuda") else torch.float32
        self.model = self.model.to(self.device, self.dtype)
        if self.model.out_dim != self.dim:
            raise ExtractError(f"{config.checkpoint or 'random weights'}: Denseface output width "
                               f"{self.model.out_dim}, expected {self.dim}")
        self.dim = int(self.model.out_dim)
        self.detector = BatchedMTCNN(det_cfg, self.device)

    def provenance(self) -> dict[str, Any]:
        c = self.config
        p: dict[str, Any] = {
            "extractor": "denseface",
            "random_weights": self.config.checkpoint is None,
            "denseface_checkpoint": None if c.checkpoint is None else str(c.checkpoint),
            "denseface_checkpoint_sha256": self.sha256,
            "denseface_config": asdict(self.model.config),
            "dim": self.dim,
            "feature": f"last BN + ReLU + global average pool ({self.dim})",
            "sample_fps": c.sample_fps,
            "frame_rule": "sample k at start + k/sample_fps takes frame floor(t*fps), fps read from the file",
            "frame_times": ("seconds from the clip start of the sample that took each frame (k / sample_fps), every "
                            "sampled frame; face_mask marks face frames"),
            "short_video_rule": (f"a video that ends more than {c.max_missing_seconds:g} s before the end of the "
                                 "span is a per-utterance error; within that the frames that exist are kept and "
                                 "frames_missing counts the rest; no frame -> error"),
            "max_missing_seconds": c.max_missing_seconds,
            "crop": {"size": 64, "channels": "gray (BT.601 luma)", "margin": c.detector.margin,
                     "resample": "bilinear ROI average"},
            "normalisation": {"rule": "(gray/255 - mean) / std", "mean": self.mean, "std": self.std,
                              "source": "random weights: identity" if c.checkpoint is None else "checkpoint"},
            "detector": self.detector.provenance(),
            "batch_size": c.batch_size,
            "face_batch_size": c.face_batch_size,
            "half": self.dtype == torch.float16,  # what ran: float16 only on CUDA, whatever was asked
            "device": self.device.type,
        }
        if c.checkpoint is None:
            p["random_weights_seed"] = RANDOM_SEED
        else:
            r = self.record
            p["checkpoint_record"] = {k: r.get(k) for k in ("epochs", "kept_epoch", "val_accuracy", "test_accuracy",
                                                            "n_test", "created", "versions")}
            p["checkpoint_record"]["data"] = {k: r.get("data", {}).get(k) for k in ("fer2013", "ferplus")}
            p["checkpoint_record"]["label_rule"] = r.get("train_config", {}).get("label_rule")
        return p

    # -- feature computation ------------------------------------------------------------
    @torch.no_grad()
    def features(self, crops01: torch.Tensor) -> torch.Tensor:
        """(F, 1, 64, 64) grayscale faces in [0, 1] -> (F, 342) float32 features."""
        out = []
        for i in range(0, len(crops01), self.config.face_batch_size):
            x = normalise(crops01[i:i + self.config.face_batch_size], self.mean, self.std).to(self.dtype)
            f, _ = self.model(x)
            out.append(f.float())
        if not out:
            return torch.empty(0, self.dim, device=crops01.device)
        return torch.cat(out)

    def _process(self, batch: list[tuple[str, int, np.ndarray]], clips: dict[str, _Clip]) -> None:
        frames = np.stack([b[2] for b in batch])  # (B, H, W, 3)
        det, crops = self.detector.detect_and_crop(frames)
        feats = self.features(crops).cpu().numpy()  # (F, 342)
        j = 0
        for (key, idx, _), has in zip(batch, det.found):
            c = clips[key]
            c.face[idx] = bool(has)
            if has:
                c.feats[idx] = feats[j]
                j += 1
            c.done += 1

    def _finish(self, key: str, c: _Clip, path: Path, r: ClipRequest) -> Result:
        """The result of a complete clip: ``path`` its video file, ``r`` the span asked for."""
        end = c.end
        if end.error is not None:
            return Result(key, error=end.error)
        if end.video_end is not None and math.isfinite(r.end):
            short = r.end - end.video_end
            # 1e-9: a video ending exactly at the tolerance passes despite rounding
            if short > self.config.max_missing_seconds + 1e-9:
                return Result(key, error=(
                    f"short video: {path}: ends at {end.video_end:.3f} s, {short:.3f} s before the end of the "
                    f"span [{r.start:.3f}, {r.end:.3f}] s (tolerance max_missing_seconds "
                    f"{self.config.max_missing_seconds:g} s; {end.n_missing} of {end.n_frames + end.n_missing} "
                    "sampled frames lie past its end)"))
        order = sorted(c.times)
        mask = np.array([c.face[i] for i in order], dtype=bool)
        times = np.array([c.times[i] for i in order], dtype=np.float32)
        if not mask.any():
            return Result(key, error=f"no face detected in any of {len(order)} sampled frames",
                          meta={"sampled_frames": len(order)})
        mat = np.stack([c.feats[i] for i in order if c.face[i]]).astype(np.float32)  # (n_face, 342)
        return Result(key, matrix=mat, meta={"frame_times": times, "face_mask": mask,
                                             "frames_missing": int(end.n_missing)})

    def extract(self, rows: pd.DataFrame, root: Path) -> Iterator[Result]:
        root = Path(root)
        jobs: dict[Path, list[ClipRequest]] = defaultdict(list)
        asked: dict[str, tuple[Path, ClipRequest]] = {}
        for r in rows.itertuples(index=False):
            uid = str(r.utterance_id)
            vp = getattr(r, "video_path", None)
            if vp is None or (isinstance(vp, float) and math.isnan(vp)) or not str(vp).strip():
                yield Result(uid, error="no video for this utterance in the manifest")
                continue
            path = root / str(vp)
            if not path.is_file():
                yield Result(uid, error=f"video not found: {path}")
                continue
            half = getattr(r, "video_half", "full")
            blank = half is None or (isinstance(half, float) and math.isnan(half)) or not str(half)
            half = "full" if blank else str(half)
            if half not in HALVES:
                yield Result(uid, error=f"video_half {half!r} is not one of {HALVES}")
                continue
            start, end = _num(getattr(r, "video_start", None)), _num(getattr(r, "video_end", None))
            start = 0.0 if start is None else start
            end = math.inf if end is None else end  # no span: the whole file is the clip
            req = ClipRequest(uid, start, end, half)
            jobs[path].append(req)
            asked[uid] = (path, req)

        clips: dict[str, _Clip] = {}
        pending: dict[tuple, list] = defaultdict(list)
        n_pending = 0
        bs = self.config.batch_size

        def ready() -> Iterator[Result]:
            for key in [k for k, c in clips.items() if c.end is not None and c.done == c.end.n_frames]:
                yield self._finish(key, clips.pop(key), *asked[key])

        for ev in decode_parallel(list(jobs.items()), self.config.sample_fps, self.config.decode_workers,
                                  self.config.prefetch):
            if isinstance(ev, ClipFrame):
                c = clips.setdefault(ev.key, _Clip())
                c.times[ev.index] = ev.time
                pending[ev.image.shape].append((ev.key, ev.index, ev.image))
                n_pending += 1
                shape = ev.image.shape
                if len(pending[shape]) >= bs:
                    batch = pending.pop(shape)
                    n_pending -= len(batch)
                    self._process(batch, clips)
                    yield from ready()
                elif n_pending >= 4 * bs:  # many sizes in flight: flush the largest group
                    shape = max(pending, key=lambda s: len(pending[s]))
                    batch = pending.pop(shape)
                    n_pending -= len(batch)
                    self._process(batch, clips)
                    yield from ready()
            else:
                c = clips.setdefault(ev.key, _Clip())
                c.end = ev
                yield from ready()
        for shape in list(pending):
            batch = pending.pop(shape)
            for i in range(0, len(batch), bs):
                self._process(batch[i:i + bs], clips)
        yield from ready()
        assert not clips, f"clips left unfinished: {list(clips)[:5]}"


def _num(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
