"""Cross-modal fusion (Sec. 3.3.2, Eqs. 10-13).

The paper writes the fusion for one condition (text missing): the recovered ``X^_t`` is the
query of two cross-attentions whose keys/values are ``X_v`` and ``X_s`` (Eqs. 10-11), their
outputs are concatenated (Eq. 12) and a self-attention block fuses them (Eq. 13); the text
speaks of "three cross-modal attention blocks". :class:`CrossModalFusion` generalises this
to all seven conditions with one rule (config ``fusion_queries``):

- the fusion inputs are ``Y_m = X_m`` for an available modality and ``Y_m = X^_m`` (the
  reconstruction; zero-filled features for the baseline) for one that is not, so all three
  modalities are always present;
- there is one cross-modal block per query modality ``q`` (three blocks); block ``q`` holds
  the cross-attentions ``Cross-Attention_{qk}(Q_q, K_k, V_k)`` for the two other modalities
  ``k``, concatenates their outputs along channels (Eq. 12, as MulT does) and maps them back
  to width ``d`` with a linear layer, so for "text missing" block ``t`` is Eqs. 10-12;
- ``fusion_queries = "all"`` (default): every block is used in every condition, and the
  self-attention (Eq. 13) runs over the three blocks' outputs concatenated along time. The
  available modalities then also look at the reconstructed ones, and the graph is the same in
  every condition (a batch may mix conditions);
- ``fusion_queries = "missing"``: the literal reading of Eqs. 10-11 — only the blocks whose
  query modality was reconstructed enter the self-attention (their tokens are masked in per
  sample); in the full condition, where nothing is reconstructed, all three do.

The fused sequence ``H`` is mean-pooled over its valid tokens for the classifier. The six
cross-attention blocks (and the three merge layers) keep separate weights but run as one
grouped call each (:mod:`cmarr.model.grouped`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MODALITIES
from .grouped import GroupAttention, GroupLayerNorm, GroupLinear, GroupMLP, group_masked_mean

# Cross-Attention_{qk}, one per ordered pair (query q, key/value k), q != k, in this order
PAIRS: tuple[tuple[int, int], ...] = tuple((q, k) for q in range(len(MODALITIES)) for k in range(len(MODALITIES))
                                           if q != k)


class CrossAttention(nn.Module):
    """Pre-norm transformer block whose queries come from one sequence and keys/values from
    another; ``groups`` blocks with separate weights run together on (G, B, T, C)."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float, groups: int = 1) -> None:
        super().__init__()
        self.norm_q = GroupLayerNorm(groups, width)
        self.norm_kv = GroupLayerNorm(groups, width)
        self.attn = GroupAttention(groups, width, heads, dropout)
        self.norm_ff = GroupLayerNorm(groups, width)
        self.ff = GroupMLP(groups, width, ff_ratio, dropout, out_dropout=True)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        """q (G, B, Tq, C), kv (G, B, Tk, C), kv_mask (G, B, Tk) bool -> (G, B, Tq, C)."""
        h = q + self.attn(self.norm_q(q), self.norm_kv(kv), kv_mask)
        return h + self.ff(self.norm_ff(h))


class SelfAttention(nn.Module):
    """Pre-norm transformer block over one sequence (Eq. 13)."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm = GroupLayerNorm(1, width)
        self.attn = GroupAttention(1, width, heads, dropout)
        self.norm_ff = GroupLayerNorm(1, width)
        self.ff = GroupMLP(1, width, ff_ratio, dropout, out_dropout=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, C), mask (B, T) -> (B, T, C)."""
        x = x.unsqueeze(0)  # (1, B, T, C)
        h = x + self.attn(self.norm(x), None, mask.unsqueeze(0))
        return (h + self.ff(self.norm_ff(h))).squeeze(0)


class CrossModalFusion(nn.Module):
    """Eqs. 10-13 for all seven conditions; see the module docstring for the query rule."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float, queries: str = "all") -> None:
        super().__init__()
        if queries not in ("all", "missing"):
            raise ValueError(f"fusion queries must be 'all' or 'missing', got {queries!r}")
        self.queries = queries
        n = len(MODALITIES)
        self.cross = CrossAttention(width, heads, ff_ratio, dropout, groups=len(PAIRS))  # group p = PAIRS[p]
        self.register_buffer("q_index", torch.tensor([q for q, _ in PAIRS]), persistent=False)
        self.register_buffer("k_index", torch.tensor([k for _, k in PAIRS]), persistent=False)
        # Eq. 12: Concat[H_qk1, H_qk2] along channels, back to the common width (one per query q)
        self.merge = GroupLinear(n, 2 * width, width)
        self.self_attn = SelfAttention(width, heads, ff_ratio, dropout)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, y: Tensor, y_mask: Tensor, available: Tensor) -> Tensor:
        """Fuse the three modality sequences into one vector per sample.

        Args:
            y: (3, B, T, C) in ``MODALITIES`` order, ``X_m`` if available else ``X^_m``.
            y_mask: (3, B, T) bool valid steps.
            available: (B, 3) bool, the condition.

        Returns:
            (B, C) pooled fused representation ``H``.
        """
        n, B, T, C = y.shape
        if self.queries == "all":
            is_query = torch.ones_like(available)  # (B, 3)
        else:
            missing = ~available
            full = ~missing.any(dim=1, keepdim=True)  # (B, 1)
            is_query = missing | full  # (B, 3)
        h_qk = self.cross(y[self.q_index], y[self.k_index], y_mask[self.k_index])  # (6, B, T, C), Eqs. 10-11
        # the two blocks of query q are PAIRS[2q], PAIRS[2q + 1]: concatenate them along channels
        cat = h_qk.view(n, 2, B, T, C).permute(0, 2, 3, 1, 4).reshape(n, B, T, 2 * C)  # (3, B, T, 2C)
        tokens = self.merge(cat)  # (3, B, T, C), Eq. 12
        token_mask = y_mask & is_query.T.unsqueeze(-1)  # (3, B, T)
        h_prime = tokens.transpose(0, 1).reshape(B, n * T, C)  # (B, 3 T, C), modality-major tokens
        mask = token_mask.transpose(0, 1).reshape(B, n * T)  # (B, 3 T)
        h = self.self_attn(h_prime, mask)  # (B, 3 T, C), Eq. 13
        return self.norm_out(group_masked_mean(h.unsqueeze(0), mask.unsqueeze(0)).squeeze(0))  # (B, C)
