"""``cm-arr-features export --format mmin``: every file read back as MMIN's loaders read it."""
from __future__ import annotations

import errno
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cmarr.extract.base import LABELS
from cmarr.extract.cli.store import app
from cmarr.extract.files import file_sha256
from cmarr.extract.store import FeatureStore
from cmarr.pipelines.demo.synthetic import SyntheticSpec, make_synthetic_store
from cmarr.pipelines.validation import split_fold

runner = CliRunner()
LETTERS = {"A": "speech", "V": "video", "L": "text"}


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """3 sessions x 2 speakers x 8 utterances, every modality present."""
    spec = SyntheticSpec(p_absent={"speech": 0.0, "text": 0.0, "video": 0.0})
    return make_synthetic_store(tmp_path_factory.mktemp("s") / "feats.h5", n_per_class=2, sessions=3, spec=spec)


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """A store some of whose utterances lack text or video."""
    spec = SyntheticSpec(p_absent={"speech": 0.0, "text": 0.15, "video": 0.2})
    return make_synthetic_store(tmp_path_factory.mktemp("g") / "gappy.h5", n_per_class=4, sessions=3, spec=spec)


def mmin_items(root, cv, part, corpus_name="IEMOCAP", types=("wav2vec2", "denseface", "bert")):
    """What MMIN's ``MultimodalDataset(opt, part)`` yields for ``--cvNo=cv``: its reading
    code (data/multimodal_dataset.py) replayed on the exported folder."""
    config = json.loads((root / "config" / f"{corpus_name}_config.json").read_text())
    files = {x: h5py.File(f"{config['feature_root']}/{x}/{t}.h5", "r") for x, t in zip("AVL", types)}
    label = np.load(f"{config['target_root']}/{cv}/{part}_label.npy")
    if corpus_name == "IEMOCAP":
        label = np.argmax(label, axis=1)
    int2name = np.load(f"{config['target_root']}/{cv}/{part}_int2name.npy")
    items = []
    for i in range(len(label)):
        name = int2name[i][0].decode() if corpus_name == "IEMOCAP" else int2name[i]
        items.append({"int2name": name, "label": int(label[i]),
                      **{x: files[x][name][()] for x in "AVL"}})
    for f in files.values():
        f.close()
    return items


def test_export_holds_the_store_exactly_in_mmin_layout(store, tmp_path):
    out = tmp_path / "mmin"
    code, text = cli("export", "--format", "mmin", store, out, "--corpus-name", "IEMOCAP")
    assert code == 0, text
    s = FeatureStore(store)
    t = s.utterances
    ids = list(t["utterance_id"])
    # the feature files: one float32 dataset per utterance, the store's float16 values exactly
    for x, m in LETTERS.items():
        name = {"A": "wav2vec2", "V": "denseface", "L": "bert"}[x]
        assert (out / x / f"{name}.h5").read_bytes()[8] == 0  # superblock 0: older HDF5 releases read it
        with h5py.File(out / x / f"{name}.h5", "r") as f:
            assert sorted(f.keys()) == sorted(ids)
            for u in ids:
                got, want = f[u][()], s.get(u, m)
                assert got.dtype == np.float32 and want.dtype == np.float16
                assert got.shape == want.shape and np.array_equal(got, want.astype(np.float32))
    # the splits: per fold, each speaker validates once and the other one tests
    label_of = dict(zip(t["utterance_id"], t["label"]))
    fold_of = dict(zip(t["utterance_id"], t["fold"]))
    speaker_of = dict(zip(t["utterance_id"], t["speaker"]))
    assert sorted(int(p.name) for p in (out / "target").iterdir()) == [1, 2, 3, 4, 5, 6]
    for cv in range(1, 7):
        fold, val_speaker = (cv + 1) // 2, f"Ses{(cv + 1) // 2:02d}{'F' if cv % 2 else 'M'}"
        parts = {p: mmin_items(out, cv, p) for p in ("trn", "val", "tst")}
        names = {p: [it["int2name"] for it in items] for p, items in parts.items()}
        assert names["val"] == [u for u in ids if speaker_of[u] == val_speaker]
        assert names["tst"] == [u for u in ids if fold_of[u] == fold and speaker_of[u] != val_speaker]
        assert names["trn"] == [u for u in ids if fold_of[u] != fold]
        for items in parts.values():
            for it in items:
                assert LABELS[it["label"]] == label_of[it["int2name"]]
                assert np.array_equal(it["A"], s.get(it["int2name"], "speech").astype(np.float32))
        one_hot = np.load(out / "target" / str(cv) / "tst_label.npy")
        assert one_hot.shape == (len(names["tst"]), 4) and set(one_hot.sum(axis=1)) == {1.0}
        assert np.load(out / "target" / str(cv) / "tst_int2name.npy").shape == (len(names["tst"]), 1)
    # what was exported, from what, and which MMIN options read it
    rec = json.loads((out / "export.json").read_text())
    assert rec["source"]["sha256"] == file_sha256(store)
    assert {x: v["modality"] for x, v in rec["modalities"].items()} == LETTERS
    assert rec["mmin"]["config"] == {"feature_root": str(out.resolve()), "target_root": str(out.resolve() / "target"),
                                     "total_cv": 6}
    assert "--A_type=wav2vec2 --input_dim_a=8" in rec["mmin"]["flags"]
    assert "--V_type=denseface --input_dim_v=6" in rec["mmin"]["flags"]
    assert rec["missing"] == {"policy": "refuse", "dropped_utterances": [], "empty_entries": {}}
    readme = (out / "README.md").read_text()
    assert file_sha256(store) in readme and "data/multimodal_miss_dataset.py" in readme
    # the cvs marked as cm-arr-train's speaker rule hold exactly its train/val/test parts
    marked = [c for c in rec["cv"] if c["cm_arr_speaker_rule"]]
    assert [c["cvNo"] for c in marked] == [1, 4, 5]
    for c in marked:
        split = split_fold(t["fold"].to_numpy(), t["label"].to_numpy(), t["speaker"].to_numpy(), c["fold"],
                           rule="speaker")
        for part, mine in (("train", "trn"), ("val", "val"), ("test", "tst")):
            want = [ids[i] for i in getattr(split, part)]
            assert [it["int2name"] for it in mmin_items(out, c["cvNo"], mine)] == want
    assert [p.name for p in tmp_path.iterdir()] == ["mmin"]  # no temporary folder left


