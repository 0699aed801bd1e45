"""Uncertainty modelling component (UMC, Fig. 3).

The UMC is the "probability distribution encoder" of MAP (Ji et al. 2023): it turns a
point-based sequence ``R_n`` into a per-step diagonal Gaussian ``N(mu_n, sigma_n^2)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .grouped import GroupAttention, GroupLayerNorm, GroupLinear, GroupMLP


class UMC(nn.Module):
    """Uncertainty modelling component (Fig. 3), one per modality, ``groups`` of them run together.

    For a sequence ``x`` (B, T, C): ``h = LN(GELU(Linear(x)))``; masked multi-head
    self-attention over ``h``; the attention output is split in two halves along channels,
    each projected back to ``C``, giving ``mu`` and ``log sigma``; ``mu = x + mu``, then
    ``mu = mu + MLP(LN(mu))``; ``log sigma = log sigma + MLP(LN(log sigma))`` (no residual from
    ``x``, as in MAP).

    The model holds one UMC per modality with separate weights; they are stacked along a
    leading group axis (``groups``, :mod:`cmarr.model.grouped`) so that all three run as one set
    of operators. Inputs and outputs are (G, B, T, C).

    Config fields that shape it: ``umc_heads``, ``umc_mlp_ratio``, ``dropout``,
    ``umc_attention`` (False = Table 3's "w/o attention": the attention is left out and
    ``h`` is split directly) and ``with_sigma`` (False when no distribution is needed, i.e.
    ``udcl_representation = "point"`` or ``alpha = 0``: only the ``mu`` branch is built, and it
    projects the whole attention output, so that no built weight is left unused).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float,
                 attention: bool = True, with_sigma: bool = True, groups: int = 1) -> None:
        super().__init__()
        G = groups
        self.with_sigma = with_sigma
        self.inp = GroupLinear(G, width, width)
        self.norm_in = GroupLayerNorm(G, width)
        self.attn = GroupAttention(G, width, heads, dropout) if attention else None
        half = width // 2 if with_sigma else width
        self.to_mu = GroupLinear(G, half, width)
        self.norm_mu = GroupLayerNorm(G, width)
        self.mlp_mu = GroupMLP(G, width, mlp_ratio, dropout)
        if with_sigma:
            self.to_logsigma = GroupLinear(G, width - half, width)
            self.norm_sigma = GroupLayerNorm(G, width)
            self.mlp_sigma = GroupMLP(G, width, mlp_ratio, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Args: x (G, B, T, C), mask (G, B, T) bool. Returns mu (G, B, T, C), log sigma (G, B, T, C) or None."""
        h = self.norm_in(nn.functional.gelu(self.inp(x)))  # (G, B, T, C)
        if self.attn is not None:
            h = self.attn(h, None, mask)  # (G, B, T, C)
        if self.with_sigma:
            half = h.shape[-1] // 2
            mu, logsigma = self.to_mu(h[..., :half]), self.to_logsigma(h[..., half:])  # (G, B, T, C) each
        else:
            mu, logsigma = self.to_mu(h), None
        mu = x + mu
        mu = mu + self.mlp_mu(self.norm_mu(mu))
        if logsigma is not None:
            logsigma = logsigma + self.mlp_sigma(self.norm_sigma(logsigma))
        return mu, logsigma
