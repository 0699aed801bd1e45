"""Trained CM-ARR checkpoints applied to raw clips: ``cm-arr-predict --media`` and
``cmarr.Predictor``.

    from cmarr import Predictor
    p = Predictor.from_checkpoints(["runs/iemocap/fold1/best.pt", ...])
    r = p.predict_file("clip.mp4", transcript=None)   # r.label, r.probs, r.used, r.reconstructed

- **Inputs.** A video file, whose audio track is the speech unless an audio file is given;
  or an audio file alone; and optionally a transcript. A modality that is not given, or
  that yields nothing (no face in any sampled frame, an empty transcript), is missing: CM-ARR
  reconstructs it from the others (``Prediction.reconstructed``); a baseline checkpoint,
  which has no reconstruction, fills it as it was trained to. A video without an audio track
  is refused unless ``no_audio`` says that the clip is meant to be predicted without speech.
- **Features made as the training store's.** The extractor settings come from the provenance
  the checkpoint carries (model and revision or folder, layer, compute dtype, batching,
  tokenizer rules, Denseface sha256 or seeded random weights, sampling rate, detector
  thresholds, crop). Models are looked for where the provenance says (a hub id in the local
  Hugging Face cache, a folder) unless a local copy is given (``speech_model``,
  ``text_model``, ``denseface_checkpoint``). Each extractor's provenance is then compared with
  the checkpoint's as ``cm-arr-predict --features`` compares a store's
  (:func:`cmarr.pipelines.predict.feature_differences`): a copy whose weights hash differently
  is refused, naming the setting. Models load when a clip first needs them (a clip without a
  transcript never loads the text model), once per ``Predictor``. The features are rounded
  to the training store's precision (``store_dtype``, float16 as ``cm-arr-extract features``
  writes) before the model reads them, as the store would hold them: a clip predicted here
  and the same clip extracted into a store and predicted with ``--features`` get the same
  probabilities up to float rounding.
- **Video.** The whole frame, and in each sampled frame the most probable face (detector
  ``selection="probability"``), unlike IEMOCAP's rule (the largest face in the speaker's half
  of a two-person frame): a clip's framing is unknown, and the detector's confidence is what
  tells the subject from a face in the background. Media folders (``cm-arr-extract features
  folder``) use the same rule.
- **Audio** is decoded once per file (:func:`cmarr.extract.audio.read_audio`: soundfile, else
  PyAV for mp4, mkv, avi, webm, ...) and cut to the span and windows in samples
  (``round(t * rate)``). ``start`` / ``end`` are times on the media's clock; an audio file
  given beside a video is taken to start with it.
- **Long clips.** A clip longer than ``window`` seconds (default ``DEFAULT_WINDOW`` = 8 s,
  about twice the longest IEMOCAP utterances' median; 0 turns windows off) is cut into
  ``n = ceil(duration / window)`` equal windows, each shorter than ``window`` and none a
  sliver at the end. Each window is predicted; the clip's probabilities are the mean of the
  windows'. A transcript carries no time stamps, so every window is given the whole of it
  (``Prediction.notes`` says so).
- **Batching.** ``predict_files`` extracts every clip's windows together (each extractor
  batches as in ``cm-arr-extract``) and runs the checkpoints over them in batches.

Bad input raises :class:`MediaError` naming the file and the problem: not a media file, a
video without an audio track (and no ``audio`` / ``no_audio``), a clip shorter than the
speech model accepts, features the checkpoint's provenance does not let us reproduce,
nothing usable at all.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from cmarr.extract.audio import DURATION_TOLERANCE_S
from cmarr.extract.base import LABELS, MODALITIES, ExtractError

from .predict import PredictError, feature_differences

#: Windows of long clips, seconds.
DEFAULT_WINDOW = 8.0
#: What a Prediction says of a missing modality, by cause.
_NOT_GIVEN = {"speech": "no audio given", "text": "no transcript given", "video": "no video given"}


class MediaError(PredictError):
    """A clip or checkpoint that cannot be predicted on; ``str(e)`` names the file and the problem."""


# --------------------------------------------------------------------------------------
# what a prediction says


@dataclass
class Prediction:
    """One clip's (or one window's) prediction.

    ``label``: the most probable class; ``probs``: class -> probability (mean over the
    checkpoints); ``per_checkpoint``: checkpoint path -> its own probabilities; ``used``: the
    modalities the clip gave; ``missing``: those the model takes but the clip lacked (``why``
    says why each); ``reconstructed``: the missing ones CM-ARR reconstructed (empty for a model
    without reconstruction); ``start`` / ``end`` / ``duration``: seconds on the media's clock;
    ``face_frames`` of ``sampled_frames``: sampled video frames with a face; ``windows``: the
    per-window predictions of a clip longer than the window (empty otherwise); ``notes``:
    anything else the caller should know."""

    label: str
    probs: dict[str, float]
    used: list[str]
    missing: list[str]
    reconstructed: list[str]
    why: dict[str, str]
    per_checkpoint: dict[str, dict[str, float]]
    start: float
    end: float
    face_frames: int = 0
    sampled_frames: int = 0
    windows: list["Prediction"] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, ``duration`` and ``windowed`` included."""
        d = dataclasses.asdict(self)
        d["duration"] = self.duration
        d["windowed"] = bool(self.windows)
        d["windows"] = [w.to_dict() for w in self.windows]
        for w in d["windows"]:
            for k in ("windows", "windowed", "sources"):
                w.pop(k, None)
        return d


