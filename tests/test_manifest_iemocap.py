"""IEMOCAP manifest: the canonical list, the reader on fixture trees with every quirk of the
release, bad input, and the ``manifest`` command."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import soundfile
from typer.testing import CliRunner

from cmarr.extract.cli.extract import app
from cmarr.extract.corpora import iemocap
from cmarr.extract.corpora.iemocap import prepare_iemocap
from cmarr.extract.corpora.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    compare_with_canonical,
    load_canonical_iemocap,
    read_manifest,
)
from cmarr.pipelines.demo.corpus import make_iemocap_tree
from cmarr.pipelines.demo.media import face_photo

runner = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two sessions, three dialogs each (impro, script, script ``b``), with video."""
    root = tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release"
    info = make_iemocap_tree(root, sessions=(1, 2), dialogs_per_session=3, utts_per_dialog=4,
                             seed=1, frame_size=(160, 120), fps=10)
    return root, info


@pytest.fixture(scope="module")
def result(tree):
    return prepare_iemocap(tree[0])


@pytest.fixture
def small(tmp_path):
    """A tree without video (fast) that a test may damage."""
    root = tmp_path / "IEMOCAP_full_release"
    info = make_iemocap_tree(root, sessions=(1, 2), dialogs_per_session=2, utts_per_dialog=4,
                             seed=2, video=False)
    return root, info


def invoke(*args):
    return runner.invoke(app, ["manifest", *map(str, args)], env=ENV)


# ---------------------------------------------------------------------------- canonical


def test_canonical_list_has_the_papers_counts():
    canon = load_canonical_iemocap()
    assert len(canon) == 5531
    assert canon["utterance_id"].is_unique
    assert canon["label"].value_counts().to_dict() == {"ang": 1103, "hap": 1636, "neu": 1708, "sad": 1084}
    assert canon["session"].value_counts().sort_index().to_dict() == {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}
    assert (canon["fold"] == canon["session"]).all()
    # every id parses and its session is the id's 5th character
    for uid, s in zip(canon["utterance_id"], canon["session"]):
        m = iemocap.UTT_RE.match(uid)
        assert m and int(m.group(2)) == s, uid
    # the list's columns are the documented ones
    assert list(pd.read_csv(Path(__file__).resolve().parents[1] / "data_manifests" /
                            "iemocap_4class.csv", nrows=1).columns) == ["utterance_id", "session", "label", "fold"]


# ---------------------------------------------------------------------------- reader


def test_manifest_is_what_the_tree_holds(tree, result):
    root, info = tree
    df = result.df
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert list(df["utterance_id"]) == info["ids"]
    assert dict(zip(df["utterance_id"], df["label"])) == info["labels"]
    assert df["label"].value_counts().to_dict() == info["counts"]["per_label"]
    assert df["session"].value_counts().to_dict() == info["counts"]["per_session"]
    assert result.sessions == (1, 2)
    assert (df["corpus"] == "iemocap").all() and (df["fold"] == df["session"]).all()
    by_id = {u["utterance_id"]: u for u in info["utterances"]}
    for row in df.itertuples():
        u = by_id[row.utterance_id]
        assert row.speaker == u["speaker"] == f"Ses0{row.session}{row.gender}"
        assert row.video_half == u["video_half"]
        assert row.consensus == u["consensus"]
        assert (row.start, row.end) == (u["start"], u["end"]) == (row.video_start, row.video_end)
        assert row.transcript == u["transcript"]
        assert row.video_path == info["dialogs"][u["dialog"]]["avi"]
        # the utterance wav: 16 kHz mono int16, duration = end - start of the label line
        i = soundfile.info(str(root / row.wav_path))
        assert (i.samplerate, i.channels, i.subtype) == (16000, 1, "PCM_16")
        assert abs(i.duration - (row.end - row.start)) < 1e-3


def test_exc_is_merged_into_hap(tree, result):
    _, info = tree
    exc = result.df[result.df["consensus"] == "exc"]
    assert sorted(exc["utterance_id"]) == sorted(info["quirks"]["exc_ids"]) and len(exc) > 0
    assert (exc["label"] == "hap").all()


def test_codes_outside_the_4_class_set_are_dropped_and_counted(tree, result):
    _, info = tree
    expected = {c: n for c, n in info["counts"]["consensus"].items() if c not in iemocap.IEMOCAP_LABEL_MAP}
    assert set(expected) >= {"xxx", "fru"}
    got = pd.Series([d.detail for d in result.dropped if d.reason == iemocap.R_NOT_4CLASS]).value_counts()
    assert got.to_dict() == expected
    assert result.drop_counts() == {iemocap.R_NOT_4CLASS: sum(expected.values())}


