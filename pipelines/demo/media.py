"""Media of the demo corpus: a synthesized voice, transcripts, and videos of real face photos.

- Audio: a voiced signal (harmonics of a moving f0, syllable-rate amplitude envelope, breath
  noise), written as 16 kHz int16 wavs.
- Video: MJPG avi (small frames, ``fps`` per call). Faces are real photos:
  ``skimage.data.astronaut()`` (actor ``F``) and matplotlib's ``grace_hopper.jpg`` (actor
  ``M``), cropped to the head. A dialog avi shows both actors side by side, the marker wearer
  on the left half, each on their own background colour; the actor who speaks moves and
  scales. A clip shows its speaker full frame, or, for clips that have no face, a textured
  background only.
- With ``emotion_signal=True`` the content depends on the label: the voice's f0 level and
  contour, energy, syllable rate and noise (``PROSODY``), the transcript's words
  (``VOCABULARY``), and the speaking face's motion and colour gain (``FACE_STYLE``), so a
  model trained on such a corpus can learn something from each modality.

:mod:`.corpus` lays these media out as the corpora's release trees.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

SR = 16000

# label -> voice: f0 (Hz, speaker M; F is 1.35x), f0 slope over the utterance (relative),
# energy (peak amplitude), syllable rate (1/s), f0 jitter (relative), noise level (relative)
PROSODY: dict[str, dict[str, float]] = {
    "ang": dict(f0=190.0, slope=-0.15, energy=0.65, rate=5.5, jitter=0.05, noise=0.10),
    "hap": dict(f0=210.0, slope=0.30, energy=0.45, rate=4.5, jitter=0.02, noise=0.04),
    "neu": dict(f0=125.0, slope=-0.05, energy=0.28, rate=3.5, jitter=0.01, noise=0.03),
    "sad": dict(f0=100.0, slope=-0.25, energy=0.14, rate=2.2, jitter=0.01, noise=0.06),
}
VOCABULARY: dict[str, tuple[str, ...]] = {
    "ang": ("furious", "outrageous", "hate", "stop", "enough", "unacceptable", "angry", "damn",
            "ridiculous", "liar"),
    "hap": ("wonderful", "great", "love", "amazing", "fantastic", "happy", "excited", "beautiful",
            "awesome", "congratulations"),
    "neu": ("okay", "meeting", "tomorrow", "table", "paper", "schedule", "address", "number",
            "report", "noon"),
    "sad": ("miss", "lonely", "sorry", "lost", "cry", "gone", "tired", "alone", "hurts", "funeral"),
}
COMMON_WORDS = ("i", "you", "the", "it", "is", "this", "that", "really", "so", "we", "just", "know")
# label -> speaking face: motion amplitude (relative scale), motion frequency (Hz),
# BGR gain, vertical offset (fraction of the frame height)
FACE_STYLE: dict[str, dict] = {
    "ang": dict(amp=0.07, freq=4.0, gain=(0.85, 0.85, 1.3), dy=0.0),
    "hap": dict(amp=0.05, freq=2.5, gain=(1.2, 1.2, 1.2), dy=-0.03),
    "neu": dict(amp=0.02, freq=1.0, gain=(1.0, 1.0, 1.0), dy=0.0),
    "sad": dict(amp=0.01, freq=0.6, gain=(0.7, 0.7, 0.7), dy=0.06),
}


def synth_voice(label: str, duration: float, rng: np.random.Generator, gender: str = "M",
                sr: int = SR) -> np.ndarray:
    """A voiced signal whose prosody follows ``PROSODY[label]``: float32 in [-1, 1], ``[N]``."""
    p = PROSODY[label]
    n = max(1, int(round(duration * sr)))
    t = np.arange(n) / sr                                             # (N,)
    u = t / max(duration, 1e-6)
    f0_base = p["f0"] * (1.35 if gender == "F" else 1.0) * rng.uniform(0.92, 1.08)
    wobble = np.interp(t, np.linspace(0, duration, 8), rng.normal(0, p["jitter"], 8))
    f0 = f0_base * (1 + p["slope"] * (u - 0.5) + wobble)              # (N,)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(h * phase) / h for h in range(1, 9))          # (N,)
    rate = p["rate"] * rng.uniform(0.9, 1.1)
    envelope = np.clip(np.sin(np.pi * rate * t + rng.uniform(0, np.pi)), 0, None) ** 0.7
    fade = np.minimum(1, np.minimum(t, duration - t) / 0.02)
    x = envelope * fade * (voiced / 2.2 + p["noise"] * rng.standard_normal(n))
    return (p["energy"] * x / max(np.abs(x).max(), 1e-6)).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def write_wav(path: Path, x: np.ndarray, sr: int = SR) -> None:
    """int16 PCM wav (``x`` float in [-1, 1], ``[N]`` mono or ``[N, C]``)."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), to_int16(x), sr, subtype="PCM_16")


