"""The CMARR module: conditions, NaN-filled missing inputs, gradients, padding, pooling, variants."""

from __future__ import annotations

import pytest
import torch

from cmarr.model import CMARR, CONDITIONS, MODALITIES, VARIANTS, CMARRConfig, pool_to_steps

# parameters whose axis 0 holds one copy per modality (or per fusion pair / query)
GROUPED = ("umc.", "proj.", "flow.", "rec.", "prior_mean", "fusion.cross.", "fusion.merge.")

DIMS = {"speech": 12, "text": 10, "video": 6}
SMALL = dict(dims=DIMS, d_model=16, seq_len=6, umc_heads=2, fusion_heads=2, flow_steps=2, flow_hidden=8,
             rcan_reduction=4, umc_mlp_ratio=2)
LENGTHS = {"speech": 15, "text": 7, "video": 9}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(variant: str = "cm-arr", **overrides) -> CMARRConfig:
    return CMARRConfig.for_variant(variant, **{**SMALL, **overrides})


def make_batch(B: int, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(B, LENGTHS[m], DIMS[m], generator=g) for m in MODALITIES}
    masks = {}
    for m in MODALITIES:
        lengths = torch.randint(2, LENGTHS[m] + 1, (B,), generator=g)
        masks[m] = torch.arange(LENGTHS[m]).unsqueeze(0) < lengths.unsqueeze(1)
    return feats, masks


def condition_mask(names: tuple[str, ...], B: int) -> torch.Tensor:
    row = torch.tensor([m in names for m in MODALITIES])
    return row.unsqueeze(0).expand(B, -1).clone()


def nan_fill(feats: dict, available: torch.Tensor) -> dict:
    return {m: torch.where(available[:, i].view(-1, 1, 1), f, torch.full_like(f, float("nan")))
            for i, (m, f) in enumerate(feats.items())}


# ------------------------------------------------------------------ pooling
def test_pool_to_steps_matches_adaptive_pooling_of_the_valid_frames() -> None:
    x = torch.randn(2, 7, 3)
    mask = torch.tensor([[True, False, True, True, False, True, False],  # gaps (face-less frames)
                         [True, True, True, True, True, True, True]])
    x_junk = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, float("nan")))
    for steps in (1, 2, 3, 6, 10):
        pooled, step_mask = pool_to_steps(x_junk, mask, steps)
        assert pooled.shape == (2, steps, 3) and step_mask.all()
        for b in range(2):
            valid = x[b][mask[b]]  # (L, 3)
            ref = torch.nn.functional.adaptive_avg_pool1d(valid.T.unsqueeze(0), steps)[0].T
            torch.testing.assert_close(pooled[b], ref)
    # hand case: L = 3 valid frames (values 0, 2, 4) to 2 steps: bins {0, 1} and {1, 2} -> 1, 3
    v = torch.tensor([[[0.0], [9.0], [2.0], [4.0]]])
    m = torch.tensor([[True, False, True, True]])
    torch.testing.assert_close(pool_to_steps(v, m, 2)[0], torch.tensor([[[1.0], [3.0]]]))


def test_pool_to_steps_is_the_identity_on_already_pooled_rows_and_marks_empty_rows() -> None:
    x = torch.randn(3, 8, 5)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2] = False
    pooled, step_mask = pool_to_steps(x, mask, 8)
    assert torch.equal(pooled[:2], x[:2])  # exactly, not approximately
    assert step_mask[:2].all() and not step_mask[2].any()
    assert torch.equal(pooled[2], torch.zeros(8, 5))
    again, _ = pool_to_steps(pooled, step_mask, 8)
    assert torch.equal(again, pooled)


def test_pooled_inputs_give_the_same_outputs_as_raw_inputs() -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    model = CMARR(cfg).eval()
    feats, masks = make_batch(4)
    available = condition_mask(CONDITIONS["sv"], 4)
    pooled = {m: pool_to_steps(feats[m], masks[m], cfg.seq_len) for m in MODALITIES}
    out_raw = model(feats, masks, available)
    out_pooled = model({m: p[0] for m, p in pooled.items()}, {m: p[1] for m, p in pooled.items()}, available)
    torch.testing.assert_close(out_raw.logits, out_pooled.logits)