def test_msp_layout_takes_the_corpus_from_the_store(store, tmp_path, rewrite_table):
    import shutil

    msp = shutil.copy(store, tmp_path / "msp.h5")
    rewrite_table(msp, lambda t: t.assign(corpus="msp-improv"))
    code, text = cli("export", "--format", "mmin", msp, tmp_path / "out", "--a-type", "w2v", "--l-type", "bert_base")
    assert code == 0, text
    label = np.load(tmp_path / "out" / "target" / "1" / "val_label.npy")
    int2name = np.load(tmp_path / "out" / "target" / "1" / "val_int2name.npy")
    assert label.dtype == np.int64 and label.ndim == 1 and int2name.ndim == 1 and int2name.dtype.kind == "U"
    items = mmin_items(tmp_path / "out", 1, "val", corpus_name="MSP", types=("w2v", "denseface", "bert_base"))
    t = FeatureStore(msp).utterances
    assert [(it["int2name"], LABELS[it["label"]]) for it in items] == [
        (u, y) for u, y, s in zip(t["utterance_id"], t["label"], t["speaker"]) if s == "Ses01F"]


def test_utterances_lacking_a_modality_are_refused_dropped_or_empty_as_asked(gappy, tmp_path):
    s = FeatureStore(gappy)
    ids = list(s.utterances["utterance_id"])
    no_text = [u for u in ids if not s.has(u, "text")]
    no_video = [u for u in ids if not s.has(u, "video")]
    assert no_text and no_video  # the fixture has some of each
    code, text = cli("export", "--format", "mmin", gappy, tmp_path / "r", "--corpus-name", "IEMOCAP")
    assert code == 2 and "Traceback" not in text
    assert f"{len(no_video)} without V (video), first {no_video[0]!r}" in text and "--missing drop" in text
    assert not (tmp_path / "r").exists()

    code, text = cli("export", "--format", "mmin", gappy, tmp_path / "d", "--corpus-name", "IEMOCAP",
                     "--missing", "drop")
    assert code == 0, text
    gone = sorted(set(no_text) | set(no_video))
    listed = set()
    for cv in (tmp_path / "d" / "target").iterdir():
        for p in cv.glob("*_int2name.npy"):
            listed |= {n[0].decode() for n in np.load(p)}
    assert listed == set(ids) - set(gone)
    with h5py.File(tmp_path / "d" / "V" / "denseface.h5", "r") as f:
        assert set(f.keys()) == set(ids) - set(gone)
    assert json.loads((tmp_path / "d" / "export.json").read_text())["missing"]["dropped_utterances"] == gone

    code, text = cli("export", "--format", "mmin", gappy, tmp_path / "e", "--corpus-name", "IEMOCAP",
                     "--missing", "empty")
    assert code == 0, text
    with h5py.File(tmp_path / "e" / "V" / "denseface.h5", "r") as f:
        assert set(f.keys()) == set(ids)
        for u in ids:
            want = s.get(u, "video")
            assert f[u].shape == ((0, 6) if want is None else want.shape)
            if want is not None:
                assert np.array_equal(f[u][()], want.astype(np.float32))
    rec = json.loads((tmp_path / "e" / "export.json").read_text())["missing"]
    assert rec["empty_entries"] == {"V": no_video, "L": no_text} and rec["dropped_utterances"] == []
    assert "(0, D) entry" in (tmp_path / "e" / "README.md").read_text()


