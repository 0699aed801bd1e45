"""Clips cut from videos (span, half, decoded once), bad videos, and the video extractor."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cmarr.extract import video_decode as video_mod
from cmarr.extract.base import ExtractError
from cmarr.extract.video import VideoConfig, VideoExtractor
from cmarr.extract.video_decode import ClipFrame, ClipRequest, iter_clips, prefetch

FPS, W, H, N = 20, 80, 48, 40  # 2.0 s


def _write_index_avi(path: Path) -> Path:
    """Left half: red = 5 * frame index; right half: constant green. MJPG keeps these flat
    colours within a few levels."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert w.isOpened()
    for i in range(N):
        f = np.zeros((H, W, 3), np.uint8)  # BGR
        f[:, : W // 2, 2] = 5 * i
        f[:, W // 2:, 1] = 200
        w.write(f)
    w.release()
    return path


def _collect(path, reqs, fps=10.0):
    frames, ends = {}, {}
    for ev in iter_clips(path, reqs, fps):
        if isinstance(ev, ClipFrame):
            frames.setdefault(ev.key, []).append(ev)
        else:
            assert ev.key not in ends
            ends[ev.key] = ev
    return frames, ends


def test_span_half_and_decoded_once(tmp_path, monkeypatch):
    p = _write_index_avi(tmp_path / "dialog.avi")
    opened = []
    real = cv2.VideoCapture

    def counting(*a):
        opened.append(a[0])
        return real(*a)

    monkeypatch.setattr(video_mod.cv2, "VideoCapture", counting)
    reqs = [ClipRequest("A", 0.5, 1.0, "left"), ClipRequest("B", 0.25, 1.5, "right"),
            ClipRequest("C", 0.0, math.inf, "full"), ClipRequest("D", 1.8, 2.5, "left"),
            ClipRequest("E", 3.0, 3.5, "left")]
    frames, ends = _collect(p, reqs)
    assert len(opened) == 2  # one probe + one decoding pass for all five clips
    assert set(ends) == {"A", "B", "C", "D", "E"}
    # A: samples at 0.5, 0.6, ..., 0.9 s -> frames 10, 12, ..., 18 of the left half
    a = frames["A"]
    assert [f.index for f in a] == list(range(5))
    assert np.allclose([f.time for f in a], [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-6)
    assert all(f.image.shape == (H, W // 2, 3) for f in a)
    red = [float(f.image[..., 0].mean()) for f in a]
    assert np.allclose(red, [5 * i for i in (10, 12, 14, 16, 18)], atol=4)
    assert all(float(f.image[..., 1].mean()) < 5 for f in a)  # not the green right half
    # B: right half, 0.25 .. 1.45 s -> 13 samples
    b = frames["B"]
    assert len(b) == 13 and ends["B"].n_frames == 13 and ends["B"].error is None
    assert all(f.image.shape == (H, W - W // 2, 3) and float(f.image[..., 1].mean()) > 190 for f in b)
    # C: the whole file, full width, 2.0 s at 10/s
    assert len(frames["C"]) == 20 and frames["C"][0].image.shape == (H, W, 3)
    # D: the video ends at 2.0 s, inside the span: the 2 frames that exist are kept, 5 missing
    assert ends["D"].n_frames == 2 and ends["D"].n_missing == 5 and ends["D"].error is None
    assert ends["D"].video_end == pytest.approx(2.0) and ends["A"].video_end is None
    # E: starts after the end of the file: an error, no frames
    assert "E" not in frames and "ends at 2.000 s" in ends["E"].error


def test_sample_rate_above_file_fps_takes_each_frame_once(tmp_path):
    p = _write_index_avi(tmp_path / "d.avi")
    frames, ends = _collect(p, [ClipRequest("A", 0.0, 0.5, "left")], fps=50.0)
    red = [float(f.image[..., 0].mean()) for f in frames["A"]]
    assert len(red) == 10 and np.allclose(red, [5 * i for i in range(10)], atol=4)


def test_unreadable_truncated_and_empty_videos(tmp_path):
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"RIFF\x00\x00not a video at all" * 10)
    _, ends = _collect(junk, [ClipRequest("A", 0, 1, "left"), ClipRequest("B", 0, 1, "right")])
    assert all("unreadable video" in e.error and str(junk) in e.error for e in ends.values())

    empty = tmp_path / "empty.avi"
    w = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    w.release()
    frames, ends = _collect(empty, [ClipRequest("A", 0, 1, "full")])
    assert not frames and ends["A"].error

    full = _write_index_avi(tmp_path / "full.avi")
    _, ends = _collect(full, [ClipRequest("inverted", 1.0, 0.5, "left")])
    assert "invalid video span" in ends["inverted"].error
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    frames, ends = _collect(cut, [ClipRequest("A", 0.0, 1.9, "left")])
    e = ends["A"]
    # a third of the file: either no frame at all (an error) or fewer frames, the rest counted
    if e.error is None:
        assert 0 < e.n_frames < 19 and e.n_frames + e.n_missing == 19
        assert len(frames["A"]) == e.n_frames
    else:
        assert "A" not in frames


def test_parallel_decode_matches_sequential(tmp_path):
    from cmarr.extract.video_decode import decode_parallel

    paths = [_write_index_avi(tmp_path / f"v{k}.avi") for k in range(3)]
    jobs = [(p, [ClipRequest(f"{p.stem}_a", 0.1, 0.7, "left"), ClipRequest(f"{p.stem}_b", 0.5, 1.2, "right")])
            for p in paths]
    seq = [e for p, reqs in jobs for e in iter_clips(p, reqs, 10.0)]
    par = list(decode_parallel(jobs, 10.0, workers=3, maxsize=4))

    def key(e):
        return e.key, getattr(e, "index", -1)

    assert sorted(map(key, seq)) == sorted(map(key, par))
    for stem in ("v0", "v1", "v2"):  # one file's events keep their order
        assert [key(e) for e in par if e.key.startswith(stem)] == [key(e) for e in seq if e.key.startswith(stem)]
    frames_seq = {key(e): e.image for e in seq if isinstance(e, ClipFrame)}
    assert all(np.array_equal(frames_seq[key(e)], e.image) for e in par if isinstance(e, ClipFrame))


def test_prefetch_passes_items_and_errors():
    assert list(prefetch(iter(range(100)), maxsize=4)) == list(range(100))

    def bad():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(prefetch(bad()))


# -- the extractor --------------------------------------------------------------------------

def test_extractor_refuses_without_checkpoint(tmp_path):
    with pytest.raises(ExtractError, match="no Denseface checkpoint") as e:
        VideoExtractor(VideoConfig())
    # the hint names the command-line flags that fix it, and they are real flags of the command
    import typer.main

    from cmarr.extract.cli.extract import app

    flags = {o for p in typer.main.get_command(app).commands["features"].params for o in p.opts}
    for flag in ("--denseface-checkpoint", "--random-denseface"):
        assert flag in str(e.value) and flag in flags
    with pytest.raises(ExtractError, match="not found"):
        VideoExtractor(VideoConfig(checkpoint=str(tmp_path / "missing.pt")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractError, match="bad.pt"):
        VideoExtractor(VideoConfig(checkpoint=str(bad)))
    with pytest.raises(ExtractError, match="--device gpu: not a device"):
        VideoExtractor(VideoConfig(allow_random_weights=True, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ExtractError, match="CUDA is not available"):
            VideoExtractor(VideoConfig(allow_random_weights=True, device="cuda"))


@pytest.fixture(scope="module")
def iemocap_fixture(tmp_path_factory):
    from cmarr.extract.corpora.iemocap import prepare_iemocap
    from cmarr.pipelines.demo.corpus import make_iemocap_tree

    root = tmp_path_factory.mktemp("iemocap")
    desc = make_iemocap_tree(root, sessions=(1,), dialogs_per_session=1, utts_per_dialog=4, quirks=False)
    return root, desc, prepare_iemocap(root).df


def test_fixture_dialog_clips_hold_speaker_half_and_span(iemocap_fixture):
    root, desc, df = iemocap_fixture
    dialog = next(iter(desc["dialogs"].values()))
    Wd, Hd = dialog["frame_size"]
    reqs = [ClipRequest(r.utterance_id, r.video_start, r.video_end, r.video_half) for r in df.itertuples()]
    assert {r.half for r in reqs} == {"left", "right"}
    frames, ends = _collect(root / df.video_path.iloc[0], reqs)
    for r in reqs:
        got = frames[r.key]
        assert len(got) == math.ceil((r.end - r.start) * 10 - 1e-9) == ends[r.key].n_frames
        assert all(f.image.shape == (Hd, Wd // 2, 3) for f in got)
        # each half has its own background: left blue-grey (R < B), right green (G > R, G > B)
        corner = np.stack([f.image[:4, :4].reshape(-1, 3).mean(0) for f in got]).mean(0)
        if r.half == "left":
            assert corner[2] > corner[0] + 30
        else:
            assert corner[1] > corner[0] + 30 and corner[1] > corner[2] + 30
        assert got[-1].time < r.end - r.start


def test_extractor_on_fixture_dialog(iemocap_fixture, tmp_path):
    root, desc, df = iemocap_fixture
    torch.set_num_threads(2)
    ex = VideoExtractor(VideoConfig(allow_random_weights=True, sample_fps=5.0, batch_size=8, device="cpu"))
    prov = ex.provenance()
    assert prov["random_weights"] is True and prov["denseface_checkpoint_sha256"] is None
    assert prov["sample_fps"] == 5.0 and prov["detector"]["min_face_size"] == 20
    # one utterance per half, spans shortened to 0.6 s (3 frames at 5/s): Denseface on a CPU is slow
    rows = pd.concat([df[df.video_half == "left"].iloc[:1], df[df.video_half == "right"].iloc[:1]])
    rows["video_end"] = rows["video_start"] + 0.6
    # one utterance without video, one whose video is blank (no face), one missing file
    blank = tmp_path / "blank.avi"
    w = cv2.VideoWriter(str(blank), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(6):
        w.write(np.full((48, 64, 3), 90, np.uint8))
    w.release()
    extra = pd.DataFrame([
        {"utterance_id": "no_video", "video_path": "", "video_start": 0.0, "video_end": 1.0, "video_half": "full"},
        {"utterance_id": "blank", "video_path": str(blank), "video_start": float("nan"),
         "video_end": float("nan"), "video_half": "full"},
        {"utterance_id": "gone", "video_path": "nowhere.avi", "video_start": 0.0, "video_end": 1.0,
         "video_half": "full"}])
    rows = pd.concat([rows[extra.columns], extra], ignore_index=True)
    results = {r.utterance_id: r for r in ex.extract(rows, root)}
    assert set(results) == set(rows.utterance_id)
    for uid in rows.utterance_id.iloc[:2]:
        r = results[uid]
        assert r.error is None, r.error
        mask, times = r.meta["face_mask"], r.meta["frame_times"]
        assert len(mask) == 3 and r.matrix.shape == (int(mask.sum()), 342) and mask.all()
        assert np.isfinite(r.matrix).all() and np.abs(r.matrix).sum() > 0
        assert len(times) == len(mask) and np.all(np.diff(times) > 0)
        assert r.meta["frames_missing"] == 0
    assert results["no_video"].error and results["no_video"].matrix is None
    assert results["blank"].error == "no face detected in any of 3 sampled frames"
    assert "video not found" in results["gone"].error


def test_msp_no_face_clips_become_missing_video(tmp_path):
    """MSP-IMPROV: a clip whose video shows no face gets no video entry; a clip with a face does."""
    from cmarr.extract.corpora.msp_improv import prepare_msp_improv
    from cmarr.pipelines.demo.corpus import make_msp_improv_tree

    desc = make_msp_improv_tree(tmp_path, sessions=(2,), utts_per_session=4, quirks=True)
    df = prepare_msp_improv(tmp_path, drop_no_face=False).df
    no_face = df[df.utterance_id.isin(desc["no_face_ids"]) & (df.video_path != "")]
    face = df[~df.utterance_id.isin(desc["no_face_ids"]) & (df.video_path != "")].iloc[:1]
    assert len(no_face) >= 1 and len(face) == 1
    rows = pd.concat([no_face, face]).copy()
    rows["video_end"] = 0.6  # 3 frames at 5/s each
    torch.set_num_threads(2)
    ex = VideoExtractor(VideoConfig(allow_random_weights=True, sample_fps=5.0, batch_size=8, device="cpu"))
    results = {r.utterance_id: r for r in ex.extract(rows, tmp_path)}
    for uid in no_face.utterance_id:
        assert results[uid].matrix is None
        assert results[uid].error == "no face detected in any of 3 sampled frames"
    r = results[face.utterance_id.iloc[0]]
    assert r.error is None and r.meta["face_mask"].all() and r.matrix.shape == (3, 342)


def test_samples_stop_before_the_span_end_and_carry_their_own_times(tmp_path):
    """A span whose length is a whole number of sample steps: ``start + k / sample_fps``
    can round just below ``end``, which took one sample too many; and a frame's time is its
    sample's (on the grid from the clip start), not the frame's own start clamped at 0."""
    p = _write_index_avi(tmp_path / "dialog.avi")
    start, end = 0.0247, 0.5247  # as label times are written: 0.0247 + 5 * 0.1 rounds to 0.52469999...
    assert start + 5 * (1 / 10.0) < end
    frames, ends = _collect(p, [ClipRequest("A", start, end, "full")])
    assert len(frames["A"]) == 5 and ends["A"].n_frames == 5 and ends["A"].n_missing == 0
    assert np.allclose([f.time for f in frames["A"]], [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-9)


def _video_duration(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    duration = cap.get(cv2.CAP_PROP_FRAME_COUNT) / cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return duration


def test_a_span_past_the_end_of_its_video_within_the_tolerance_is_stored_beyond_it_is_an_error(
        iemocap_fixture, tmp_path, capsys):
    """A video that ends before the span does: within ``max_missing_seconds`` (default 0.2 s)
    the frames that exist are stored, the shortfall in the meta and in the run's summary;
    beyond it the utterance is an error naming the file, the span and where the video ends,
    never features of part of the utterance."""
    from cmarr.extract.corpora.manifest import write_manifest
    from cmarr.extract.features import run_features
    from cmarr.extract.store import FeatureStore

    root, desc, df = iemocap_fixture
    video = root / df.video_path.iloc[0]
    duration = _video_duration(video)
    rows = df[df.video_path == df.video_path.iloc[0]].iloc[:2].copy()
    within, beyond = rows.utterance_id
    # samples at 5/s: within: d-0.3, d-0.1, d+0.1 (1 past the end, the video 0.15 s short);
    # beyond: d-0.3 .. d+0.3 (2 past the end, the video 0.5 s short)
    rows["video_start"] = duration - 0.3
    rows["video_end"] = [duration + 0.15, duration + 0.5]
    torch.set_num_threads(2)
    run = run_features("iemocap", root, write_manifest(rows, tmp_path / "m.csv"), tmp_path / "f.h5",
                       modalities=("video",), log_every=0, allow_missing=True,
                       video=VideoConfig(allow_random_weights=True, sample_fps=5.0, batch_size=8, device="cpu"))
    with FeatureStore(run.out) as store:
        assert store.ids("video") == {within}
        meta = store.meta(within, "video")
        assert meta["frames_missing"] == 1 and len(meta["face_mask"]) == 2
        assert store.provenance["video"]["max_missing_seconds"] == 0.2
    assert run.short_videos == {within: 1}
    assert "1 utterances' spans run past the end of their video" in capsys.readouterr().out
    err = run.errors.set_index("utterance_id").loc[beyond]
    assert err.modality == "video"
    reason = err.reason
    assert reason.startswith(f"short video: {video}: ends at {duration:.3f} s, 0.500 s before the end of the span "
                             f"[{duration - 0.3:.3f}, {duration + 0.5:.3f}] s"), reason
    assert "max_missing_seconds 0.2 s" in reason and "2 of 4 sampled frames" in reason

    # a wider tolerance keeps the 0.5 s shortfall, the frames that exist, and records itself
    ex = VideoExtractor(VideoConfig(allow_random_weights=True, sample_fps=5.0, batch_size=8, device="cpu",
                                    max_missing_seconds=0.5))
    assert ex.provenance()["max_missing_seconds"] == 0.5
    (r,) = ex.extract(rows[rows.utterance_id == beyond], root)
    assert r.error is None and r.meta["frames_missing"] == 2 and len(r.meta["face_mask"]) == 2
    with pytest.raises(ExtractError, match="max_missing_seconds -1"):
        VideoExtractor(VideoConfig(allow_random_weights=True, device="cpu", max_missing_seconds=-1))


def test_provenance_records_the_feature_width():
    ex = VideoExtractor(VideoConfig(allow_random_weights=True, sample_fps=5.0, batch_size=8, device="cpu"))
    assert ex.provenance()["dim"] == ex.model.out_dim == 342


def test_a_corpus_whose_videos_all_fail_gives_a_store_of_the_video_width(tmp_path):
    """Every utterance without video features (its avi cannot be decoded; accepted with
    allow_missing): the store's video block still has the Denseface width, and validate
    finds nothing wrong with its provenance. (A corpus copy without any avi file is refused
    before models load: tests/test_extract_faults.py.)"""
    from cmarr.extract.corpora.iemocap import prepare_iemocap
    from cmarr.extract.corpora.manifest import write_manifest
    from cmarr.extract.features import run_features
    from cmarr.extract.store import FeatureStore, validate_store
    from cmarr.pipelines.demo.corpus import make_iemocap_tree

    root = tmp_path / "IEMOCAP_full_release"
    make_iemocap_tree(root, sessions=(1,), dialogs_per_session=1, utts_per_dialog=2, quirks=False)
    manifest = write_manifest(prepare_iemocap(root).df, tmp_path / "m.csv")
    for avi in root.rglob("*.avi"):
        avi.write_bytes(b"not a video")
    run = run_features("iemocap", root, manifest, tmp_path / "f.h5", modalities=("video",), log_every=0,
                       allow_missing=True, video=VideoConfig(allow_random_weights=True, device="cpu"))
    assert len(run.errors) == 2 and set(run.errors.modality) == {"video"}
    with FeatureStore(run.out) as store:
        assert store.dims["video"] == 342 and store.provenance["video"]["dim"] == 342
        assert not store.ids("video")
    problems, _ = validate_store(run.out)
    assert not [p for p in problems if "dim" in p or "width" in p], problems


def test_provenance_records_the_precision_that_ran():
    """float16 runs on CUDA only: on the CPU a request for it computes, and records, float32."""
    from cmarr.extract.video import VideoConfig, VideoExtractor

    ex = VideoExtractor(VideoConfig(allow_random_weights=True, device="cpu", half=True))
    p = ex.provenance()
    assert ex.dtype == torch.float32 and p["half"] is False and p["detector"]["half"] is False
