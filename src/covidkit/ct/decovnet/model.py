"""DeCoVNet (Wang et al., "A Weakly-supervised Framework for COVID-19 Classification and Lesion
Localization from Chest CT", IEEE TMI 2020): a 3D CNN that maps a whole CT volume and its lung mask,
``[B, 2, T, H, W]``, to two logits (negative, COVID), for any number of slices ``T``.

Three stages, as in the paper:

- **stem**: 3D convolution 2 -> 16 channels, kernel 5x7x7, stride (1, 2, 2), batch norm, ReLU, then a
  1x3x3 max pool with stride (1, 2, 2);
- **two 3D residual blocks** (16 -> 64, then 64 -> 128 with in-plane stride 2), with a temporal max pool
  (2, 1, 1) between them that halves the number of slices;
- **progressive classifier** (ProClf): three 3D convolutions (128 -> 64 -> 32 -> 32) interleaved with
  adaptive 3D max pooling that shrinks the volume step by step to one vector, then two fully connected
  layers to the 2 logits.

Details the paper leaves open, chosen after its released code: the residual blocks are bottlenecks in
the I3D style (a 3x1x1 convolution across slices, a 1x3x3 one within slices, a 1x1x1 expansion; inner
widths 16 and 32) with a 1x1x1 projection shortcut; the ProClf's pooled sizes are (16, 24, 36),
(4, 12, 18), (1, 6, 9), (1, 1, 1) for a 224 x 336 input and are scaled in-plane with ``input_size``
(so a small smoke-test input is not blown up); the two fully connected layers have no non-linearity
between them; the temporal pool rounds up (``ceil_mode``), so that a one-slice volume still works.

Batch norm is the standard one, with running statistics for evaluation: the pipeline trains on batches
of several volumes (see :mod:`covidkit.ct.decovnet.method`). The released code trains with batch 1
and normalises every volume by its own statistics, in training and evaluation alike; on the synthetic
set that network's output stayed the same for every volume (the README has the measurements).
Initialisation: He (fan-out) for the convolutions with zero biases, as in the released code, and the last
batch norm of each residual branch at zero; the fully connected layers keep PyTorch's default. The released
code's N(0, 0.01) for both of them makes the logits about 1e-4 at the start, and on the synthetic set
they stayed that small (the loss at ln 2) for most of the smoke run while the ranking was already learned.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PAPER_INPUT_SIZE = (224, 336)
PAPER_POOLS = ((16, 24, 36), (4, 12, 18), (1, 6, 9))


def scaled_pools(input_size: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """The ProClf's pooled sizes for an in-plane ``input_size`` (the paper's, scaled in-plane)."""
    sh, sw = input_size[0] / PAPER_INPUT_SIZE[0], input_size[1] / PAPER_INPUT_SIZE[1]
    return tuple((t, max(1, round(h * sh)), max(1, round(w * sw))) for t, h, w in PAPER_POOLS)


class Stem(nn.Sequential):
    def __init__(self, in_channels: int = 2, out_channels: int = 16) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )


class ResBlock3d(nn.Module):
    """Bottleneck residual block: 3x1x1 -> 1x3x3 (in-plane ``stride``) -> 1x1x1, batch norm after each."""

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv3d(in_channels, inner, (3, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(inner),
            nn.ReLU(inplace=True),
            nn.Conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(inner),
            nn.ReLU(inplace=True),
            nn.Conv3d(inner, out_channels, 1, bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class ProgressiveClassifier(nn.Module):
    """ProClf: adaptive max pool -> conv -> ReLU, three times, global max pool, FC 32 -> 32 -> classes."""

    def __init__(self, in_channels: int = 128, num_classes: int = 2,
                 pools: Sequence[Sequence[int]] = PAPER_POOLS) -> None:
        super().__init__()
        channels = (in_channels, 64, 32, 32)
        layers: list[nn.Module] = []
        for cin, cout, pool in zip(channels[:-1], channels[1:], pools):
            layers += [nn.AdaptiveMaxPool3d(tuple(pool)), nn.Conv3d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool3d(1), nn.Flatten(1))
        self.fc = nn.Sequential(nn.Linear(channels[-1], channels[-1]), nn.Linear(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class DeCoVNet(nn.Module):
    """``[B, in_channels, T, H, W]`` (CT window in 0-1 and lung mask) -> ``[B, num_classes]`` logits."""

    def __init__(self, in_channels: int = 2, num_classes: int = 2,
                 input_size: Sequence[int] = PAPER_INPUT_SIZE) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.stem = Stem(in_channels, 16)
        self.blocks = nn.Sequential(
            ResBlock3d(16, 16, 64),
            nn.MaxPool3d((2, 1, 1), stride=(2, 1, 1), ceil_mode=True),
            ResBlock3d(64, 32, 128, stride=2),
        )
        self.classifier = ProgressiveClassifier(128, num_classes, scaled_pools(input_size))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            if isinstance(block, ResBlock3d):
                nn.init.zeros_(block.branch[-1].weight)  # each block starts as its shortcut (Goyal et al. 2017)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The residual blocks' output, ``[B, 128, ceil(T/2), H/8, W/8]``: where class activation maps are read."""
        if x.ndim != 5:
            raise ValueError(f"DeCoVNet expects [B, C, T, H, W], got shape {tuple(x.shape)}")
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