def test_an_existing_folder_is_refused_unless_overwrite(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, text = cli("export", "--format", "mmin", store, out, "--corpus-name", "IEMOCAP")  # empty: fine
    assert code == 0, text
    (out / "mine.txt").write_text("keep")
    code, text = cli("export", "--format", "mmin", store, out, "--corpus-name", "IEMOCAP")
    assert code == 2 and "already exists and is not empty" in text and "--overwrite" in text
    assert (out / "mine.txt").read_text() == "keep"
    code, text = cli("export", "--format", "mmin", store, out, "--corpus-name", "IEMOCAP", "--overwrite")
    assert code == 0, text
    assert not (out / "mine.txt").exists() and (out / "export.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone too
    # a folder holding the store is never replaced, --overwrite or not
    code, text = cli("export", "--format", "mmin", store, store.parent, "--corpus-name", "IEMOCAP", "--overwrite")
    assert code == 2 and "holds the store being exported" in text and store.exists()


@pytest.mark.parametrize("fault", ["missing", "not hdf5", "damaged"])
def test_a_bad_store_is_one_line_and_nothing_written(store, tmp_path, fault):
    bad = tmp_path / "bad.h5"
    if fault == "not hdf5":
        bad.write_text("utterance_id,label\n")
    elif fault == "damaged":
        import shutil

        shutil.copy(store, bad)
        with h5py.File(bad, "a") as f:
            ds = f["features"]["video"]["data"]
            ds[3, 1] = np.nextafter(ds[3, 1], np.float16(np.inf))
    code, text = cli("export", "--format", "mmin", bad, tmp_path / "out", "--corpus-name", "IEMOCAP")
    want = {"missing": "no such file", "not hdf5": "not an HDF5 file",
            "damaged": "video: the frames do not match the checksum"}[fault]
    assert code == 2 and f"bad.h5: {want}" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_bad_options_are_refused(store, tmp_path):
    for args, said in ((["--format", "lhotse"], "--format 'lhotse'"),
                       (["--format", "mmin", "--missing", "zeros"], "--missing 'zeros'"),
                       (["--format", "mmin", "--a-type", "comparE"], "comparE_mean_std.h5"),
                       (["--format", "mmin", "--v-type", "a/b"], "without '/'"),
                       (["--format", "mmin"], "--corpus-name IEMOCAP")):  # a synthetic corpus: say which
        code, text = cli("export", *args, store, tmp_path / "out")
        assert code == 2 and said in text and "Traceback" not in text, (args, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["disk full", "ctrl-c"])
def test_a_failed_or_interrupted_export_leaves_nothing(store, tmp_path, monkeypatch, fault):
    from cmarr.extract.store import export as export_module

    real = export_module._fill_features

    def fill(f, s, modality, ids):
        if modality == "video":  # A was written: the failure comes half-way
            if fault == "ctrl-c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.h5"))
        real(f, s, modality, ids)

    monkeypatch.setattr(export_module, "_fill_features", fill)
    code, text = cli("export", "--format", "mmin", store, tmp_path / "out", "--corpus-name", "IEMOCAP")
    if fault == "ctrl-c":
        assert code == 130 and "interrupted (Ctrl-C); nothing was written at" in text
    else:
        assert code == 2 and "disk full" in text and "nothing was written at" in text
    assert "Traceback" not in text
    assert list(tmp_path.iterdir()) == []