def test_quirks_are_present_and_passed_over(tree, result):
    root, info = tree
    q = info["quirks"]
    # junk ._ files: binary, present beside label files, transcripts, wavs and avis
    assert {Path(p).parent.name for p in q["junk_files"]} >= {"EmoEvaluation", "transcriptions", "DivX"}
    for p in q["junk_files"]:
        with pytest.raises(UnicodeDecodeError):
            (root / p).read_bytes().decode("utf-8")
    # rater subfolders hold files with utterance ids: they do not become labels
    assert {Path(p).parent.name for p in q["rater_folders"]} == {"Categorical", "Attribute", "Self-evaluation"}
    # self-evaluation, multi-label votes and a missing dom are in the label files, and parse
    label_text = "".join(p.read_text() for p in root.glob("Session*/dialog/EmoEvaluation/*.txt")
                         if not p.name.startswith("._"))
    assert re.search(r"^C-E1:\tFrustration; \w+", label_text, re.M)
    assert re.search(r"^C-[FM]1:", label_text, re.M)
    assert re.search(r"^A-E3:\tval 3; act 2;\t\(\)$", label_text, re.M)
    assert q["multi_label_ids"] and q["missing_dom_ids"] and q["self_evaluation_ids"]
    assert not [d for d in result.dropped if d.reason == iemocap.R_UNPARSEABLE]
    # script and b dialog names
    assert q["script_dialogs"] and q["b_dialogs"]
    assert any(u.startswith(q["b_dialogs"][0] + "_") for u in result.df["utterance_id"])
    # transcript lines that are not utterances are passed over, and counted in a note
    n = q["non_utterance_transcript_lines"]
    assert n > 0 and any(f"{n} transcription lines are not utterances" in x for x in result.notes)
    # [LAUGHTER] markers stay in the text
    laugh = result.df.set_index("utterance_id").loc[q["laughter_ids"][0], "transcript"]
    assert "[LAUGHTER]" in laugh
    # an utterance without word alignment is no problem
    assert q["no_wdseg_ids"][0] in set(result.df["utterance_id"])


def test_dialog_media_stereo_wav_and_halves_with_different_faces(tree):
    root, info = tree
    name, d = next((n, d) for n, d in info["dialogs"].items() if d["marker"] == "F")
    i = soundfile.info(str(root / d["wav"]))
    assert i.channels == 2 and i.samplerate == 16000
    cap = cv2.VideoCapture(str(root / d["avi"]))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (120, 160, 3)
    left, right = frame[:, :80], frame[:, 80:]

    def score(half, actor):
        t = face_photo(actor)
        h = int(0.55 * half.shape[0])
        t = cv2.resize(t, (int(h * t.shape[1] / t.shape[0]), h), interpolation=cv2.INTER_AREA)
        return cv2.matchTemplate(half, t, cv2.TM_CCOEFF_NORMED).max()

    # marker wearer F (astronaut) on the left, the other actor (grace hopper) on the right
    assert score(left, "F") > score(left, "M") and score(right, "M") > score(right, "F")
    assert np.abs(left.astype(int) - right.astype(int)).mean() > 20


def test_emotion_signal_reaches_audio_and_text(tree, result):
    root, _ = tree
    rms = {}
    for row in result.df.itertuples():
        x, _ = soundfile.read(str(root / row.wav_path))
        rms.setdefault(row.label, []).append(np.sqrt(np.mean(x ** 2)))
    assert np.mean(rms["ang"]) > np.mean(rms["neu"]) > np.mean(rms["sad"])
    from cmarr.pipelines.demo.media import VOCABULARY

    for row in result.df.itertuples():
        words = set(re.findall(r"[a-z]+", row.transcript.lower()))
        assert words & set(VOCABULARY[row.label]), row.transcript


def test_compare_with_canonical_reports_each_difference(result):
    df = result.df
    canon = df[["utterance_id", "session", "label", "fold"]].copy()
    assert compare_with_canonical(df, canon).matches
    gone = canon["utterance_id"].iloc[0]
    canon = canon.iloc[1:].copy()
    canon.loc[canon.index[0], "label"] = "sad" if canon["label"].iloc[0] != "sad" else "ang"
    canon = pd.concat([canon, pd.DataFrame([{"utterance_id": "Ses01F_impro09_F000", "session": 1,
                                             "label": "neu", "fold": 1},
                                            {"utterance_id": "Ses05F_impro09_F000", "session": 5,
                                             "label": "neu", "fold": 5}])])
    c = compare_with_canonical(df, canon, sessions=(1, 2))
    assert c.missing == ["Ses01F_impro09_F000"]  # session 5 is outside the compared sessions
    assert c.extra == [gone]
    assert [d[0] for d in c.label_disagreements] == [canon["utterance_id"].iloc[0]]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", ["empty", "file", "other"])