def make_transcript(label: str, rng: np.random.Generator, emotion_signal: bool = True) -> str:
    pool = VOCABULARY[label] if emotion_signal else sum(VOCABULARY.values(), ())
    n = int(rng.integers(4, 9))
    words = [str(rng.choice(pool)) if rng.random() < 0.45 else str(rng.choice(COMMON_WORDS)) for _ in range(n)]
    words[int(rng.integers(0, n))] = str(rng.choice(pool))  # at least one content word
    end = {"ang": "!", "hap": "!", "neu": ".", "sad": "..."}[label] if emotion_signal else "."
    return " ".join(words).capitalize() + end


@functools.lru_cache(maxsize=None)
def face_photo(actor: str) -> np.ndarray:
    """A real face photo cropped to the head, BGR uint8: ``F`` = astronaut (scikit-image),
    ``M`` = Grace Hopper (matplotlib sample data)."""
    import cv2

    if actor == "F":
        from skimage import data

        img = data.astronaut()[10:240, 130:320, ::-1]
    else:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        img = cv2.imread(path)
        if img is None:
            raise FileNotFoundError(f"{path}: cannot read matplotlib's sample photo")
        img = img[40:400, 120:400]
    return np.ascontiguousarray(img)


@functools.lru_cache(maxsize=4096)
def _scaled_face(actor: str, fw: int, fh: int, gain: tuple[float, float, float]) -> np.ndarray:
    """``face_photo(actor)`` resized to ``(fw, fh)`` and colour-scaled (cached: the sizes a
    moving face takes repeat from frame to frame)."""
    import cv2

    img = cv2.resize(face_photo(actor), (fw, fh), interpolation=cv2.INTER_AREA)
    if gain != (1.0, 1.0, 1.0):
        img = np.clip(img * np.asarray(gain, np.float32), 0, 255).astype(np.uint8)
    return img


def _paste_face(frame: np.ndarray, actor: str, x0: int, width: int, t: float,
                style: dict | None, rng_phase: float) -> None:
    """Draw ``face_photo(actor)`` into the column band ``[x0, x0+width)`` of ``frame``, scaled and moved
    by ``style`` at time ``t`` (``None`` = the idle listener: a slow small sway)."""
    H = frame.shape[0]
    face = face_photo(actor)
    amp, freq, gain, dy = ((0.008, 0.3, (1.0, 1.0, 1.0), 0.0) if style is None else
                           (style["amp"], style["freq"], style["gain"], style["dy"]))
    s = 1.0 + amp * math.sin(2 * math.pi * freq * t + rng_phase)
    fh = int(0.62 * H * s)
    fw = max(8, int(fh * face.shape[1] / face.shape[0]))
    fw = min(fw, width - 2)
    img = _scaled_face(actor, fw, fh, tuple(gain))
    cx = x0 + width // 2 + int(amp * width * math.sin(2 * math.pi * freq * 0.7 * t))
    cy = H // 2 + int(dy * H) + int(amp * H * 0.5 * math.cos(2 * math.pi * freq * t))
    top, left = cy - fh // 2, cx - fw // 2
    t0, l0 = max(top, 0), max(left, x0)
    t1, l1 = min(top + fh, H), min(left + fw, x0 + width)
    frame[t0:t1, l0:l1] = img[t0 - top:t1 - top, l0 - left:l1 - left]


def _video_writer(path: Path, fps: float, size: tuple[int, int]):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not w.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write MJPG avi")
    return w


