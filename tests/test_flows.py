"""Flows of the reconstruction phase (Eqs. 6, 8): invertibility, log-determinants, all layers used."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from cmarr.model.flows import ActNorm, AffineCoupling, Flow, InvertibleConv1x1LU

C, T, G = 6, 5, 2  # channels, steps, groups (flows with separate weights run together)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its initial value so that no layer is a near-identity."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _transforms() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "actnorm": _randomise(ActNorm(C, groups=G)),
        "conv1x1_lu": _randomise(InvertibleConv1x1LU(C, groups=G)),
        "coupling": _randomise(AffineCoupling(C, hidden=8, kernel=3, groups=G)),
        "coupling_odd": _randomise(AffineCoupling(C + 1, hidden=8, kernel=3, groups=G)),
        "flow": _randomise(Flow(C, steps=3, hidden=8, kernel=3, groups=G), std=0.1),
    }


def _width(name: str) -> int:
    return C + 1 if name == "coupling_odd" else C


@pytest.mark.parametrize("name", list(_transforms()))
def test_inverse_of_forward_is_identity_and_logdets_cancel(name: str) -> None:
    t = _transforms()[name].eval()
    x = torch.randn(G, 4, T, _width(name))
    z, ld_f = t(x)
    x_back, ld_i = t.inverse(z)
    assert z.shape == x.shape and ld_f.shape == (G, 4) and ld_i.shape == (G, 4)
    assert not torch.allclose(z, x, atol=1e-3), "the transform should not be the identity here"
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld_f + ld_i, torch.zeros(G, 4), atol=1e-5, rtol=0)
    # forward of inverse as well
    z_again, _ = t(t.inverse(z)[0])
    torch.testing.assert_close(z_again, z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(_transforms()))
def test_logabsdet_matches_autograd_jacobian(name: str) -> None:
    t = _transforms()[name].double().eval()
    c = _width(name)
    x = torch.randn(G, 2, 3, c, dtype=torch.float64)  # two rows per group: the log-det is per row
    _, ld = t(x)
    _, ld_inv = t.inverse(x)
    for g in range(G):
        for b in range(2):
            def row(v: torch.Tensor, g: int = g, b: int = b) -> torch.Tensor:
                full = x.clone()
                full[g, b] = v.view(3, c)
                return full

            jac = jacobian(lambda v, g=g, b=b: t(row(v))[0][g, b].flatten(), x[g, b].flatten())  # (3c, 3c): one row
            jac_inv = jacobian(lambda v, g=g, b=b: t.inverse(row(v))[0][g, b].flatten(), x[g, b].flatten())
            torch.testing.assert_close(ld[g, b], torch.linalg.slogdet(jac).logabsdet, atol=1e-8, rtol=1e-8)
            torch.testing.assert_close(ld_inv[g, b], torch.linalg.slogdet(jac_inv).logabsdet, atol=1e-8, rtol=1e-8)


def test_lu_weight_is_the_product_of_its_factors_and_inverse_solves() -> None:
    t = _randomise(InvertibleConv1x1LU(C, groups=G)).double()
    w = t.weight()  # (G, C, C)
    torch.testing.assert_close(torch.linalg.slogdet(w).logabsdet, t.log_s.sum(dim=1), atol=1e-10, rtol=0)
    z = torch.randn(G, 3, T, C, dtype=torch.float64)
    for g in range(G):
        torch.testing.assert_close(t.inverse(z)[0][g], z[g] @ torch.linalg.inv(w[g]).T, atol=1e-10, rtol=0)


def test_every_flow_layer_is_used_and_gets_gradients_both_ways() -> None:
    torch.manual_seed(0)
    flow = Flow(C, steps=2, hidden=8, kernel=3, groups=G)
    kinds = [type(t).__name__ for t in flow.transforms]
    assert kinds == ["ActNorm", "InvertibleConv1x1LU", "AffineCoupling"] * 2
    for direction in ("forward", "inverse"):
        flow.zero_grad()
        x = torch.randn(G, 4, T, C)
        out, ld = flow(x) if direction == "forward" else flow.inverse(x)
        (out.pow(2).sum() - ld.sum()).backward()
        for name, p in flow.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{direction}: no gradient for {name}"


def test_flow_transforms_every_channel() -> None:
    """The DiCMoR flow left half of the channels untouched; here every output depends on every input channel."""
    torch.manual_seed(0)
    flow = _randomise(Flow(C, steps=2, hidden=8, kernel=1), std=0.1).double()
    x = torch.randn(1, 1, 1, C, dtype=torch.float64)
    jac = jacobian(lambda v: flow(v.view(1, 1, 1, C))[0].flatten(), x.flatten())  # (C, C)
    assert (jac.abs() > 1e-8).all()


@pytest.mark.parametrize("name", list(_transforms()))
def test_each_group_is_the_transform_of_its_own_weights(name: str) -> None:
    """Group g of a grouped transform equals a one-group transform holding group g's weights,
    both ways: the groups (modalities) share no weight and no value."""
    t = _transforms()[name].double().eval()
    x = torch.randn(G, 3, T, _width(name), dtype=torch.float64)
    z, ld = t(x)
    x_inv, ld_inv = t.inverse(x)
    for g in range(G):
        single = _slice_group(t, g)
        z_g, ld_g = single(x[g : g + 1])
        torch.testing.assert_close(z_g[0], z[g], atol=1e-12, rtol=0)
        torch.testing.assert_close(ld_g[0], ld[g], atol=1e-12, rtol=0)
        x_g, ld_inv_g = single.inverse(x[g : g + 1])
        torch.testing.assert_close(x_g[0], x_inv[g], atol=1e-12, rtol=0)
        torch.testing.assert_close(ld_inv_g[0], ld_inv[g], atol=1e-12, rtol=0)


def _slice_group(t: torch.nn.Module, g: int) -> torch.nn.Module:
    """A one-group copy of ``t`` holding group ``g``'s weights and buffers."""
    import copy

    single = copy.deepcopy(t)
    for mod in single.modules():
        if hasattr(mod, "groups"):
            mod.groups = 1
    shared = {"lower_mask", "eye"}  # (C, C) masks common to all groups
    with torch.no_grad():
        for name, tensor in list(single.named_parameters()) + list(single.named_buffers()):
            if name.split(".")[-1] in shared:
                continue
            mod = single.get_submodule(name.rsplit(".", 1)[0]) if "." in name else single
            leaf = name.rsplit(".", 1)[-1]
            value = tensor.data[g : g + 1].clone()
            if isinstance(getattr(mod, leaf), torch.nn.Parameter):
                setattr(mod, leaf, torch.nn.Parameter(value))
            else:
                setattr(mod, leaf, value)
    return single
