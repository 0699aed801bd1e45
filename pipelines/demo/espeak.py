"""espeak-ng speech for the demo corpus, in place of the synthesized voice when installed.

Each utterance's transcript is spoken with pitch, speed and amplitude set by its emotion
(``ESPEAK_STYLE``, the same direction as :data:`.media.PROSODY`), then time-stretched to the
utterance's duration, so the corpus's EmoEvaluation times stay true.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import DemoError
from .media import SR, write_wav

# label -> espeak-ng options (pitch 0-99, speed in words per minute, amplitude 0-200): the
# same direction as the synthesized voice's ``PROSODY`` (anger loud and fast, happiness
# high, neutral mid, sadness low, slow and quiet).
ESPEAK_STYLE: dict[str, dict[str, int]] = {
    "ang": {"pitch": 55, "speed": 185, "amplitude": 180},
    "hap": {"pitch": 80, "speed": 170, "amplitude": 130},
    "neu": {"pitch": 45, "speed": 150, "amplitude": 90},
    "sad": {"pitch": 25, "speed": 105, "amplitude": 45},
}
ESPEAK_VOICE = {"F": "en+f3", "M": "en+m3"}


def resolve_audio(setting: str) -> str:
    """``"espeak"`` or ``"synth"`` for the setting ``auto|espeak|synth``."""
    if setting not in ("auto", "espeak", "synth"):
        raise DemoError(f"audio {setting!r}: expected auto, espeak or synth")
    have = shutil.which("espeak-ng") is not None
    if setting == "espeak" and not have:
        raise DemoError("audio 'espeak': espeak-ng is not on the PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    if setting == "auto":
        return "espeak" if have else "synth"
    return setting


def espeak_utterance(text: str, label: str, gender: str, duration: float, sr: int = 16000) -> np.ndarray:
    """``text`` spoken by espeak-ng in the style ``ESPEAK_STYLE[label]``, leading and
    trailing silence trimmed, time-stretched (pitch kept) to ``duration`` seconds: float32
    ``(round(duration * sr),)``. The stretch keeps the EmoEvaluation times of the corpus
    true; speed differences between emotions survive as relative rates."""
    import librosa
    import soundfile

    words = re.sub(r"\[[^\]]*\]", " ", text).strip() or "mm"
    s = ESPEAK_STYLE[label]
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        cmd = ["espeak-ng", "-v", ESPEAK_VOICE.get(gender, "en"), "-p", str(s["pitch"]), "-s", str(s["speed"]),
               "-a", str(s["amplitude"]), "-w", str(wav), words]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not wav.is_file():
            raise DemoError(f"espeak-ng failed on {words!r}: {res.stderr.strip() or res.returncode}")
        x, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if rate != sr:
        x = librosa.resample(x, orig_sr=rate, target_sr=sr)
    x, _ = librosa.effects.trim(x, top_db=35)
    n = max(1, int(round(duration * sr)))
    if len(x) > 1 and len(x) != n:
        x = librosa.effects.time_stretch(x, rate=len(x) / n)
    x = np.pad(x, (0, max(0, n - len(x))))[:n]
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def speak_corpus(info: dict) -> int:
    """Replace the utterance wavs of a ``make_iemocap_tree`` corpus by espeak-ng speech of
    their transcripts (same durations), and rebuild the stereo dialog wavs from them, as the
    corpus builder writes them (speaker's microphone on its channel, 8 % cross-talk). Returns the
    number of utterances spoken."""
    root = Path(info["root"])
    by_dialog: dict[str, list[dict]] = {}
    for u in info["utterances"]:
        by_dialog.setdefault(u["dialog"], []).append(u)
    n = 0
    for dialog, utts in by_dialog.items():
        d = info["dialogs"][dialog]
        stereo = np.zeros((int(math.ceil(d["duration"] * SR)), 2), np.float32)  # (N, 2)
        for u in utts:
            # the corpus's voice label: the emotion for 4-class utterances, a drawn one for the others
            x = espeak_utterance(u["transcript"], u["voice_label"], u["gender"], u["end"] - u["start"], SR)
            write_wav(root / u["wav_path"], x)
            ch = 0 if u["gender"] == d["marker"] else 1
            a = int(round(u["start"] * SR))
            seg = stereo[a:a + len(x)]
            seg[:, ch] += x[:len(seg)]
            seg[:, 1 - ch] += 0.08 * x[:len(seg)]
            n += 1
        write_wav(root / d["wav"], np.clip(stereo, -1, 1))
    return n
