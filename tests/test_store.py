"""The feature store: writing, resume, reading, merge, validation and every bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cmarr.extract.cli.store import app
from cmarr.extract.store import FeatureStore, StoreError, StoreWriter, validate_store

runner = CliRunner()


def table(ids, session=1):
    labels = ["ang", "hap", "neu", "sad"]
    return pd.DataFrame({
        "utterance_id": ids, "corpus": "iemocap", "session": session, "speaker": f"Ses0{session}F",
        "label": [labels[i % 4] for i in range(len(ids))], "fold": session,
        "start": 0.0, "end": 1.5,
    })


PROV = {"speech": {"model": "facebook/wav2vec2-base", "layer": -1, "dim": 6, "frame_rate": 50.0},
        "video": {"checkpoint_sha256": "ab" * 32, "dim": 3, "sample_fps": 10.0}}


def feats(seed, rows, dim):
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def write_store(path, ids, prov=PROV, session=1, skip_video=(), shard=None):
    attrs = {"shard": shard} if shard else None
    with StoreWriter(path, table(ids, session), prov, chunk_size=3, extra_attrs=attrs) as w:
        for i, u in enumerate(ids):
            w.add(u, "speech", feats(i, 5 + i, prov["speech"]["dim"]), frame_rate=50.0)
            if u in skip_video:
                w.add_error(u, "video", "no face detected in any of 12 sampled frames")
            else:
                mask = np.array([True, False, True, True])
                w.add(u, "video", feats(100 + i, 3, prov["video"]["dim"]),
                      frame_times=np.arange(4) / 10, face_mask=mask)
    return path


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_clean_error(code, text, *needles):
    assert code != 0
    assert "Traceback" not in text
    for n in needles:
        assert str(n) in text, (n, text)


# ---------------------------------------------------------------------------------------
def test_roundtrip_tables_meta_and_missing(tmp_path):
    path = write_store(tmp_path / "f.h5", ["u0", "u1", "u2"], skip_video={"u1"})
    s = FeatureStore(path)
    assert list(s.utterances["utterance_id"]) == ["u0", "u1", "u2"]
    assert list(s.utterances["label"]) == ["ang", "hap", "neu"]
    assert s.utterances["session"].dtype.kind == "i"
    np.testing.assert_allclose(s.get("u2", "speech"), feats(2, 7, 6).astype(np.float16))
    assert s.get("u2", "speech").dtype == np.float16
    # a modality with no data is absent, never zeros, and the reason is on record
    assert s.get("u1", "video") is None and not s.has("u1", "video")
    assert s.errors.to_dict("records") == [
        {"utterance_id": "u1", "modality": "video", "reason": "no face detected in any of 12 sampled frames"}]
    meta = s.meta("u0", "video")
    assert meta["face_mask"].dtype == bool and meta["face_mask"].tolist() == [True, False, True, True]
    np.testing.assert_allclose(meta["frame_times"], [0, .1, .2, .3], atol=1e-6)
    assert s.meta("u0", "speech") == {"frame_rate": 50.0}
    prov = s.provenance["speech"]
    assert prov["model"] == "facebook/wav2vec2-base" and "torch" in prov["library_versions"]
    assert prov["cm_arr_version"] and prov["created"]
    everything = s.load_all()
    assert set(everything) == {"speech", "video"} and set(everything["video"]) == {"u0", "u2"}
    np.testing.assert_array_equal(everything["speech"]["u1"], s.get("u1", "speech"))
    assert validate_store(path) == ([], [f"video: 1 utterances missing, with reasons recorded "
                                         f"(`cm-arr-features errors {path}` lists them)"])


def test_output_appears_only_when_complete_and_resume_skips_done(tmp_path):
    out = tmp_path / "f.h5"
    ids = [f"u{i}" for i in range(7)]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    for i, u in enumerate(ids[:5]):
        w.add(u, "speech", feats(i, 4, 6))
    w.close()  # the job ends without finalize: 4 committed in chunks, 1 buffered and lost
    assert not out.exists()
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    assert w.done() == {(u, "speech") for u in ids[:4]}
    for i, u in enumerate(ids):
        if (u, "speech") not in w.done():
            w.add(u, "speech", feats(i, 4, 6))
    w.finalize()
    s = FeatureStore(out)
    assert s.ids("speech") == set(ids)
    assert not out.with_name(out.name + ".parts").exists()
    for i, u in enumerate(ids):
        np.testing.assert_allclose(s.get(u, "speech"), feats(i, 4, 6).astype(np.float16))


def test_rerun_of_a_finished_store_has_nothing_to_do(tmp_path):
    out = tmp_path / "f.h5"
    undeclared = {"speech": {"model": "m"}}  # width found from the data
    with StoreWriter(out, table(["a", "b"]), undeclared) as w:
        w.add("a", "speech", feats(0, 4, 6))
        w.add("b", "speech", feats(1, 4, 6))
    before = FeatureStore(out).get("b", "speech")
    stamp = "2000-01-01T00:00:00+00:00"  # long ago: a rewrite or a new stamp would show
    with h5py.File(out, "a") as f:
        f.attrs["created"] = stamp
        f["provenance"].attrs["speech"] = json.dumps({**FeatureStore(out).provenance["speech"], "created": stamp})
    data = out.read_bytes()
    with StoreWriter(out, table(["a", "b"]), undeclared) as w:
        assert w.done() == {("a", "speech"), ("b", "speech")}
    np.testing.assert_array_equal(FeatureStore(out).get("b", "speech"), before)
    assert FeatureStore(out).provenance["speech"]["dim"] == 6
    # untouched: not rewritten, and its provenance still says when the frames were made
    assert out.read_bytes() == data and FeatureStore(out).provenance["speech"]["created"] == stamp
    assert not _parts(out).exists()
    # a table with blank cells (rows without video) compares equal to itself as stored
    blanks = table(["a", "b"]).assign(video_path=["a.avi", None], video_start=[0.5, np.nan])
    out2 = tmp_path / "g.h5"
    with StoreWriter(out2, blanks, undeclared) as w:
        w.add("a", "speech", feats(0, 4, 6))
        w.add("b", "speech", feats(1, 4, 6))
    data = out2.read_bytes()
    with StoreWriter(out2, blanks, undeclared):
        pass
    assert out2.read_bytes() == data
    # extended by a run of both modalities: rewritten, and speech, of which it computed
    # nothing, keeps the stamp of when its frames were made
    with StoreWriter(out, table(["a", "b"]), {**undeclared, "text": {"model": "t", "dim": 4}}) as w:
        w.add("a", "text", feats(2, 2, 4), tokens=["x", "y"])
        w.add_error("b", "text", "empty transcript")
    s = FeatureStore(out)
    assert s.provenance["speech"]["created"] == stamp and s.provenance["text"]["created"] != stamp


def test_rerun_tries_recorded_errors_again_and_keeps_the_newest_outcome(tmp_path):
    """An error is not a finished utterance: after the media is fixed the same job stores its
    features (and drops the error); an error that happens again replaces the old record."""
    out = tmp_path / "f.h5"
    with StoreWriter(out, table(["a", "b", "c"]), {"speech": PROV["speech"]}) as w:
        w.add("a", "speech", feats(0, 4, 6))
        w.add_error("b", "speech", "unreadable audio (old)")
        w.add_error("c", "speech", "unreadable audio (old)")
    with StoreWriter(out, table(["a", "b", "c"]), {"speech": PROV["speech"]}) as w:
        assert w.done() == {("a", "speech")}
        assert w.retried() == {("b", "speech"), ("c", "speech")}
        w.add("b", "speech", feats(1, 4, 6))
        w.add_error("c", "speech", "unreadable audio (new)")
    s = FeatureStore(out)
    assert s.ids("speech") == {"a", "b"}
    assert s.errors.to_dict("records") == [
        {"utterance_id": "c", "modality": "speech", "reason": "unreadable audio (new)"}]
    # an error committed in a chunk of a killed run is tried again on resume, too
    out2 = tmp_path / "g.h5"
    w = StoreWriter(out2, table(["a", "b"]), {"speech": PROV["speech"]}, chunk_size=1)
    w.add_error("a", "speech", "unreadable audio")
    w.flush()
    w.close()
    w = StoreWriter(out2, table(["a", "b"]), {"speech": PROV["speech"]}, chunk_size=1)
    assert w.done() == set() and w.retried() == {("a", "speech")}


def test_a_rebuilt_manifest_is_refused_with_what_changed(tmp_path):
    """Resuming takes the same table only: another one (a rebuilt manifest) is refused for an
    unfinished extraction and for a finished store alike, naming the utterances added,
    removed and changed and what to do; a manifest file that differs but holds the same rows
    resumes."""
    out = tmp_path / "f.h5"
    prov = {"speech": {**PROV["speech"], "manifest_sha256": "old"}}
    old = table(["a", "b", "c"]).assign(wav_path=["a.wav", "", "c.wav"])
    w = StoreWriter(out, old, prov, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.flush()
    w.close()  # killed: one chunk
    new = table(["a", "b", "d"]).assign(wav_path=["a.wav", "b.wav", "d.wav"])
    with pytest.raises(StoreError) as e:
        StoreWriter(out, new, {"speech": {**PROV["speech"], "manifest_sha256": "new"}})
    assert str(e.value) == (f"{_parts(out)}: holds an unfinished extraction of another manifest (utterances 1 added "
                            "(first: 'd'); 1 removed (first: 'c'); 1 changed (first: 'b')); write to another --out, "
                            "or remove this folder to start over")
    same = old.sample(frac=1, random_state=1).astype({"session": float})  # other row order and dtypes, same rows
    with StoreWriter(out, same, {"speech": {**PROV["speech"], "manifest_sha256": "same"}}) as w:
        assert w.done() == {("a", "speech")}
        w.add("b", "speech", feats(1, 4, 6))
        w.add("c", "speech", feats(2, 4, 6))
    with pytest.raises(StoreError, match=r"f\.h5: exists, made from another manifest \(utterances 1 changed \(first: "
                                         r"'c'\)\); write to another --out, or remove it to extract everything again"):
        StoreWriter(out, old.assign(wav_path=["a.wav", "", "c2.wav"]), prov)
    assert FeatureStore(out).ids("speech") == {"a", "b", "c"} and not _parts(out).exists()


def test_the_parts_folder_is_emptied_chunks_first_and_its_progress_record_last(tmp_path, monkeypatch):
    """The progress record says which chunks belong to the extraction: removed after them, so
    that a kill in between never leaves chunks without it; the lock file goes last."""
    from pathlib import Path

    out = tmp_path / "f.h5"
    w = StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.add("b", "speech", feats(1, 4, 6))
    removed = []
    real_unlink = Path.unlink

    def unlink(self, *a, **kw):
        removed.append(self.name)
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", unlink)
    w.finalize()
    monkeypatch.undo()
    chunks = [i for i, n in enumerate(removed) if n.startswith("chunk-")]
    assert len(chunks) == 2 and removed.index("state.json") > max(chunks)
    assert removed.index("lock") > removed.index("state.json") and not _parts(out).exists()


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "f.h5"
    w = StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.close()
    other = {"speech": {**PROV["speech"], "layer": 6}}
    with pytest.raises(StoreError, match="other settings"):
        StoreWriter(out, table(["a", "b"]), other)


def test_killed_writer_process_resumes_without_corruption(tmp_path):
    out = tmp_path / "f.h5"
    script = textwrap.dedent(f"""
        import numpy as np, pandas as pd, time, sys
        from cmarr.extract.store import StoreWriter
        ids = [f"u{{i}}" for i in range(40)]
        t = pd.DataFrame(dict(utterance_id=ids, corpus="c", session=1, speaker="s", label="ang", fold=1,
                              start=0.0, end=1.0))
        w = StoreWriter({str(out)!r}, t, {{"speech": {{"model": "m", "dim": 6}}}}, chunk_size=2)
        for i, u in enumerate(ids):
            if (u, "speech") in w.done():
                continue
            w.add(u, "speech", np.full((3, 6), i, np.float32))
            print(u, flush=True)
            if len(sys.argv) > 1:
                time.sleep(0.05)
        w.finalize()
        print("DONE", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, "slow"], stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if len(seen) == 11:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert not out.exists()
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    redone = [x for x in second.stdout.split() if x.startswith("u")]
    assert second.stdout.strip().endswith("DONE")
    assert len(redone) < 40 - 9  # the committed chunks were not recomputed
    s = FeatureStore(out)
    assert len(s.ids("speech")) == 40
    assert all(float(s.get(f"u{i}", "speech")[0, 0]) == i for i in range(40))
    assert validate_store(out)[0] == []


