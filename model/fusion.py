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

The fused sequence ``H`` is mean-pooled over its valid tokens for the classifier.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MODALITIES
from .umc import masked_mean, safe_key_padding


class FeedForward(nn.Module):
    def __init__(self, width: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width * ratio), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width * ratio, width), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Pre-norm transformer block whose queries come from one sequence and keys/values from another."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = FeedForward(width, ff_ratio, dropout)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor) -> Tensor:
        """q (B, Tq, C), kv (B, Tk, C), kv_mask (B, Tk) bool -> (B, Tq, C)."""
        kv_n = self.norm_kv(kv)
        h, _ = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=safe_key_padding(kv_mask), need_weights=False)
        h = q + h
        return h + self.ff(self.norm_ff(h))


class SelfAttention(nn.Module):
    """Pre-norm transformer block over one sequence (Eq. 13)."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = FeedForward(width, ff_ratio, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, C), mask (B, T) -> (B, T, C)."""
        x_n = self.norm(x)
        h, _ = self.attn(x_n, x_n, x_n, key_padding_mask=safe_key_padding(mask), need_weights=False)
        h = x + h
        return h + self.ff(self.norm_ff(h))


class CrossModalFusion(nn.Module):
    """Eqs. 10-13 for all seven conditions; see the module docstring for the query rule."""

    def __init__(self, width: int, heads: int, ff_ratio: int, dropout: float, queries: str = "all") -> None:
        super().__init__()
        if queries not in ("all", "missing"):
            raise ValueError(f"fusion queries must be 'all' or 'missing', got {queries!r}")
        self.queries = queries
        # Cross-Attention_{qk}: one per ordered pair (query q, key/value k), q != k
        self.cross = nn.ModuleDict({
            f"{q}_{k}": CrossAttention(width, heads, ff_ratio, dropout)
            for q in MODALITIES for k in MODALITIES if q != k
        })
        # Eq. 12: Concat[H_qk1, H_qk2] along channels, back to the common width
        self.merge = nn.ModuleDict({q: nn.Linear(2 * width, width) for q in MODALITIES})
        self.self_attn = SelfAttention(width, heads, ff_ratio, dropout)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, y: dict[str, Tensor], y_mask: dict[str, Tensor], available: Tensor) -> Tensor:
        """Fuse the three modality sequences into one vector per sample.

        Args:
            y: modality -> (B, T, C), ``X_m`` if available else ``X^_m``.
            y_mask: modality -> (B, T) bool valid steps.
            available: (B, 3) bool, the condition (index order ``MODALITIES``).

        Returns:
            (B, C) pooled fused representation ``H``.
        """
        if self.queries == "all":
            is_query = torch.ones_like(available)  # (B, 3)
        else:
            missing = ~available
            full = ~missing.any(dim=1, keepdim=True)  # (B, 1)
            is_query = missing | full  # (B, 3)
        tokens, token_mask = [], []
        for qi, q in enumerate(MODALITIES):
            h_q = [self.cross[f"{q}_{k}"](y[q], y[k], y_mask[k]) for k in MODALITIES if k != q]  # 2 x (B, T, C), Eqs. 10-11
            tokens.append(self.merge[q](torch.cat(h_q, dim=-1)))  # (B, T, C), Eq. 12
            token_mask.append(y_mask[q] & is_query[:, qi : qi + 1])  # (B, T)
        h_prime = torch.cat(tokens, dim=1)  # (B, 3 T, C)
        mask = torch.cat(token_mask, dim=1)  # (B, 3 T)
        h = self.self_attn(h_prime, mask)  # (B, 3 T, C), Eq. 13
        return self.norm_out(masked_mean(h, mask))  # (B, C)