@dataclass(frozen=True)
class _Clip:
    media: Path | None
    audio: Path | None
    transcript: str | None
    start: float | None
    end: float | None
    no_audio: bool


@dataclass
class _Segment:
    """One window of one clip: its span, and per modality its features or why it has none."""

    clip: int
    start: float
    end: float
    video_end: float  # math.inf: to the end of the file
    feats: dict[str, np.ndarray] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    face_frames: int = 0
    sampled_frames: int = 0


# --------------------------------------------------------------------------------------
# media


def probe_media(path: Path) -> tuple[bool, bool, float | None]:
    """``(has_video, has_audio, duration in seconds or None)`` of a media file (PyAV);
    ``MediaError`` when it is not one."""
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    if path.is_dir():
        raise MediaError(f"{path}: is a folder, not a media file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: zero-length file (0 bytes)")
    import av

    try:
        with av.open(str(path)) as c:
            has_video = any(s.type == "video" for s in c.streams)
            has_audio = any(s.type == "audio" for s in c.streams)
            duration = c.duration / 1e6 if c.duration else None
            if duration is None:
                spans = [float(s.duration * s.time_base) for s in c.streams if s.duration and s.time_base]
                duration = max(spans) if spans else None
    except Exception as e:  # av.error.FFmpegError, OSError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MediaError(f"{path}: not a media file that can be decoded ({first})") from None
    if not has_video and not has_audio:
        raise MediaError(f"{path}: holds neither video nor audio")
    return has_video, has_audio, duration