def _failing_chunk_writes(monkeypatch, n):
    """The first ``n`` chunk files cannot be put in place (disk full); returns the list of
    failed attempts."""
    import cmarr.extract.store.chunks as chunks_mod

    real = chunks_mod.durable_replace
    failures = []

    def full_disk(tmp, dst):
        if len(failures) < n and str(dst).endswith(".h5"):  # chunks, not the progress record
            failures.append(dst)
            raise OSError(28, "No space left on device", str(tmp))
        real(tmp, dst)

    monkeypatch.setattr(chunks_mod, "durable_replace", full_disk)
    return failures


def _assert_holds_all(out, ids):
    s = FeatureStore(out)
    assert s.ids("speech") == set(ids)
    for i, u in enumerate(ids):
        np.testing.assert_array_equal(s.get(u, "speech"), feats(i, 4, 6).astype(np.float16))


def test_a_failed_commit_is_raised_and_loses_nothing(tmp_path, monkeypatch):
    """A chunk that cannot be written (disk full, ...) is raised by the call that committed
    it; its utterances stay in the buffer and go into the next commit."""
    failures = _failing_chunk_writes(monkeypatch, 2)
    ids = [f"u{i}" for i in range(5)]
    out = tmp_path / "f.h5"
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    w.add("u0", "speech", feats(0, 4, 6))
    with pytest.raises(OSError, match="No space left"):
        w.add("u1", "speech", feats(1, 4, 6))  # the buffer is full: committed, which fails
    with pytest.raises(OSError, match="No space left"):
        w.flush()  # fails again: raised, the utterances kept in the buffer
    assert len(failures) == 2 and [u for u, *_ in w._buffer] == ["u0", "u1"]
    for i in (2, 3, 4):
        w.add(f"u{i}", "speech", feats(i, 4, 6))
    w.finalize()  # the disk has room again
    _assert_holds_all(out, ids)


