"""Config, store loading, splits, condition sampling, batching, metrics, synthetic stores."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cmarr.pipelines.conditions import CONDITION_MASKS, CONDITION_NAMES, condition_available, sample_conditions
from cmarr.pipelines.config import ConfigError, load_config, with_overrides
from cmarr.pipelines.data import Collate, DataError, ResidentData, StoreData
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.metrics import build_metrics, confusion, results_markdown, score, war_uar
from cmarr.pipelines.validation import SplitError, split_fold

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("syn") / "s.h5", n_per_class=4, sessions=3, seed=3)


# ---------------------------------------------------------------- config

def test_config_defaults_are_the_paper_settings():
    c = load_config(None)
    assert (c.optim.lr, c.optim.batch_size, c.optim.epochs) == (1e-5, 16, 100)
    assert c.variant == "cm-arr" and c.data.load == "memory"


def test_config_yaml_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim.*unknown key 'lrate'"):
        load_config(p)
    p.write_text("optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.epochs.*expected int"):
        load_config(p)
    p.write_text("model:\n  d_modell: 3\n")
    with pytest.raises(ConfigError, match=r"model\.d_modell"):
        load_config(p)
    p.write_text("model:\n  d_model: 'wide'\n")
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        load_config(p)
    p.write_text("optim:\n  lr: 1e-4\n  compile: off\n")  # YAML 1.1: a string and a bool
    c = load_config(p)
    assert c.optim.lr == 1e-4 and c.optim.compile == "off"
    p.write_text("model:\n  beta: 5e-1\n  udcl_b: 4e0\n")  # model floats too, stored as floats
    c = load_config(p)
    assert c.model == {"beta": 0.5, "udcl_b": 4.0} and all(type(v) is float for v in c.model.values())
    assert with_overrides(load_config(None), {"model.alpha": "1e-1"}).model == {"alpha": 0.1}
    p.write_text("protocol:\n  folds: [1, 2, 1]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: protocol\.folds names a fold more than once"):
        load_config(p)


def test_packaged_configs_by_name_and_a_file_wins(tmp_path, monkeypatch):
    assert load_config("iemocap").optim.epochs == load_config("iemocap.yaml").optim.epochs == 100
    assert load_config("synthetic_quick").model != {}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iemocap").write_text("optim:\n  epochs: 3\n")  # a file of that name in the working folder
    assert load_config("iemocap").optim.epochs == 3
    with pytest.raises(ConfigError, match=r"nope: no such config file.*packaged: iemocap, msp_improv, synthetic_quick"):
        load_config("nope")
    with pytest.raises(ConfigError, match=r"sub/iemocap.yaml: no such config file"):
        load_config("sub/iemocap.yaml")


def test_config_overrides_and_round_trip(tmp_path):
    c = with_overrides(load_config(None), {"optim.epochs": 3, "protocol.folds": [2], "model.beta": 0.5})
    assert c.optim.epochs == 3 and c.protocol.folds == (2,) and c.model == {"beta": 0.5}
    p = tmp_path / "r.yaml"
    p.write_text(c.to_yaml())
    assert load_config(p) == c
    with pytest.raises(ConfigError, match="unknown key 'optim.nope'"):
        with_overrides(c, {"optim.nope": 1})


# ---------------------------------------------------------------- store loading

def test_store_data_loads_in_memory_and_lazily(store):
    d = StoreData(store)
    assert len(d) == 48 and d.fold_ids == [1, 2, 3]
    assert d.present.shape == (48, 3) and d.present.any(axis=1).all()
    assert not d.present.all()  # some utterances lack a modality (no face / no transcript)
    lazy = StoreData(store, load="lazy")
    i = int(np.flatnonzero(d.present[:, 0])[0])
    np.testing.assert_array_equal(lazy.get(i, "speech"), d.get(i, "speech"))



@pytest.mark.parametrize("edit,message", [
    (lambda df: df.drop(columns=["label"]), "has no labels"),
    (lambda df: df.assign(label=""), "has no labels"),
    (lambda df: df.drop(columns=["fold"]), "has no folds"),
    (lambda df: df.assign(label=["fru"] + list(df["label"][1:])), "outside the four classes.*'fru'"),
    (lambda df: pd.concat([df, df.iloc[:1]], ignore_index=True), "lists 1 ids more than once"),
])
def test_bad_tables(tmp_path, store, edit, message, rewrite_table):
    import shutil

    p = tmp_path / "bad.h5"
    shutil.copy(store, p)
    rewrite_table(p, edit)
    with pytest.raises(DataError, match=message) as e:
        StoreData(p)
    assert str(p) in str(e.value)


def test_store_without_a_modality(tmp_path):
    p = make_synthetic_store(tmp_path / "nov.h5", n_per_class=2, sessions=2, modalities=("speech", "text"))
    with pytest.raises(DataError, match="no video features at all"):
        StoreData(p)


# ---------------------------------------------------------------- splits

def test_splits(store):
    d = StoreData(store)
    s = split_fold(d.folds, d.labels, d.speakers, 2, "stratified", 0.25, seed=0)
    assert set(d.folds[s.test]) == {2} and not set(d.folds[s.train]) & {2} and not set(d.folds[s.val]) & {2}
    assert not set(s.train) & set(s.val)
    assert set(d.labels[s.val]) == {0, 1, 2, 3}  # stratified: every class held out
    s2 = split_fold(d.folds, d.labels, d.speakers, 2, "stratified", 0.25, seed=0)
    np.testing.assert_array_equal(s.val, s2.val)  # seeded
    n = split_fold(d.folds, d.labels, d.speakers, 3, "next-session")
    assert set(d.folds[n.val]) == {1} and set(d.folds[n.train]) == {2}
    sp = split_fold(d.folds, d.labels, d.speakers, 1, "speaker")
    assert len(set(d.speakers[sp.val])) == 1 and not set(d.speakers[sp.val]) & set(d.speakers[sp.test])
    assert set(d.folds[sp.val]) == set(d.folds[sp.test]) == {1} and set(d.folds[sp.train]) == {2, 3}
    # the validation speaker alternates over the folds, so both speakers of a pair get tested
    tested = [set(d.speakers[split_fold(d.folds, d.labels, d.speakers, f, "speaker").test]) for f in (1, 2, 3)]
    assert tested == [{"Ses01M"}, {"Ses02F"}, {"Ses03M"}]
    with pytest.raises(SplitError, match="fold 9 has no test utterances"):
        split_fold(d.folds, d.labels, d.speakers, 9)
    with pytest.raises(SplitError, match="no 'speaker' values"):
        split_fold(d.folds, d.labels, np.array([""] * len(d.folds)), 1, "speaker")


# ---------------------------------------------------------------- conditions

def test_condition_masks_agree_with_the_model():
    from cmarr.model import CONDITIONS, MODALITIES

    assert MODALITIES == ("speech", "text", "video")
    for name, row in zip(CONDITION_NAMES, CONDITION_MASKS):
        assert tuple(m for m, on in zip(MODALITIES, row) if on) == tuple(m for m in MODALITIES if m in CONDITIONS[name])


def test_sample_conditions():
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool).repeat(3000, 1)
    a = sample_conditions(present, "missing", g)
    assert not (a & ~present).any() and a.any(dim=1).all()
    full = a[0::3]
    assert not full.all(dim=1).any()  # the full condition is never drawn in "missing"
    counts = np.unique(full.numpy(), axis=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 400  # the six missing conditions, about uniformly
    assert len(np.unique(a[1::3].numpy(), axis=0)) == 3  # no video: {s}, {t}, {s,t}
    assert (a[2::3] == torch.tensor([True, False, False])).all()  # only speech
    b = sample_conditions(present, "missing+full", torch.Generator().manual_seed(0))
    assert b[0::3].all(dim=1).any()
    assert torch.equal(sample_conditions(present, "full"), present)
    again = sample_conditions(present, "missing", torch.Generator().manual_seed(0))
    assert torch.equal(a, again)
    cond = condition_available(present[:3], "vt")
    assert cond.tolist() == [[False, True, True], [False, True, False], [False, False, False]]


# ---------------------------------------------------------------- batches

def test_collate_and_resident(store):
    from cmarr.model import pool_to_steps

    d = StoreData(store)
    no_video = int(np.flatnonzero(~d.present[:, 2])[0])
    idx = [0, 1, no_video]
    b = Collate(d, float("nan"))([(i, {m: d.get(i, m) for m in ("speech", "text", "video")}) for i in idx])
    assert b.feats["speech"].shape[0] == 3 and b.masks["speech"].dtype == torch.bool
    assert torch.isnan(b.feats["video"][2]).all() and not b.masks["video"][2].any()  # absent: NaN, never zeros
    T = d.get(0, "speech").shape[0]
    assert b.masks["speech"][0].sum() == T
    assert torch.isfinite(b.feats["speech"][0]).all()
    r = ResidentData(d, idx, steps=8, device=torch.device("cpu"), fill=float("nan"))
    pooled, _ = pool_to_steps(b.feats["speech"][:1], b.masks["speech"][:1], 8)
    torch.testing.assert_close(r.x["speech"][0], pooled[0])
    assert torch.isnan(r.x["video"][2]).all() and r.mask["speech"].all()


# ---------------------------------------------------------------- metrics

def test_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    p = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    cm = confusion(y, p, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    war, uar = war_uar(cm)
    assert war == pytest.approx(5 / 8)
    assert uar == pytest.approx((3 / 4 + 1 / 2 + 1 + 0) / 4)
    folds = {1: {c: score(y, p, 4) for c in CONDITION_NAMES}, 2: {c: score(y, y, 4) for c in CONDITION_NAMES}}
    m = build_metrics(folds, ("ang", "hap", "neu", "sad"))
    assert m["folds"]["2"]["avg"]["war"] == 1.0
    assert m["summary"]["avg"]["war_mean"] == pytest.approx((5 / 8 + 1) / 2)
    assert m["summary"]["svt"]["war_std"] == pytest.approx(np.std([5 / 8, 1.0], ddof=1))
    md = results_markdown(m)
    rows = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| {") or ln.startswith("| Avg")]
    assert rows == ["{t}", "{s}", "{v}", "{v, t}", "{s, v}", "{s, t}", "Avg.", "{s, v, t}"]
    assert "81.25 ± 26.52" in md


def test_synthetic_store_shares_content(store):
    """Speech and text carry the class strongly, video weakly (nearest class mean, pooled frames)."""
    d = StoreData(store)
    acc = {}
    for j, m in enumerate(("speech", "text", "video")):
        rows = np.flatnonzero(d.present[:, j])
        x = np.stack([d.get(i, m).astype(np.float32).mean(0) for i in rows])
        y = d.labels[rows]
        mu = np.stack([x[y == c].mean(0) for c in range(4)])
        acc[m] = (np.argmin(((x[:, None] - mu[None]) ** 2).sum(-1), 1) == y).mean()
    assert acc["speech"] > 0.4 and acc["text"] > 0.4 and acc["video"] < min(acc["speech"], acc["text"])


def test_lazy_store_in_dataloader_workers(store):
    from cmarr.pipelines.data import eager_loader

    mem, lazy = StoreData(store), StoreData(store, load="lazy")
    assert lazy.features is None
    idx = np.arange(10)
    a = next(iter(eager_loader(mem, idx, 10, shuffle=False, seed=0, fill=float("nan"))))
    b = next(iter(eager_loader(lazy, idx, 10, shuffle=False, seed=0, fill=float("nan"), num_workers=2)))
    for m in ("speech", "text", "video"):
        torch.testing.assert_close(a.feats[m], b.feats[m], equal_nan=True)
        assert torch.equal(a.masks[m], b.masks[m])


def test_resident_pipeline_feeds_the_model_the_same_numbers(store):
    """Pooling once up front (resident path) gives the model's own pooling result."""
    from cmarr.model import CMARR, CMARRConfig

    d = StoreData(store)
    torch.manual_seed(0)
    model = CMARR(CMARRConfig(dims=d.dims, d_model=16, seq_len=8, flow_hidden=16, flow_steps=1, umc_heads=2,
                              fusion_heads=2)).eval()
    idx = list(range(12))
    raw = Collate(d, float("nan"))([(i, {m: d.get(i, m) for m in ("speech", "text", "video")}) for i in idx])
    res = ResidentData(d, idx, steps=8, device=torch.device("cpu"), fill=float("nan")).batch(torch.arange(12))
    with torch.no_grad():
        for cond in ("svt", "t", "sv"):
            av = condition_available(raw.present, cond)
            keep = av.any(dim=1)
            f1 = {m: x[keep] for m, x in raw.feats.items()}
            f2 = {m: x[keep] for m, x in res.feats.items()}
            l1 = model(f1, {m: x[keep] for m, x in raw.masks.items()}, av[keep]).logits
            l2 = model(f2, {m: x[keep] for m, x in res.masks.items()}, av[keep]).logits
            torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