# ------------------------------------------------------------------ conditions and NaN
@pytest.mark.parametrize("variant", VARIANTS)
def test_all_conditions_with_nan_filled_missing_inputs_give_finite_outputs(variant: str) -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg(variant))
    B = 4
    feats, masks = make_batch(B)
    labels = torch.tensor([0, 1, 2, 3])
    for name, mods in CONDITIONS.items():
        available = condition_mask(mods, B)
        for train in (True, False):
            model.train(train)
            model.zero_grad()
            out = model(nan_fill(feats, available), masks, available, labels=labels)
            assert out.logits.shape == (B, 4)
            assert torch.isfinite(out.logits).all(), f"{variant} {name}: non-finite logits"
            assert set(out.losses) == {"udcl", "spcl", "rec", "nll", "cls", "total"}
            assert all(torch.isfinite(v) for v in out.losses.values()), f"{variant} {name}: {out.losses}"
            if train:
                out.losses["total"].backward()
                for p_name, p in model.named_parameters():
                    assert p.grad is None or torch.isfinite(p.grad).all(), f"{variant} {name}: NaN grad in {p_name}"


@pytest.mark.parametrize("variant", ["cm-arr", "baseline"])
def test_unavailable_modalities_do_not_influence_the_logits(variant: str) -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg(variant)).eval()
    feats, masks = make_batch(4)
    other, _ = make_batch(4, seed=5)
    for name, mods in CONDITIONS.items():
        available = condition_mask(mods, 4)
        present = torch.ones(4, 3, dtype=torch.bool)
        mixed = {m: torch.where(available[:, i].view(-1, 1, 1), feats[m], 100 * other[m])
                 for i, m in enumerate(MODALITIES)}
        a = model(feats, masks, available, present=present).logits
        b = model(mixed, masks, available, present=present).logits
        torch.testing.assert_close(a, b, msg=f"{variant} {name}")
        # present but unavailable rows holding NaN (read as L_rec targets) cannot reach the logits
        c = model(nan_fill(feats, available), masks, available, present=present).logits
        torch.testing.assert_close(a, c, msg=f"{variant} {name}: NaN in a present, unavailable row")
        if name != "svt":
            full = model(feats, masks, torch.ones(4, 3, dtype=torch.bool)).logits
            assert not torch.allclose(a, full), f"{variant} {name}: the condition had no effect"


def test_padding_frames_do_not_change_the_outputs() -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg()).eval()
    feats, masks = make_batch(3)
    available = condition_mask(CONDITIONS["st"], 3)
    present = torch.ones(3, 3, dtype=torch.bool)
    labels = torch.tensor([0, 1, 0])
    ref = model(feats, masks, available, present=present, labels=labels)
    # longer padding filled with NaN, and the original padding overwritten with junk
    padded_feats, padded_masks = {}, {}
    for m in MODALITIES:
        f = torch.where(masks[m].unsqueeze(-1), feats[m], torch.full_like(feats[m], 1e6))
        padded_feats[m] = torch.cat([f, torch.full((3, 5, DIMS[m]), float("nan"))], dim=1)
        padded_masks[m] = torch.cat([masks[m], torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    out = model(padded_feats, padded_masks, available, present=present, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k], ref.losses[k])
    # a single sample alone gives the same logits as inside the batch (no cross-sample leakage)
    one = model({m: feats[m][:1] for m in MODALITIES}, {m: masks[m][:1] for m in MODALITIES}, available[:1])
    torch.testing.assert_close(one.logits, ref.logits[:1])


# ------------------------------------------------------------------ gradients
def _mixed_missing_batch(B: int = 12) -> torch.Tensor:
    missing = [c for c in CONDITIONS if c != "svt"]
    return torch.stack([condition_mask(CONDITIONS[missing[i % len(missing)]], 1)[0] for i in range(B)])


def test_a_learned_scale_of_eq5_stays_negative() -> None:
    """``learn_ab``: ``a`` is learned, yet Eq. 5 needs it negative however hard the
    gradient pushes it up."""
    model = CMARR(small_cfg("cm-arr", learn_ab=True))
    assert torch.allclose(model.udcl_scale(), torch.tensor(-1 / 200))
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    for _ in range(50):
        opt.zero_grad()
        (-model.udcl_scale()).backward()  # minimise -a: push a up
        opt.step()
    assert model.udcl_scale().item() < 0 and "udcl_log_neg_a" in dict(model.named_parameters())
    assert "udcl_a" in dict(CMARR(small_cfg("cm-arr")).named_buffers())  # the default: a fixed buffer


@pytest.mark.parametrize("variant,overrides", [(v, {}) for v in VARIANTS] + [
    ("cm-arr", {"fusion_queries": "missing"}),
    ("cm-arr", {"nll_prior": "class", "learn_ab": True}),
    ("cm-arr", {"proj_input": "features"}),
    ("no-udcl", {"proj_input": "features"}),
    ("point", {"point_similarity": "cosine", "learn_ab": True}),
])
def test_every_parameter_gets_a_gradient_with_missing_conditions(variant: str, overrides: dict) -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg(variant, **overrides)).train()
    B = 12
    feats, masks = make_batch(B)
    available = _mixed_missing_batch(B)
    present = torch.ones(B, 3, dtype=torch.bool)
    labels = torch.arange(B) % 4
    out = model(nan_fill(feats, available) if variant == "baseline" else feats, masks, available,
                present=present, labels=labels)
    out.losses["total"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, f"{variant} {overrides}: parameters without gradient: {no_grad}"
    # the per-modality and per-pair layers hold their copies along axis 0: every copy is trained
    no_grad = [f"{n}[{g}]" for n, p in model.named_parameters() if n.startswith(GROUPED)
               for g in range(p.shape[0]) if p.grad[g].abs().sum() == 0]
    assert not no_grad, f"{variant} {overrides}: parameter groups without gradient: {no_grad}"


def test_a_single_missing_condition_trains_the_missing_modalities_modules() -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg()).train()
    feats, masks = make_batch(4)
    available = condition_mask(CONDITIONS["s"], 4)
    out = model(feats, masks, available, present=torch.ones(4, 3, dtype=torch.bool), labels=torch.tensor([0, 1, 2, 3]))
    assert out.losses["rec"] > 0
    out.losses["total"].backward()
    for m in ("text", "video"):  # reconstructed: the reconstruction module is trained; the flows by the likelihood
        g = MODALITIES.index(m)
        for prefix in ("rec.", "flow."):
            grads = [p.grad[g] for n, p in model.named_parameters() if n.startswith(prefix)]
            assert grads and all(gr.abs().sum() > 0 for gr in grads), (prefix, m)
    # the speech flow is trained by the likelihood (and by L_rec through Z_s when rec_detach_input=False)
    assert all(p.grad[0].abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("flow."))


