"""Layers that hold ``G`` independent copies of their weights and run them in one call.

CM-ARR has one UMC, one 1-D projection, one flow and one reconstruction module per modality,
and six cross-attention blocks of the same shape. Run one after another, a training step at
batch 16 is a few thousand small operators and its time is the per-operator overhead
(Python, dispatcher, kernel launch), not arithmetic (``benchmarks/model_step.py``). These
layers keep every copy's weights separate (the model is the same as ``G`` separate layers: a
test checks it) but stack them along a leading group axis, so each layer is one batched
operator for all copies.

Layouts:

- sequences are ``(G, B, T, C)``: group, batch, time, channels;
- convolutions over time work on ``(B, G * C, T)`` (:func:`to_conv`, :func:`from_conv`), where a
  grouped ``conv1d`` with ``groups=G`` is one operator.

Initialisation follows the ``torch.nn`` layer each one replaces (``nn.Linear``, ``nn.Conv1d``,
``nn.LayerNorm``, ``nn.MultiheadAttention``), independently for every group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_conv(x: Tensor) -> Tensor:
    """(G, B, T, C) -> (B, G * C, T), the layout of a grouped ``conv1d``."""
    G, B, T, C = x.shape
    return x.permute(1, 0, 3, 2).reshape(B, G * C, T)


def from_conv(y: Tensor, groups: int) -> Tensor:
    """(B, G * C, T) -> (G, B, T, C)."""
    B, GC, T = y.shape
    return y.reshape(B, groups, GC // groups, T).permute(1, 0, 3, 2)


class GroupLinear(nn.Module):
    """``G`` linear layers: ``y[g] = x[g] @ weight[g] + bias[g]`` as one batched matmul.

    weight (G, in, out) (the transpose of ``nn.Linear``'s, so no transpose per call); input
    (G, ..., in) -> (G, ..., out).
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default for weight and bias
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        G = self.weight.shape[0]
        flat = x.reshape(G, -1, x.shape[-1])  # (G, N, in)
        if self.bias is None:
            y = torch.bmm(flat, self.weight)
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)  # (G, N, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class GroupLayerNorm(nn.Module):
    """Layer normalisation over the last axis with a separate affine map per group."""

    def __init__(self, groups: int, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, width))
        self.bias = nn.Parameter(torch.zeros(groups, width))

    def forward(self, x: Tensor) -> Tensor:
        """x (G, ..., C) -> same shape."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


class GroupConv1d(nn.Module):
    """``G`` 1-D convolutions over time as one grouped ``conv1d``; input (B, G * in, T)."""

    def __init__(self, groups: int, in_channels: int, out_channels: int, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.groups, self.padding = groups, padding
        self.weight = nn.Parameter(torch.empty(groups, out_channels, in_channels, kernel))
        self.bias = nn.Parameter(torch.empty(groups, out_channels))
        bound = 1.0 / math.sqrt(in_channels * kernel)  # nn.Conv1d's default
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, G * in, T) -> (B, G * out, T)."""
        # in x's dtype: a no-op in float32 and under autocast, whose cast of a batched
        # (vmapped) conv reaches the input but not the bias
        w, b = self.weight.flatten(0, 1).to(x.dtype), self.bias.flatten().to(x.dtype)
        return F.conv1d(x, w, b, padding=self.padding, groups=self.groups)


def attention_mask(mask: Tensor) -> Tensor:
    """Keys that take part, (N, 1, 1, T) bool, from a (N, T) valid mask.

    A row with no valid key would make every weight ``softmax(-inf) = NaN``; such rows (absent
    modalities, whose results the caller discards) attend over all keys instead.
    """
    empty = ~mask.any(dim=-1, keepdim=True)  # (N, 1)
    return (mask | empty)[:, None, None, :]


class GroupAttention(nn.Module):
    """``G`` multi-head attentions (``nn.MultiheadAttention`` semantics: scaled dot product,
    dropout on the attention weights, input and output projections) as batched operators."""

    def __init__(self, groups: int, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj = GroupLinear(groups, width, 3 * width)
        self.out_proj = GroupLinear(groups, width, width)
        for g in range(groups):  # nn.MultiheadAttention: xavier input projection, zero biases
            nn.init.xavier_uniform_(self.in_proj.weight.data[g].T)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        G, B, T, C = x.shape  # -> (G * B, heads, T, C / heads)
        return x.reshape(G * B, T, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, kv: Tensor | None, kv_mask: Tensor) -> Tensor:
        """q (G, B, Tq, C); kv (G, B, Tk, C) or None (self-attention over ``q``);
        kv_mask (G, B, Tk) bool valid keys -> (G, B, Tq, C)."""
        G, B, Tq, C = q.shape
        w, b = self.in_proj.weight, self.in_proj.bias
        if kv is None:  # one matmul for q, k and v
            q_, k_, v_ = self.in_proj(q).chunk(3, dim=-1)
        else:
            q_ = torch.baddbmm(b[:, None, :C], q.reshape(G, -1, C), w[:, :, :C]).reshape(G, B, Tq, C)
            k_, v_ = torch.baddbmm(b[:, None, C:], kv.reshape(G, -1, C), w[:, :, C:]).reshape(
                G, B, -1, 2 * C).chunk(2, dim=-1)
        # written out rather than F.scaled_dot_product_attention: at these lengths (tens of steps)
        # it is as fast, and it has batching rules, so a trainer can vmap the model over folds
        q_, k_, v_ = self._heads(q_), self._heads(k_), self._heads(v_)  # (G * B, heads, T, C / heads)
        scores = (q_ * (q_.shape[-1] ** -0.5)) @ k_.transpose(-2, -1)  # (G * B, heads, Tq, Tk)
        scores = scores.masked_fill(~attention_mask(kv_mask.reshape(G * B, -1)), float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        h = weights @ v_  # (G * B, heads, Tq, C / heads)
        return self.out_proj(h.transpose(1, 2).reshape(G, B, Tq, C))


class GroupMLP(nn.Module):
    """Feed-forward layer: Linear -> GELU -> dropout -> Linear (-> dropout), per group."""

    def __init__(self, groups: int, width: int, ratio: int, dropout: float, out_dropout: bool = False) -> None:
        super().__init__()
        self.fc1 = GroupLinear(groups, width, width * ratio)
        self.fc2 = GroupLinear(groups, width * ratio, width)
        self.drop = nn.Dropout(dropout)
        self.out_dropout = out_dropout

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc2(self.drop(F.gelu(self.fc1(x))))
        return self.drop(y) if self.out_dropout else y


def group_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (G, B, T, C) over the steps where ``mask`` (G, B, T) is True -> (G, B, C).

    Rows without a valid step give zeros (the caller must not read them as data).
    """
    m = mask.unsqueeze(-1).to(x.dtype)  # (G, B, T, 1)
    return (x * m).sum(dim=2) / m.sum(dim=2).clamp(min=1.0)