def test_root_that_is_not_the_corpus(tmp_path, make):
    root = tmp_path / "x"
    if make == "empty":
        root.mkdir()
    elif make == "file":
        root.write_text("not a folder")
    else:
        (root / "Audio").mkdir(parents=True)
        (root / "Evalution.txt").write_text("")
    with pytest.raises(ManifestError) as e:
        prepare_iemocap(root)
    msg = str(e.value)
    assert msg.startswith(str(root)) and "Session1..Session5" in msg and "dialog/EmoEvaluation" in msg


def test_root_above_the_release_folder_is_accepted(small):
    root, info = small
    r = prepare_iemocap(root.parent)
    assert list(r.df["utterance_id"]) == info["ids"]
    assert any("IEMOCAP_full_release" in n for n in r.notes)
    # media paths are relative to the folder the user named (the extractors get the same --root)
    wavs = [p for p in r.df["wav_path"] if p]
    assert wavs and all((root.parent / p).is_file() for p in wavs)
    assert all((root.parent / p).is_file() for p in r.df["video_path"] if p)


def test_unparseable_label_lines_are_counted_with_file_and_line(small):
    root, info = small
    f = next((root / "Session1/dialog/EmoEvaluation").glob("Ses*.txt"))
    lines = f.read_text().splitlines()
    lines.insert(2, "[6.2901 - ]\tSes01F_impro01_F099\tneu\t[2.5, 2.5, 2.5]")  # no end time
    lines.insert(5, "some stray text")
    f.write_text("\n".join(lines) + "\n")
    r = prepare_iemocap(root)
    bad = [d for d in r.dropped if d.reason == iemocap.R_UNPARSEABLE]
    assert [d.where for d in bad] == [f"{f}:3", f"{f}:6"]
    assert bad[0].utterance_id == "Ses01F_impro01_F099" and bad[1].detail == "some stray text"
    assert list(r.df["utterance_id"]) == info["ids"]  # the other lines are still read


def test_partly_absent_media_keep_the_utterance_all_absent_drops_it(small):
    root, info = small
    df0 = prepare_iemocap(root).df.set_index("utterance_id")
    a, b = df0.index[0], df0.index[1]
    (root / df0.loc[a, "wav_path"]).unlink()                      # a: transcript left (no video in this tree)
    (root / df0.loc[b, "wav_path"]).unlink()                      # b: wav and transcript gone
    dialog = b.rsplit("_", 1)[0]
    t = root / f"Session{df0.loc[b, 'session']}/dialog/transcriptions/{dialog}.txt"
    t.write_text("".join(x + "\n" for x in t.read_text().splitlines() if not x.startswith(b + " ")))
    r = prepare_iemocap(root)
    df = r.df.set_index("utterance_id")
    assert df.loc[a, "wav_path"] == "" and df.loc[a, "transcript"] == df0.loc[a, "transcript"]
    assert b not in df.index
    no_media = [(d.utterance_id, d.reason) for d in r.dropped if d.reason == iemocap.R_NO_MEDIA]
    assert no_media == [(b, iemocap.R_NO_MEDIA)]
    assert any("have no wav" in n for n in r.notes)
    assert all(df["video_path"] == "")


def test_unreadable_label_and_transcription_files(small):
    root, _ = small
    f = next((root / "Session2/dialog/EmoEvaluation").glob("Ses*.txt"))
    f.write_bytes(b"% header\n\n[1.0 - 2.0]\tSes02F_impro01_F000\tneu\t\xff\xfe\n")
    with pytest.raises(ManifestError, match=re.escape(str(f)) + ".*not UTF-8"):
        prepare_iemocap(root)
    f.unlink()
    f.mkdir()  # a folder named like a label file is not a label file, and says nothing
    t = next((root / "Session1/dialog/transcriptions").glob("Ses*.txt"))
    t.write_bytes(b"\x80\x81 binary")
    with pytest.raises(ManifestError, match=re.escape(str(t)) + ".*transcription"):
        prepare_iemocap(root)


def test_partial_corpus_says_what_it_covers(tmp_path):
    root = tmp_path / "iem"
    info = make_iemocap_tree(root, sessions=(1,), dialogs_per_session=1, utts_per_dialog=4, seed=3, video=False)
    r = prepare_iemocap(root)
    assert r.sessions == (1,) and list(r.df["utterance_id"]) == info["ids"]
    assert r.notes[0].startswith("partial corpus: covers Session1 only")
    c = compare_with_canonical(r.df, load_canonical_iemocap(), r.sessions)
    assert c.sessions == (1,) and c.n_canonical == 1085


# ---------------------------------------------------------------------------- command


