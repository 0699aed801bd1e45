"""cm-arr-predict: trained checkpoints applied to a store (the same, another, one lacking a
modality), averaging several checkpoints, the feature-provenance check, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tolerance import TINY_CMARR_DEPTH, assert_float32_close
from typer.testing import CliRunner

from cmarr.pipelines.cli.predict import app
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.predict import (
    PredictError,
    feature_differences,
    parse_conditions,
    predict_store,
    prediction_metrics,
)
from cmarr.pipelines.train import run_training

torch.set_num_threads(1)
runner = CliRunner()
SEVEN = ["t", "s", "v", "vt", "sv", "st", "svt"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("predict")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    cfg = tiny_config(root / "tiny.yaml", epochs=1)
    run_training(store, cfg, out_dir=root / "run", folds=[1, 2], device="cpu", seed=0, log=None)
    return root, store, root / "run"


def test_predictions_on_the_training_store_reproduce_the_folds_test_evaluation(run):
    """The test part of fold 1 is the only part its checkpoint never saw: scored alone, the
    predictions give exactly the fold's own test metrics (same confusion matrices)."""
    root, store, rd = run
    table, accepted = predict_store([rd / "fold1" / "best.pt"], store, SEVEN, device="cpu")
    assert accepted == []
    ck = torch.load(rd / "fold1" / "best.pt", map_location="cpu", weights_only=True)
    seen = set(ck["split"]["train"]) | set(ck["split"]["val"])
    assert set(table.loc[~table["seen_in_training"], "utterance_id"]) == set(ck["split"]["test"])
    assert set(table.loc[table["seen_in_training"], "utterance_id"]) == seen
    got = prediction_metrics(table)
    want = json.loads((rd / "fold1" / "metrics.json").read_text())["conditions"]
    for c in SEVEN:
        assert got[c]["confusion"] == want[c]["confusion"], c
        assert got[c]["n_no_input"] == want[c]["n_no_input"], c
    assert got["avg"]["uar"] == pytest.approx(want["avg"]["uar"])
    probs = table[[f"p_{k}" for k in ("ang", "hap", "neu", "sad")]].to_numpy()
    scored = table["prediction"] != ""
    np.testing.assert_allclose(probs[scored.to_numpy()].sum(axis=1), 1.0, atol=1e-5)
    assert (table.loc[scored, "prediction"].to_numpy()
            == np.array(["ang", "hap", "neu", "sad"])[probs[scored.to_numpy()].argmax(axis=1)]).all()
    assert len(table) == 7 * table["utterance_id"].nunique()


def test_several_checkpoints_average_their_probabilities(run):
    root, store, rd = run
    cols = [f"p_{k}" for k in ("ang", "hap", "neu", "sad")]
    one = predict_store([rd / "fold1" / "best.pt"], store, ["st"], device="cpu")[0]
    two = predict_store([rd / "fold2" / "best.pt"], store, ["st"], device="cpu")[0]
    both = predict_store([rd / "fold1" / "best.pt", rd / "fold2" / "best.pt"], store, ["st"], device="cpu")[0]
    np.testing.assert_allclose(both[cols].to_numpy(), (one[cols].to_numpy() + two[cols].to_numpy()) / 2, atol=1e-6)
    assert (both["seen_in_training"] == (one["seen_in_training"] | two["seen_in_training"])).all()


