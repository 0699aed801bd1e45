"""Uncertainty modelling component (UMC, Fig. 3) and its helpers.

The UMC is the "probability distribution encoder" of MAP (Ji et al. 2023): it turns a
point-based sequence ``R_n`` into a per-step diagonal Gaussian ``N(mu_n, sigma_n^2)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def safe_key_padding(mask: Tensor) -> Tensor:
    """Key-padding mask for ``nn.MultiheadAttention`` from a (B, T) valid mask.

    A row with no valid step would make every attention weight ``softmax(-inf) = NaN``; such
    rows (absent modalities, whose results the caller discards) attend over all steps instead.
    """
    empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
    return ~(mask | empty)  # (B, T) True = ignore


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, T, C) over the steps where ``mask`` (B, T) is True -> (B, C).

    Rows without a valid step give zeros (the caller must not read them as data).
    """
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class MLP(nn.Module):
    """Feed-forward layer of Fig. 3: Linear -> GELU -> dropout -> Linear."""

    def __init__(self, width: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width * ratio)
        self.fc2 = nn.Linear(width * ratio, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(nn.functional.gelu(self.fc1(x))))


class UMC(nn.Module):
    """Uncertainty modelling component (Fig. 3), one per modality.

    For a sequence ``x`` (B, T, C): ``h = LN(GELU(Linear(x)))``; masked multi-head
    self-attention over ``h``; the attention output is split in two halves along channels,
    each projected back to ``C``, giving ``mu`` and ``log sigma``; ``mu = x + mu``, then
    ``mu = mu + MLP(LN(mu))``; ``log sigma = log sigma + MLP(LN(log sigma))`` (no residual from
    ``x``, as in MAP).

    Config fields that shape it: ``umc_heads``, ``umc_mlp_ratio``, ``dropout``,
    ``umc_attention`` (False = Table 3's "w/o attention": the attention is left out and
    ``h`` is split directly) and ``with_sigma`` (False when no distribution is needed, i.e.
    ``udcl_representation = "point"`` or ``alpha = 0``: only the ``mu`` branch is built, and it
    projects the whole attention output, so that no built weight is left unused).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float,
                 attention: bool = True, with_sigma: bool = True) -> None:
        super().__init__()
        self.with_sigma = with_sigma
        self.inp = nn.Linear(width, width)
        self.norm_in = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True) if attention else None
        half = width // 2 if with_sigma else width
        self.to_mu = nn.Linear(half, width)
        self.norm_mu = nn.LayerNorm(width)
        self.mlp_mu = MLP(width, mlp_ratio, dropout)
        if with_sigma:
            self.to_logsigma = nn.Linear(width - half, width)
            self.norm_sigma = nn.LayerNorm(width)
            self.mlp_sigma = MLP(width, mlp_ratio, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Args: x (B, T, C), mask (B, T) bool. Returns mu (B, T, C), log sigma (B, T, C) or None."""
        h = self.norm_in(nn.functional.gelu(self.inp(x)))  # (B, T, C)
        if self.attn is not None:
            h, _ = self.attn(h, h, h, key_padding_mask=safe_key_padding(mask), need_weights=False)  # (B, T, C)
        if self.with_sigma:
            half = h.shape[-1] // 2
            mu, logsigma = self.to_mu(h[..., :half]), self.to_logsigma(h[..., half:])  # (B, T, C) each
        else:
            mu, logsigma = self.to_mu(h), None
        mu = x + mu
        mu = mu + self.mlp_mu(self.norm_mu(mu))
        if logsigma is not None:
            logsigma = logsigma + self.mlp_sigma(self.norm_sigma(logsigma))
        return mu, logsigma