def test_command_writes_the_manifest_and_prints_the_summary(tree, result, tmp_path):
    root, info = tree
    out = tmp_path / "sub" / "iemocap.csv"
    r = invoke("iemocap", "--root", root, "--out", out, "--dropped-out", tmp_path / "dropped.csv")
    assert r.exit_code == 0, r.output
    df = read_manifest(out)
    pd.testing.assert_frame_equal(df, result.df)
    assert f"iemocap: {info['counts']['total']} utterances" in r.output
    for label, n in info["counts"]["per_label"].items():
        row = re.search(rf"│ {label}\s+│\s+(\d+) │\s+(\d+) │\s+(\d+) │", r.output)
        assert row and int(row.group(3)) == n
    n_drop = len(result.dropped)
    assert f"dropped: {n_drop} items" in r.output and iemocap.R_NOT_4CLASS in r.output
    assert "partial corpus: covers Session1, Session2 only" in r.output
    assert "differs from the canonical list" in r.output and "missing ids" in r.output
    assert len(pd.read_csv(tmp_path / "dropped.csv")) == n_drop
    assert not list(out.parent.glob(".*tmp"))


def test_command_against_a_matching_canonical_list_and_strict(tree, result, tmp_path):
    root, _ = tree
    canon = tmp_path / "canon.csv"
    result.df[["utterance_id", "session", "label", "fold"]].to_csv(canon, index=False)
    r = invoke("iemocap", "--root", root, "--out", tmp_path / "a.csv", "--canonical", canon, "--strict")
    assert r.exit_code == 0 and "matches the canonical list" in r.output
    bad = result.df[["utterance_id", "session", "label", "fold"]].copy()
    bad.loc[0, "label"] = "sad" if bad.loc[0, "label"] != "sad" else "neu"
    bad.to_csv(canon, index=False)
    r = invoke("iemocap", "--root", root, "--out", tmp_path / "b.csv", "--canonical", canon, "--strict")
    assert r.exit_code == 1 and "label disagreements (id, label here, canonical label): 1" in r.output
    assert (tmp_path / "b.csv").exists()


def test_written_manifests_are_readable_by_others(result, tmp_path):
    """Manifests are shared with a team: the file gets the mode open() would give it."""
    import os
    import stat

    from cmarr.extract.corpora.manifest import write_manifest

    old = os.umask(0o022)
    try:
        path = write_manifest(result.df, tmp_path / "m.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("blank", ["", "   "])
def test_read_manifest_refuses_an_empty_utterance_id(result, tmp_path, blank):
    from cmarr.extract.corpora.manifest import write_manifest

    path = write_manifest(result.df, tmp_path / "m.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[2, "utterance_id"] = blank
    df.to_csv(path, index=False)
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 3 has an empty utterance_id"), msg
    assert df.loc[2, "wav_path"] in msg  # the row is recognisable by its media
    # nor can such a manifest be written
    with pytest.raises(ManifestError, match="row 3 has an empty utterance_id"):
        write_manifest(df.assign(session=df["session"].astype(int), fold=df["fold"].astype(int),
                                 start=df["start"].astype(float), end=df["end"].astype(float)),
                       tmp_path / "again.csv")
    assert not (tmp_path / "again.csv").exists()


def test_command_bad_input_exits_nonzero_without_traceback(small, tmp_path):
    root, _ = small
    out = tmp_path / "m.csv"
    out.write_text("previous content")
    r = invoke("iemocap", "--root", tmp_path / "nowhere", "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "not a folder" in r.output and "Session1..Session5" in r.output
    assert out.read_text() == "previous content"  # nothing half-written
    r = invoke("iemocap", "--root", root, "--out", out, "--keep-no-face")
    assert r.exit_code == 2 and "msp-improv only" in r.output
    f = next((root / "Session1/dialog/EmoEvaluation").glob("Ses*.txt"))
    f.write_text(f.read_text() + "garbage line\n")
    r = invoke("iemocap", "--root", root, "--out", out)
    assert r.exit_code == 0 and f"unparseable: {f}:" in r.output and "garbage line" in r.output
    f.write_bytes(b"\xff\xff")
    r = invoke("iemocap", "--root", root, "--out", out)
    assert r.exit_code == 2 and str(f) in r.output and "not UTF-8" in r.output and "Traceback" not in r.output


def test_command_with_nothing_to_keep(tmp_path):
    root = tmp_path / "iem"
    make_iemocap_tree(root, sessions=(3,), dialogs_per_session=1, utts_per_dialog=1, seed=4, video=False)
    emo = next((root / "Session3/dialog/EmoEvaluation").glob("Ses*.txt"))
    emo.write_text(re.sub(r"\t(ang|hap|exc|neu|sad)\t", "\txxx\t", emo.read_text()))
    r = invoke("iemocap", "--root", root, "--out", tmp_path / "o.csv")
    assert r.exit_code == 2 and "no utterance of the 4-class set" in r.output
    assert not (tmp_path / "o.csv").exists()
