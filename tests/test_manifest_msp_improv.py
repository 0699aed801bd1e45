"""MSP-IMPROV manifest: the no-face list, the reader on fixture trees with every quirk of the
release, bad input, and the ``manifest`` command."""
from __future__ import annotations

import math
import re
import shutil

import pandas as pd
import pytest
import soundfile
from typer.testing import CliRunner

from cmarr.extract.cli.extract import app
from cmarr.extract.corpora import msp_improv as msp
from cmarr.extract.corpora.manifest import MANIFEST_COLUMNS, ManifestError, load_msp_no_face, read_manifest
from cmarr.extract.corpora.msp_improv import parse_evaluation, prepare_msp_improv
from cmarr.pipelines.demo.corpus import make_msp_improv_tree

runner = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}

REASON_KEYS = {"type": msp.R_TYPE, "not_4class": msp.R_NOT_4CLASS, "no_face": msp.R_NO_FACE,
               "no_media": msp.R_NO_MEDIA}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("msp") / "MSP-IMPROV"
    return root, make_msp_improv_tree(root, sessions=(1, 2), utts_per_session=8, seed=1)


@pytest.fixture(scope="module")
def result(tree):
    return prepare_msp_improv(tree[0])


@pytest.fixture
def small(tmp_path):
    """A tree without video that a test may damage."""
    root = tmp_path / "MSP-IMPROV"
    return root, make_msp_improv_tree(root, sessions=(1, 2), utts_per_session=4, seed=2, video=False)


def invoke(*args):
    return runner.invoke(app, ["manifest", *map(str, args)], env=ENV)


def test_no_face_list_is_the_papers():
    nf = load_msp_no_face()
    assert len(nf) == 121
    assert pd.Series(nf).value_counts().to_dict() == {"N": 56, "H": 49, "A": 10, "S": 6}
    assert all(msp.ID_RE.match(u).group(5) == "S" for u in nf)
    # 3,940 S clips minus these = the paper's 3,819 (per label)
    s_set = {"ang": 470, "hap": 1048, "neu": 1789, "sad": 633}
    removed = {msp.MSP_LABEL_MAP[c]: n for c, n in pd.Series(nf).value_counts().items()}
    assert {k: s_set[k] - removed[k] for k in s_set} == {"ang": 460, "hap": 999, "neu": 1733, "sad": 627}


def test_manifest_is_what_the_tree_holds(tree, result):
    root, info = tree
    df = result.df
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert list(df["utterance_id"]) == info["ids"]
    assert dict(zip(df["utterance_id"], df["label"])) == {u: info["labels"][u] for u in info["ids"]}
    assert df["label"].value_counts().to_dict() == info["counts"]["per_label"]
    assert df["session"].value_counts().to_dict() == info["counts"]["per_session"]
    assert (df["corpus"] == "msp-improv").all() and (df["fold"] == df["session"]).all()
    assert (df["video_half"] == "full").all() and (df["start"] == 0).all()
    clips = {c["utterance_id"]: c for c in info["clips"]}
    for row in df.itertuples():
        m = msp.ID_RE.match(row.utterance_id)
        assert row.speaker == f"{m.group(3)}{m.group(4)}" and row.session == int(m.group(4))
        assert row.gender == m.group(3) and row.consensus == clips[row.utterance_id]["consensus"]
        assert row.end == pytest.approx(soundfile.info(str(root / row.wav_path)).duration)
        assert pd.isna(row.video_end) and row.transcript == clips[row.utterance_id]["transcript"]  # the whole clip
        assert row.video_path == clips[row.utterance_id]["video_path"]
    got = {k: result.drop_counts()[r] for k, r in REASON_KEYS.items()}
    assert got == info["dropped"] and sum(got.values()) == len(result.dropped)


def test_all_recording_types_present_only_s_kept(tree, result):
    _, info = tree
    assert set(info["quirks"]["types"]) == {"P", "R", "S", "T"}
    details = pd.Series([d.detail[0] for d in result.dropped if d.reason == msp.R_TYPE]).value_counts().to_dict()
    assert details == {t: n for t, n in info["quirks"]["types"].items() if t != "S"}
    assert all("-S-" in u for u in result.df["utterance_id"])


def test_no_face_clips_are_dropped_by_default_and_kept_on_request(tree, result):
    root, info = tree
    assert info["no_face_ids"] and not set(info["no_face_ids"]) & set(result.df["utterance_id"])
    assert sorted(d.utterance_id for d in result.dropped if d.reason == msp.R_NO_FACE) == info["no_face_ids"]
    kept = prepare_msp_improv(root, drop_no_face=False)
    assert list(kept.df["utterance_id"]) == info["ids_keep_no_face"]
    assert any("no-face list was not applied" in n for n in kept.notes)


