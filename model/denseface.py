"""Denseface: the DenseNet-BC that turns a 64x64 grayscale face into a 342-d feature.

DenseNet-BC (Huang et al., 2017) as the paper's lineage configures it: depth 100, growth
rate ``k = 12``, three dense blocks of 16 bottleneck layers (BN-ReLU-Conv1x1(4k)-BN-ReLU-
Conv3x3(k)), transitions with compression 0.5 (BN-ReLU-Conv1x1-AvgPool2), 24 initial
channels. Channels: 24 + 16*12 = 216 -> 108 -> 108 + 192 = 300 -> 150 -> 150 + 192 = 342.
The feature is the last BN + ReLU + global average pool (342-d); an 8-way linear layer on
it gives the FER+ logits (neutral, happiness, surprise, sadness, anger, disgust, fear,
contempt).

Legend: ``B`` faces, ``C`` channels, ``H x W`` spatial size (64 x 64 at the input).

Pure module: no file I/O (checkpoints are read and written by
``cmarr.extract.denseface_train``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")


@dataclass(frozen=True)
class DenseFaceConfig:
    """Architecture of Denseface.

    ``depth`` 100 and ``bottleneck`` give (100 - 4) / 6 = 16 layers per block.
    ``stem_stride``: stride of the first 3x3 convolution. The lineage states only the
    block structure; default 1 (the CIFAR-style DenseNet-BC stem, the first block working
    at the full 64x64 resolution). ``drop_rate``: dropout after each 3x3 convolution
    during training (default 0.0: DenseNet-BC uses dropout only when trained without
    data augmentation, and the FER+ training here augments).
    """

    depth: int = 100
    growth_rate: int = 12
    n_blocks: int = 3
    compression: float = 0.5
    init_channels: int = 24
    bottleneck_width: int = 4  # the 1x1 convolution outputs bottleneck_width * growth_rate
    n_classes: int = len(FERPLUS_CLASSES)
    in_channels: int = 1
    stem_stride: int = 1
    drop_rate: float = 0.0

    @property
    def layers_per_block(self) -> int:
        # depth = 3 * 2 * layers + 4 (stem conv, 2 transitions, classifier) for bottleneck nets
        return (self.depth - 4) // (2 * self.n_blocks)

    @property
    def out_dim(self) -> int:
        c = self.init_channels
        for b in range(self.n_blocks):
            c += self.layers_per_block * self.growth_rate
            if b < self.n_blocks - 1:
                c = int(c * self.compression)
        return c


class BottleneckLayer(nn.Module):
    """BN-ReLU-Conv1x1 -> BN-ReLU-Conv3x3; its ``k`` new channels are concatenated to its input."""

    def __init__(self, c_in: int, growth_rate: int, bottleneck_width: int, drop_rate: float):
        super().__init__()
        c_mid = bottleneck_width * growth_rate
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))  # (B, 4k, H, W)
        h = self.conv2(F.relu(self.bn2(h)))  # (B, k, H, W)
        if self.drop_rate > 0:
            h = F.dropout(h, p=self.drop_rate, training=self.training)
        return torch.cat([x, h], dim=1)  # (B, C + k, H, W)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compression) -> AvgPool 2x2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)  # (B, C', H/2, W/2)


class DenseFace(nn.Module):
    """DenseNet-BC face encoder; ``forward(x)`` returns ``(features (B, 342), logits (B, 8))``."""

    def __init__(self, config: DenseFaceConfig = DenseFaceConfig()):
        super().__init__()
        self.config = config
        k = config.growth_rate
        self.stem = nn.Conv2d(config.in_channels, config.init_channels, kernel_size=3,
                              stride=config.stem_stride, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c = config.init_channels
        for b in range(config.n_blocks):
            layers = []
            for _ in range(config.layers_per_block):
                layers.append(BottleneckLayer(c, k, config.bottleneck_width, config.drop_rate))
                c += k
            blocks.append(nn.Sequential(*layers))
            if b < config.n_blocks - 1:
                c_out = int(c * config.compression)
                blocks.append(Transition(c, c_out))
                c = c_out
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, config.n_classes)
        self.out_dim = c
        assert c == config.out_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: (B, 1, 64, 64) normalised grayscale faces."""
        h = self.features(self.stem(x))  # (B, 342, H/4, W/4)
        h = F.relu(self.norm(h))
        feats = h.mean(dim=(2, 3))  # (B, 342): global average pool
        logits = self.classifier(feats)  # (B, 8)
        return feats, logits