# ------------------------------------------------------------------ targets, losses and reps
def test_reconstruction_targets_and_reps() -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg()).eval()
    feats, masks = make_batch(4)
    available = condition_mask(CONDITIONS["vt"], 4)
    labels = torch.tensor([0, 1, 2, 3])
    # without `present`, nothing is a target: L_rec is 0
    assert model(feats, masks, available, labels=labels).losses["rec"].item() == 0.0
    present = torch.ones(4, 3, dtype=torch.bool)
    present[1, 0] = False  # sample 1 has no speech at all: neither input nor target
    out = model(nan_fill(feats, present), masks, available, present=present, labels=labels, reps=True)
    assert out.losses["rec"].item() > 0
    assert model(feats, masks, available, present=present).reps == {}  # only on request
    reps = out.reps
    assert torch.equal(reps["recon_mask"], ~available) and torch.equal(reps["present_mask"], present)
    for m in MODALITIES:
        assert reps["real"][m].shape == (4, 16) and reps["recon"][m].shape == (4, 16)
        assert not reps["real"][m].requires_grad
    assert torch.isnan(reps["real"]["speech"][1]).all() and torch.isfinite(reps["real"]["speech"][[0, 2, 3]]).all()
    assert torch.isfinite(reps["recon"]["speech"]).all()  # speech reconstructed for every sample
    assert torch.isnan(reps["recon"]["text"]).all()  # text was available everywhere
    # the rec loss is exactly the mean squared error between pooled-step X^_s and X_s on target rows
    assert model(feats, masks, available).losses == {}


def test_rec_loss_is_the_mse_of_reconstruction_against_projected_features() -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg(lambda_rec=1.0)).eval()
    feats, masks = make_batch(3)
    available = condition_mask(CONDITIONS["t"], 3)
    present = torch.ones(3, 3, dtype=torch.bool)
    captured = {}
    hooks = [model.rec.register_forward_hook(lambda mod, inp, out: captured.__setitem__("hat", out)),
             model.proj.register_forward_hook(lambda mod, inp, out: captured.__setitem__("x", out))]
    out = model(feats, masks, available, present=present, labels=torch.tensor([0, 1, 2]))
    for h in hooks:
        h.remove()
    x_n = captured["x"].view(3, len(MODALITIES), 16, -1).permute(1, 0, 3, 2)  # (B, 3d, S) -> (3, B, S, d)
    se = sum(((captured["hat"][i] - x_n[i]) ** 2).sum() for i in (0, 2))  # speech and video were targets
    expected = se / (2 * 3 * 6 * 16)  # two target modalities x 3 rows x seq_len x d_model
    torch.testing.assert_close(out.losses["rec"], expected)