def test_nan_values_missing_n_field_and_multilabel_raters_parse(tree):
    root, info = tree
    q = info["quirks"]
    assert q["nan_ids"] and q["no_n_ids"] and q["multi_label_ids"]
    text = (root / "Evalution.txt").read_text()
    assert "A:NaN" in text and re.search(r"D:\S+ ;\n", text) and "; Frustrated;" in text
    entries, bad = parse_evaluation(root / "Evalution.txt")
    assert not bad and len(entries) == len(info["clips"])
    by_id = {e["utterance_id"]: e for e in entries}
    assert all(math.isnan(by_id[u]["values"]["A"]) for u in q["nan_ids"])
    assert all("N" not in by_id[u]["values"] for u in q["no_n_ids"])


def test_label_without_media_dropped_partial_media_kept(tree, result):
    _, info = tree
    q = info["quirks"]
    assert [d.utterance_id for d in result.dropped if d.reason == msp.R_NO_MEDIA] == q["no_media_ids"]
    row = result.df.set_index("utterance_id").loc[q["no_avi_ids"][0]]
    assert row["video_path"] == "" and row["wav_path"] != "" and row["transcript"] != ""
    assert "1 kept clips have no video (that modality will be missing)" in result.notes


def test_junk_files_are_ignored(tree, result):
    root, info = tree
    assert info["quirks"]["junk_files"]
    for p in info["quirks"]["junk_files"]:
        assert (root / p).name.startswith("._") and b"\xff" in (root / p).read_bytes()
    assert not any("._" in p for p in result.df["wav_path"])


@pytest.mark.parametrize("evaluation_name,layout", [("Evaluation.txt", "flat"), ("Evalution.txt", "flat"),
                                                    ("Evaluation.txt", "nested")])
def test_file_name_variant_and_flat_layout(tmp_path, evaluation_name, layout):
    root = tmp_path / "msp"
    info = make_msp_improv_tree(root, sessions=(2,), utts_per_session=4, seed=5, video=False,
                                evaluation_name=evaluation_name, layout=layout)
    r = prepare_msp_improv(root)
    assert list(r.df["utterance_id"]) == info["ids"]
    if layout == "flat":
        assert all(p.count("/") == 1 for p in r.df["wav_path"])
    shutil.copy(root / evaluation_name, root / ({"Evaluation.txt", "Evalution.txt"} - {evaluation_name}).pop())
    assert any("both Evalution.txt and Evaluation.txt exist" in n for n in prepare_msp_improv(root).notes)


# ---------------------------------------------------------------------------- bad input


def test_root_that_is_not_the_corpus(tmp_path):
    (tmp_path / "Session1").mkdir()
    with pytest.raises(ManifestError) as e:
        prepare_msp_improv(tmp_path)
    assert str(e.value).startswith(str(tmp_path)) and "Evalution.txt (or Evaluation.txt)" in str(e.value)
    assert "Audio/session{1..6}" in str(e.value) and "Session1" in str(e.value)
    (tmp_path / "Evalution.txt").write_text("")
    with pytest.raises(ManifestError, match="no MSP-IMPROV media"):
        prepare_msp_improv(tmp_path)


def test_unparseable_lines_are_counted_with_file_and_line(small):
    root, info = small
    ev = root / "Evalution.txt"
    lines = ev.read_text().splitlines()
    lines[0] = "UTD-IMPROV-S01A-F01-S-FM01.avi A A:2.8"          # no ';' separators
    ev.write_text("stray header\n" + "\n".join(lines) + "\n")
    r = prepare_msp_improv(root)
    bad = [d for d in r.dropped if d.reason == msp.R_UNPARSEABLE]
    assert [d.where for d in bad] == [f"{ev}:1", f"{ev}:2"]
    lost = info["clips"][0]["utterance_id"]
    assert lost not in set(r.df["utterance_id"]) and len(r.df) == len(info["ids"]) - (lost in info["ids"])


def test_unreadable_files(small):
    root, info = small
    row = prepare_msp_improv(root).df.iloc[0]
    (root / row["wav_path"]).write_bytes(b"RIFF....not a wav")
    r = prepare_msp_improv(root)
    assert row["utterance_id"] not in set(r.df["utterance_id"])  # no wav, no video: no duration
    d = next(d for d in r.dropped if d.utterance_id == row["utterance_id"])
    assert d.reason == msp.R_NO_DURATION and row["wav_path"] in d.detail
    assert any("could not be read" in n and row["wav_path"] in n for n in r.notes)
    (root / "Evalution.txt").write_bytes(b"UTD-IMPROV-S01A-F01-S-FM01.avi; A;\xff\n")
    with pytest.raises(ManifestError, match="Evalution.txt: cannot read label file: not UTF-8"):
        prepare_msp_improv(root)


