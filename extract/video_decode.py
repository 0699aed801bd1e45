"""Utterance clips from video files, decoded once per file, frames sampled at a fixed rate.

IEMOCAP: one ``.avi`` per dialog holds both actors side by side; an utterance is the span
``[video_start, video_end)`` of it, on the speaker's half (``video_half`` "left"/"right",
rule in ``docs/corpora.md``). All utterances of a dialog are cut in ONE sequential pass over
the file. MSP-IMPROV: one video per utterance (``video_half`` "full"); when the manifest
gives no span the whole file is the clip.

Sampling: sample ``k`` of a clip is at ``t_k = start + k / sample_fps`` (default 10/s) for
``t_k < end``; it takes frame ``floor(t_k * fps)``, the frame shown at that time, with ``fps``
read from the file. When ``sample_fps`` exceeds the file's fps a frame is taken once (the
effective rate is then the file's). A frame's time is that of the sample that took it,
``t_k - start = k / sample_fps`` (on the sample grid, from the clip start).

A file that ends before a clip's span does (a short or truncated video): the sampled frames
that exist are emitted, and the clip's ``ClipEnd`` records the number missing
(``n_missing``) and where the video ends (``video_end``), so that the caller can decide
whether what exists is enough (the video extractor's ``max_missing_seconds``); a clip with
no decodable sampled frame at all ends with an error, as does every clip of a file that
cannot be opened or whose fps cannot be read. Nothing is ever filled with blank frames.

Legend: ``H x W`` frame size (of the chosen half).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

HALVES = ("left", "right", "full")


@dataclass(frozen=True)
class ClipRequest:
    """One utterance's clip: ``key`` (the utterance id), span in seconds (``end`` may be
    ``math.inf``: to the end of the file), and which half of the frame."""

    key: str
    start: float
    end: float
    half: str = "full"


@dataclass
class ClipFrame:
    """A sampled frame of a clip: ``index`` its position in the clip, ``time`` the time of
    the sample that took it (``k / sample_fps``, from the clip start), ``image`` uint8 RGB
    (H, W, 3) of the chosen half."""

    key: str
    index: int
    time: float
    image: np.ndarray


@dataclass
class ClipEnd:
    """A clip is complete: ``n_frames`` sampled frames were emitted, ``n_missing`` sampled
    times lay past the last decodable frame; ``error`` set when the clip has no frame.
    ``video_end``: seconds (from the start of the file) at which the last decoded frame
    ends, set when the file ended before the clip's span did (None otherwise)."""

    key: str
    n_frames: int
    n_missing: int = 0
    error: str | None = None
    video_end: float | None = None


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    n_frames: int  # as the container states it (may be wrong for truncated files)
    width: int
    height: int