def test_weighted_sum_and_disabled_terms() -> None:
    torch.manual_seed(0)
    feats, masks = make_batch(4)
    available = condition_mask(CONDITIONS["s"], 4)
    present = torch.ones(4, 3, dtype=torch.bool)
    labels = torch.tensor([0, 1, 2, 3])
    for variant in VARIANTS:
        cfg = small_cfg(variant)
        losses = CMARR(cfg).eval()(feats, masks, available, present=present, labels=labels).losses
        expected = (cfg.alpha * losses["udcl"] + cfg.beta * losses["spcl"] + cfg.lambda_rec * losses["rec"]
                    + losses["cls"] + cfg.nll_weight * losses["nll"])
        torch.testing.assert_close(losses["total"], expected)
        for term, weight in (("udcl", cfg.alpha), ("spcl", cfg.beta), ("rec", cfg.lambda_rec), ("nll", cfg.nll_weight)):
            assert (losses[term].item() == 0.0) == (weight == 0), f"{variant}: {term}"


# ------------------------------------------------------------------ config and errors
def test_for_variant_settings() -> None:
    base = CMARRConfig.for_variant("cm-arr")
    assert ((base.alpha, base.beta, base.lambda_rec, base.tau_init, base.spcl_temperature)
            == (1.0, 0.1, 10.0, 0.07, 0.07))
    assert base.udcl_a == -1 / 200 and base.udcl_b == 4.0 and base.dims == {"speech": 768, "text": 768, "video": 342}
    assert base.reconstruction and base.umc_attention and base.udcl_representation == "distribution"
    assert CMARRConfig.for_variant("no-udcl").alpha == 0.0
    assert CMARRConfig.for_variant("no-spcl").beta == 0.0
    assert CMARRConfig.for_variant("no-attention").umc_attention is False
    assert CMARRConfig.for_variant("point").udcl_representation == "point"
    bl = CMARRConfig.for_variant("baseline")
    assert not bl.reconstruction and not bl.train_missing and bl.alpha == bl.beta == bl.lambda_rec == bl.nll_weight == 0
    assert CMARRConfig.for_variant("no-spcl", seq_len=16).seq_len == 16
    for v in VARIANTS:
        assert CMARRConfig.for_variant(v).variant == v
    # the variants differ in what is built
    names = {v: {n for n, _ in CMARR(small_cfg(v)).named_parameters()} for v in VARIANTS}
    assert not any(n.startswith(("umc.", "flow.", "rec.")) for n in names["baseline"])
    assert any("to_logsigma" in n for n in names["cm-arr"])
    assert not any("to_logsigma" in n for n in names["point"] | names["no-udcl"])
    assert not any(".attn." in n for n in names["no-attention"] if n.startswith("umc."))
    assert "log_tau" in names["cm-arr"] and "log_tau" not in names["no-udcl"]
    with pytest.raises(ValueError, match="unknown variant"):
        CMARRConfig.for_variant("nope")
    with pytest.raises(ValueError, match="fusion_queries"):
        CMARRConfig(fusion_queries="some")
    with pytest.raises(ValueError, match="dims"):
        CMARRConfig(dims={"speech": 3})
    with pytest.raises(ValueError, match="baseline"):
        CMARRConfig(reconstruction=False)