def test_unreadable_wav_falls_back_to_the_video_for_the_duration(tmp_path):
    root = tmp_path / "msp"
    make_msp_improv_tree(root, sessions=(1,), utts_per_session=2, seed=6, quirks=False, frame_size=(64, 48))
    row = prepare_msp_improv(root).df.iloc[0]
    (root / row["wav_path"]).write_bytes(b"junk")
    r = prepare_msp_improv(root).df.set_index("utterance_id").loc[row["utterance_id"]]
    assert r["wav_path"] == "" and r["video_path"] == row["video_path"]
    assert r["end"] == pytest.approx(row["end"], abs=0.1)  # frames / fps


def test_partial_corpus_says_what_it_covers(small):
    root, info = small
    shutil.rmtree(root / "Audio" / "session2")
    r = prepare_msp_improv(root)
    assert r.sessions == (1,) and set(r.df["session"]) == {1}
    assert r.notes[0].startswith("partial corpus: media cover session 1 only")
    n2 = sum(1 for u in info["ids"] if u.split("-")[3] in ("F02", "M02"))
    assert r.drop_counts()[msp.R_SESSION_ABSENT] == n2


# ---------------------------------------------------------------------------- command


def test_command_default_and_keep_no_face(tree, result, tmp_path):
    root, info = tree
    out = tmp_path / "msp.csv"
    r = invoke("msp-improv", "--root", root, "--out", out)
    assert r.exit_code == 0, r.output
    pd.testing.assert_frame_equal(read_manifest(out), result.df)
    assert f"msp-improv: {info['counts']['total']} utterances" in r.output
    assert msp.R_NO_FACE in r.output and "P (natural interaction)" in r.output
    assert f"dropped: {len(result.dropped)} items" in r.output
    assert "partial corpus: media cover sessions 1, 2 only" in r.output
    r = invoke("msp-improv", "--root", root, "--out", out, "--keep-no-face")
    assert r.exit_code == 0 and msp.R_NO_FACE not in r.output
    assert list(read_manifest(out)["utterance_id"]) == info["ids_keep_no_face"]
    custom = tmp_path / "nf.txt"
    custom.write_text("# only one\n" + info["no_face_ids"][0] + " N False\n")
    r = invoke("msp-improv", "--root", root, "--out", out, "--no-face-list", custom)
    assert r.exit_code == 0 and len(read_manifest(out)) == len(info["ids_keep_no_face"]) - 1


def test_command_bad_input(tmp_path, small):
    root, _ = small
    r = invoke("msp-improv", "--root", tmp_path / "empty", "--out", tmp_path / "o.csv")
    assert r.exit_code == 2 and "Traceback" not in r.output and "not a folder" in r.output
    r = invoke("msp-improv", "--root", root, "--out", tmp_path / "o.csv", "--canonical", tmp_path / "x.csv")
    assert r.exit_code == 2 and "iemocap only" in r.output
    bad = tmp_path / "nf.txt"
    bad.write_text("not-an-id A False\n")
    r = invoke("msp-improv", "--root", root, "--out", tmp_path / "o.csv", "--no-face-list", bad)
    assert r.exit_code == 2 and f"{bad}:1" in r.output and "not a clip id" in r.output
    assert not (tmp_path / "o.csv").exists()


def test_count_check_compares_keep_no_face_with_the_3940_set():
    from rich.console import Console

    from cmarr.extract.cli.extract import print_count_check
    from cmarr.extract.corpora.manifest import ManifestResult

    def result(counts):
        labels = [lab for lab, n in counts.items() for _ in range(n)]
        return ManifestResult(df=pd.DataFrame({"label": labels}), sessions=(1, 2, 3, 4, 5, 6))

    before = {"ang": 470, "hap": 1048, "neu": 1789, "sad": 633}
    paper = {"ang": 460, "hap": 999, "neu": 1733, "sad": 627}
    console = Console(record=True, width=200)
    assert print_count_check(console, "msp-improv", result(before), keep_no_face=True) is False
    assert print_count_check(console, "msp-improv", result(paper), keep_no_face=False) is False
    assert print_count_check(console, "msp-improv", result(before), keep_no_face=False) is True
    text = console.export_text()
    assert "match the paper's set before its no-face clips are dropped" in text and "ang 470 vs 460" in text