def test_an_unfinished_extraction_of_an_earlier_version_is_refused(tmp_path):
    """Chunks and progress records of another chunk format are not read: a one-line message
    names the folder and says to remove it and extract again."""
    out = tmp_path / "f.h5"
    ids = ["a", "b"]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.close()
    state = _parts(out) / "state.json"
    recorded = json.loads(state.read_text())
    state.write_text(json.dumps({k: v for k, v in recorded.items() if k != "chunk_format"}))
    with pytest.raises(StoreError, match=rf"^{_parts(out)}: holds an unfinished extraction of another cm-arr version; "
                                         "remove the folder and extract again$"):
        StoreWriter(out, table(ids), {"speech": PROV["speech"]})
    state.unlink()  # without its record, the chunk itself is refused
    with h5py.File(_parts(out) / "chunk-000000.h5", "a") as f:
        f.attrs["chunk_format"] = 2
    with pytest.raises(StoreError, match=r"chunk-000000\.h5: a chunk of format version 2, not this cm-arr's 3: "
                                         "remove the folder .* and extract again"):
        StoreWriter(out, table(ids), {"speech": PROV["speech"]})


def test_string_and_dict_meta_round_trip_as_given(tmp_path):
    """A string meta is read back as the same string even when it looks like JSON; a dict
    meta comes back as the dict."""
    out = tmp_path / "f.h5"
    prov = {"text": {"model": "bert-base-uncased", "dim": 4}}
    with StoreWriter(out, table(["a", "b"]), prov, chunk_size=1) as w:
        w.add("a", "text", feats(0, 2, 4), note="[LAUGHTER] yes", info={"n": 1})
        w.add("b", "text", feats(1, 2, 4), note='{"not": "parsed"}', info={"n": 2, "k": "x"})
    s = FeatureStore(out)
    assert s.meta("a", "text") == {"note": "[LAUGHTER] yes", "info": {"n": 1}}
    assert s.meta("b", "text") == {"note": '{"not": "parsed"}', "info": {"k": "x", "n": 2}}


def test_meta_keys_must_agree_within_a_modality(tmp_path):
    w = StoreWriter(tmp_path / "f.h5", table(["a", "b"]), {"speech": PROV["speech"]})
    w.add("a", "speech", feats(0, 4, 6), frame_rate=50.0)
    with pytest.raises(ValueError,
                       match=r"b \(speech\): meta keys \[\], other speech utterances have \['frame_rate'\]"):
        w.add("b", "speech", feats(1, 4, 6))
    w.close()


def test_extending_a_store_keeps_what_it_held(tmp_path):
    out = write_store(tmp_path / "f.h5", ["a", "b"])
    before = FeatureStore(out).get("a", "speech")
    with StoreWriter(out, table(["a", "b"]), {"text": {"model": "bert-base-uncased", "dim": 4}}) as w:
        assert ("a", "speech") in w.done() and ("a", "text") not in w.done()
        w.add("a", "text", feats(9, 2, 4), tokens=["hi", "there"])
        w.add_error("b", "text", "empty transcript")
    s = FeatureStore(out)
    assert set(s.modalities) == {"speech", "text", "video"}
    np.testing.assert_array_equal(s.get("a", "speech"), before)
    assert s.meta("a", "text")["tokens"] == ["hi", "there"]


def _nudge(path, modality="speech", row=1, col=2):
    """One stored value moved one float16 step: finite, plausible, found only by its checksum."""
    with h5py.File(path, "a") as f:
        ds = f["features"][modality]["data"]
        ds[row, col] = np.nextafter(ds[row, col], np.float16(np.inf))


def test_verify_reads_in_pieces_and_finds_one_changed_value(tmp_path):
    p = write_store(tmp_path / "f.h5", [f"u{i}" for i in range(6)])
    rows = FeatureStore(p)._layout["speech"][1][0]
    FeatureStore(p).verify(piece_bytes=2 * 6 * 2)  # two speech rows a piece: many pieces, sound store
    _nudge(p, row=rows - 1)  # in the last piece
    for piece in (2 * 6 * 2, 64 << 20):
        with pytest.raises(StoreError, match=r"f\.h5: speech: the frames do not match the checksum"):
            FeatureStore(p).verify(piece_bytes=piece)
    FeatureStore(p).verify(["video"])  # only what is asked for is read


def test_merge_refuses_a_damaged_shard(tmp_path):
    """The merged store gets a new checksum over what it copies, so a shard damaged since it
    was written must be refused, not blessed."""
    a = write_store(tmp_path / "a.h5", ["a0", "a1"], session=1)
    b = write_store(tmp_path / "b.h5", ["b0", "b1"], session=2)
    _nudge(b, "video", row=0, col=0)
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "b.h5", "video: the frames do not match the checksum")
    assert not (tmp_path / "m.h5").exists()
    assert not list(tmp_path.glob("m.h5*"))


def test_extending_a_damaged_store_is_refused_before_any_work(tmp_path):
    out = write_store(tmp_path / "f.h5", ["a", "b"])
    _nudge(out)
    with pytest.raises(StoreError, match=r"speech: the frames do not match the checksum.*carry them into the new"):
        StoreWriter(out, table(["a", "b"]), {"text": {"model": "bert-base-uncased", "dim": 4}})
    assert FeatureStore(out).modalities == ("speech", "video")  # left as it was
    assert not list(tmp_path.glob("f.h5.parts*"))


@pytest.mark.parametrize("big", [False, True])
def test_a_chunk_damaged_before_assembly_is_refused_not_stored(tmp_path, monkeypatch, big):
    """A committed chunk of a killed run, changed on disk before the rerun assembles the
    store: its frames would enter the store under the store's fresh sha256. Refused, naming
    the chunk; removing it recomputes its utterances. ``big``: the modality is assembled
    per utterance (over WHOLE_BLOCK_READ_BYTES), not from whole blocks."""
    import cmarr.extract.store.assemble as assemble_mod

    if big:
        monkeypatch.setattr(assemble_mod, "WHOLE_BLOCK_READ_BYTES", 0)
    out = tmp_path / "f.h5"
    ids = ["a", "b", "c", "d"]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    for i, u in enumerate(ids[:3]):
        w.add(u, "speech", feats(i, 4, 6))
    w.flush()
    w.close()  # killed: two chunks committed
    first = sorted(_parts(out).glob("chunk-*.h5"))[0]
    with h5py.File(first, "a") as f:  # one value one float16 step off, as bit rot would leave it
        ds = f["features/speech/data"]
        ds[5, 1] = np.nextafter(ds[5, 1], np.float16(np.inf))
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]})
    w.add("d", "speech", feats(3, 4, 6))
    with pytest.raises(StoreError, match=rf"{first.name}: speech: the frames of this committed chunk do not match"):
        w.finalize()
    assert not out.exists()
    first.unlink()
    with StoreWriter(out, table(ids), {"speech": PROV["speech"]}) as w:
        assert w.done() == {("c", "speech"), ("d", "speech")}
        for i, u in enumerate(ids[:2]):
            w.add(u, "speech", feats(i, 4, 6))
    _assert_holds_all(out, ids)


