"""Loss functions of CM-ARR (Eqs. 1-5, 9, 14), the flow likelihood and SupCon.

All are pure functions of tensors. They compute in float32 (mixed-precision inputs are cast)
and take boolean masks instead of indexing, so shapes stay static and rows that are masked
out never contribute a value or a gradient.

Modality axis: where a loss takes (B, M, d) tensors, ``M`` follows ``MODALITIES``.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# Stands in for -inf in masked logits: finite, so that a softmax over a fully masked row stays
# finite (and its gradient zero) instead of NaN.
_MASKED = -1e9

LOSS_NAMES: tuple[str, ...] = ("udcl", "spcl", "rec", "nll", "cls")


def wasserstein2(mu_a: Tensor, sigma_a: Tensor | None, mu_b: Tensor, sigma_b: Tensor | None) -> Tensor:
    """Pairwise squared 2-Wasserstein distance between diagonal Gaussians (Eq. 1).

    ``D_ij = ||mu_a_i - mu_b_j||_2^2 + ||sigma_a_i - sigma_b_j||_2^2`` with ``sigma`` the standard
    deviation (the exact W2^2 of diagonal Gaussians; the paper writes ``Sigma``). With
    ``sigma_a = sigma_b = None`` it is the squared Euclidean distance of points.

    Args: mu_a, sigma_a (N, d); mu_b, sigma_b (K, d). Returns (N, K).
    """
    d = (mu_a.unsqueeze(1) - mu_b.unsqueeze(0)).pow(2).sum(-1)  # (N, K)
    if (sigma_a is None) != (sigma_b is None):
        raise ValueError("wasserstein2: give both sigmas or neither")
    if sigma_a is not None:
        d = d + (sigma_a.unsqueeze(1) - sigma_b.unsqueeze(0)).pow(2).sum(-1)
    return d


def info_nce(logits: Tensor, valid: Tensor) -> Tensor:
    """Mean InfoNCE over valid rows, positives on the diagonal (Eqs. 3-4).

    ``L_i = -log exp(l_ii) / sum_{j valid} exp(l_ij)`` averaged over valid ``i``; 0 when no
    row is valid.

    Args: logits (..., N, N), ``logits[..., i, j]`` = similarity of anchor ``i`` to candidate
    ``j``; valid (..., N) bool (both modalities of the instance exist). Leading axes are
    independent problems. Returns (...), a scalar for (N, N) logits.
    """
    n = logits.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    cols = valid.unsqueeze(-2) | eye  # (..., N, N): each row keeps its own diagonal, so it is never empty
    logits = logits.masked_fill(~cols, _MASKED)
    per_row = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=-2, dim2=-1)  # (..., N)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)


def loss_udcl(
    mu: Tensor,
    sigma: Tensor | None,
    valid: Tensor,
    *,
    a: Tensor | float,
    b: Tensor | float,
    tau: Tensor | float,
    point_similarity: str = "euclidean",
    direction_reduction: str = "sum",
    pair_reduction: str = "mean",
) -> Tensor:
    """Unsupervised distribution-based contrastive loss L_udcl (Eqs. 1-5).

    For every pair of modalities (n, m) the same instance is the positive and the other
    instances of the batch are negatives; the similarity is ``S = a * D_2W + b`` (Eq. 5) and
    the logits are ``S / tau``. ``L^{n2m}`` and ``L^{m2n}`` (Eqs. 3-4) are combined by
    ``direction_reduction`` ("sum" = Eq. 2, config ``udcl_direction_reduction``) and the
    pairs by ``pair_reduction`` ("mean" over pairs with at least one valid instance, or
    "sum"; config ``udcl_pair_reduction``). Only instances where both modalities of a pair
    exist take part.

    Point variant (``sigma is None``, Table 3 "w/ Point"): ``point_similarity = "euclidean"``
    keeps Eq. 5 with ``D = ||mu_n - mu_m||^2``; "cosine" uses ``S = cos(mu_n, mu_m)`` (no a, b).

    Args:
        mu: (B, M, d) utterance-level means (masked mean over steps of the UMC ``mu``).
        sigma: (B, M, d) utterance-level standard deviations, or None (point variant).
        valid: (B, M) bool, modality exists for the instance.
        a, b: Eq. 5 scale (< 0) and shift; tau: temperature (> 0).

    Returns: scalar.
    """
    mu = mu.float()
    sigma = sigma.float() if sigma is not None else None
    M = mu.shape[1]
    # all modality pairs (n < m) at once: P = M (M - 1) / 2 independent (B, B) problems
    n_idx, m_idx = torch.triu_indices(M, M, offset=1, device=mu.device)  # (P,) each
    mu_n, mu_m = mu[:, n_idx].transpose(0, 1), mu[:, m_idx].transpose(0, 1)  # (P, B, d)
    if sigma is None and point_similarity == "cosine":
        s = F.normalize(mu_n, dim=-1) @ F.normalize(mu_m, dim=-1).transpose(1, 2)  # (P, B, B)
    else:
        d = (mu_n.unsqueeze(2) - mu_m.unsqueeze(1)).pow(2).sum(-1)  # (P, B, B), Eq. 1
        if sigma is not None:
            sg_n, sg_m = sigma[:, n_idx].transpose(0, 1), sigma[:, m_idx].transpose(0, 1)
            d = d + (sg_n.unsqueeze(2) - sg_m.unsqueeze(1)).pow(2).sum(-1)
        s = a * d + b  # Eq. 5
    logits = s / tau  # [p, i, j] = S(n_i, m_j) / tau
    rows = (valid[:, n_idx] & valid[:, m_idx]).T  # (P, B)
    both = info_nce(torch.cat([logits, logits.transpose(1, 2)]), torch.cat([rows, rows]))  # (2P,): Eq. 3, Eq. 4
    l_n2m, l_m2n = both[: len(n_idx)], both[len(n_idx):]
    pair = l_n2m + l_m2n if direction_reduction == "sum" else 0.5 * (l_n2m + l_m2n)  # (P,)
    total = pair.sum()
    if pair_reduction == "mean":
        return total / rows.any(dim=1).sum().to(total.dtype).clamp(min=1)
    return total


def loss_spcl(features: Tensor, labels: Tensor, temperature: float = 0.07, valid: Tensor | None = None) -> Tensor:
    """Supervised point-based contrastive loss L_spcl (Sec. 3.3.1): SupCon (Khosla et al. 2020, L_out).

    Features are L2-normalised; for anchor ``i`` the positives ``P(i)`` are the other valid
    entries with the same label (any instance, any modality):
    ``L_i = -1/|P(i)| sum_{p in P(i)} log exp(z_i.z_p / T) / sum_{a != i, valid} exp(z_i.z_a / T)``,
    averaged over valid anchors with at least one positive; 0 when there is none.

    Args: features (N, d); labels (N,) long; temperature T (config ``spcl_temperature``);
    valid (N,) bool or None (all valid). Returns: scalar.
    """
    z = F.normalize(features.float(), dim=-1)
    n = z.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=z.device)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    others = valid.unsqueeze(0) & ~eye  # (N, N) candidates a != i
    sim = (z @ z.T / temperature).masked_fill(~others, _MASKED)  # (N, N)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)  # (N, N)
    pos = others & (labels.unsqueeze(0) == labels.unsqueeze(1))  # (N, N)
    n_pos = pos.sum(dim=1)  # (N,)
    per_anchor = -torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / n_pos.clamp(min=1)
    anchors = valid & (n_pos > 0)
    per_anchor = torch.where(anchors, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / anchors.sum().clamp(min=1)


def loss_rec(x_hat: Tensor, x: Tensor, target: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Reconstruction loss L_rec (Eq. 9), ``||X^_m - X_m||^2`` over the target rows.

    ``reduction = "mean"`` (config ``rec_reduction``, default): mean squared error over target
    rows, valid steps and channels. "sum": the squared Frobenius norm of each target row's
    error (Eq. 9 as written), averaged over target rows. 0 when there is no target row.

    Args: x_hat, x (B, T, C); target (B,) bool rows to reconstruct; mask (B, T) bool valid
    steps or None (all). Returns: scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_rec: reduction must be 'mean' or 'sum', got {reduction!r}")
    keep = target.view(-1, 1) if mask is None else (target.view(-1, 1) & mask)  # (B, 1) or (B, T)
    keep = keep.unsqueeze(-1).expand_as(x_hat)  # (B, T, C)
    diff = torch.where(keep, x_hat.float() - x.float(), torch.zeros((), device=x_hat.device))
    sq = diff.pow(2).sum()
    if reduction == "mean":
        return sq / keep.sum().clamp(min=1)
    return sq / target.sum().clamp(min=1)


def loss_nll(z: Tensor, logabsdet: Tensor, valid: Tensor, prior_mean: Tensor | None = None) -> Tensor:
    """Negative log-likelihood of a flow's input, per dimension, averaged over valid rows.

    ``-log p(X) = -log N(Z; m, I) - log|det dZ/dX|``, divided by the number of dimensions
    ``T * C`` of one row (a scale that does not depend on ``seq_len`` or ``d_model``). ``m`` = 0
    (config ``nll_prior = "standard"``) or a class mean (``"class"``). The paper's objective
    (Eq. 14) has no such term; it is what trains the flows besides L_rec (``nll_weight``).

    Args: z (B, T, C); logabsdet (B,); valid (B,) bool; prior_mean broadcastable to z or None.
    Returns: scalar (0 when no row is valid).
    """
    z = z.float()
    if prior_mean is not None:
        z = z - prior_mean.float()
    dims = z[0].numel()
    per_row = (0.5 * z.pow(2).flatten(1).sum(1) + 0.5 * dims * math.log(2 * math.pi) - logabsdet.float()) / dims
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


def loss_cls(logits: Tensor, labels: Tensor) -> Tensor:
    """Emotion recognition loss L_cls: cross-entropy, mean over the batch."""
    return F.cross_entropy(logits.float(), labels)


def total_loss(
    losses: Mapping[str, Tensor],
    *,
    alpha: float,
    beta: float,
    lambda_rec: float,
    nll_weight: float,
) -> Tensor:
    """The training objective, Eq. 14 plus the flow likelihood:

    ``L = alpha * L_udcl + beta * L_spcl + lambda * L_rec + L_cls + nll_weight * L_nll``.

    ``losses`` holds the scalars under the keys ``LOSS_NAMES``.
    """
    missing = [k for k in LOSS_NAMES if k not in losses]
    if missing:
        raise KeyError(f"total_loss: missing terms {missing}")
    return (alpha * losses["udcl"] + beta * losses["spcl"] + lambda_rec * losses["rec"]
            + losses["cls"] + nll_weight * losses["nll"])
