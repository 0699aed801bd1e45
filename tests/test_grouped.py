"""Grouped layers: group g of each is the torch.nn layer holding group g's weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_float32_close
from torch import nn

from cmarr.model.grouped import (
    GroupAttention,
    GroupConv1d,
    GroupLayerNorm,
    GroupLinear,
    from_conv,
    group_masked_mean,
    to_conv,
)

G, B, T, C = 3, 2, 5, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def test_layout_round_trip() -> None:
    x = torch.randn(G, B, T, C)
    y = to_conv(x)
    assert y.shape == (B, G * C, T)
    # pure layout changes: exact
    torch.testing.assert_close(y[:, C:2 * C], x[1].transpose(1, 2), rtol=0, atol=0)  # group 1's channels
    torch.testing.assert_close(from_conv(y, G), x, rtol=0, atol=0)


def test_group_linear_and_layer_norm_equal_torch_layers() -> None:
    torch.manual_seed(0)
    lin, norm = _randomise(GroupLinear(G, C, 4)), _randomise(GroupLayerNorm(G, C))
    x = torch.randn(G, B, T, C)
    y, z = lin(x), norm(x)
    for g in range(G):
        ref = nn.Linear(C, 4)
        ref.weight.data, ref.bias.data = lin.weight[g].T.clone(), lin.bias[g].clone()
        # one batched matmul for all groups against torch's own kernel: another summation order
        assert_float32_close(y[g], ref(x[g]), C + 1, f"linear group {g}")  # C products and the bias
        ln = nn.LayerNorm(C)
        ln.weight.data, ln.bias.data = norm.weight[g].clone(), norm.bias[g].clone()
        assert_float32_close(z[g], ln(x[g]), C, f"layer norm group {g}")


def test_group_conv_equals_torch_conv() -> None:
    torch.manual_seed(0)
    conv = GroupConv1d(G, C, 6, kernel=3, padding=1)
    x = torch.randn(G, B, T, C)
    y = from_conv(conv(to_conv(x)), G)  # (G, B, T, 6)
    for g in range(G):
        ref = F.conv1d(x[g].transpose(1, 2), conv.weight[g], conv.bias[g], padding=1).transpose(1, 2)
        assert_float32_close(y[g], ref, 3 * C + 1, f"conv group {g}")  # 3 taps of C channels and the bias


@pytest.mark.parametrize("cross", [False, True])
def test_group_attention_equals_multihead_attention(cross: bool) -> None:
    torch.manual_seed(0)
    attn = _randomise(GroupAttention(G, C, heads=2, dropout=0.0)).eval()
    q = torch.randn(G, B, T, C)
    kv = torch.randn(G, B, T + 2, C) if cross else None
    keys = kv if cross else q
    mask = torch.ones(G, B, keys.shape[2], dtype=torch.bool)
    mask[:, 0, 3:] = False  # padding of row 0
    mask[1, 1] = False  # a row without any valid key attends over all of them (finite output)
    y = attn(q, kv, mask)
    assert torch.isfinite(y).all()
    for g in range(G):
        ref = nn.MultiheadAttention(C, 2, batch_first=True).eval()
        ref.in_proj_weight.data = attn.in_proj.weight[g].T.clone()
        ref.in_proj_bias.data = attn.in_proj.bias[g].clone()
        ref.out_proj.weight.data = attn.out_proj.weight[g].T.clone()
        ref.out_proj.bias.data = attn.out_proj.bias[g].clone()
        keep = mask[g] | ~mask[g].any(dim=1, keepdim=True)
        out, _ = ref(q[g], keys[g], keys[g], key_padding_mask=~keep, need_weights=False)
        # in and out projections (C + 1 each), scores (C / 2 per head), softmax and weighted
        # sum over the keys (T + 2 each)
        assert_float32_close(y[g], out, 2 * (C + 1) + C // 2 + 2 * (T + 2), f"attention group {g}")


def test_group_masked_mean() -> None:
    x = torch.randn(G, B, T, C)
    mask = torch.zeros(G, B, T, dtype=torch.bool)
    mask[0, 0, :2] = True
    out = group_masked_mean(x, mask)
    # a sum of two values and masked zeros, halved: exact
    torch.testing.assert_close(out[0, 0], x[0, 0, :2].mean(dim=0), rtol=0, atol=0)
    assert (out[1] == 0).all()  # rows without a valid step give zeros
