"""Modality-specific reconstruction module (Sec. 3.2): residual channel-attention blocks in 1-D.

RCAN's blocks (Zhang et al. 2018, cited by the paper through Wei et al. 2022) with every 2-D
convolution replaced by a 1-D convolution over time, as the paper states. It maps the
flow's inverse output ``X~_m`` (Eq. 8) to the recovered features ``X^_m`` compared with ``X_m``
by Eq. 9.
"""

from __future__ import annotations

from torch import Tensor, nn

from .grouped import GroupConv1d, from_conv, to_conv


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation over channels: average over time, C -> C/r -> C, sigmoid gate."""

    def __init__(self, channels: int, reduction: int, groups: int = 1) -> None:
        super().__init__()
        squeezed = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool1d(1),
            GroupConv1d(groups, channels, squeezed, 1),
            nn.ReLU(),
            GroupConv1d(groups, squeezed, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, G * C, T) -> (B, G * C, T)."""
        return x * self.gate(x)  # gate (B, G * C, 1)


class RCAB(nn.Module):
    """Residual channel-attention block: x + CA(conv(ReLU(conv(x))))."""

    def __init__(self, channels: int, kernel: int, reduction: int, groups: int = 1) -> None:
        super().__init__()
        pad = kernel // 2
        self.body = nn.Sequential(
            GroupConv1d(groups, channels, channels, kernel, padding=pad),
            nn.ReLU(),
            GroupConv1d(groups, channels, channels, kernel, padding=pad),
            ChannelAttention(channels, reduction, groups),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, G * C, T) -> (B, G * C, T)."""
        return x + self.body(x)


class ReconstructionModule(nn.Module):
    """One residual group: ``blocks`` RCABs and a closing convolution, with a long skip.

    Config fields: ``rcan_blocks``, ``rcan_kernel``, ``rcan_reduction``. ``groups`` modules
    with separate weights (one per modality) run together: input and output are (G, B, T, C)
    sequences (``X~_m`` -> ``X^_m``).
    """

    def __init__(self, channels: int, blocks: int, kernel: int, reduction: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.blocks = nn.Sequential(*[RCAB(channels, kernel, reduction, groups) for _ in range(blocks)])
        self.tail = GroupConv1d(groups, channels, channels, kernel, padding=kernel // 2)

    def forward(self, x_tilde: Tensor) -> Tensor:
        h = to_conv(x_tilde)  # (B, G * C, T)
        h = h + self.tail(self.blocks(h))  # long skip
        return from_conv(h, self.groups)  # (G, B, T, C)
