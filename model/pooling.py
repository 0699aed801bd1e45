"""Masked adaptive average pooling of a padded sequence to a fixed number of steps.

Eq. 7 averages the flow latents of different modalities elementwise, so every modality must
have the same number of steps; the paper does not say how (``docs/method.md``, "sequence
length"). This project resamples every modality to ``CMARRConfig.seq_len`` steps with
:func:`pool_to_steps` before any learned layer. It has no parameters, so a trainer may run
it once over a whole feature store and feed :class:`cmarr.model.CMARR` the pooled tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pool_to_steps(x: Tensor, mask: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Masked adaptive average pooling of ``x`` to ``steps`` steps.

    The valid frames of each row (``mask`` True, in order, gaps such as face-less video
    frames closed up) form a sequence of length ``L``; step ``i`` is the mean of valid
    frames ``floor(i L / steps) .. ceil((i + 1) L / steps) - 1``, the bins of
    ``torch.nn.AdaptiveAvgPool1d``. When ``L < steps`` frames are repeated, so every step of a
    row with at least one valid frame is valid. Padding frames are never read (they may hold
    NaN). A row of exactly ``steps`` valid frames is returned unchanged (the identity), so
    pooling already-pooled inputs is a no-op.

    Args:
        x: (B, T, D) float, padded.
        mask: (B, T) bool, True = valid frame.
        steps: number of output steps (``CMARRConfig.seq_len``).

    Returns:
        pooled: (B, steps, D), zeros on rows without valid frames.
        step_mask: (B, steps) bool, True on every step of rows with at least one valid frame.
    """
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"pool_to_steps: need x (B, T, D) and mask (B, T), "
                         f"got {tuple(x.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"pool_to_steps: mask must be bool, got {mask.dtype}")
    if steps < 1:
        raise ValueError(f"pool_to_steps: steps must be >= 1, got {steps}")
    B, T, _ = x.shape
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))  # (B, T, D)
    length = mask.sum(dim=1, keepdim=True)  # (B, 1) valid frames L
    rank = torch.cumsum(mask.long(), dim=1) - 1  # (B, T) position among the valid frames
    i = torch.arange(steps, device=x.device).view(1, steps, 1)  # (1, S, 1)
    start = (i * length.unsqueeze(1)) // steps  # (B, S, 1)
    end = ((i + 1) * length.unsqueeze(1) + steps - 1) // steps  # (B, S, 1)
    r = rank.unsqueeze(1)  # (B, 1, T)
    weight = (mask.unsqueeze(1) & (r >= start) & (r < end)).to(x.dtype)  # (B, S, T)
    count = weight.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, S, 1)
    pooled = torch.bmm(weight, x) / count  # (B, S, D)
    step_mask = (length > 0).expand(B, steps)  # (B, S)
    return pooled, step_mask.contiguous()
