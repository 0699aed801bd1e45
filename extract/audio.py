"""Reading utterance audio for the speech extractor.

``read_audio`` returns one mono float32 waveform at the model's sample rate (16 kHz for
wav2vec2). Choices the paper leaves open, and the defaults taken here:

- **Decoder**: ``soundfile`` (libsndfile: wav, flac, ogg) first; when it cannot open a
  file, ``librosa.load`` (audioread / ffmpeg backends) is tried before giving up.
- **Channels**: several channels are averaged into one (IEMOCAP's sentence wavs are
  already mono; its dialog wavs are stereo, one actor per channel).
- **Resampling**: the SoX "HQ" filter of ``python-soxr`` (what ``librosa.resample(...,
  res_type="soxr_hq")`` calls; librosa is used when soxr cannot be imported), only when the
  file's rate differs from the target (MSP-IMPROV copies vary).

Every failure raises ``AudioError`` whose message names the file and the problem; the
extractor turns it into a per-utterance error, never a row of zeros.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import PathError

#: The rate wav2vec2 models are trained on.
TARGET_SAMPLE_RATE = 16_000
#: The resampling filter, as recorded in provenance.
RESAMPLER = "soxr HQ"


class AudioError(PathError):
    """An audio file that cannot be used. ``str(e)`` is ``"<path>: <problem>"``."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``(samples (N, C) float32, sample rate)`` with soundfile, else librosa."""
    try:
        import soundfile as sf

        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
        return data, int(rate)
    except ImportError:
        first_error = "soundfile is not installed"
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        first_error = _first_line(e)
    try:
        import warnings

        import librosa

        with warnings.catch_warnings():
            # librosa warns when it falls back to audioread; the error below says enough.
            warnings.simplefilter("ignore")
            data, rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    except ImportError:
        raise AudioError(path, f"unreadable audio ({first_error}; librosa is not installed)") from None
    except Exception as e:
        raise AudioError(path, f"unreadable audio ({first_error}; librosa: {_first_line(e)})") from None
    data = np.asarray(data, dtype=np.float32)
    data = data[:, None] if data.ndim == 1 else data.T  # librosa gives (C, N)
    return data, int(rate)


def resample(wave: np.ndarray, orig_rate: int, target_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Resample a mono waveform ``(N,)`` with the soxr HQ filter."""
    if orig_rate == target_rate:
        return wave
    try:
        import soxr
    except ImportError:  # librosa calls the same filter; it is slower to import
        import librosa

        return librosa.resample(wave, orig_sr=orig_rate, target_sr=target_rate,
                                res_type="soxr_hq").astype(np.float32, copy=False)
    return soxr.resample(wave, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """One utterance as a mono float32 waveform ``(N,)`` at ``sample_rate``.

    Raises ``AudioError`` for a missing or unreadable file, a file with no samples, and
    samples that are not finite.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "no such file")
    if path.is_dir():
        raise AudioError(path, "is a folder, not an audio file")
    if path.is_file() and path.stat().st_size == 0:
        raise AudioError(path, "zero-length file (0 bytes)")
    data, rate = _decode(path)
    if data.shape[0] == 0:
        raise AudioError(path, "zero-length audio (the file holds no samples)")
    if rate <= 0:
        raise AudioError(path, f"invalid sample rate {rate}")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]  # (N,)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise AudioError(path, "audio holds NaN or Inf samples")
    try:
        wave = resample(wave, rate, sample_rate)
    except ImportError:
        raise AudioError(path, f"sample rate {rate} Hz needs resampling to {sample_rate} Hz, "
                               "and neither soxr nor librosa is installed") from None
    if wave.size == 0:
        raise AudioError(path, f"no samples left after resampling from {rate} Hz to {sample_rate} Hz")
    return wave