def probe(path: Path) -> VideoInfo:
    """Read fps, frame count and size from the file; ``ValueError`` naming the file when it
    cannot be opened or states no usable fps / size."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"unreadable video: {path}: cannot be opened")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"unreadable video: {path}: no frame rate in the file (read {fps})")
    if w <= 0 or h <= 0:
        raise ValueError(f"unreadable video: {path}: no frame size in the file")
    return VideoInfo(fps, n, w, h)


def cut_half(frame: np.ndarray, half: str) -> np.ndarray:
    """The speaker's half of a side-by-side frame: left = columns [0, W//2), right =
    [W//2, W), full = all."""
    if half == "full":
        return frame
    w2 = frame.shape[1] // 2
    if half == "left":
        return frame[:, :w2]
    if half == "right":
        return frame[:, w2:]
    raise ValueError(f"video_half must be one of {HALVES}, got {half!r}")


class _Clip:
    """Sampling state of one request while the file streams by."""

    def __init__(self, req: ClipRequest, sample_fps: float, fps: float):
        self.req = req
        self.k = 0  # next sample
        self.n = 0  # frames emitted
        self.last_frame = -1
        self.step = 1.0 / sample_fps
        self.fps = fps

    def next_time(self) -> float:
        return self.req.start + self.k * self.step

    def next_frame(self) -> int:
        # 1e-9: a time exactly on a frame boundary belongs to that frame despite rounding
        return int(math.floor(self.next_time() * self.fps + 1e-9))

    def exhausted(self) -> bool:
        # 1e-9: start + k * step rounded just below end is end (no sample at t == end)
        return self.next_time() >= self.req.end - 1e-9


def iter_clips(path: Path, requests: Iterable[ClipRequest], sample_fps: float = 10.0
               ) -> Iterator[ClipFrame | ClipEnd]:
    """Decode ``path`` once, front to back, and yield every sampled frame of every request
    (``ClipFrame``) and, once a request is complete, its ``ClipEnd``. Each request yields
    exactly one ``ClipEnd``. Frames no request needs are only grabbed, not converted."""
    if sample_fps <= 0:
        raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
    reqs = sorted(requests, key=lambda r: (r.start, r.key))
    for r in reqs:
        if r.half not in HALVES:
            raise ValueError(f"{r.key}: video_half must be one of {HALVES}, got {r.half!r}")
    try:
        info = probe(path)
    except ValueError as e:
        for r in reqs:
            yield ClipEnd(r.key, 0, error=str(e))
        return
    fps = info.fps
    pending: list[_Clip] = []  # not started yet, by start time
    for r in reqs:
        if r.end > r.start >= 0:
            pending.append(_Clip(r, sample_fps, fps))
        else:
            yield ClipEnd(r.key, 0, error=f"invalid video span [{r.start}, {r.end}] for {path}")
    active: list[_Clip] = []
    cap = cv2.VideoCapture(str(path))
    i = -1  # index of the frame last grabbed
    try:
        while pending or active:
            # Start clips whose first sample lies at or before the next frame.
            while pending and pending[0].next_frame() <= i + 1:
                active.append(pending.pop(0))
            if not active:
                # Skip ahead by grabbing (decode without colour conversion) to the next start.
                target = pending[0].next_frame()
                ok = True
                while i + 1 < target:
                    ok = cap.grab()
                    if not ok:
                        break
                    i += 1
                if not ok:
                    break
                continue
            if not cap.grab():
                break
            i += 1
            wanted = [c for c in active if c.next_frame() == i]
            if wanted:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                for c in wanted:
                    t = c.k * c.step  # the time of the sample that took this frame, from the clip start
                    yield ClipFrame(c.req.key, c.n, t, np.ascontiguousarray(cut_half(rgb, c.req.half)))
                    c.n += 1
                    # advance past every sample that falls on this same frame
                    while not c.exhausted() and c.next_frame() <= i:
                        c.k += 1
            done = [c for c in active if c.exhausted()]
            for c in done:
                active.remove(c)
                yield ClipEnd(c.req.key, c.n)
    finally:
        cap.release()
    # The file ended (or stopped decoding) first: what is left is short or missing.
    last_t = (i + 1) / fps  # end of the last decoded frame
    for c in active + pending:
        missing = 0
        if math.isfinite(c.req.end):
            missing = max(0, math.ceil((c.req.end - c.next_time()) * sample_fps - 1e-9))
        if c.n == 0:
            what = "no decodable frame" if i < 0 else f"the video ends at {last_t:.3f} s"
            yield ClipEnd(c.req.key, 0, missing,
                          error=f"no video frame for span [{c.req.start:.3f}, {c.req.end:.3f}] s: {path}: {what}",
                          video_end=last_t)
        elif math.isfinite(c.req.end):
            yield ClipEnd(c.req.key, c.n, missing, video_end=last_t)
        else:  # the clip is the rest of the file: it ends where the file does
            yield ClipEnd(c.req.key, c.n)


def prefetch(it: Iterator, maxsize: int = 256) -> Iterator:
    """Run ``it`` in a background thread (OpenCV releases the GIL while decoding) and yield
    its items; an exception in the thread is re-raised here."""
    q: queue.Queue = queue.Queue(maxsize)
    sentinel = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer
            q.put(_Raised(e))
        finally:
            q.put(sentinel)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                break
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        # drain so that the worker is not blocked on a full queue
        while th.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


@dataclass
class _Raised:
    exc: BaseException


def decode_parallel(jobs: list[tuple[Path, list[ClipRequest]]], sample_fps: float = 10.0, workers: int = 4,
                    maxsize: int = 256) -> Iterator[ClipFrame | ClipEnd]:
    """``iter_clips`` over many files, ``workers`` files at a time, each in its own thread
    (a file is still decoded once, front to back, by one thread). Events of different files
    interleave; those of one file keep their order. An exception in a worker is re-raised
    here."""
    if workers <= 1:
        def one():
            for path, reqs in jobs:
                yield from iter_clips(path, reqs, sample_fps)
        yield from prefetch(one(), maxsize)
        return
    q: queue.Queue = queue.Queue(maxsize)
    todo: queue.Queue = queue.Queue()
    for j in jobs:
        todo.put(j)
    stop = threading.Event()
    done = object()

    def work():
        try:
            while not stop.is_set():
                try:
                    path, reqs = todo.get_nowait()
                except queue.Empty:
                    return
                for ev in iter_clips(path, reqs, sample_fps):
                    if stop.is_set():
                        return
                    q.put(ev)
        except BaseException as e:
            q.put(_Raised(e))
        finally:
            q.put(done)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, max(len(jobs), 1)))]
    for t in threads:
        t.start()
    live = len(threads)
    try:
        while live:
            item = q.get()
            if item is done:
                live -= 1
            elif isinstance(item, _Raised):
                raise item.exc
            else:
                yield item
    finally:
        stop.set()
        while any(t.is_alive() for t in threads):
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
