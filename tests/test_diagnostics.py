"""What each loss trains (the reference code's detaches, the frozen projection) and the
diagnostic columns of fold<k>/log.csv (weighted losses, gradient norms, scale of X_m,
reconstruction against the trivial one)."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from cmarr.model import CMARR, CONDITIONS, MODALITIES, CMARRConfig
from cmarr.pipelines.conditions import MISSING_CONDITIONS, condition_available
from cmarr.pipelines.data import StoreData, hide_unavailable
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.diagnostics import DIAG_TERMS, DIAGNOSTIC_COLUMNS, ValDiagnostics, term_weights
from cmarr.pipelines.fold import FoldRecipe
from cmarr.pipelines.train import resolve_config, run_training

torch.set_num_threads(1)

DIMS = {"speech": 12, "text": 10, "video": 6}
SMALL = dict(dims=DIMS, d_model=16, seq_len=6, umc_heads=2, fusion_heads=2, flow_steps=2, flow_hidden=8,
             rcan_reduction=4, umc_mlp_ratio=2)


def small_model(**overrides) -> CMARR:
    torch.manual_seed(0)
    return CMARR(CMARRConfig(**{**SMALL, **overrides})).train()


def batch(B: int = 6, condition: str = "s", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, 9, DIMS[m], generator=g) for m in MODALITIES}
    masks = {m: torch.ones(B, 9, dtype=torch.bool) for m in MODALITIES}
    available = torch.tensor([m in CONDITIONS[condition] for m in MODALITIES]).expand(B, -1).clone()
    return feats, masks, available, torch.ones(B, 3, dtype=torch.bool), torch.arange(B) % 4


def losses_of(model, condition: str = "s"):
    feats, masks, available, present, labels = batch(condition=condition)
    return model(feats, masks, available, present=present, labels=labels).losses


def grad_norm(loss, params) -> float:
    """Norm of d loss / d params; 0 where the loss does not reach them (or does not depend on anything)."""
    params = list(params)
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def params_of(model, prefix: str):
    return [p for n, p in model.named_parameters() if n.startswith(prefix)]


# ------------------------------------------------------------------ what L_rec and the NLL train

def test_the_defaults_follow_the_reference_code():
    cfg = CMARRConfig()
    assert cfg.rec_detach_target and cfg.rec_detach_input and cfg.proj_grad == "train" and cfg.rec_reduction == "mean"
    with pytest.raises(ValueError, match="nll_weight > 0"):  # the flows would learn nothing
        CMARRConfig(nll_weight=0.0)
    CMARRConfig(nll_weight=0.0, rec_detach_input=False)
    CMARRConfig.for_variant("baseline")  # no flows: no constraint


def test_rec_target_gets_no_gradient_by_default():
    """The projection reaches L_rec only through its target X_m (X~ is detached by default):
    no gradient with the default, a gradient with rec_detach_target=False."""
    model = small_model()
    losses = losses_of(model)
    assert losses["rec"] > 0
    assert grad_norm(losses["rec"], params_of(model, "proj.")) == 0.0
    assert grad_norm(losses["rec"], params_of(model, "umc.")) == 0.0
    assert grad_norm(losses["rec"], params_of(model, "rec.")) > 0  # it still trains the reconstruction module
    model = small_model(rec_detach_target=False)
    losses = losses_of(model)
    assert grad_norm(losses["rec"], params_of(model, "proj.")) > 0


def test_flows_learn_from_their_likelihood_only_by_default():
    model = small_model()
    losses = losses_of(model)
    flow = params_of(model, "flow.")
    assert grad_norm(losses["rec"], flow) == 0.0
    assert grad_norm(losses["cls"], flow) == 0.0
    assert grad_norm(losses["nll"], flow) > 0
    # the reconstruction module of each reconstructed modality is trained by L_rec and by L_cls
    rec = params_of(model, "rec.")
    for term in ("rec", "cls"):
        grads = torch.autograd.grad(losses[term], rec, retain_graph=True)
        for m in ("text", "video"):
            assert all(g[MODALITIES.index(m)].abs().sum() > 0 for g in grads), (term, m)
    # the total gives every parameter a gradient
    losses["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # not detached: L_rec reaches the flows (through F^{-1}) and the projection (through F)
    model = small_model(rec_detach_input=False)
    losses = losses_of(model)
    assert grad_norm(losses["rec"], params_of(model, "flow.")) > 0


def test_rec_detach_input_changes_gradients_not_values():
    feats, masks, available, present, labels = batch()
    a = small_model()(feats, masks, available, present=present, labels=labels)
    b = small_model(rec_detach_input=False)(feats, masks, available, present=present, labels=labels)
    # dropout draws the same masks: same seed, same order of random draws
    torch.testing.assert_close(a.logits, b.logits)
    for k in ("rec", "nll", "cls", "udcl", "spcl", "total"):
        torch.testing.assert_close(a.losses[k], b.losses[k])


def test_rec_detach_output_trains_the_reconstruction_module_by_l_rec_only():
    feats, masks, available, present, labels = batch()
    model = small_model(rec_detach_output=True)
    losses = model(feats, masks, available, present=present, labels=labels).losses
    rec = params_of(model, "rec.")
    assert grad_norm(losses["cls"], rec) == 0.0 and grad_norm(losses["spcl"], rec) == 0.0
    assert grad_norm(losses["rec"], rec) > 0
    assert grad_norm(losses["cls"], params_of(model, "proj.")) > 0  # the available modalities still train
    # same values as without the detach (dropout draws the same masks: same seed, same order)
    plain = small_model()(feats, masks, available, present=present, labels=labels)
    for k in ("rec", "cls", "spcl", "total"):
        torch.testing.assert_close(losses[k], plain.losses[k])


def test_frozen_projection_gets_no_gradient():
    model = small_model(proj_grad="frozen")
    assert not any(p.requires_grad for p in model.proj.parameters())
    assert "proj.weight" not in model.shared_parameters()
    before = {n: p.detach().clone() for n, p in model.proj.named_parameters()}
    losses = losses_of(model)
    # X carries no gradient: the encoders do not learn from L_cls, only from L_udcl
    assert grad_norm(losses["cls"], params_of(model, "umc.") + params_of(model, "inp.")) == 0.0
    assert grad_norm(losses["udcl"], params_of(model, "umc.")) > 0
    losses["total"].backward()
    assert all(p.grad is None for p in model.proj.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.proj.named_parameters())
    # the default trains the projection (and, through it, the encoders) from L_cls
    model = small_model()
    losses = losses_of(model)
    assert grad_norm(losses["cls"], params_of(model, "proj.")) > 0
    # the baseline without a UMC: its input layers would learn nothing, so they are frozen too
    base = CMARR(CMARRConfig.for_variant("baseline", **SMALL, proj_grad="frozen"))
    assert not any(p.requires_grad for p in base.inp.parameters())


# ------------------------------------------------------------------ the log's columns

@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("diag")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    return root, store, tiny_config(root / "tiny.yaml")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("variant", ["cm-arr", "baseline"])
def test_log_has_the_diagnostic_columns(env, variant):
    root, store, cfg = env
    run_training(store, cfg, out_dir=root / variant, folds=[1], device="cpu", log=None, variant=variant)
    rows = _rows(root / variant / "fold1" / "log.csv")
    assert len(rows) == 2
    cols = list(rows[0])
    assert cols[:8] == ["epoch", "loss_udcl", "loss_spcl", "loss_rec", "loss_nll", "loss_cls", "loss_total", "steps"]
    assert cols[-1] == "seconds" and set(DIAGNOSTIC_COLUMNS) <= set(cols)
    mcfg = CMARRConfig.for_variant(variant, **{"d_model": 16})
    w = term_weights(mcfg)
    for row in rows:
        for t in DIAG_TERMS:
            # both rounded to 6 decimals
            assert float(row[f"wloss_{t}"]) == pytest.approx(w[t] * float(row[f"loss_{t}"]), abs=(w[t] + 1) * 1e-6)
            if w[t] == 0:
                assert row[f"gradnorm_{t}"] == ""
            else:
                assert math.isfinite(float(row[f"gradnorm_{t}"]))
        assert float(row["gradnorm_cls"]) > 0
        for m in MODALITIES:
            assert float(row[f"x_norm_{m}"]) > 0 and float(row[f"x_var_{m}"]) > 0
            for s in ("cos", "mse"):
                assert math.isfinite(float(row[f"triv_{s}_{m}"]))
                if variant == "baseline":
                    assert row[f"rec_{s}_{m}"] == ""
                else:
                    assert math.isfinite(float(row[f"rec_{s}_{m}"]))
        if variant == "cm-arr":
            # the default detaches: L_rec and the likelihood do not reach the shared layers
            assert float(row["gradnorm_rec"]) == 0.0 and float(row["gradnorm_nll"]) == 0.0
            assert float(row["gradnorm_udcl"]) > 0 and float(row["gradnorm_spcl"]) > 0


def test_gradient_norms_are_those_of_each_weighted_term(env):
    root, store, cfg = env
    tcfg = resolve_config(cfg, folds=[2], device="cpu")
    r = FoldRecipe(tcfg, StoreData(store), 2, root / "gn", torch.device("cpu")).setup()
    got = r.gradient_norms()
    b, available = r.diagnostic_batch()
    model = r.model.eval()
    losses = model(b.feats, b.masks, available, present=b.present, labels=b.labels).losses
    shared = list(model.shared_parameters().values())
    assert any(n.startswith("umc.") for n in model.shared_parameters())
    w = term_weights(r.mcfg)
    for t in DIAG_TERMS:
        assert got[f"gradnorm_{t}"] == pytest.approx(grad_norm(w[t] * losses[t], shared), rel=1e-4, abs=1e-9), t
    assert r.model.training is False and r.gradient_norms() == got  # deterministic, fixed batch


def test_validation_diagnostics_match_a_direct_computation(env):
    """x_*, rec_* and triv_* from the stacked evaluation pass against one model call per
    condition, the trivial reconstruction written out row by row."""
    root, store, cfg = env
    tcfg = resolve_config(cfg, folds=[3], device="cpu")
    r = FoldRecipe(tcfg, StoreData(store), 3, root / "vd", torch.device("cpu")).setup()
    diag = ValDiagnostics(True)
    r.evaluate("val", diag=diag)
    got = diag.columns()
    model = r.model.eval()
    batches = list(r._eval_batches("val"))
    assert len(batches) == 1
    b = batches[0]
    pooled = r.pipeline == "resident"
    with torch.no_grad():
        full = model(b.feats, b.masks, b.present, present=b.present, pooled=pooled, internals=True).internals["X"]
        acc = {(k, s, m): [] for k in ("rec", "triv") for s in ("cos", "mse") for m in MODALITIES}
        for c in MISSING_CONDITIONS:
            a = condition_available(b.present, c)
            ok = a.any(dim=1)
            feats = hide_unavailable({m: b.feats[m][ok] for m in MODALITIES}, a[ok], float("nan"))
            out = model(feats, {m: b.masks[m][ok] for m in MODALITIES}, a[ok], present=a[ok], pooled=pooled,
                        internals=True).internals
            for j, i in enumerate(ok.nonzero().flatten().tolist()):
                avail = [n for n in range(3) if a[i, n]]
                triv = sum(out["X"][n, j] for n in avail) / len(avail)  # (S, d)
                for mi, m in enumerate(MODALITIES):
                    if a[i, mi] or not b.present[i, mi]:
                        continue
                    true = full[mi, i]
                    for k, est in (("rec", out["x_hat"][mi, j]), ("triv", triv)):
                        acc[(k, "cos", m)].append(F.cosine_similarity(est, true, dim=-1).mean())
                        acc[(k, "mse", m)].append((est - true).pow(2).mean())
    for (k, s, m), vals in acc.items():
        assert vals, (k, s, m)
        assert got[f"{k}_{s}_{m}"] == pytest.approx(float(torch.stack(vals).mean()), rel=1e-4, abs=1e-6), (k, s, m)
    for mi, m in enumerate(MODALITIES):
        x = full[mi][b.present[:, mi]]  # (rows, S, d)
        assert got[f"x_norm_{m}"] == pytest.approx(float(x.norm(dim=-1).mean()), rel=1e-4)
        assert got[f"x_var_{m}"] == pytest.approx(float(x.reshape(-1, x.shape[-1]).var(dim=0, unbiased=False).mean()),
                                                  rel=1e-4)
    # the trivial reconstruction is not the model's: the two differ
    assert got["triv_mse_speech"] != got["rec_mse_speech"]
