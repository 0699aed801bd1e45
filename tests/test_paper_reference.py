"""The paper's reported numbers beside a run's own, for runs on the paper's 4-class sets."""
from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from cmarr.pipelines.config import TrainConfig, with_overrides
from cmarr.pipelines.metrics import paper_reference, results_markdown, rich_table
from cmarr.pipelines.train import summary_document

IEMOCAP = {"ang": 1103, "hap": 1636, "neu": 1708, "sad": 1084}  # Table 1
CONDS = ("t", "s", "v", "vt", "sv", "st", "svt")


def _fold(k):
    cm = np.eye(4, dtype=int) * (10 + k)
    cm[0, 1] = k
    return {"fold": k, "best_epoch": 3, "n_train": 100, "n_val": 10, "n_test": 20,
            "conditions": {c: {"war": 0.5 + 0.01 * k, "uar": 0.4 + 0.01 * k, "confusion": cm.tolist(), "n": 20,
                               "n_no_input": 0, "n_reduced": 0} for c in CONDS}}


def test_reference_only_for_the_papers_sets_and_variants():
    ref = paper_reference("iemocap", IEMOCAP, "cm-arr")
    assert ref["source"] == "CM-ARR paper, Table 2 (IEMOCAP, Ours)"
    assert ref["rows"]["t"] == {"war": pytest.approx(0.6974), "uar": pytest.approx(0.7092)}
    assert ref["rows"]["svt"] == {"war": pytest.approx(0.7986), "uar": pytest.approx(0.8106)}
    msp = paper_reference("msp-improv", {"ang": 460, "hap": 999, "neu": 1733, "sad": 627}, "cm-arr")
    assert msp["rows"]["avg"] == {"war": pytest.approx(0.6382), "uar": pytest.approx(0.5839)}
    base = paper_reference("iemocap", IEMOCAP, "baseline")
    assert base["source"].endswith("Table 3 (IEMOCAP, baseline)") and "svt" not in base["rows"]
    assert base["rows"]["avg"] == {"war": pytest.approx(0.6171), "uar": pytest.approx(0.6180)}
    assert paper_reference("iemocap", {**IEMOCAP, "sad": 1083}, "cm-arr") is None  # not the paper's set
    assert paper_reference("msp-improv", {"ang": 460, "hap": 999, "neu": 1733, "sad": 627}, "baseline") is None
    assert paper_reference("synthetic", IEMOCAP, "cm-arr") is None
    assert paper_reference(None, None, "cm-arr") is None


@pytest.mark.parametrize("variant", ["cm-arr", "baseline"])
def test_run_summary_and_tables_show_the_reference(variant):
    cfg = with_overrides(TrainConfig(), {"variant": variant})
    store = {"path": "feats.h5", "corpus": "iemocap", "label_counts": IEMOCAP}
    m = summary_document(cfg, {1: _fold(1), 2: _fold(2)}, store, {})
    assert m["paper"] == paper_reference("iemocap", IEMOCAP, variant)
    md = results_markdown(m)
    assert "| Avail. | WAR | UAR | paper WAR | paper UAR |" in md
    t_row = "69.74 | 70.92 |" if variant == "cm-arr" else "66.63 | 67.15 |"
    assert f"| {{t}} | 51.50 ± 0.71 | 41.50 ± 0.71 | {t_row}" in md
    full = [line for line in md.splitlines() if line.startswith("| {s, v, t} |")][0]
    assert full.endswith("79.86 | 81.06 |" if variant == "cm-arr" else "- | - |")
    console = Console(record=True, width=200)
    console.print(rich_table(m))
    text = console.export_text()
    assert "paper WAR" in text and ("69.74" if variant == "cm-arr" else "66.63") in text
    other = summary_document(cfg, {1: _fold(1)}, {"path": "s.h5", "corpus": "synthetic", "label_counts": IEMOCAP}, {})
    assert "paper" not in other and "paper WAR" not in results_markdown(other)


def test_store_fingerprint_names_the_corpus_and_class_counts(tmp_path):
    from cmarr.pipelines.data import StoreData
    from cmarr.pipelines.synthetic import make_synthetic_store
    from cmarr.pipelines.train import store_fingerprint

    data = StoreData(make_synthetic_store(tmp_path / "s.h5", n_per_class=3, sessions=2, seed=0))
    fp = store_fingerprint(data)
    assert fp["corpus"] == "synthetic" and fp["label_counts"] == {"ang": 6, "hap": 6, "neu": 6, "sad": 6}


def test_run_dirs_of_an_earlier_version_gain_the_new_store_fields(tmp_path, tiny_config):
    """A RUN_DIR whose model_config.yaml lacks the store's corpus and class counts (written
    by an earlier version) gets them when the run is continued, and cm-arr-results fills
    them from any RUN_DIR that has them, whatever the order."""
    import yaml

    from cmarr.pipelines.combine import combine_runs
    from cmarr.pipelines.synthetic import make_synthetic_store
    from cmarr.pipelines.train import run_training

    store = make_synthetic_store(tmp_path / "s.h5", n_per_class=3, sessions=3, seed=0)
    cfg = tiny_config(tmp_path / "tiny.yaml", epochs=1)

    def strip(run_dir):
        side = run_dir / "model_config.yaml"
        doc = yaml.safe_load(side.read_text())
        for k in ("corpus", "label_counts"):
            doc["store"].pop(k)
        side.write_text(yaml.safe_dump(doc, sort_keys=False))

    a, b = tmp_path / "a", tmp_path / "b"
    for d, fold in ((a, 1), (b, 2)):
        run_training(store, cfg, out_dir=d, folds=[fold], device="cpu", log=None)
    strip(a)
    for order in ((a, b), (b, a)):
        m = combine_runs(order, tmp_path / f"c-{order[0].name}")
        assert m["store"]["corpus"] == "synthetic" and sum(m["store"]["label_counts"].values()) == 36
    run_training(store, cfg, out_dir=a, folds=[1], device="cpu", log=None)  # continued (already finished)
    side = yaml.safe_load((a / "model_config.yaml").read_text())
    assert side["store"]["corpus"] == "synthetic" and "model" in side
