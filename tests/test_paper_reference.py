"""The paper's reported numbers beside a run's own, for runs on the paper's 4-class sets."""
from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from cmarr.pipelines.config import TrainConfig, with_overrides
from cmarr.pipelines.metrics import paper_reference, results_markdown, rich_table
from cmarr.pipelines.run_dir import summary_document

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
    from cmarr.pipelines.demo.synthetic import make_synthetic_store
    from cmarr.pipelines.run_dir import store_fingerprint

    data = StoreData(make_synthetic_store(tmp_path / "s.h5", n_per_class=3, sessions=2, seed=0))
    fp = store_fingerprint(data)
    assert fp["corpus"] == "synthetic" and fp["label_counts"] == {"ang": 6, "hap": 6, "neu": 6, "sad": 6}