def test_writer_records_nan_and_overflow_instead_of_storing(tmp_path):
    out = tmp_path / "f.h5"
    with StoreWriter(out, table(["a", "b", "c"]), {"speech": PROV["speech"]}) as w:
        bad = feats(0, 3, 6)
        bad[1, 2] = np.nan
        assert w.add("a", "speech", bad) is False
        assert w.add("b", "speech", np.full((2, 6), 1e6, np.float32)) is False
        assert w.add("c", "speech", feats(1, 3, 6)) is True
        with pytest.raises(ValueError, match="width 5"):
            w.add("c", "speech", feats(1, 3, 5))
    s = FeatureStore(out)
    assert s.ids("speech") == {"c"}
    reasons = dict(zip(s.errors["utterance_id"], s.errors["reason"]))
    assert "NaN" in reasons["a"] and "float16" in reasons["b"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("src", [np.float16, np.float32, np.float64])
def test_store_cast_and_overflow_check_agree_with_numpy(src, dtype):
    """The writer's fast cast gives numpy's bits, and its overflow test says "overflow"
    exactly for the values numpy's cast turns into infinities (the rounding edge included)."""
    from cmarr.extract.store.writer import _store_cast, _unstorable

    rng = np.random.default_rng(0)
    edge = [65503.9, 65504.0, 65519.99, 65520.0, 65536.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-12, 3.4e38]
    values = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000), edge, [-v for v in edge]])
    with np.errstate(over="ignore"):  # float16: the large values become infinite, and are left out
        values = values[np.isfinite(values.astype(src))].astype(src)
        expect = values.astype(dtype)
    got = _store_cast(values.reshape(-1, 1), dtype).ravel()
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), expect.view(f"u{expect.itemsize}"))
    for v, e in zip(values, expect):
        assert _unstorable(np.array([[0.5, v]], src), dtype) == (None if np.isfinite(e) else
                                                                 f"values exceed the {dtype} range"), (v, e)
    for bad in (np.nan, np.inf, -np.inf):
        with np.errstate(over="ignore"):
            arrays = (np.array([[bad, 1.0]], src), np.array([[1e30, bad]], src))
        for arr in arrays:  # NaN/Inf named, beside an overflow too
            assert _unstorable(arr, dtype) == "extractor produced NaN or Inf values"


class _Reads(torch.utils.data.Dataset):
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return torch.from_numpy(self.store.get(self.ids[i], "speech").astype(np.float32)).sum()


def test_lazy_handle_per_dataloader_worker(tmp_path):
    ids = [f"u{i}" for i in range(8)]
    store = FeatureStore(write_store(tmp_path / "f.h5", ids))
    store.get("u0", "speech")  # opened in the parent before forking: workers must reopen
    ds = _Reads(store, ids)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat(list(loader))
    want = torch.tensor([float(store.get(u, "speech").astype(np.float32).sum()) for u in ids])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------
# merge

def test_merge_joins_disjoint_shards(tmp_path):
    a = write_store(tmp_path / "a.h5", ["a0", "a1"], session=1)
    b = write_store(tmp_path / "b.h5", ["b0", "b1", "b2"], session=2, skip_video={"b2"})
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert code == 0, text
    m = FeatureStore(tmp_path / "m.h5")
    assert list(m.utterances["utterance_id"]) == ["a0", "a1", "b0", "b1", "b2"]
    np.testing.assert_array_equal(m.get("b1", "speech"), FeatureStore(b).get("b1", "speech"))
    assert m.meta("a1", "video")["face_mask"].tolist() == [True, False, True, True]
    assert list(m.errors["utterance_id"]) == ["b2"]
    assert validate_store(tmp_path / "m.h5")[0] == []


def test_merge_refuses_duplicate_ids(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x", "y"])
    b = write_store(tmp_path / "b.h5", ["y", "z"])
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "b.h5", "'y'")
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_shards_of_other_models(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x"])
    other = {**PROV, "speech": {**PROV["speech"], "model": "facebook/wav2vec2-large"}}
    b = write_store(tmp_path / "b.h5", ["y"], prov=other)
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "b.h5", "wav2vec2-large", "made differently")


