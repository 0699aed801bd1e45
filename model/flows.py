"""Normalizing flows ``F_n`` of the reconstruction phase (Sec. 3.2, Eqs. 6 and 8).

Every transform follows the nflows convention: ``forward(x) -> (z, logabsdet)`` and
``inverse(z) -> (x, logabsdet)``, with ``logabsdet`` (B,) the log absolute determinant of the
Jacobian of the map just applied, so ``inverse(forward(x))`` is ``x`` and the two
log-determinants cancel. Inputs are sequences: the channel-mixing layers act on every step
alike (Glow's 1x1 convolutions with time as the spatial axis), the coupling network looks at
neighbouring steps, and the log-determinant sums over all steps.

The model has one flow per modality with separate weights. They are stacked along a leading
group axis (``groups``, :mod:`cmarr.model.grouped`): sequences are (G, B, T, C) and
log-determinants (G, B), and group ``g`` is exactly the flow of its own weights.

One flow step is ActNorm -> invertible 1x1 convolution (LU) -> affine coupling, all three
applied (unlike the DiCMoR flow, whose ActNorm and 1x1 layers are built but never called,
leaving half of the channels untouched): the 1x1 convolution mixes channels, so across steps
every channel is transformed by a coupling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .grouped import GroupConv1d, from_conv, to_conv


class Transform(nn.Module):
    """Base class: an invertible map of (G, B, T, C) sequences, log-determinants (G, B)."""

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

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(groups, channels))
        self.shift = nn.Parameter(torch.zeros(groups, channels))

    def _logdet(self, x: Tensor, sign: int) -> Tensor:
        G, B, T, _ = x.shape
        return (sign * T * self.log_scale.sum(dim=1, keepdim=True)).expand(G, B)  # (G, B)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x * torch.exp(self.log_scale)[:, None, None] + self.shift[:, None, None]  # (G, B, T, C)
        return z, self._logdet(x, 1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = (z - self.shift[:, None, None]) * torch.exp(-self.log_scale)[:, None, None]  # (G, B, T, C)
        return x, self._logdet(z, -1)


class InvertibleConv1x1LU(Transform):
    """Invertible 1x1 convolution with an LU-parameterised weight (Glow, Sec. 3.2).

    ``W = P L (U + diag(sign * exp(log_s)))``, with ``P`` a fixed permutation, ``L`` unit
    lower-triangular and ``U`` strictly upper-triangular; ``z_t = W x_t`` at every step ``t``.
    Initialised from a random rotation (one per group). log|det J| = T * sum(log_s).
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        ps, lowers, uppers = [], [], []
        for _ in range(groups):
            q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
            p, lower, upper = torch.linalg.lu(q)
            ps.append(p), lowers.append(lower), uppers.append(upper)
        p, lower, upper = torch.stack(ps), torch.stack(lowers), torch.stack(uppers)  # (G, C, C)
        s = torch.diagonal(upper, dim1=1, dim2=2)  # (G, C)
        self.register_buffer("P", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), diagonal=-1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, diagonal=-1).float())
        self.upper = nn.Parameter(torch.triu(upper, diagonal=1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye  # (G, C, C) unit lower-triangular
        upper = self.upper * self.lower_mask.T + torch.diag_embed(self.sign_s * torch.exp(self.log_s))  # (G, C, C)
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self._factors()
        return self.P @ lower @ upper  # (G, C, C)

    def _logdet(self, x: Tensor, sign: int) -> Tensor:
        G, B, T, _ = x.shape
        return (sign * T * self.log_s.sum(dim=1, keepdim=True)).expand(G, B)  # (G, B)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        G, C = x.shape[0], x.shape[-1]
        z = torch.bmm(x.reshape(G, -1, C), self.weight().transpose(1, 2)).reshape(x.shape)  # (G, B, T, C)
        return z, self._logdet(x, 1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        G, C = z.shape[0], z.shape[-1]
        # rows: x W^T = z  <=>  (x U^T) L^T = z P, solved with triangular solves (exact and
        # differentiable) in the weights' precision: they have no reduced-precision kernels
        rows = z.reshape(G, -1, C).to(lower.dtype)  # (G, N, C)
        perm = self.P.argmax(dim=1)  # (G, C): column j of P has its 1 in row perm[j]
        rows = torch.gather(rows, 2, perm[:, None, :].expand_as(rows))  # z P, by indexing: exact
        rows = torch.linalg.solve_triangular(lower.transpose(1, 2), rows, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.transpose(1, 2), rows, upper=False, left=False)
        return x.reshape(z.shape), self._logdet(z, -1)


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

    def __init__(self, channels: int, hidden: int, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.n_a = channels // 2
        n_b = channels - self.n_a
        pad = kernel // 2
        self.net = nn.Sequential(
            GroupConv1d(groups, self.n_a, hidden, kernel, padding=pad),
            nn.ReLU(),
            GroupConv1d(groups, hidden, hidden, 1),
            nn.ReLU(),
            GroupConv1d(groups, hidden, 2 * n_b, kernel, padding=pad),
        )
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = from_conv(self.net(to_conv(x_a)), self.groups)  # (G, B, T, 2 * n_b)
        shift, s = h.chunk(2, dim=-1)  # (G, B, T, n_b) each
        scale = torch.sigmoid(s + 2.0) + self.eps
        return scale, shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[..., : self.n_a], x[..., self.n_a:]
        scale, shift = self._scale_shift(x_a)
        z = torch.cat([x_a, (x_b + shift) * scale], dim=-1)  # (G, B, T, C)
        return z, torch.log(scale).sum(dim=(2, 3))

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_a, z_b = z[..., : self.n_a], z[..., self.n_a:]
        scale, shift = self._scale_shift(z_a)
        x = torch.cat([z_a, z_b / scale - shift], dim=-1)  # (G, B, T, C)
        return x, -torch.log(scale).sum(dim=(2, 3))


class CompositeTransform(Transform):
    """Transforms applied in order; ``inverse`` applies their inverses in reverse order."""

    def __init__(self, transforms: list[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[:2])
        for t in self.transforms:
            x, logabsdet = t(x)
            total = total + logabsdet
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[:2])
        for t in reversed(self.transforms):
            z, logabsdet = t.inverse(z)
            total = total + logabsdet
        return z, total


class Flow(CompositeTransform):
    """The flow ``F_n`` of one modality (Eq. 6): ``steps`` x [ActNorm, 1x1 conv (LU), coupling].

    ``groups`` flows with separate weights run together (one per modality in the model).
    Config fields: ``flow_steps``, ``flow_hidden``, ``flow_kernel``.
    """

    def __init__(self, channels: int, steps: int, hidden: int, kernel: int, groups: int = 1) -> None:
        layers: list[Transform] = []
        for _ in range(steps):
            layers += [ActNorm(channels, groups), InvertibleConv1x1LU(channels, groups),
                       AffineCoupling(channels, hidden, kernel, groups)]
        super().__init__(layers)