def _background(size: tuple[int, int], bgr: tuple[int, int, int]) -> np.ndarray:
    W, H = size
    ramp = np.linspace(0.75, 1.0, H, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    return np.broadcast_to(ramp * np.asarray(bgr, np.float32), (H, W, 3)).astype(np.uint8)


def write_dialog_avi(path: Path, duration: float, turns: list[dict], marker: str, fps: float,
                     size: tuple[int, int], emotion_signal: bool) -> None:
    """Both actors side by side: marker wearer (gender ``marker``) left, the other right.
    ``turns``: ``{start, end, gender, voice_label}``; the speaking actor moves per ``FACE_STYLE``."""
    W, H = size
    half = W // 2
    other = "M" if marker == "F" else "F"
    base = np.concatenate([_background((half, H), (150, 110, 70)),      # left: blue-grey
                           _background((W - half, H), (80, 140, 90))], axis=1)  # right: green
    writer = _video_writer(path, fps, size)
    try:
        for i in range(int(math.ceil(duration * fps))):
            t = i / fps
            frame = base.copy()
            for x0, width, actor in ((0, half, marker), (half, W - half, other)):
                style = None
                for turn in turns:
                    if turn["gender"] == actor and turn["start"] <= t < turn["end"]:
                        style = FACE_STYLE[turn["voice_label"] if emotion_signal else "neu"]
                        break
                _paste_face(frame, actor, x0, width, t, style, 0.0 if x0 == 0 else 1.3)
            writer.write(frame)
    finally:
        writer.release()


def write_clip_avi(path: Path, duration: float, actor: str | None, label: str, fps: float,
                   size: tuple[int, int], emotion_signal: bool, rng: np.random.Generator) -> None:
    """One speaker full frame (``actor`` ``F``/``M``), or no face at all (``actor=None``:
    moving stripes on a background, for clips that have no detectable face)."""
    writer = _video_writer(path, fps, size)
    try:
        for frame in clip_frames(duration, actor, label, fps, size, emotion_signal, rng):
            writer.write(frame)
    finally:
        writer.release()


def clip_frames(duration: float, actor: str | None, label: str, fps: float, size: tuple[int, int],
                emotion_signal: bool = True, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """The BGR frames of a one-speaker clip: the speaker full frame, moving as ``label``'s
    ``FACE_STYLE`` says, or (``actor=None``) moving stripes on a background of ``rng``'s colour."""
    W, H = size
    rng = rng or np.random.default_rng(0)
    base = _background(size, (120, 120, 120) if actor else tuple(int(v) for v in rng.integers(60, 200, 3)))
    frames = []
    for i in range(max(1, int(math.ceil(duration * fps)))):
        t = i / fps
        frame = base.copy()
        if actor is None:
            off = int(20 * t) % 20
            frame[:, off::20] = (40, 40, 40)
        else:
            _paste_face(frame, actor, 0, W, t, FACE_STYLE[label if emotion_signal else "neu"], 0.0)
        frames.append(frame)
    return frames


def write_clip_mp4(path: Path, frames_bgr: list[np.ndarray], fps: float, audio: np.ndarray | None = None,
                   sr: int = SR) -> Path:
    """An mp4 as a phone or a web page gives one: MPEG-4 video of ``frames_bgr`` at ``fps``
    and, when ``audio`` (mono float in [-1, 1]) is given, an AAC track at ``sr`` (PyAV)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    H, W = frames_bgr[0].shape[:2]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=int(round(fps)))
        vs.width, vs.height, vs.pix_fmt = W - W % 2, H - H % 2, "yuv420p"
        a = None
        if audio is not None:
            a = c.add_stream("aac", rate=sr)
            a.layout = "mono"
        for f in frames_bgr:
            img = np.ascontiguousarray(f[: vs.height, : vs.width, ::-1])  # BGR -> RGB, even size
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode(None):
            c.mux(p)
        if a is not None:
            x = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
            for i in range(0, len(x), 1024):
                fr = av.AudioFrame.from_ndarray(x[None, i:i + 1024], format="fltp", layout="mono")
                fr.sample_rate, fr.pts = sr, i
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    return path