def test_a_store_that_lacks_video_altogether(run):
    """New media without video: "present" predicts every utterance from speech and text;
    under {v} no utterance has input, and each still gets a row (empty prediction)."""
    root, store, rd = run
    novideo = make_synthetic_store(root / "novideo.h5", n_per_class=2, sessions=2, seed=5,
                                   modalities=("speech", "text"))
    table, _ = predict_store([rd / "fold1" / "best.pt"], novideo, ["present", "v", "sv"], device="cpu")
    n = table["utterance_id"].nunique()
    present = table[table["condition"] == "present"]
    assert len(present) == n and (present["available"] == "s,t").all() and (present["prediction"] != "").all()
    v = table[table["condition"] == "v"]
    assert len(v) == n and (v["available"] == "").all() and (v["prediction"] == "").all()
    assert v[["p_ang", "p_hap", "p_neu", "p_sad"]].isna().all().all()
    sv = table[table["condition"] == "sv"]
    assert (sv["available"] == "s").all() and (sv["prediction"] != "").all()
    # under {s, v} only speech is there: the same input as {s}, so the same probabilities
    s_only = predict_store([rd / "fold1" / "best.pt"], novideo, ["s"], device="cpu")[0]
    # {s, v} ran in a batch with the "present" rows: another batch, so equal up to float32 reordering.
    # A logit error d moves a probability by at most 2d; the logits' sums run at the scale of the
    # normalised activations (order 1) or of the logits' spread, whichever is larger.
    spread = np.ptp(np.log(s_only[["p_ang", "p_hap", "p_neu", "p_sad"]].to_numpy()), axis=1).max()
    assert_float32_close(sv[["p_ang", "p_sad"]].to_numpy(), s_only[["p_ang", "p_sad"]].to_numpy(), TINY_CMARR_DEPTH,
                         "{s, v} vs {s}", scale=2 * max(1.0, spread))
    m = prediction_metrics(table)
    assert set(m) <= {"present", "sv"} and "v" not in m


def test_a_shard_of_an_extraction_is_predicted_on_like_a_store(run, tmp_path):
    import shutil

    import h5py

    root, store, rd = run
    shard = tmp_path / "shard.h5"
    shutil.copy(store, shard)
    with h5py.File(shard, "r+") as f:
        f.attrs["shard"] = "0/2"
    a = predict_store([rd / "fold1" / "best.pt"], shard, ["vt"], device="cpu")[0]
    b = predict_store([rd / "fold1" / "best.pt"], store, ["vt"], device="cpu")[0]
    pd.testing.assert_frame_equal(a, b)


def test_a_damaged_store_is_refused(run, tmp_path):
    import shutil

    import h5py

    root, store, rd = run
    bad = tmp_path / "bad.h5"
    shutil.copy(store, bad)
    with h5py.File(bad, "r+") as f:
        f["features/text/data"][0, 0] += 1.0
    with pytest.raises(PredictError, match=r"text: the frames do not match the checksum"):
        predict_store([rd / "fold1" / "best.pt"], bad, ["present"], device="cpu")


def test_features_made_differently_are_refused_unless_accepted(run):
    root, store, rd = run
    other = make_synthetic_store(root / "seed6.h5", n_per_class=2, sessions=2, seed=6)  # another generator seed
    with pytest.raises(PredictError, match=r"speech features were made differently.*seed: trained on 5, store has 6"):
        predict_store([rd / "fold1" / "best.pt"], other, ["present"], device="cpu")
    table, accepted = predict_store([rd / "fold1" / "best.pt"], other, ["present"], device="cpu",
                                    allow_feature_mismatch=True)
    assert {a.split(":")[0] for a in accepted} == {"speech", "text", "video"} and len(table)
    same_way = make_synthetic_store(root / "more.h5", n_per_class=3, sessions=2, seed=5)  # other data, same recipe
    assert predict_store([rd / "fold1" / "best.pt"], same_way, ["present"], device="cpu")[1] == []


def test_feature_differences_rules():
    """Copies of one model in two folders (weights sha256 equal) make the same features; where,
    when and for which corpus a store was made, and the duration check, do not matter."""
    one = {"model": "/a/models/bert", "revision": None, "commit_hash": None, "layer": -1,
           "weights_sha256": {"model.safetensors": "aa"},
           "tokenizer": {"class": "BertTokenizer", "name_or_path": "/a/models/bert", "vocab_size": 30522},
           "created": "2026-01-01", "host": "a", "corpus": "iemocap", "manifest_sha256": "x",
           "duration_check": "max(0.05 s, 0.05 x expected)"}
    copy = {**one, "model": "/b/bert-copy", "tokenizer": {**one["tokenizer"], "name_or_path": "/b/bert-copy"},
            "created": "2026-02-02", "host": "b", "corpus": "msp-improv", "manifest_sha256": "y",
            "duration_check": "max(0.2 s, 0.1 x expected)"}
    assert feature_differences(one, copy) == []
    other = {**copy, "weights_sha256": {"model.safetensors": "bb"}}
    diffs = feature_differences(one, other)
    assert any(d.startswith("model:") for d in diffs) and any(d.startswith("weights_sha256:") for d in diffs)
    assert any(d.startswith("tokenizer:") for d in diffs)  # its path counts again once the weights differ
    assert feature_differences(one, {**one, "layer": 6}) == ["layer: trained on -1, store has 6"]
    hub = {k: v for k, v in one.items() if k != "weights_sha256"} | {"model": "bert-base-uncased", "commit_hash": "c1"}
    assert feature_differences(hub, {**hub, "host": "c"}) == []
    assert [d.split(":")[0] for d in feature_differences(hub, {**hub, "commit_hash": "c2"})] == ["commit_hash"]


