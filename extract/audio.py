"""Reading utterance audio for the speech extractor.

``read_audio`` returns one mono float32 waveform at the model's sample rate (16 kHz for
wav2vec2). Choices the paper leaves open, and the defaults taken here:

- **Decoder**: ``soundfile`` (libsndfile: wav, flac, ogg, mp3) first; when it cannot open a
  file, PyAV (``av``: FFmpeg's libraries, linked into its wheel) decodes the first audio
  track of any container FFmpeg reads (mp4, m4a, mkv, webm, avi, mov, ...). No ``ffmpeg``
  binary is needed or called. A container without an audio track is an ``AudioError`` of
  kind ``"no audio track"``.
- **Channels**: several channels are averaged into one (IEMOCAP's sentence wavs are
  already mono; its dialog wavs are stereo, one actor per channel).
- **Resampling**: the SoX "HQ" filter of ``python-soxr`` (what ``librosa.resample(...,
  res_type="soxr_hq")`` calls; librosa is used when soxr cannot be imported), only when the
  file's rate differs from the target (MSP-IMPROV copies vary).
- **Truncated files**: a wav cut short with its header intact decodes without complaint
  (libsndfile reads whatever part of the data chunk is there), which would turn a corrupt
  file into features of part of the utterance. Two checks catch it, both measured on the
  samples actually decoded, before resampling:

  - *header*: for a PCM / float / A-law / mu-law RIFF wav, the frame count its ``data``
    chunk declares; a placeholder size (0 or 0xFFFFFFFF, written by streaming tools that
    never go back to fill it in) and other formats (compressed wavs, RF64, flac, ...)
    declare nothing usable and are not checked this way;
  - *expected duration*: the caller's ``expected_seconds`` (the speech extractor passes the
    manifest's ``end - start``: IEMOCAP's sentence wavs span exactly the times of their
    EmoEvaluation line; MSP-IMPROV's ``end`` is the clip's own duration, so there only the
    header check can tell).

  The header's count is exact for an intact file: audio passes the header check when at
  most ``tolerance_s`` is missing (not a share of the duration, so a long file that lost
  its end fails however long it is). It passes the expected-duration check when within
  ``max(tolerance_s, tolerance_fraction * expected)``; the defaults (``DURATION_TOLERANCE_S`` = 50 ms,
  ``DURATION_TOLERANCE_FRACTION``
  = 5 %) allow for the rounding of label times and for a few frames that a recording
  tool or resampler adds or drops at the edges, while a cut that loses a word (a few
  hundred ms) fails. A decoded duration
  *longer* than expected also fails (the manifest points at the wrong file).

Every failure raises ``AudioError`` whose message names the file and the problem; the
extractor turns it into a per-utterance error, never a row of zeros. ``AudioError.kind``
is a short category for that error (``"unreadable audio"``, ``"truncated audio"``,
``"audio duration mismatch"``).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from cmarr.extract.base import PathError, first_line

#: The rate wav2vec2 models are trained on.
TARGET_SAMPLE_RATE = 16_000
#: The resampling filter, as recorded in provenance.
RESAMPLER = "soxr HQ"


#: Default tolerances of the duration checks (see the module docstring): audio passes when
#: it is within ``max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRACTION * expected)``.
DURATION_TOLERANCE_S = 0.05
DURATION_TOLERANCE_FRACTION = 0.05

# RIFF wav format tags whose data chunk holds a whole number of ``block_align``-byte frames:
# PCM, IEEE float, A-law, mu-law (WAVE_FORMAT_EXTENSIBLE carries one of them as sub-format).
_FRAME_FORMATS = {0x0001, 0x0003, 0x0006, 0x0007}
_EXTENSIBLE = 0xFFFE


class AudioError(PathError):
    """An audio file that cannot be used. ``str(e)`` is ``"<path>: <problem>"``; ``kind``
    is the category the extractor records the error under."""

    def __init__(self, path: str | os.PathLike, problem: str, kind: str = "unreadable audio"):
        super().__init__(path, problem)
        self.kind = kind


def duration_tolerance(expected_s: float, tolerance_s: float = DURATION_TOLERANCE_S,
                       tolerance_fraction: float = DURATION_TOLERANCE_FRACTION) -> float:
    """The largest accepted difference, in seconds, from a duration of ``expected_s``."""
    return max(float(tolerance_s), float(tolerance_fraction) * max(float(expected_s), 0.0))


def wav_declared_frames(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(frames, sample rate)`` that a RIFF wav's header declares, read from its ``fmt ``
    and ``data`` chunk headers (a few small reads, no decoding).

    ``None`` when the file is not a RIFF/WAVE file, its format is not one with fixed-size
    frames (PCM, float, A-law, mu-law, or WAVE_FORMAT_EXTENSIBLE of one of them), or the
    data size is a placeholder (0 or 0xFFFFFFFF) that declares nothing."""
    fmt: tuple[int, int, int] | None = None  # (format tag, sample rate, block align)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            for _ in range(64):  # real wavs hold a handful of chunks; never loop on junk
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    body = f.read(min(size, 40))
                    if len(body) < 16:
                        return None
                    tag, _channels, rate, _bytes_per_s, align = struct.unpack("<HHIIH", body[:14])
                    if tag == _EXTENSIBLE and len(body) >= 26:
                        tag = struct.unpack("<H", body[24:26])[0]  # first two bytes of the sub-format GUID
                    fmt = (tag, rate, align)
                    f.seek(size - len(body) + (size & 1), os.SEEK_CUR)
                elif cid == b"data":
                    if fmt is None or size in (0, 0xFFFFFFFF):
                        return None
                    tag, rate, align = fmt
                    if tag not in _FRAME_FORMATS or align <= 0 or rate <= 0:
                        return None
                    return size // align, rate
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None
    return None


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``(samples (N, C) float32, sample rate)`` with soundfile, else PyAV."""
    try:
        import soundfile as sf

        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
        return data, int(rate)
    except ImportError:
        first_error = "soundfile is not installed"
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        first_error = first_line(e)
    return decode_container(path, first_error)


def decode_container(path: str | os.PathLike, first_error: str | None = None) -> tuple[np.ndarray, int]:
    """The first audio track of a media container as ``(samples (N, C) float32, rate)``,
    decoded by PyAV at the track's own rate and channel layout (integer samples scaled to
    [-1, 1) as soundfile scales them; samples past the duration the track declares, an
    encoder's padding of its last frame, dropped). ``AudioError`` naming the file: not media (kind
    ``"unreadable audio"``), no audio track (``"no audio track"``), no samples.
    ``first_error``: why soundfile could not read it, repeated when PyAV cannot either."""
    path = Path(path)
    before = f"soundfile: {first_error}; " if first_error else ""
    try:
        import av
    except ImportError:
        raise AudioError(path, f"unreadable audio ({before}PyAV (av) is not installed)") from None
    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.FFmpegError subclasses, OSError
        raise AudioError(path, f"unreadable audio ({before}PyAV: {first_line(e)})") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioError(path, f"no audio track in this file (its streams: {', '.join(kinds)})",
                             kind="no audio track")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # planar float32; layout and rate as the track's
        chunks: list[np.ndarray] = []
        rate = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (C, n)
                    rate = out.sample_rate
            for out in resampler.resample(None):  # what the resampler still holds
                chunks.append(out.to_ndarray())
                rate = out.sample_rate or rate
        except Exception as e:  # a damaged stream
            raise AudioError(path, f"unreadable audio track (PyAV: {first_line(e)})") from None
        declared = (int(round(float(stream.duration * stream.time_base) * rate))
                    if stream.duration and stream.time_base and rate else None)
    if not chunks:
        raise AudioError(path, "zero-length audio (its audio track holds no samples)")
    data = np.concatenate(chunks, axis=1).T  # (N, C)
    if declared and len(data) > declared:  # an encoder's padding of its last frame (AAC: up to 1023 samples)
        data = data[:declared]
    return np.ascontiguousarray(data, dtype=np.float32), int(rate)


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


def read_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE,
               expected_seconds: float | None = None, tolerance_s: float = DURATION_TOLERANCE_S,
               tolerance_fraction: float = DURATION_TOLERANCE_FRACTION,
               expected_source: str = "expected") -> np.ndarray:
    """One utterance as a mono float32 waveform ``(N,)`` at ``sample_rate``.

    Raises ``AudioError`` for a missing or unreadable file, a file with no samples, samples
    that are not finite, a wav holding fewer frames than its header declares, and (when
    ``expected_seconds`` is given) a decoded duration that differs from ``expected_seconds``;
    both duration checks accept differences up to ``duration_tolerance(...)`` (see the
    module docstring). ``expected_source`` says where ``expected_seconds`` comes from in the
    error message (e.g. ``"the manifest's end - start"``).
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
    _check_duration(path, data.shape[0], rate, expected_seconds, tolerance_s, tolerance_fraction,
                    expected_source)
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


def _check_duration(path: Path, frames: int, rate: int, expected_seconds: float | None,
                    tolerance_s: float, tolerance_fraction: float, expected_source: str) -> None:
    """Raise ``AudioError`` when ``frames`` decoded samples at ``rate`` fall short of the
    header's declared frames, or differ from ``expected_seconds``, by more than the tolerance."""
    seconds = frames / rate
    declared = wav_declared_frames(path)
    if declared is not None:
        want, want_rate = declared
        want_s = want / want_rate
        if want_s - seconds > tolerance_s:  # the count is exact: no share of a long file may go
            raise AudioError(path, f"truncated file: its header declares {want} frames ({want_s:.3f} s) but only "
                                   f"{frames} ({seconds:.3f} s) could be read", kind="truncated audio")
    if expected_seconds is not None:
        tol = duration_tolerance(expected_seconds, tolerance_s, tolerance_fraction)
        if abs(seconds - expected_seconds) > tol:
            hint = "truncated file?" if seconds < expected_seconds else "the wrong file?"
            raise AudioError(path, f"decoded {seconds:.3f} s of audio, {expected_source} {expected_seconds:.3f} s "
                                   f"(tolerance {tol:.3f} s): {hint}", kind="audio duration mismatch")