def test_bad_inputs_raise_clear_errors() -> None:
    model = CMARR(small_cfg()).eval()
    feats, masks = make_batch(2)
    full = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="at least one available"):
        model(feats, masks, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not present"):
        model(feats, masks, full, present=condition_mask(("text",), 2))
    empty = dict(masks, video=torch.zeros_like(masks["video"]))
    with pytest.raises(ValueError, match="video"):
        model(feats, empty, full)
    with pytest.raises(ValueError, match="speech"):
        model(dict(feats, speech=feats["speech"][..., :5]), masks, full)
    with pytest.raises(ValueError, match="available"):
        model(feats, masks, full.long())


def test_default_model_size_and_condition_table() -> None:
    from cmarr.extract import base

    # the model keeps its own copy (it reads no store): the same modalities, in the same order
    assert MODALITIES == base.MODALITIES == ("speech", "text", "video")
    assert set(CONDITIONS) == {"t", "s", "v", "vt", "sv", "st", "svt"}
    assert all(set(v) <= set(MODALITIES) for v in CONDITIONS.values())
    assert sorted(len(v) for v in CONDITIONS.values()) == [1, 1, 1, 2, 2, 2, 3]
    assert len({frozenset(v) for v in CONDITIONS.values()}) == 7
    n_params = sum(p.numel() for p in CMARR(CMARRConfig()).parameters())
    assert 1e6 < n_params < 1e7  # modest: a CPU step at batch 16 stays cheap
    assert VARIANTS[0] == "cm-arr" and len(VARIANTS) == 7


# ------------------------------------------------------------------ components
def test_umc_is_masked_and_without_attention_works_per_step() -> None:
    from cmarr.model import UMC

    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 8)  # (G, B, T, C), one group
    mask = torch.tensor([[[True, True, True, False, False], [True] * 5]])
    changed = x.clone()
    changed[0, 0, 3:] = 1e3  # padding of row 0
    umc = UMC(8, heads=2, mlp_ratio=2, dropout=0.0).eval()
    mu, logsigma = umc(x, mask)
    mu2, logsigma2 = umc(changed, mask)
    assert mu.shape == logsigma.shape == (1, 2, 5, 8)
    torch.testing.assert_close(mu[0, 0, :3], mu2[0, 0, :3])
    torch.testing.assert_close(logsigma[0, 0, :3], logsigma2[0, 0, :3])
    torch.testing.assert_close(mu[0, 1], mu2[0, 1])
    # with attention a valid step sees the other valid steps; without it, only itself
    other = x.clone()
    other[0, 1, 4] += 1.0
    assert not torch.allclose(umc(other, mask)[0][0, 1, 0], mu[0, 1, 0])
    flat = UMC(8, heads=2, mlp_ratio=2, dropout=0.0, attention=False).eval()
    torch.testing.assert_close(flat(other, mask)[0][0, 1, :4], flat(x, mask)[0][0, 1, :4])
    point = UMC(8, heads=2, mlp_ratio=2, dropout=0.0, with_sigma=False)
    assert point(x, mask)[1] is None and not hasattr(point, "to_logsigma")
    # three UMCs in one call: each group is the UMC of its own weights and input
    three = UMC(8, heads=2, mlp_ratio=2, dropout=0.0, groups=3).eval()
    xs, masks3 = torch.randn(3, 2, 5, 8), mask.expand(3, 2, 5)
    mu3, ls3 = three(xs, masks3)
    for g in range(3):
        one = UMC(8, heads=2, mlp_ratio=2, dropout=0.0).eval()
        one.load_state_dict({k: v[g : g + 1] for k, v in three.state_dict().items()})
        mu_g, ls_g = one(xs[g : g + 1], mask)
        torch.testing.assert_close(mu_g[0], mu3[g])
        torch.testing.assert_close(ls_g[0], ls3[g])


def _perturbed_logits(model: CMARR, block: str, feats: dict, masks: dict, available: torch.Tensor) -> torch.Tensor:
    """Logits after changing the weights of one cross-attention block, named "query_key"."""
    from cmarr.model.fusion import PAIRS

    q, k = block.split("_")
    g = PAIRS.index((MODALITIES.index(q), MODALITIES.index(k)))
    with torch.no_grad():
        for p in model.fusion.cross.parameters():
            p[g].add_(0.5)
    return model(feats, masks, available).logits


def test_fusion_query_rules() -> None:
    feats, masks = make_batch(3)
    text_missing = condition_mask(CONDITIONS["sv"], 3)
    for rule, unused_changes in (("missing", False), ("all", True)):
        torch.manual_seed(0)
        model = CMARR(small_cfg(fusion_queries=rule)).eval()
        ref = model(feats, masks, text_missing).logits
        # Eqs. 10-11: the reconstructed text is the query against speech and video
        assert not torch.allclose(_perturbed_logits(model, "text_speech", feats, masks, text_missing), ref)
        # a block whose query is an available modality is used only under the "all" rule
        torch.manual_seed(0)
        model = CMARR(small_cfg(fusion_queries=rule)).eval()
        changed = not torch.allclose(_perturbed_logits(model, "speech_video", feats, masks, text_missing), ref)
        assert changed == unused_changes, rule
    # full condition under "missing": every modality is a query
    torch.manual_seed(0)
    model = CMARR(small_cfg(fusion_queries="missing")).eval()
    full = torch.ones(3, 3, dtype=torch.bool)
    ref = model(feats, masks, full).logits
    assert not torch.allclose(_perturbed_logits(model, "speech_video", feats, masks, full), ref)