def test_condition_names():
    assert parse_conditions("present") == ["present"]
    assert parse_conditions("all") == SEVEN
    assert parse_conditions("ts, vs,t") == ["st", "sv", "t"]
    for bad in ("x", "tt", "s,s", ""):
        with pytest.raises(PredictError):
            parse_conditions(bad)


def test_cli_writes_predictions_and_metrics_and_refuses_bad_input(run, tmp_path):
    root, store, rd = run
    out = tmp_path / "p.csv"
    args = ["--checkpoint", str(rd / "fold1" / "best.pt"), "--features", str(store), "--out", str(out),
            "--conditions", "all", "--device", "cpu"]
    res = runner.invoke(app, args + ["--metrics", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "{s, v, t}" in res.output and "Avg." in res.output
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["utterance_id", "condition", "available", "label", "prediction", "p_ang", "p_hap",
                                   "p_neu", "p_sad", "seen_in_training"]
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m["conditions"]) == set(SEVEN) | {"avg"}
    before = out.read_bytes()
    for extra, message in (
            ([], f"{out}: already exists"),
            (["--conditions", "x"], "condition 'x'"),
            (["--checkpoint", str(tmp_path / "none.pt")], "none.pt: no such checkpoint"),
    ):
        a = args[:]
        if extra[:1] == ["--conditions"]:
            a[a.index("--conditions") + 1] = extra[1]
        elif extra:
            a[1] = extra[1]
        res = runner.invoke(app, a + (["--overwrite"] if extra else []))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert message in " ".join(res.output.split()), res.output
    assert out.read_bytes() == before  # nothing replaced
    for flag, path, message in (("--metrics", out, "--metrics and --out name the same file"),
                                ("--out", store, "is an input (--features / --checkpoint)"),
                                ("--out", tmp_path, "is a folder; give a file path")):
        a = args + ["--overwrite"]
        if flag == "--out":
            a[a.index("--out") + 1] = str(path)
        else:
            a += [flag, str(path)]
        res = runner.invoke(app, a)
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    res = runner.invoke(app, args + ["--overwrite", "--device", "gpu"])
    assert res.exit_code == 2 and "device 'gpu': expected auto, cpu, cuda or cuda:N" in res.output, res.output
    assert out.read_bytes() == before and store.stat().st_size > 0
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    a = args[:]
    a[1] = str(tmp_path / "junk.pt")
    res = runner.invoke(app, a + ["--overwrite"])
    assert res.exit_code == 2 and "junk.pt: not a readable cm-arr-train checkpoint" in " ".join(res.output.split())
    res = runner.invoke(app, args + ["--overwrite", "--conditions", "present"])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(out, keep_default_na=False)["condition"].eq("present").all()


def test_only_the_modalities_the_conditions_use_are_read(run, monkeypatch):
    from cmarr.extract.store import FeatureStore

    root, store, rd = run
    read = []
    real = FeatureStore.load_all
    monkeypatch.setattr(FeatureStore, "load_all",
                        lambda self, mods=None, **kw: read.append(tuple(mods)) or real(self, mods, **kw))
    t_only = predict_store([rd / "fold1" / "best.pt"], store, ["t"], device="cpu")[0]
    assert read[-1] == ("text",)
    everything = predict_store([rd / "fold1" / "best.pt"], store, ["present", "t"], device="cpu")[0]
    assert read[-1] == ("speech", "text", "video")
    pd.testing.assert_frame_equal(t_only.reset_index(drop=True),
                                  everything[everything["condition"] == "t"].reset_index(drop=True))