def test_merge_refuses_an_incomplete_or_mixed_set_of_shards(tmp_path):
    s = [write_store(tmp_path / f"s{k}.h5", [f"u{k}{j}" for j in range(2)], shard=f"{k}/3") for k in range(3)]
    code, text = cli("merge", s[0], s[2], "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "s0.h5", "1/3", "merge all 3")
    other = write_store(tmp_path / "o.h5", ["o1"], shard="1/2")
    code, text = cli("merge", s[0], other, s[2], "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "different splits")
    plain = write_store(tmp_path / "p.h5", ["p1"])
    code, text = cli("merge", *s, plain, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "p.h5", "not a shard")
    assert not (tmp_path / "m.h5").exists()
    code, text = cli("merge", *s, "--out", tmp_path / "m.h5")
    assert code == 0, text
    m = FeatureStore(tmp_path / "m.h5")
    assert len(m.utterances) == 6 and "shard" not in m.attrs  # the merged store is the whole extraction


def _located(folder, sha="cd" * 32, torch_version="2.9.0"):
    """Speech provenance of a model loaded from ``folder`` whose weights hash to ``sha``."""
    return {**PROV, "speech": {**PROV["speech"], "model": folder, "weights_sha256": {"model.safetensors": sha},
                               "library_versions": {"torch": torch_version}}}


def test_shards_whose_same_weights_lay_in_other_folders_merge(tmp_path):
    """Shards made on two machines load the same weights from their own folders: merged,
    and the merged store keeps where each shard's model was; other weights are refused."""
    a = write_store(tmp_path / "a.h5", ["a0"], prov=_located("/node1/w2v"), shard="0/2")
    b = write_store(tmp_path / "b.h5", ["b0"], prov=_located("/node2/w2v"), shard="1/2")
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert code == 0, text
    m = FeatureStore(tmp_path / "m.h5")
    assert m.provenance["speech"]["model"] == "/node1/w2v"
    assert json.loads(m.attrs["shard_provenance"]) == {"b.h5": {"speech": {"model": "/node2/w2v"}}}
    c = write_store(tmp_path / "c.h5", ["b0"], prov=_located("/node2/w2v", sha="ef" * 32), shard="1/2")
    code, text = cli("merge", a, c, "--out", tmp_path / "m2.h5")
    assert_clean_error(code, text, "c.h5", "made differently", "model")
    # other library versions only when allowed, and then on record
    d = write_store(tmp_path / "d.h5", ["b0"], prov=_located("/node1/w2v", torch_version="2.14.1"), shard="1/2")
    code, text = cli("merge", a, d, "--out", tmp_path / "m3.h5")
    assert_clean_error(code, text, "d.h5", "library_versions")
    code, text = cli("merge", a, d, "--out", tmp_path / "m3.h5", "--allow-library-mismatch")
    assert code == 0, text
    assert json.loads(FeatureStore(tmp_path / "m3.h5").attrs["shard_provenance"]) == {
        "d.h5": {"speech": {"library_versions": {"torch": "2.14.1"}}}}


def test_a_rerun_may_load_the_same_weights_from_another_folder(tmp_path):
    """Resuming (an unfinished run, or extending a finished store) with the model copied
    elsewhere: the same features, so not "made differently"; other weights are refused."""
    out = tmp_path / "f.h5"
    w = StoreWriter(out, table(["a", "b"]), {"speech": _located("/old/w2v")["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.close()  # killed: a chunk committed, no store yet
    with StoreWriter(out, table(["a", "b"]), {"speech": _located("/new/w2v")["speech"]}) as w:
        assert w.done() == {("a", "speech")}
        w.add("b", "speech", feats(1, 4, 6))
    with StoreWriter(out, table(["a", "b"]), {"speech": _located("./w2v")["speech"]}) as w:
        assert w.done() == {("a", "speech"), ("b", "speech")}
    with pytest.raises(StoreError, match="made differently"):
        StoreWriter(out, table(["a", "b"]), {"speech": _located("/new/w2v", sha="ef" * 32)["speech"]})


def test_merge_into_a_missing_folder_is_a_clear_error(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x"])
    code, text = cli("merge", a, "--out", tmp_path / "nowhere" / "m.h5")
    assert_clean_error(code, text, "nowhere", "does not exist")


def test_merge_never_overwrites(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x"])
    b = write_store(tmp_path / "b.h5", ["y"])
    target = tmp_path / "m.h5"
    target.write_bytes(b"precious")
    code, text = cli("merge", a, b, "--out", target)
    assert_clean_error(code, text, "m.h5", "already exists")
    assert code == 2
    assert target.read_bytes() == b"precious"


def test_merge_refuses_other_schema(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x"])
    b = write_store(tmp_path / "b.h5", ["y"])
    with h5py.File(b, "a") as f:
        f.attrs["schema_version"] = 99
    code, text = cli("merge", a, b, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, "b.h5", "schema version 99")


# ---------------------------------------------------------------------------------------
# bad input at the command line

def test_missing_path(tmp_path):
    code, text = cli("info", tmp_path / "nope.h5")
    assert_clean_error(code, text, "nope.h5", "no such file")
    assert code == 2  # bad input (cmarr.cli's table)


def test_not_hdf5(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("utterance_id,label\n")
    code, text = cli("validate", p)
    assert_clean_error(code, text, "notes.h5", "not an HDF5 file")
    assert code == 2  # a file that cannot be used, not a store with problems


def test_truncated_hdf5(tmp_path):
    p = write_store(tmp_path / "f.h5", [f"u{i}" for i in range(6)])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    code, text = cli("info", p)
    assert_clean_error(code, text, "f.h5", "truncated or corrupt")


def test_hdf5_that_is_not_a_store(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["Ses01F_impro01_F000"] = np.zeros((3, 768))
    code, text = cli("info", p)
    assert_clean_error(code, text, "other.h5", "not a cm-arr feature store")


def test_other_schema_version(tmp_path):
    """A store of another schema version is refused in one line naming the file and what to do."""
    p = write_store(tmp_path / "f.h5", ["a"])
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 1
    code, text = cli("validate", p)
    assert_clean_error(code, text, f"{p}: feature store schema version 1, written by an earlier cm-arr; this one "
                       "reads schema version 2: extract the features again")
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(StoreError, match="schema version 3, written by a later cm-arr; .*: update cm-arr"):
        FeatureStore(p)


def test_validate_finds_nan_inf(tmp_path):
    p = write_store(tmp_path / "f.h5", ["a", "b", "c"])
    s = FeatureStore(p)
    off_b = s._index["speech"]["b"][0]
    with h5py.File(p, "a") as f:
        ds = f["features/speech/data"]
        arr = ds[()]
        arr[off_b, 0] = np.inf
        arr[off_b + 1, 1] = np.nan
        ds[...] = arr
    code, text = cli("validate", p)
    assert_clean_error(code, text, "speech/b: 2 frames with NaN/Inf values", "do not match the checksum",
                       "2 problem(s)")


def test_validate_finds_frames_changed_after_writing(tmp_path):
    """One float16 value one step off, finite and plausible: only the checksum can tell."""
    p = write_store(tmp_path / "f.h5", ["a", "b", "c"])
    assert validate_store(p) == ([], [])
    with h5py.File(p, "a") as f:
        ds = f["features/video/data"]
        v = ds[2, 1]
        ds[2, 1] = np.nextafter(v, np.float16(np.inf))
    code, text = cli("validate", p)
    assert_clean_error(code, text, "video: the frames do not match the checksum", "1 problem(s)")


def test_validate_finds_wrong_width(tmp_path):
    p = write_store(tmp_path / "f.h5", ["a", "b"])
    with h5py.File(p, "a") as f:
        g = f["features/video"]
        rows = g["data"].shape[0]
        del g["data"]
        g.create_dataset("data", data=np.zeros((rows, 5), np.float16))
    code, text = cli("validate", p)
    assert_clean_error(code, text, "video: frames have width 5, provenance says 3")


def test_validate_against_manifest(tmp_path):
    p = write_store(tmp_path / "f.h5", ["a", "b"])
    man = tmp_path / "m.csv"
    pd.DataFrame({"utterance_id": ["a", "b", "c"], "label": ["ang", "sad", "neu"]}).to_csv(man, index=False)
    code, text = cli("validate", p, "--manifest", man)
    assert_clean_error(code, text, "1 manifest utterances are not in the store",
                       "1 utterances' label disagree with the manifest (first: 'b': store 'hap', manifest 'sad')")
    ok = tmp_path / "ok.csv"
    pd.DataFrame({"utterance_id": ["a", "b"], "label": ["ang", "hap"]}).to_csv(ok, index=False)
    code, text = cli("validate", p, "--manifest", ok)
    assert code == 0, text
    # every column both hold is compared: folds, speakers, times (to 1e-6 s) ...
    full = table(["a", "b"]).assign(wav_path=["a.wav", ""], end=[1.5 + 1e-9, 1.5])
    full.to_csv(ok, index=False)
    with h5py.File(p, "a") as f:  # the table as extraction writes it: the manifest's columns
        del f["utterances"]
        from cmarr.extract.store import write_table
        write_table(f.create_group("utterances"), full.assign(wav_path=["a.wav", None]))
    code, text = cli("validate", p, "--manifest", ok)
    assert code == 0, text
    full.assign(fold=[3, 3], start=[0.0, 0.25]).to_csv(ok, index=False)  # session 1 in one fold: no leak
    code, text = cli("validate", p, "--manifest", ok)
    assert_clean_error(code, text, "2 utterances' fold disagree with the manifest (first: 'a': store 1, manifest 3)",
                       "1 utterances' start disagree", "2 problem(s)")
    code, text = cli("validate", p, "--manifest", tmp_path)  # a folder
    assert_clean_error(code, text, str(tmp_path), "cannot read the manifest")


def test_validate_notes_a_store_made_from_another_manifest_file(tmp_path):
    prov = {m: {**p, "manifest_sha256": "ab" * 32} for m, p in PROV.items()}
    p = write_store(tmp_path / "f.h5", ["a", "b"], prov=prov)
    man = table(["a", "b"])
    assert validate_store(p, man, "ab" * 32) == ([], [])
    problems, notes = validate_store(p, man, "cd" * 32)
    assert problems == [] and notes == ["the store was extracted from another manifest file (sha256 abababababab, "
                                        "this one cdcdcdcdcdcd); its table was compared with this one row by row"]
    # extended by a run whose manifest file differs (the same rows): one modality names each file: no note
    with h5py.File(p, "a") as f:
        video = {**FeatureStore(p).provenance["video"], "manifest_sha256": "cd" * 32}
        f["provenance"].attrs["video"] = json.dumps(video)
    assert validate_store(p, man, "cd" * 32) == ([], [])


def test_info_table(tmp_path):
    p = write_store(tmp_path / "f.h5", ["a", "b", "c", "d", "e"], skip_video={"e"})
    code, text = cli("info", p)
    assert code == 0, text
    assert "5 utterances" in text and "wav2vec2-base" in text
    assert "video" in text and "speech" in text


def test_validate_requires_provenance_to_name_the_model(tmp_path):
    ids = ["a", "b"]
    random = {"speech": {"extractor": "wav2vec2", "dim": 6, "random_weights": True}}
    ok = tmp_path / "random.h5"
    with StoreWriter(ok, table(ids), random) as w:
        for i, u in enumerate(ids):
            w.add(u, "speech", feats(i, 3, 6))
    assert validate_store(ok)[0] == []
    anonymous = tmp_path / "anonymous.h5"
    with StoreWriter(anonymous, table(ids), {"speech": {"extractor": "wav2vec2", "dim": 6}}) as w:
        for i, u in enumerate(ids):
            w.add(u, "speech", feats(i, 3, 6))
    assert any("names no model or checkpoint" in p for p in validate_store(anonymous)[0])


# ---------------------------------------------------------------------------------------
# one writer per output, coverage, leftovers of dead runs

def _parts(out):
    return out.with_name(out.name + ".parts")


def test_a_second_writer_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    import os

    out = tmp_path / "f.h5"
    ids = [f"u{i}" for i in range(6)]
    first = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    for i, u in enumerate(ids[:4]):
        first.add(u, "speech", feats(i, 4, 6))
    first.flush()
    with pytest.raises(StoreError, match=rf"f\.h5: is being written by another process \(pid {os.getpid()}\)"):
        StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=2)
    chunks = sorted(_parts(out).glob("chunk-*.h5"))
    assert len(chunks) == 2  # the refused writer touched nothing of the first one's
    for i, u in enumerate(ids[4:], 4):
        first.add(u, "speech", feats(i, 4, 6))
    first.finalize()  # releases the lock
    s = FeatureStore(out)
    assert s.ids("speech") == set(ids) and validate_store(out)[0] == []
    with StoreWriter(out, table(ids), {"speech": PROV["speech"]}) as again:  # free again
        assert again.done() == {(u, "speech") for u in ids}


def test_the_lock_of_a_killed_writer_does_not_block_the_rerun(tmp_path):
    out = tmp_path / "f.h5"
    script = textwrap.dedent(f"""
        import numpy as np, pandas as pd, time
        from cmarr.extract.store import StoreWriter
        ids = ["a", "b", "c"]
        t = pd.DataFrame(dict(utterance_id=ids, corpus="c", session=1, speaker="s", label="ang", fold=1,
                              start=0.0, end=1.0))
        w = StoreWriter({str(out)!r}, t, {{"speech": {{"model": "m", "dim": 6}}}}, chunk_size=1)
        w.add("a", "speech", np.ones((3, 6), np.float32))
        w.flush()
        print("holding", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        prov = {"speech": {"model": "m", "dim": 6}}
        t = table(["a", "b", "c"])
        t["corpus"], t["speaker"], t["label"], t["end"] = "c", "s", "ang", 1.0
        with pytest.raises(StoreError, match=rf"being written by another process \(pid {proc.pid}\)"):
            StoreWriter(out, t, prov)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    with StoreWriter(out, t, prov) as w:  # the kernel dropped the dead process's lock
        assert w.done() == {("a", "speech")}
        w.add("b", "speech", np.full((3, 6), 2, np.float32))
        w.add("c", "speech", np.full((3, 6), 3, np.float32))
    s = FeatureStore(out)
    assert [float(s.get(u, "speech")[0, 0]) for u in "abc"] == [1.0, 2.0, 3.0]
    assert not _parts(out).exists()


def test_chunk_numbers_continue_after_the_highest_and_never_replace_a_chunk(tmp_path):
    out = tmp_path / "f.h5"
    ids = [f"u{i}" for i in range(6)]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("u0", "speech", feats(0, 4, 6))
    w.add("u1", "speech", feats(1, 4, 6))
    w.close()
    parts = _parts(out)
    (parts / "chunk-000000.h5").rename(parts / "chunk-000007.h5")  # a gap: counting files would reuse 000001
    before = {p.name: p.read_bytes() for p in parts.glob("chunk-*.h5")}
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=1)
    for i, u in enumerate(ids[2:], 2):
        w.add(u, "speech", feats(i, 4, 6))
    names = sorted(p.name for p in parts.glob("chunk-*.h5"))
    assert names == ["chunk-000001.h5", "chunk-000007.h5"] + [f"chunk-{n:06d}.h5" for n in range(8, 12)]
    assert all((parts / n).read_bytes() == b for n, b in before.items())
    w.finalize()
    s = FeatureStore(out)
    for i, u in enumerate(ids):
        np.testing.assert_array_equal(s.get(u, "speech"), feats(i, 4, 6).astype(np.float16))


def test_finalize_refuses_a_store_that_does_not_cover_every_utterance(tmp_path):
    out = tmp_path / "f.h5"
    ids = ["a", "b", "c"]
    prov = {"speech": PROV["speech"], "video": PROV["video"]}
    w = StoreWriter(out, table(ids), prov, chunk_size=2)
    w.add("a", "speech", feats(0, 4, 6))
    w.add("b", "speech", feats(1, 4, 6))
    w.add_error("a", "video", "no face detected")
    with pytest.raises(StoreError) as e:
        w.finalize()
    message = str(e.value)
    assert message.startswith(f"{out}: not written: 3 utterance/modality pairs have neither features nor a "
                              "recorded error")
    assert "first: c (speech), b (video), c (video)" in message and "run the same command again" in message
    assert not out.exists() and not list(tmp_path.glob("f.h5.tmp-*"))  # no store, not even a temporary one
    assert sorted(_parts(out).glob("chunk-*.h5"))  # what was finished is kept ...
    w = StoreWriter(out, table(ids), prov)  # ... and the lock released: a rerun resumes
    assert w.done() == {("a", "speech"), ("b", "speech")} and w.retried() == {("a", "video")}
    w.add("c", "speech", feats(2, 4, 6))
    for u in ids[:2]:
        w.add_error(u, "video", "no face detected")
    w.add("c", "video", feats(3, 2, 3))
    w.finalize()
    s = FeatureStore(out)
    assert s.ids("speech") == set(ids) and len(s.errors) == 2 and validate_store(out)[0] == []


def test_a_rerun_removes_the_store_left_by_a_run_killed_while_finalizing(tmp_path):
    out = tmp_path / "f.h5"
    ids = ["a", "b"]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.close()
    # the temporary store of a process that died in finalize (its pid is gone), and one of a live process
    dead = subprocess.run([sys.executable, "-c", f"import os; open({str(out)!r} + f'.tmp-{{os.getpid()}}', 'wb')"
                           ".write(b'x' * 4096); print(os.getpid())"], capture_output=True, text=True, check=True)
    leftover = tmp_path / f"f.h5.tmp-{dead.stdout.strip()}"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f"f.h5.tmp-{alive.pid}"
        busy.write_bytes(b"someone else's")
        assert leftover.exists()
        w = StoreWriter(out, table(ids), {"speech": PROV["speech"]})
        assert not leftover.exists() and busy.exists()
        w.add("b", "speech", feats(1, 4, 6))
        w.finalize()
    finally:
        alive.kill()
        alive.wait()
    assert FeatureStore(out).ids("speech") == set(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", busy.name]


def test_an_unreadable_progress_record_is_a_clear_error(tmp_path):
    out = tmp_path / "f.h5"
    ids = ["a", "b"]
    w = StoreWriter(out, table(ids), {"speech": PROV["speech"]}, chunk_size=1)
    w.add("a", "speech", feats(0, 4, 6))
    w.close()
    state = _parts(out) / "state.json"
    assert state.exists() and not list(_parts(out).glob("*.tmp"))  # written whole, under a temporary name
    state.write_text("")  # what a crash in a non-atomic write leaves
    with pytest.raises(StoreError) as e:
        StoreWriter(out, table(ids), {"speech": PROV["speech"]})
    assert str(e.value).startswith(f"{state}: cannot be read (empty or damaged)")
    assert "remove this file and run it again to resume" in str(e.value)
    state.unlink()  # what the message says to do
    with StoreWriter(out, table(ids), {"speech": PROV["speech"]}) as w:
        assert w.done() == {("a", "speech")}
        w.add("b", "speech", feats(1, 4, 6))
    # with nothing committed yet there is nothing to protect: a damaged record is replaced
    out2 = tmp_path / "g.h5"
    StoreWriter(out2, table(ids), {"speech": PROV["speech"]}).close()
    (_parts(out2) / "state.json").write_text("{")
    with StoreWriter(out2, table(ids), {"speech": PROV["speech"]}) as w:
        w.add("a", "speech", feats(0, 4, 6))
        w.add("b", "speech", feats(1, 4, 6))
    assert FeatureStore(out2).ids("speech") == set(ids)


def test_an_output_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "notstore.h5").write_text("x")
    with pytest.raises(StoreError, match=r"notstore\.h5: is a file, not a folder "
                                         r"\(--out .*notstore\.h5/f\.h5 needs a folder there\)"):
        StoreWriter(tmp_path / "notstore.h5" / "f.h5", table(["a"]), {"speech": PROV["speech"]})
    with pytest.raises(StoreError, match=r"notstore\.h5: is a file, not a folder"):
        StoreWriter(tmp_path / "notstore.h5" / "deeper" / "f.h5", table(["a"]), {"speech": PROV["speech"]})


# ---------------------------------------------------------------------------------------
# merge order, listing errors, validating a shard

def _write_by_id(path, rows, shard=None, fail=()):
    """A store of the table ``rows`` whose values depend on the utterance id only (so shards
    equal the whole)."""
    with StoreWriter(path, rows, {"speech": PROV["speech"]}, chunk_size=2,
                     extra_attrs={"shard": shard} if shard else None) as w:
        for u in rows["utterance_id"]:
            if u in fail:
                w.add_error(u, "speech", f"unreadable audio {u}")
            else:
                w.add(u, "speech", feats(int(u[1:]), 3 + int(u[1:]) % 4, 6), frame_rate=50.0)
    return path


def test_merged_shards_equal_the_single_process_store_row_for_row(tmp_path):
    from cmarr.extract.features import select_shard

    ids = [f"u{i:02d}" for i in range(11)]
    fail = {"u03", "u04", "u09"}
    manifest = table(ids).sample(frac=1, random_state=0)  # any row order
    single = _write_by_id(tmp_path / "single.h5", select_shard(manifest, 0, 1), fail=fail)
    shards = [_write_by_id(tmp_path / f"s{k}.h5", select_shard(manifest, k, 3), shard=f"{k}/3", fail=fail)
              for k in range(3)]
    merged = tmp_path / "merged.h5"
    code, text = cli("merge", shards[2], shards[0], shards[1], "--out", merged)  # in any order
    assert code == 0, text
    a, b = FeatureStore(single), FeatureStore(merged)
    pd.testing.assert_frame_equal(a.utterances, b.utterances)
    assert list(a.utterances["utterance_id"]) == ids
    assert a._order == b._order and a.checksums == b.checksums
    pd.testing.assert_frame_equal(a.errors, b.errors)
    assert list(b.errors["utterance_id"]) == sorted(fail)


def test_merge_names_the_shard_given_twice(tmp_path):
    a = write_store(tmp_path / "a.h5", ["x"])
    b = write_store(tmp_path / "b.h5", ["y"])
    code, text = cli("merge", a, b, b, "--out", tmp_path / "m.h5")
    assert_clean_error(code, text, f"{b}: the same shard is given twice")
    assert f"{a}:" not in text


def test_errors_command_lists_every_recorded_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    ids = [f"u{i:02d}" for i in range(70)]
    prov = {"speech": PROV["speech"], "video": PROV["video"]}
    path = tmp_path / "f.h5"
    with StoreWriter(path, table(ids + ["zz"]), prov, chunk_size=16) as w:
        for i, u in enumerate(ids):
            w.add(u, "speech", feats(i, 3, 6))
            w.add_error(u, "video", f"no face detected in {u}.avi")
        w.add("zz", "speech", feats(99, 3, 6))
        w.add("zz", "video", feats(98, 2, 3))
        w.add_error("u05", "speech", "unreadable audio [corrupt header]")  # replaced by the features: dropped
    code, text = cli("info", path)
    assert code == 0 and f"70 recorded extraction failures; `cm-arr-features errors {path}` lists them" in text
    code, text = cli("errors", path)
    assert code == 0, text
    assert "70 recorded extraction failures" in text
    lines = [line for line in text.splitlines() if "no face detected in" in line]
    assert len(lines) == 70
    for u, line in zip(ids, lines):
        assert u in line and "video" in line and f"{u}.avi" in line
    code, text = cli("errors", path, "--modality", "speech")
    assert code == 0 and "no recorded speech extraction failures" in text
    code, text = cli("errors", path, "--modality", "smell")
    assert_clean_error(code, text, "--modality 'smell'")
    code, text = cli("errors", tmp_path / "nope.h5")
    assert_clean_error(code, text, "nope.h5", "no such file")
    code, text = cli("validate", path)
    assert code == 0 and f"`cm-arr-features errors {path}` lists them" in text


def test_errors_command_shows_reasons_with_brackets_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    path = tmp_path / "f.h5"
    with StoreWriter(path, table(["a", "b"]), {"speech": PROV["speech"]}) as w:
        w.add("a", "speech", feats(0, 3, 6))
        w.add_error("b", "speech", "empty transcript after removing [LAUGHTER]")
    code, text = cli("errors", path)
    assert code == 0 and "1 recorded extraction failures" in text
    assert "empty transcript after removing [LAUGHTER]" in text


def test_validate_checks_a_shard_against_its_share_of_the_manifest(tmp_path):
    from cmarr.extract.features import select_shard

    ids = [f"u{i}" for i in range(5)]
    man = tmp_path / "m.csv"
    manifest = table(ids)
    manifest.to_csv(man, index=False)
    rows = select_shard(manifest, 1, 2)
    share = list(rows["utterance_id"])
    p = _write_by_id(tmp_path / "s1.h5", rows, shard="1/2")
    code, text = cli("validate", p, "--manifest", man)
    assert code == 0, text
    assert "shard 1/2 of an extraction: checked against that shard's share of the manifest (2 of 5 utterances)" in text
    short = _write_by_id(tmp_path / "short.h5", rows.iloc[:1], shard="1/2")  # a shard lacking one of its utterances
    code, text = cli("validate", short, "--manifest", man)
    assert_clean_error(code, text, "1 manifest utterances are not in the store", repr(share[1]))
    assert code == 1  # validation ran and found problems
    plain = _write_by_id(tmp_path / "plain.h5", rows)  # not a shard: the whole manifest counts
    code, text = cli("validate", plain, "--manifest", man)
    assert_clean_error(code, text, "3 manifest utterances are not in the store")


def test_commit_policy_counts_utterances_and_bytes(tmp_path):
    """A chunk is committed at chunk_size results or at chunk_bytes of features; nothing
    else commits but flush and finalize."""
    ids = [f"u{i}" for i in range(9)]
    prov = {"speech": PROV["speech"]}
    one = feats(0, 4, 6).astype(np.float16).nbytes  # bytes of one stored (4, 6) matrix

    def chunks(out):
        return sorted(p.name for p in _parts(out).glob("chunk-*.h5"))

    out = tmp_path / "bytes.h5"
    w = StoreWriter(out, table(ids), prov, chunk_size=100, chunk_bytes=3 * one)
    for i in range(5):
        w.add(ids[i], "speech", feats(i, 4, 6))
    assert chunks(out) == ["chunk-000000.h5"]  # the third matrix reached 3 * one; two wait in the buffer
    w.add_error(ids[5], "speech", "unreadable")  # an error record has no bytes
    assert chunks(out) == ["chunk-000000.h5"]
    w.close()
    with h5py.File(_parts(out) / "chunk-000000.h5", "r") as f:
        assert list(f["features/speech/ids"].asstr()[()]) == ids[:3]

    out = tmp_path / "count.h5"
    w = StoreWriter(out, table(ids), prov, chunk_size=3)
    for i in range(4):
        w.add(ids[i], "speech", feats(i, 4, 6))
    assert chunks(out) == ["chunk-000000.h5"]
    w.flush()
    assert chunks(out) == ["chunk-000000.h5", "chunk-000001.h5"]
    w.close()
    assert StoreWriter(out, table(ids), prov).done() == {(u, "speech") for u in ids[:4]}

    for bad in ({"chunk_size": 0}, {"chunk_bytes": 0}):
        with pytest.raises(StoreError, match="each must be positive"):
            StoreWriter(tmp_path / "bad.h5", table(ids), prov, **bad)


@pytest.mark.parametrize("whole_blocks", [True, False])
def test_assembled_store_is_the_same_read_whole_or_per_utterance(tmp_path, monkeypatch, whole_blocks):
    """Assembling reads a chunk's block whole (small modalities) or per utterance (large
    ones, WHOLE_BLOCK_READ_BYTES); both give the same store, also when chunks hold the
    utterances out of table order and a later chunk replaces an earlier result."""
    import cmarr.extract.store.assemble as assemble_mod

    monkeypatch.setattr(assemble_mod, "WHOLE_BLOCK_READ_BYTES", (1 << 30) if whole_blocks else 0)
    reads = []
    real = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: reads.append(k.get("count")) or real(*a, **k))
    ids = [f"u{i}" for i in range(8)]
    prov = {"speech": PROV["speech"]}
    out = tmp_path / "f.h5"
    order = [5, 2, 7, 0, 3, 6, 1, 4]  # as a length-sorted extractor finishes them
    w = StoreWriter(out, table(ids), prov, chunk_size=3)
    for i in order:
        w.add(ids[i], "speech", feats(1000 + i, 2 + i, 6))  # superseded below for u2 and u6
    w.flush()
    w.add(ids[2], "speech", feats(2, 4, 6))
    w.add(ids[6], "speech", feats(6, 8, 6))
    w.finalize()
    s = FeatureStore(out)
    assert list(s._index["speech"]) == ids  # table order
    for i, u in enumerate(ids):
        want = feats(i, 4 if i == 2 else 8, 6) if i in (2, 6) else feats(1000 + i, 2 + i, 6)
        np.testing.assert_array_equal(s.get(u, "speech"), want.astype(np.float16))
    assert validate_store(out) == ([], [])
    # whole: one read per chunk (4 chunks); per utterance: one read per stored matrix (8)
    assert len(reads) == (4 if whole_blocks else 8)


def test_a_dropped_writer_releases_its_lock_without_gc(tmp_path, monkeypatch):
    """A writer dropped without close, also after a failed commit, frees its output at once:
    nothing holds a reference back to it."""
    import gc

    out = tmp_path / "f.h5"
    failures = _failing_chunk_writes(monkeypatch, 1)
    w = StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}, chunk_size=1)
    with pytest.raises(OSError, match="No space left"):
        w.add("a", "speech", feats(0, 4, 6))
    assert len(failures) == 1
    gc.disable()
    try:
        del w
        StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}).close()  # not refused: the lock is free
    finally:
        gc.enable()


def test_a_failed_finalize_in_a_with_block_closes_the_writer(tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    _failing_chunk_writes(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        with StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}) as w:
            w.add("a", "speech", feats(0, 4, 6))
    assert not w._lock.held
    StoreWriter(out, table(["a", "b"]), {"speech": PROV["speech"]}).close()  # a rerun is not refused


def test_reading_a_store_needs_no_fcntl(tmp_path):
    """Readers (training, prediction) may run where POSIX file locks do not exist: the lock
    code is imported by writers only."""
    p = write_store(tmp_path / "f.h5", ["a", "b"])
    code = ("import sys\n"
            "sys.modules['fcntl'] = None  # import fcntl now raises ImportError\n"
            "from cmarr.extract.store import FeatureStore\n"
            f"s = FeatureStore({str(p)!r})\n"
            "s.verify()\n"
            "print(s.get('b', 'speech').shape, sorted(s.ids('speech')),"
            " 'fcntl' in sys.modules and sys.modules['fcntl'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(6, 6) ['a', 'b'] None"