def windows(start: float, end: float, window: float) -> list[tuple[float, float]]:
    """``[start, end)`` cut into ``ceil((end - start) / window)`` equal windows (one when
    ``window <= 0`` or the span fits)."""
    span = end - start
    n = 1 if window <= 0 or span <= window else int(math.ceil(span / window - 1e-9))
    edges = [start + span * k / n for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


# --------------------------------------------------------------------------------------
# extractor settings from a checkpoint's provenance


def speech_config(prov: Mapping[str, Any], model: str | None, device: str):
    from cmarr.extract.speech import SpeechConfig

    return SpeechConfig(model=model or str(prov["model"]), revision=None if model else prov.get("revision"),
                        layer=int(prov.get("layer", -1)), dtype=str(prov.get("compute_dtype", "float32")),
                        batching=str(prov.get("batching", "masked")), device=device)


def text_config(prov: Mapping[str, Any], model: str | None, device: str):
    from cmarr.extract.text import TextConfig

    d = TextConfig()
    return TextConfig(model=model or str(prov["model"]), revision=None if model else prov.get("revision"),
                      layer=int(prov.get("layer", d.layer)), dtype=str(prov.get("compute_dtype", d.dtype)),
                      markers=str(prov.get("markers", d.markers)),
                      special_tokens=bool(prov.get("special_tokens", d.special_tokens)),
                      max_length=int(prov.get("max_length", d.max_length)),
                      long_text=str(prov.get("long_text", d.long_text)), device=device)


def video_config(prov: Mapping[str, Any], checkpoint: str | None, device: str):
    """The video settings of ``prov`` with the face rule of clips (the most probable face)."""
    from cmarr.extract.faces import DetectorConfig
    from cmarr.extract.video import VideoConfig

    det = dict(prov.get("detector") or {})
    d = DetectorConfig()
    detector = DetectorConfig(min_face_size=int(det.get("min_face_size", d.min_face_size)),
                              thresholds=tuple(float(x) for x in det.get("thresholds", d.thresholds)),
                              factor=float(det.get("factor", d.factor)), selection="probability",
                              margin=float(det.get("margin", d.margin)))
    random = bool(prov.get("random_weights", False))
    if checkpoint is None and not random:
        checkpoint = prov.get("denseface_checkpoint")
    v = VideoConfig()
    return VideoConfig(checkpoint=checkpoint, allow_random_weights=random and checkpoint is None,
                       sample_fps=float(prov.get("sample_fps", v.sample_fps)), detector=detector,
                       max_missing_seconds=float(prov.get("max_missing_seconds", v.max_missing_seconds)),
                       half=bool(prov.get("half", False)), device=device)


_OVERRIDE_FLAG = {"speech": "--speech-model", "text": "--text-model", "video": "--denseface-checkpoint"}


def _where_made(m: str, prov: Mapping[str, Any]) -> str:
    if m == "video":
        if prov.get("random_weights"):
            return f"seeded random Denseface weights (seed {prov.get('random_weights_seed')})"
        sha = prov.get("denseface_checkpoint_sha256") or "?"
        return f"the Denseface checkpoint {prov.get('denseface_checkpoint')} (sha256 {str(sha)[:12]}...)"
    sha = prov.get("weights_sha256") or {}
    hashes = ", ".join(f"{k} {str(v)[:12]}..." for k, v in sha.items()) if isinstance(sha, Mapping) else ""
    rev = f" revision {prov.get('revision')}" if prov.get("revision") else ""
    return f"the model {prov.get('model')}{rev}" + (f" (weights sha256 {hashes})" if hashes else "")


# --------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """Checkpoints of one ``cm-arr-train`` run applied to raw clips (see the module docstring).

    Build it with :meth:`from_checkpoints`; predict with :meth:`predict_file` (one clip) or
    :meth:`predict_files` (many, batched)."""

    def __init__(self, checkpoints: Sequence[Mapping[str, Any]], device: str = "auto", window: float = DEFAULT_WINDOW,
                 speech_model: str | None = None, text_model: str | None = None,
                 denseface_checkpoint: str | None = None, batch_size: int = 64, store_dtype: str = "float16"):
        from .predict import build_models
        from .runtime import resolve_device

        if not window >= 0:
            raise MediaError(f"window {window}: must be >= 0 seconds (0: no windows)")
        if batch_size < 1:
            raise MediaError(f"batch size {batch_size}: must be >= 1")
        self.checkpoints = list(checkpoints)
        self.paths = [str(ck["path"]) for ck in self.checkpoints]
        first = self.checkpoints[0]
        self.model_config = dict(first["model_config"])
        self.dims = {m: int(d) for m, d in self.model_config["dims"].items()}
        self.provenance = {m: dict(first["provenance"][m]) for m in MODALITIES if first["provenance"].get(m)}
        self.reconstructs = bool(self.model_config.get("reconstruction", True))
        self.window = float(window)
        self.batch_size = int(batch_size)
        self.store_dtype = np.dtype(store_dtype)
        self.overrides = {"speech": speech_model, "text": text_model, "video": denseface_checkpoint}
        for m, path in self.overrides.items():
            if path is not None and m not in self.provenance:
                raise MediaError(f"{_OVERRIDE_FLAG[m]} {path}: the checkpoints were trained without {m} features")
        self.device_name = device
        try:
            self.device = resolve_device(device)
        except Exception as e:  # TrainError: a CUDA device that is not there
            raise MediaError(str(e)) from None
        self.models = build_models(self.checkpoints, self.device)
        self._extractors: dict[str, Any] = {}

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path] | str | Path, **kwargs) -> "Predictor":
        """Read the ``best.pt`` files of a run (several: their probabilities are averaged; they
        must share one model config and features) and load their models once. ``kwargs``: see
        :class:`Predictor` (``device``, ``window``, ``speech_model``, ``text_model``,
        ``denseface_checkpoint``, ``batch_size``)."""
        from .predict import load_checkpoints

        if isinstance(paths, (str, Path)):
            paths = [paths]
        try:
            cks = load_checkpoints(list(paths))
        except PredictError as e:
            raise MediaError(str(e)) from None
        return cls(cks, **kwargs)

    # -- extractors -------------------------------------------------------------------
    def extractor(self, m: str):
        """The extractor of modality ``m`` as the checkpoint's store made it (loaded on first
        use); ``MediaError`` when its model is not at hand or makes other features."""
        if m in self._extractors:
            return self._extractors[m]
        from cmarr.extract.features import build_extractors

        prov = self.provenance[m]
        dev = self.device_name
        try:
            if m == "speech":
                cfg = {"speech": speech_config(prov, self.overrides["speech"], dev)}
            elif m == "text":
                cfg = {"text": text_config(prov, self.overrides["text"], dev)}
            else:
                cfg = {"video": video_config(prov, self.overrides["video"], dev)}
            ex = build_extractors([m], **cfg)[m]
        except (ExtractError, OSError, ValueError) as e:
            given = self.overrides[m]
            hint = (f"the copy given with {_OVERRIDE_FLAG[m]} {given} cannot be loaded" if given else
                    f"it is not at hand here: pass {_OVERRIDE_FLAG[m]} with a local copy")
            raise MediaError(f"{m}: the checkpoint's {m} features were made with {_where_made(m, prov)}; {hint} "
                             f"({str(e).splitlines()[0]})") from None
        diffs = feature_differences(prov, ex.provenance())
        if diffs:
            given = self.overrides[m]
            raise MediaError(f"{given or prov.get('model') or prov.get('denseface_checkpoint')}: makes other {m} "
                             f"features than the checkpoint's store ({'; '.join(diffs[:3])}"
                             f"{'; ...' if len(diffs) > 3 else ''}); give a copy of {_where_made(m, prov)}")
        self._extractors[m] = ex
        return ex

    # -- prediction -------------------------------------------------------------------
    def predict_file(self, media: str | Path | None = None, audio: str | Path | None = None,
                     transcript: str | None = None, start: float | None = None, end: float | None = None,
                     no_audio: bool = False) -> Prediction:
        """Predict one clip: ``media`` a video (or audio) file, ``audio`` an audio file (alone,
        or the speech of ``media``), ``transcript`` its text, ``start`` / ``end`` a span in
        seconds, ``no_audio``: a video without an audio track is predicted without speech."""
        return self.predict_files([{"media": media, "audio": audio, "transcript": transcript, "start": start,
                                    "end": end, "no_audio": no_audio}])[0]

    def predict_files(self, clips: Sequence[Mapping[str, Any] | str | Path]) -> list[Prediction]:
        """Predict many clips (paths, or mappings with the keys of :meth:`predict_file`),
        extracting and predicting them in batches."""
        parsed = [self._clip(c) for c in clips]
        segs: list[_Segment] = []
        bounds: list[tuple[int, int]] = []
        waves: dict[int, tuple[np.ndarray, int]] = {}
        for i, clip in enumerate(parsed):
            wave = self._audio(clip)
            if wave is not None:
                waves[i] = wave
            s0, s1, open_end = self._span(clip, wave)
            wins = windows(s0, s1, self.window)
            a = len(segs)
            for k, (ws, we) in enumerate(wins):
                last = k == len(wins) - 1
                segs.append(_Segment(i, ws, we, math.inf if (last and open_end) else we))
            bounds.append((a, len(segs)))
        self._speech(parsed, segs, waves)
        self._video(parsed, segs)
        self._text(parsed, segs)
        for i, clip in enumerate(parsed):
            a, b = bounds[i]
            if not any(s.feats for s in segs[a:b]):
                reasons = "; ".join(f"{m}: {r}" for m, r in segs[a].why.items())
                raise MediaError(f"{self._name(clip)}: nothing usable to predict from ({reasons})")
        probs, per_model = self._run(segs)
        out = []
        for i, clip in enumerate(parsed):
            a, b = bounds[i]
            wins = [self._prediction(segs[j], probs[j], per_model[:, j]) for j in range(a, b)]
            out.append(self._combine(clip, wins, waves.get(i)))
        return out

    # -- steps ------------------------------------------------------------------------
    def _clip(self, c: Mapping[str, Any] | str | Path) -> _Clip:
        if isinstance(c, (str, Path)):
            c = {"media": c}
        unknown = set(c) - {"media", "audio", "transcript", "start", "end", "no_audio"}
        if unknown:
            raise MediaError(f"unknown clip keys {sorted(unknown)} (expected media, audio, transcript, start, end, "
                             "no_audio)")
        media = Path(c["media"]) if c.get("media") is not None else None
        audio = Path(c["audio"]) if c.get("audio") is not None else None
        if media is None and audio is None:
            raise MediaError("no media and no audio given: nothing to predict from")
        start, end = c.get("start"), c.get("end")
        for name, v in (("start", start), ("end", end)):
            if v is not None and not (math.isfinite(float(v)) and float(v) >= 0):
                raise MediaError(f"--{name} {v}: must be a time >= 0 in seconds")
        if start is not None and end is not None and float(end) <= float(start):
            raise MediaError(f"--end {end} is not after --start {start}")
        transcript = c.get("transcript")
        return _Clip(media, audio, None if transcript is None else str(transcript),
                     None if start is None else float(start), None if end is None else float(end),
                     bool(c.get("no_audio", False)))

    @staticmethod
    def _name(clip: _Clip) -> Path:
        return clip.media if clip.media is not None else clip.audio  # type: ignore[return-value]

    def _audio(self, clip: _Clip) -> tuple[np.ndarray, int] | None:
        """The clip's whole decoded speech ``(wave, rate)``, or None without speech."""
        from cmarr.extract.audio import AudioError, read_audio

        if clip.media is not None:
            has_video, has_audio, _ = probe_media(clip.media)
            if not has_video and clip.audio is not None:
                raise MediaError(f"{clip.media}: has no video stream; give an audio-only clip as --audio alone")
            if clip.audio is None and not has_audio and not clip.no_audio:
                raise MediaError(f"{clip.media}: this video has no audio track; give the speech with --audio WAV, or "
                                 "pass --no-audio to predict from the face (and transcript) alone")
        source = clip.audio if clip.audio is not None else (None if clip.no_audio else clip.media)
        if source is None or "speech" not in self.provenance:
            return None
        if clip.audio is not None:
            probe_media(clip.audio)  # not media: said as such
        rate = int(self.provenance["speech"].get("sample_rate", 16000))
        try:
            return read_audio(source, rate), rate
        except AudioError as e:
            raise MediaError(str(e)) from None

    def _span(self, clip: _Clip, wave: tuple[np.ndarray, int] | None) -> tuple[float, float, bool]:
        """``(start, end, open_end)``: the clip's span in seconds; ``open_end``: it runs to
        the end of the file (no ``end`` given)."""
        if wave is not None:
            full = len(wave[0]) / wave[1]
        else:
            full = self._video_duration(clip.media) if clip.media is not None else None
        start = clip.start or 0.0
        if full is not None and start >= full:
            raise MediaError(f"{self._name(clip)}: --start {start:g} s is past the end of the clip ({full:.3f} s)")
        end = clip.end if clip.end is not None else full
        if end is None:
            raise MediaError(f"{self._name(clip)}: its duration cannot be read; give --end")
        if full is not None and clip.end is not None and clip.end > full + DURATION_TOLERANCE_S:  # a rounded time
            raise MediaError(f"{self._name(clip)}: --end {clip.end:g} s is past the end of the clip ({full:.3f} s)")
        return start, min(end, full) if full is not None else end, clip.end is None

    @staticmethod
    def _video_duration(path: Path) -> float | None:
        _, _, duration = probe_media(path)
        if duration:
            return duration
        from cmarr.extract.video_decode import probe

        try:
            info = probe(path)
        except ValueError:
            return None
        return info.n_frames / info.fps if info.n_frames > 0 else None

    def _speech(self, clips: list[_Clip], segs: list[_Segment], waves: Mapping[int, tuple[np.ndarray, int]]) -> None:
        todo = []
        for j, s in enumerate(segs):
            clip = clips[s.clip]
            if "speech" not in self.provenance:
                continue
            if s.clip not in waves:
                s.why["speech"] = "no audio (--no-audio)" if clip.no_audio else _NOT_GIVEN["speech"]
                continue
            wave, rate = waves[s.clip]
            piece = wave[int(round(s.start * rate)):int(round(s.end * rate))]
            todo.append((j, piece))
        if not todo:
            return
        ex = self.extractor("speech")
        for j, piece in todo:
            if len(piece) < ex.receptive_field:
                clip = clips[segs[j].clip]
                raise MediaError(f"{clip.audio or clip.media}: {len(piece) / ex.sample_rate * 1000:.0f} ms of audio "
                                 f"in [{segs[j].start:.3f}, {segs[j].end:.3f}] s; the speech model needs at least "
                                 f"{1000 * ex.receptive_field / ex.sample_rate:.0f} ms")
        feats = ex.embed([p for _, p in todo])
        for (j, _), f in zip(todo, feats):
            segs[j].feats["speech"] = f

    def _video(self, clips: list[_Clip], segs: list[_Segment]) -> None:
        rows = []
        has_video = {i: c.media is not None and probe_media(c.media)[0] for i, c in enumerate(clips)}
        for j, s in enumerate(segs):
            clip = clips[s.clip]
            if "video" not in self.provenance:
                continue
            if not has_video[s.clip]:
                s.why["video"] = _NOT_GIVEN["video"] if clip.media is None else "the media file has no video stream"
                continue
            rows.append({"utterance_id": str(j), "video_path": str(clip.media.resolve()), "video_half": "full",
                         "video_start": s.start, "video_end": s.video_end if math.isfinite(s.video_end) else np.nan})
        for s, r in self._extract("video", rows, segs):
            if r.error is None:
                mask = np.asarray(r.meta["face_mask"], dtype=bool)
                s.face_frames, s.sampled_frames = int(mask.sum()), int(mask.size)
            else:
                s.sampled_frames = int(r.meta.get("sampled_frames", 0))

    def _text(self, clips: list[_Clip], segs: list[_Segment]) -> None:
        rows = []
        for j, s in enumerate(segs):
            clip = clips[s.clip]
            if "text" not in self.provenance:
                continue
            if clip.transcript is None or not clip.transcript.strip():
                s.why["text"] = _NOT_GIVEN["text"] if clip.transcript is None else "the transcript is empty"
                continue
            rows.append({"utterance_id": str(j), "transcript": clip.transcript})
        for _ in self._extract("text", rows, segs):
            pass

    def _extract(self, m: str, rows: list[dict], segs: list[_Segment]):
        """Run modality ``m``'s extractor over ``rows`` (one per segment, ``utterance_id`` its
        index; paths absolute): each segment gets its features or the reason it has none.
        Yields ``(segment, result)``."""
        if not rows:
            return
        for r in self.extractor(m).extract(pd.DataFrame(rows), Path("/")):
            s = segs[int(r.utterance_id)]
            if r.error is not None:
                s.why[m] = r.error
            else:
                s.feats[m] = r.matrix
            yield s, r

    def _run(self, segs: list[_Segment]) -> tuple[np.ndarray, np.ndarray]:
        """``(probs (S, 4), per-model probs (M, S, 4))`` of the segments, each with what it has."""
        from .predict import ensemble_probs

        view = _SegmentView(segs, self.dims, self.store_dtype)
        for m in MODALITIES:
            for s in segs:
                f = s.feats.get(m)
                if f is not None and f.shape[1] != self.dims[m]:
                    raise MediaError(f"{m}: the extractor gives {f.shape[1]}-d features, the model takes "
                                     f"{self.dims[m]}-d")
        probs, per_model, _ = ensemble_probs(self.models, view, ["present"], self.device, self.batch_size,
                                             where="clip")
        return probs["present"], per_model["present"]

    def _prediction(self, s: _Segment, p: np.ndarray, each: np.ndarray) -> Prediction:
        used = [m for m in MODALITIES if m in s.feats]
        missing = [m for m in MODALITIES if m in self.provenance and m not in s.feats]
        why = {m: s.why.get(m, _NOT_GIVEN[m]) for m in missing}
        return Prediction(label=LABELS[int(np.argmax(p))], probs=_probs(p), used=used, missing=missing,
                          reconstructed=missing if self.reconstructs else [], why=why,
                          per_checkpoint={path: _probs(e) for path, e in zip(self.paths, each)},
                          start=s.start, end=s.end, face_frames=s.face_frames, sampled_frames=s.sampled_frames)

    def _combine(self, clip: _Clip, wins: list[Prediction], wave) -> Prediction:
        sources = {"media": None if clip.media is None else str(clip.media),
                   "audio": None if clip.audio is None else str(clip.audio),
                   "transcript": clip.transcript}
        if len(wins) == 1:
            w = wins[0]
            w.sources = sources
            return w
        p = np.mean([[w.probs[c] for c in LABELS] for w in wins], axis=0)
        each = {path: _probs(np.mean([[w.per_checkpoint[path][c] for c in LABELS] for w in wins], axis=0))
                for path in self.paths}
        used = [m for m in MODALITIES if any(m in w.used for w in wins)]
        missing = [m for m in MODALITIES if any(m in w.missing for w in wins)]
        why = {m: next(w.why[m] for w in wins if m in w.why) for m in missing}
        notes = [f"{len(wins)} windows of {wins[0].duration:.2f} s (the clip is longer than the {self.window:g} s "
                 "window); the clip's probabilities are the mean of the windows'"]
        if clip.transcript and "text" in used:
            notes.append("the transcript has no time stamps: every window was given the whole of it")
        partial = [m for m in missing if m in used]
        if partial:
            notes.append(f"{', '.join(partial)}: missing in some windows only (see windows)")
        return Prediction(label=LABELS[int(np.argmax(p))], probs=_probs(p), used=used, missing=missing,
                          reconstructed=missing if self.reconstructs else [], why=why, per_checkpoint=each,
                          start=wins[0].start, end=wins[-1].end, face_frames=sum(w.face_frames for w in wins),
                          sampled_frames=sum(w.sampled_frames for w in wins), windows=wins, notes=notes,
                          sources=sources)


def _probs(p: np.ndarray) -> dict[str, float]:
    return {c: float(x) for c, x in zip(LABELS, p)}


class _SegmentView:
    """What :func:`cmarr.pipelines.predict.ensemble_probs` reads, over segments; features
    rounded to the training store's dtype, as the store would hold them."""

    def __init__(self, segs: list[_Segment], dims: Mapping[str, int], store_dtype: np.dtype):
        self.segs = segs
        self.ids = [str(j) for j in range(len(segs))]
        self.labels = np.full(len(segs), -1, dtype=np.int64)
        self.present = np.array([[m in s.feats for m in MODALITIES] for s in segs], dtype=bool)  # (S, 3)
        self.dims = dict(dims)
        self.dtype = store_dtype

    def get(self, i: int, m: str) -> np.ndarray | None:
        f = self.segs[i].feats.get(m)
        return None if f is None else f.astype(self.dtype).astype(np.float32)
