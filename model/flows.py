"""Normalizing flows ``F_n`` of the reconstruction phase (Sec. 3.2, Eqs. 6 and 8).

Every transform follows the nflows convention: ``forward(x) -> (z, logabsdet)`` and
``inverse(z) -> (x, logabsdet)``, with ``logabsdet`` (B,) the log absolute determinant of the
Jacobian of the map just applied, so ``inverse(forward(x))`` is ``x`` and the two
log-determinants cancel. Inputs are sequences (B, T, C): the channel-mixing layers act on
every step alike (Glow's 1x1 convolutions with time as the spatial axis), the coupling
network looks at neighbouring steps, and the log-determinant sums over all steps.

One flow step is ActNorm -> invertible 1x1 convolution (LU) -> affine coupling, all three
applied (unlike the DiCMoR flow, whose ActNorm and 1x1 layers are built but never called,
leaving half of the channels untouched): the 1x1 convolution mixes channels, so across steps
every channel is transformed by a coupling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """Base class: an invertible map of (B, T, C) sequences."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class ActNorm(Transform):
    """Per-channel affine map ``z = x * exp(log_scale) + shift`` (Glow).

    Initialised to the identity (``log_scale = shift = 0``) rather than Glow's data-dependent
    initialisation, because the first batch contains zero-filled rows of absent modalities
    that would bias the statistics. log|det J| = T * sum(log_scale).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x * torch.exp(self.log_scale) + self.shift  # (B, T, C)
        logabsdet = (x.shape[1] * self.log_scale.sum()).expand(x.shape[0])  # (B,)
        return z, logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = (z - self.shift) * torch.exp(-self.log_scale)  # (B, T, C)
        logabsdet = (-z.shape[1] * self.log_scale.sum()).expand(z.shape[0])  # (B,)
        return x, logabsdet


class InvertibleConv1x1LU(Transform):
    """Invertible 1x1 convolution with an LU-parameterised weight (Glow, Sec. 3.2).

    ``W = P L (U + diag(sign * exp(log_s)))``, with ``P`` a fixed permutation, ``L`` unit
    lower-triangular and ``U`` strictly upper-triangular; ``z_t = W x_t`` at every step ``t``.
    Initialised from a random rotation. log|det J| = T * sum(log_s).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("P", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), diagonal=-1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, diagonal=-1).float())
        self.upper = nn.Parameter(torch.triu(upper, diagonal=1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye  # (C, C) unit lower-triangular
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))  # (C, C)
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return self.P @ lower @ upper  # (C, C)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x @ self.weight().T  # (B, T, C)
        logabsdet = (x.shape[1] * self.log_s.sum()).expand(x.shape[0])  # (B,)
        return z, logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        # x = U^-1 L^-1 P^T z, solved with triangular solves (exact and differentiable)
        # in the weights' precision: triangular solves have no reduced-precision kernels
        y = self.P.T @ z.reshape(-1, z.shape[-1]).T.to(lower.dtype)  # (C, B*T)
        y = torch.linalg.solve_triangular(lower, y, upper=False, unitriangular=True)
        y = torch.linalg.solve_triangular(upper, y, upper=True)
        x = y.T.reshape(z.shape)  # (B, T, C)
        logabsdet = (-z.shape[1] * self.log_s.sum()).expand(z.shape[0])  # (B,)
        return x, logabsdet


class AffineCoupling(Transform):
    """Affine coupling layer (RealNVP / Glow).

    The first ``C // 2`` channels ``x_a`` pass unchanged and condition the rest:
    ``(shift, s) = NN(x_a)``, ``scale = sigmoid(s + 2) + eps``, ``z_b = (x_b + shift) * scale``.
    ``NN`` is Conv1d(k) -> ReLU -> Conv1d(1) -> ReLU -> Conv1d(k) over time (config
    ``flow_hidden``, ``flow_kernel``); its last layer starts small (not zero, so that every
    weight gets a gradient from the first step) so the layer starts close to a fixed scaling.
    log|det J| = sum over steps and channels of log(scale).
    """

    eps = 1e-3

    def __init__(self, channels: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.n_a = channels // 2
        n_b = channels - self.n_a
        pad = kernel // 2
        self.net = nn.Sequential(
            nn.Conv1d(self.n_a, hidden, kernel, padding=pad),
            nn.ReLU(),
            nn.Conv1d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv1d(hidden, 2 * n_b, kernel, padding=pad),
        )
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x_a.transpose(1, 2)).transpose(1, 2)  # (B, T, 2 * n_b)
        shift, s = h.chunk(2, dim=-1)  # (B, T, n_b) each
        scale = torch.sigmoid(s + 2.0) + self.eps
        return scale, shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[..., : self.n_a], x[..., self.n_a:]
        scale, shift = self._scale_shift(x_a)
        z = torch.cat([x_a, (x_b + shift) * scale], dim=-1)  # (B, T, C)
        return z, torch.log(scale).sum(dim=(1, 2))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_a, z_b = z[..., : self.n_a], z[..., self.n_a:]
        scale, shift = self._scale_shift(z_a)
        x = torch.cat([z_a, z_b / scale - shift], dim=-1)  # (B, T, C)
        return x, -torch.log(scale).sum(dim=(1, 2))


class CompositeTransform(Transform):
    """Transforms applied in order; ``inverse`` applies their inverses in reverse order."""

    def __init__(self, transforms: list[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, logabsdet = t(x)
            total = total + logabsdet
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, logabsdet = t.inverse(z)
            total = total + logabsdet
        return z, total


class Flow(CompositeTransform):
    """The flow ``F_n`` of one modality (Eq. 6): ``steps`` x [ActNorm, 1x1 conv (LU), coupling].

    Config fields: ``flow_steps``, ``flow_hidden``, ``flow_kernel``.
    """

    def __init__(self, channels: int, steps: int, hidden: int, kernel: int) -> None:
        layers: list[Transform] = []
        for _ in range(steps):
            layers += [ActNorm(channels), InvertibleConv1x1LU(channels), AffineCoupling(channels, hidden, kernel)]
        super().__init__(layers)

