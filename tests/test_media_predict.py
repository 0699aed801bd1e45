"""cm-arr-predict --media and cmarr.Predictor: raw clips (video+audio, audio only, video
only, with a transcript), the reconstructed-modality report, windows, the equality with
``--features`` on a store extracted from the same clip, and every bad input.

The checkpoint is trained (one fold, one epoch, tiny model) on a store that the real
extractors made from a small corpus in IEMOCAP's layout with local models: a random-weight
wav2vec2 loaded as a hub checkpoint is, the real MiniLM, the real MTCNN and seeded random
Denseface weights.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tolerance import TINY_CMARR_DEPTH, assert_float32_close, reorder_bound
from typer.testing import CliRunner

from cmarr.extract.base import LABELS
from cmarr.pipelines.cli.predict import app
from cmarr.pipelines.demo.media import clip_frames, synth_voice, write_clip_mp4, write_wav
from cmarr.pipelines.media import MediaError, Predictor, windows

torch.set_num_threads(1)
runner = CliRunner()
FPS = 10.0
SIZE = (128, 96)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    """A cm-arr-train checkpoint whose store the real extractors made, and the models."""
    from cmarr.extract.corpora.iemocap import prepare_iemocap
    from cmarr.extract.corpora.manifest import write_manifest
    from cmarr.extract.features import run_features
    from cmarr.extract.speech import SpeechConfig
    from cmarr.extract.text import TextConfig
    from cmarr.extract.video import VideoConfig
    from cmarr.pipelines.demo.corpus import make_iemocap_tree
    from cmarr.pipelines.demo.models import build_random_wav2vec2, minilm_path
    from cmarr.pipelines.demo.run import DemoConfig
    from cmarr.pipelines.train import run_training

    root = tmp_path_factory.mktemp("media")
    corpus = root / "IEMOCAP_full_release"
    make_iemocap_tree(corpus, sessions=(1, 2), dialogs_per_session=1, utts_per_dialog=8, seed=0, quirks=False,
                      fps=FPS, frame_size=(160, 96), duration_range=(0.6, 1.0))
    manifest = root / "manifest.csv"
    write_manifest(prepare_iemocap(corpus).df, manifest)
    w2v = build_random_wav2vec2(root / "w2v", DemoConfig().wav2vec2, seed=0)["path"]
    minilm = minilm_path()
    store = root / "feats.h5"
    run_features("iemocap", corpus, manifest, store, device="cpu", allow_missing=True,
                 speech=SpeechConfig(model=w2v), text=TextConfig(model=minilm),
                 video=VideoConfig(allow_random_weights=True, sample_fps=2.0), log_every=1e9)
    cfg = tiny_config(root / "tiny.yaml", epochs=1, batch_size=4)
    cfg.write_text(cfg.read_text().replace("val_fraction: 0.2", "val_fraction: 0.5"))  # 1 of 2 per class
    run_training(store, cfg, out_dir=root / "run", folds=[1], device="cpu", seed=0, log=None)
    return {"root": root, "ckpt": root / "run" / "fold1" / "best.pt", "w2v": w2v, "minilm": minilm}


@pytest.fixture(scope="module")
def clips(trained):
    """Clips as users bring them: an mp4 with a face and an AAC track, a wav, a silent video."""
    d = trained["root"] / "clips"
    rng = np.random.default_rng(3)
    voice = synth_voice("hap", 1.2, rng, gender="F")
    frames = clip_frames(1.2, "F", "hap", FPS, SIZE)
    out = {"av": write_clip_mp4(d / "talk.mp4", frames, FPS, voice),
           "silent": write_clip_mp4(d / "silent.mp4", frames, FPS, None),
           "noface": write_clip_mp4(d / "noface.mp4", clip_frames(1.2, None, "hap", FPS, SIZE), FPS, voice),
           "long": write_clip_mp4(d / "long.mp4", clip_frames(5.0, "M", "sad", FPS, SIZE), FPS,
                                  synth_voice("sad", 5.0, rng))}
    write_wav(d / "talk.wav", voice)
    out["wav"] = d / "talk.wav"
    (d / "notmedia.mp4").write_text("this is not a video\n")
    out["notmedia"] = d / "notmedia.mp4"
    write_wav(d / "tiny.wav", voice[:200])
    out["tiny"] = d / "tiny.wav"
    return out


@pytest.fixture(scope="module")
def predictor(trained):
    return Predictor.from_checkpoints([trained["ckpt"]], device="cpu", window=2.0)


def _sums_to_one(probs):
    assert set(probs) == {"ang", "hap", "neu", "sad"}
    assert abs(sum(probs.values()) - 1.0) < 1e-5


def test_video_with_audio_uses_speech_and_face_and_reconstructs_text(predictor, clips):
    r = predictor.predict_file(clips["av"])
    assert r.used == ["speech", "video"]
    assert r.missing == ["text"] and r.reconstructed == ["text"]
    assert r.why["text"] == "no transcript given"
    _sums_to_one(r.probs)
    assert r.label == max(r.probs, key=r.probs.get)
    assert 0 < r.face_frames <= r.sampled_frames == 3  # 1.2 s sampled as the training store did: 0, 0.5, 1 s
    assert r.duration == pytest.approx(1.2, abs=0.01)
    assert not r.windows


def test_audio_only_video_only_and_transcript(predictor, clips):
    audio = predictor.predict_file(audio=clips["wav"])
    assert audio.used == ["speech"] and audio.reconstructed == ["text", "video"]
    assert audio.face_frames == 0
    silent = predictor.predict_file(clips["silent"], no_audio=True)
    assert silent.used == ["video"] and silent.reconstructed == ["speech", "text"]
    full = predictor.predict_file(clips["av"], transcript="this is wonderful, I love it")
    assert full.used == ["speech", "text", "video"] and full.reconstructed == []
    # what each modality adds changes the output: the three predictions differ
    for a, b in ((audio, full), (silent, full)):
        assert max(abs(a.probs[c] - b.probs[c]) for c in a.probs) > 1e-6


def test_no_face_found_is_a_missing_modality(predictor, clips):
    r = predictor.predict_file(clips["noface"])
    assert r.used == ["speech"] and "video" in r.reconstructed
    assert r.why["video"].startswith("no face detected") and (r.face_frames, r.sampled_frames) == (0, 3)


def test_windows_split_long_clips_and_average(predictor, clips):
    assert windows(0.0, 5.0, 2.0) == [(0.0, 5 / 3), (5 / 3, 10 / 3), (10 / 3, 5.0)]
    assert windows(0.0, 1.5, 2.0) == [(0.0, 1.5)] and windows(0.0, 9.0, 0.0) == [(0.0, 9.0)]
    r = predictor.predict_file(clips["long"], transcript="I miss her so much")
    assert len(r.windows) == 3 and r.to_dict()["windowed"] is True
    mean = {c: np.mean([w.probs[c] for w in r.windows]) for c in r.probs}
    for c in r.probs:
        assert r.probs[c] == pytest.approx(mean[c], abs=1e-7)
    assert [round(w.start, 3) for w in r.windows] == [0.0, 1.667, 3.333]
    assert any("whole of it" in n for n in r.notes)
    # a window is the same clip cut: predicting its span alone gives its probabilities
    w1 = r.windows[1]
    alone = predictor.predict_file(clips["long"], transcript="I miss her so much", start=w1.start, end=w1.end)
    for c in alone.probs:
        assert alone.probs[c] == pytest.approx(w1.probs[c], abs=1e-5)


def test_predict_files_batches_many_clips_as_one_by_one(predictor, clips):
    """Batched extraction equals one-by-one up to float rounding; the store's float16 rounding
    of the features can then turn a last-bit difference into one float16 step, so the
    probabilities are compared at float16 precision through the model's depth, a bound the
    differences between these clips exceed many times."""
    many = predictor.predict_files([clips["av"], {"audio": clips["wav"]}, {"media": clips["silent"],
                                                                          "no_audio": True}])
    one = [predictor.predict_file(clips["av"]), predictor.predict_file(audio=clips["wav"]),
           predictor.predict_file(clips["silent"], no_audio=True)]
    probs = [np.array([r.probs[c] for c in LABELS]) for r in many + one]
    tol = reorder_bound(max(float(np.abs(p).max()) for p in probs), TINY_CMARR_DEPTH, eps=2.0 ** -11)
    for k, (a, b) in enumerate(zip(many, one)):
        assert a.used == b.used
        assert np.abs(probs[k] - probs[3 + k]).max() <= tol
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(probs[i] - probs[j]).max() > 3 * tol, (i, j)


def test_bad_input_is_named(predictor, clips, trained, tmp_path):
    with pytest.raises(MediaError, match="not a media file"):
        predictor.predict_file(clips["notmedia"])
    with pytest.raises(MediaError, match="no audio track.*--audio"):
        predictor.predict_file(clips["silent"])
    with pytest.raises(MediaError, match="speech model needs at least"):
        predictor.predict_file(audio=clips["tiny"])
    empty = write_clip_mp4(tmp_path / "empty.mp4", clip_frames(1.0, None, "neu", FPS, SIZE), FPS)
    with pytest.raises(MediaError, match="nothing usable"):
        predictor.predict_file(empty, no_audio=True)
    with pytest.raises(MediaError, match="no such file"):
        predictor.predict_file(tmp_path / "absent.mp4")


def test_a_model_that_is_not_at_hand_is_named_and_a_copy_is_hash_checked(trained, clips, tmp_path):
    moved = tmp_path / "w2v-moved"
    shutil.copytree(trained["w2v"], moved)
    hidden = trained["w2v"] + ".hidden"
    shutil.move(trained["w2v"], hidden)
    try:
        p = Predictor.from_checkpoints([trained["ckpt"]], device="cpu")
        with pytest.raises(MediaError, match="speech features were made with .*--speech-model"):
            p.predict_file(clips["av"])
        # a copy elsewhere: accepted, its weights hash as the checkpoint's
        ok = Predictor.from_checkpoints([trained["ckpt"]], device="cpu", speech_model=str(moved))
        assert ok.predict_file(clips["av"]).used == ["speech", "video"]
        # a copy with other weights: refused, naming the hash
        from cmarr.pipelines.demo.models import build_random_wav2vec2
        from cmarr.pipelines.demo.run import DemoConfig

        other = build_random_wav2vec2(tmp_path / "w2v-other", DemoConfig().wav2vec2, seed=1)["path"]
        bad = Predictor.from_checkpoints([trained["ckpt"]], device="cpu", speech_model=other)
        with pytest.raises(MediaError, match="weights_sha256"):
            bad.predict_file(clips["av"])
    finally:
        shutil.move(hidden, trained["w2v"])


def test_cli_writes_json_and_exits_2_on_bad_input(trained, clips, tmp_path):
    out = tmp_path / "pred.json"
    res = runner.invoke(app, ["--checkpoint", str(trained["ckpt"]), "--media", str(clips["av"]), "--device", "cpu",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["label"] in doc["probs"] and doc["reconstructed"] == ["text"] and doc["used"] == ["speech", "video"]
    assert list(doc["per_checkpoint"]) == [str(trained["ckpt"])]
    assert doc["duration"] == pytest.approx(1.2, abs=0.01) and doc["face_frames"] > 0
    assert "reconstructed" in res.output and "text" in res.output
    res = runner.invoke(app, ["--checkpoint", str(trained["ckpt"]), "--media", str(clips["notmedia"]),
                              "--device", "cpu"])
    assert res.exit_code == 2 and "not a media file" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["--checkpoint", str(trained["ckpt"]), "--media", str(clips["silent"]),
                              "--device", "cpu"])
    assert res.exit_code == 2 and "no audio track" in res.output
    res = runner.invoke(app, ["--checkpoint", str(trained["ckpt"]), "--media", str(clips["av"]),
                              "--features", str(trained["root"] / "feats.h5")])
    assert res.exit_code == 2 and "give either --features FEATS.h5 or --media" in res.output


def test_media_equals_features_of_a_store_extracted_from_the_same_clip(trained, clips, tmp_path):
    """The clip as a media folder (with its transcript in a same-named .txt) through
    ``cm-arr-extract manifest folder`` / ``features folder`` with the checkpoint's models, then
    ``cm-arr-predict --features``; and the raw clip through ``cm-arr-predict --media``: the same
    probabilities up to float32 reordering (the features are the same float16 values)."""
    import pandas as pd

    from cmarr.extract.cli.extract import app as extract_app

    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(clips["av"], folder / "talk.mp4")
    text = "I love it, this is wonderful"
    (folder / "talk.txt").write_text(text + "\n")
    ck, man, store = trained["ckpt"], tmp_path / "m.csv", tmp_path / "talk.h5"
    res = runner.invoke(extract_app, ["manifest", "folder", "--root", str(folder), "--out", str(man)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(extract_app, ["features", "folder", "--root", str(folder), "--manifest", str(man), "--out",
                                      str(store), "--speech-model", trained["w2v"], "--text-model", trained["minilm"],
                                      "--random-denseface", "--sample-fps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    csv = tmp_path / "p.csv"
    res = runner.invoke(app, ["--checkpoint", str(ck), "--features", str(store), "--out", str(csv), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(csv, keep_default_na=False).iloc[0]
    assert row["available"] == "s,t,v"
    out = tmp_path / "p.json"
    res = runner.invoke(app, ["--checkpoint", str(ck), "--media", str(clips["av"]), "--transcript-file",
                              str(folder / "talk.txt"), "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["used"] == ["speech", "text", "video"] and doc["label"] == row["prediction"]
    media = np.array([doc["probs"][c] for c in LABELS], dtype=np.float32)
    feats = np.array([row[f"p_{c}"] for c in LABELS], dtype=np.float32)
    assert_float32_close(media, feats, depth=TINY_CMARR_DEPTH)
    # and not by accident: without the transcript the probabilities move far beyond that bound
    other = Predictor.from_checkpoints([ck], device="cpu").predict_file(clips["av"]).probs
    assert np.abs(np.array([other[c] for c in LABELS]) - feats).max() > 1e3 * reorder_bound(1.0, TINY_CMARR_DEPTH)