def test_reconstruction_module_keeps_shape_and_uses_channel_attention() -> None:
    from cmarr.model import ReconstructionModule

    torch.manual_seed(0)
    rec = ReconstructionModule(16, blocks=2, kernel=3, reduction=4, groups=3)
    x = torch.randn(3, 2, 6, 16)  # (G, B, T, C)
    y = rec(x)
    assert y.shape == (3, 2, 6, 16)
    gate = rec.blocks[0].body[3].gate
    assert isinstance(gate[-1], torch.nn.Sigmoid) and gate[1].weight.shape[:2] == (3, 4)  # C -> C/r -> C per group
    # the groups are independent: changing group 1's input changes only group 1's output
    x2 = x.clone()
    x2[1] += 1.0
    y2 = rec(x2)
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]])
    assert not torch.allclose(y2[1], y[1])


def test_missing_latent_is_the_mean_of_the_available_latents_eq7() -> None:
    torch.manual_seed(0)
    model = CMARR(small_cfg()).eval()
    feats, masks = make_batch(2)
    z_out, z_in = {}, {}
    flow = model.flow
    flow.register_forward_hook(lambda mod, inp, out: z_out.update(zip(MODALITIES, out[0])))
    original = flow.inverse
    flow.inverse = lambda z: (z_in.update(zip(MODALITIES, z)), original(z))[1]
    available = torch.tensor([[True, False, True],    # speech + video -> text from (Z_s + Z_v) / 2
                              [True, False, False]])  # speech only -> text and video from Z_s
    model(feats, masks, available)
    torch.testing.assert_close(z_in["text"][0], (z_out["speech"][0] + z_out["video"][0]) / 2)
    torch.testing.assert_close(z_in["text"][1], z_out["speech"][1])
    torch.testing.assert_close(z_in["video"][1], z_out["speech"][1])


def test_training_step_without_value_checks_is_one_graph() -> None:
    """``validate=False`` leaves no host sync in forward and backward, so ``torch.compile``
    captures the whole step as one graph (what CUDA graphs need); it computes the same losses
    and gradients as the eager step. ``aot_eager`` traces like inductor without generating code."""
    torch.manual_seed(0)
    model = CMARR(small_cfg(dropout=0.0))
    feats, masks = make_batch(4)
    available = _mixed_missing_batch(4)
    present = torch.ones(4, 3, dtype=torch.bool)
    labels = torch.tensor([0, 1, 2, 3])
    eager = model(feats, masks, available, present, labels, validate=False).losses["total"]
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    total = compiled(feats, masks, available, present, labels, validate=False).losses["total"]
    total.backward()
    torch.testing.assert_close(total, eager)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_pooled_inputs_skip_pooling_with_the_same_result() -> None:
    torch.manual_seed(0)
    cfg = small_cfg(dropout=0.0)
    model = CMARR(cfg).eval()
    feats, masks = make_batch(4)
    available = _mixed_missing_batch(4)
    present = torch.ones(4, 3, dtype=torch.bool)
    present[1, 2] = False  # no video for row 1: its pooled mask row is all False
    available &= present
    available[1, 0] = True
    labels = torch.tensor([0, 1, 2, 3])
    pf, pm = {}, {}
    for i, m in enumerate(MODALITIES):
        pf[m], pm[m] = pool_to_steps(feats[m], masks[m] & present[:, i : i + 1], cfg.seq_len)
    ref = model(feats, masks, available, present, labels)
    out = model(pf, pm, available, present, labels, pooled=True)
    torch.testing.assert_close(out.logits, ref.logits)
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k], ref.losses[k])
    with pytest.raises(ValueError, match="seq_len"):
        model(feats, masks, available, present, labels, pooled=True)  # raw frames are not pooled
    pm["text"] = pm["text"].clone()
    pm["text"][0, -1] = False  # a row partly valid cannot come from pool_to_steps
    with pytest.raises(ValueError, match="all True or all False"):
        model(pf, pm, available, present, labels, pooled=True)
