"""The baseline-missing variant, cm-arr-results over seeds, and the cross-modal synthetic store."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cmarr.extract.base import LABELS
from cmarr.model import CMARRConfig
from cmarr.pipelines.cli.results import app as combine_app
from cmarr.pipelines.combine import CombineError, combine_runs
from cmarr.pipelines.conditions import MISSING_CONDITIONS
from cmarr.pipelines.demo.synthetic import CrossModalSpec, make_crossmodal_data, make_synthetic_store
from cmarr.pipelines.metrics import TABLE_ROWS, results_markdown, summarize_seeds

torch.set_num_threads(1)
runner = CliRunner()
CONDS = ("t", "s", "v", "vt", "sv", "st", "svt")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("variants")
    store = make_synthetic_store(root / "s.h5", n_per_class=3, sessions=3, seed=2)
    cfg = tiny_config(root / "tiny.yaml", epochs=1)
    return root, store, cfg


# ---------------------------------------------------------------- baseline-missing

def test_baseline_missing_is_the_baseline_trained_on_missing_conditions():
    from cmarr.pipelines.conditions import resolve_train_conditions
    from cmarr.pipelines.config import VARIANT_NAMES, TrainConfig, with_overrides

    c = CMARRConfig.for_variant("baseline-missing")
    assert c.reconstruction is False and c.train_missing is True
    assert (c.alpha, c.beta, c.lambda_rec, c.nll_weight) == (0.0, 0.0, 0.0, 0.0)
    base = CMARRConfig.for_variant("baseline")
    differ = {k for k, v in dataclasses.asdict(c).items() if dataclasses.asdict(base)[k] != v}
    assert differ == {"train_missing", "variant"}
    assert resolve_train_conditions("auto", c.train_missing) == "missing"
    assert resolve_train_conditions("auto", base.train_missing) == "full"
    assert "baseline-missing" in VARIANT_NAMES
    assert with_overrides(TrainConfig(), {"variant": "baseline-missing"}).variant == "baseline-missing"


def test_baseline_missing_trains_on_missing_conditions(env):
    from cmarr.pipelines.cli.train import app

    root, store, cfg = env
    out = root / "run-bm"
    res = runner.invoke(app, ["--features", str(store), "--config", str(cfg), "--variant", "baseline-missing",
                              "--folds", "1", "--out", str(out), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["variant"] == "baseline-missing" and set(m["folds"]["1"]) == set(CONDS) | {"avg"}
    side = yaml.safe_load((out / "model_config.yaml").read_text())["model"]
    assert side["reconstruction"] is False and side["train_missing"] is True and side["lambda_rec"] == 0
    ck = torch.load(out / "fold1" / "best.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("flows.", "recon", "umc.")) for k in ck["model"])  # the baseline's network
    assert "paper" not in m  # the paper has no row for it
    bad = runner.invoke(app, ["--features", str(store), "--variant", "baseline-misssing", "--out", str(root / "x")])
    assert bad.exit_code == 2 and "baseline-missing" in bad.output


# ---------------------------------------------------------------- seeds in cm-arr-results

def _fold(war, uar):
    cm = [[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 1, 4]]
    out = {c: {"war": war, "uar": uar, "confusion": cm, "n": 20, "n_no_input": 0, "n_reduced": 0} for c in CONDS}
    out["avg"] = {"war": war, "uar": uar}
    return out


def test_summarize_seeds_by_hand():
    # seed 0: folds 0.5, 0.7 (mean 0.6); seed 1: folds 0.6, 1.0 (mean 0.8)
    s = summarize_seeds({0: {1: _fold(0.5, 0.4), 2: _fold(0.7, 0.4)}, 1: {1: _fold(0.6, 0.4), 2: _fold(1.0, 0.4)}})
    assert s["seed_summary"]["t"]["war_mean"] == pytest.approx(0.7)
    assert s["seed_summary"]["t"]["war_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert s["seed_summary"]["t"]["uar_std"] == pytest.approx(0.0)
    assert s["summary"]["t"]["war_mean"] == pytest.approx(0.7)
    assert s["summary"]["t"]["war_std"] == pytest.approx(np.std([0.5, 0.7, 0.6, 1.0], ddof=1))
    assert s["summary"]["t"]["n_runs"] == 4 and s["seed_summary"]["t"]["n_seeds"] == 2
    assert s["folds"]["2"]["t"]["war"] == pytest.approx(0.85) and s["folds"]["2"]["t"]["n"] == 20
    assert np.asarray(s["summary"]["svt"]["confusion_total"]).sum() == 80
    with pytest.raises(ValueError, match="same folds"):
        summarize_seeds({0: {1: _fold(0.5, 0.4)}, 1: {2: _fold(0.5, 0.4)}})


def _avg(conds, k):
    return float(np.mean([conds[c][k] for c in MISSING_CONDITIONS]))


def test_combine_runs_of_two_seeds(env):
    from cmarr.pipelines.train import run_training

    root, store, cfg = env
    runs = {s: root / f"seed{s}" for s in (0, 1)}
    for s, d in runs.items():
        run_training(store, cfg, out_dir=d, folds=[1, 2], device="cpu", seed=s, log=None)
    out = root / "both-seeds"
    res = runner.invoke(combine_app, [str(runs[0]), str(runs[1]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 seeds (0, 1)" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [0, 1] and sorted(m["folds"], key=int) == ["1", "2"]
    # direct computation from the folds' own metrics.json
    per = {s: {k: json.loads((runs[s] / f"fold{k}" / "metrics.json").read_text())["conditions"] for k in (1, 2)}
           for s in (0, 1)}
    assert per[0][1] != per[1][1]  # the seeds gave different results (else the test proves little)
    for r in TABLE_ROWS:
        for key in ("war", "uar"):
            get = (lambda c, key=key: _avg(c, key)) if r == "avg" else (lambda c, r=r, key=key: c[r][key])
            vals = np.array([[get(per[s][k]) for k in (1, 2)] for s in (0, 1)])  # (seeds, folds)
            seed_means = vals.mean(axis=1)
            assert m["seed_summary"][r][f"{key}_mean"] == pytest.approx(seed_means.mean())
            assert m["seed_summary"][r][f"{key}_std"] == pytest.approx(seed_means.std(ddof=1))
            assert m["summary"][r][f"{key}_mean"] == pytest.approx(vals.mean())
            assert m["summary"][r][f"{key}_std"] == pytest.approx(vals.ravel().std(ddof=1))
            assert m["folds"]["2"][r][key] == pytest.approx(vals[:, 1].mean())
    assert m["per_seed"]["1"]["folds"]["1"]["t"]["war"] == pytest.approx(per[1][1]["t"]["war"])
    assert m["config"]["seed"] == 0 and m["per_seed"]["1"]["run_dirs"] == [str(runs[1])]
    md = (out / "results.md").read_text()
    assert "2 seeds (0, 1) x 2 folds (1, 2)" in md and "WAR over seeds" in md
    assert md == results_markdown(m, "cm-arr, folds 1, 2, seeds 0, 1 (combined)")

    # a run differing in more than seed is refused, naming the key
    other = root / "seed1-lr"
    shutil.copytree(runs[1], other)
    doc = yaml.safe_load((other / "config.yaml").read_text())
    doc["optim"]["lr"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CombineError, match=r"optim\.lr \(only folds, device and seed may differ\)"):
        combine_runs([runs[0], other], root / "c-lr")
    # seeds that cover different folds are refused
    part = root / "seed1-fold1"
    shutil.copytree(runs[1], part)
    shutil.rmtree(part / "fold2")
    doc = yaml.safe_load((part / "config.yaml").read_text())
    doc["protocol"]["folds"] = [1]
    (part / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(CombineError, match="cover different folds"):
        combine_runs([runs[0], part], root / "c-part")
    # one seed given twice is still a duplicate fold
    with pytest.raises(CombineError, match="fold 1 is also in another RUN_DIR"):
        combine_runs([runs[0], runs[0]], root / "c-dup")


# ---------------------------------------------------------------- the cross-modal store

def test_crossmodal_store_is_valid_and_shaped_like_the_shared_one(tmp_path):
    from cmarr.extract.store import FeatureStore, validate_store

    a = make_synthetic_store(tmp_path / "shared.h5", n_per_class=3, sessions=3, seed=1)
    b = make_synthetic_store(tmp_path / "cross.h5", n_per_class=3, sessions=3, seed=1, kind="crossmodal")
    problems, _ = validate_store(b)
    assert problems == []
    with FeatureStore(a) as fa, FeatureStore(b) as fb:
        ta, tb = fa.utterances, fb.utterances
        assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
        assert ta.groupby(["fold", "label"]).size().to_dict() == tb.groupby(["fold", "label"]).size().to_dict()
        assert list(ta["utterance_id"]) == list(tb["utterance_id"])
        assert fb.provenance["speech"]["kind"] == "crossmodal" and fb.provenance["text"]["role"] == "code"
        assert fa.provenance["speech"]["kind"] == "shared"
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_store(tmp_path / "x.h5", kind="other")


def _pooled(feats, ids, m):
    ok = np.array([u in feats[m] for u in ids])
    width = next(iter(feats[m].values())).shape[1]
    x = np.zeros((len(ids), width))
    x[ok] = [feats[m][u].astype(np.float64).mean(axis=0) for u in ids[ok]]
    return x, ok


def _ridge(x, y, lam=1e-3):
    x1 = np.c_[x, np.ones(len(x))]
    return np.linalg.solve(x1.T @ x1 + lam * np.eye(x1.shape[1]), x1.T @ y)


def _apply(x, w):
    return np.c_[x, np.ones(len(x))] @ w


def _class_share(x, y):
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(LABELS))])
    return means[y].var(axis=0).sum() / x.var(axis=0).sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_crossmodal_structure(seed):
    """A coded modality predicts the carrier's pooled features (least squares, leave one
    session out) but carries little class evidence of its own; the carrier read back from it
    carries more than it does directly, for a nearest-class-mean classifier (whose class
    means are learned on the real carrier)."""
    table, feats, _ = make_crossmodal_data(CrossModalSpec(n_per_class=40), seed=seed)
    ids = table["utterance_id"].to_numpy()
    y = table["label"].map({l: i for i, l in enumerate(LABELS)}).to_numpy()
    onehot = np.eye(len(LABELS))[y]
    folds = table["fold"].to_numpy()
    xa, _ = _pooled(feats, ids, "speech")  # the carrier (never absent)
    def ncm(x, mu):  # nearest class mean
        return -((x[:, None, :] - mu[None]) ** 2).sum(axis=-1)

    def means(x, rows):
        return np.stack([x[rows & (y == c)].mean(axis=0) for c in range(len(LABELS))])

    assert _class_share(xa, y) > 0.25
    ncm_gain = []
    for m in ("text", "video"):
        xb, ok = _pooled(feats, ids, m)
        assert _class_share(xb[ok], y[ok]) < 0.15  # B looks class-independent
        sse = sst = 0.0
        hits = {"ridge_a": 0, "ridge_b": 0, "ncm_b": 0, "ncm_rec": 0}
        n = 0
        for k in np.unique(folds):
            train, test = (folds != k), (folds == k) & ok
            fit = train & ok
            w = _ridge(xb[fit], xa[fit])  # B -> A
            sse += ((xa[test] - _apply(xb[test], w)) ** 2).sum()
            sst += ((xa[test] - xa[test].mean(axis=0)) ** 2).sum()
            def right(score, test=test):
                return int((score.argmax(axis=1) == y[test]).sum())

            hits["ridge_a"] += right(_apply(xa[test], _ridge(xa[train], onehot[train])))
            hits["ridge_b"] += right(_apply(xb[test], _ridge(xb[fit], onehot[fit])))
            hits["ncm_b"] += right(ncm(xb[test], means(xb, fit)))
            hits["ncm_rec"] += right(ncm(_apply(xb[test], w), means(xa, train)))
            n += int(test.sum())
        acc = {key: h / n for key, h in hits.items()}
        assert 1 - sse / sst > 0.45, (m, 1 - sse / sst)  # B -> A explains much of A's variance
        assert acc["ridge_a"] > acc["ridge_b"] + 0.05, (m, acc)  # a linear classifier reads less from B
        ncm_gain.append(acc["ncm_rec"] - acc["ncm_b"])
    # the NCM gain depends on the random maps: over seeds 0-5 and both coded modalities it
    # ranged from -0.03 to 0.18, its mean over the two above 0.03 for seeds 0, 1, 3, 4, 5 (not 2)
    assert np.mean(ncm_gain) > 0.03, ncm_gain
