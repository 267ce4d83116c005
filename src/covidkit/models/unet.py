"""U-Net parts for the study model: two encoders (a plain one from scratch, a torchvision ResNet) and a decoder.

Both encoders return their feature maps finest first, and the decoder climbs back up through them with
skip connections, as in Ronneberger et al.'s U-Net:

- ``PlainEncoder``: four levels of two 3x3 convolutions (``width * 2**i`` channels), max pooling between
  them; its first level works at the input's full resolution, which keeps faint, small opacities visible
  to a network trained from scratch on a few hundred images (the smoke profile, where there is no
  pretrained backbone worth the name). Each image is standardised first (exposure varies between films).
- ``ResNetEncoder``: a torchvision ResNet-family body (the NIH backbone of notebook 01 in the full
  profile): its stem and four stages, strides 2 to 32.

Hand-written rather than taken from segmentation-models-pytorch: its encoders fetch ImageNet weights by
name from a hub, and this repository loads its backbones from local files only (01's checkpoint).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import get_model

from covidkit.models.backbones import check_arch

ZONES = (3, 2)  # rows x sides of the heat-map summary the study head reads
PLAIN = "plain"  # the encoder name of PlainEncoder


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class PlainEncoder(nn.Module):
    """Four levels of ``width * 2**i`` channels at strides 1, 2, 4, 8, on one standardised grey channel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.channels = [width * 2 ** i for i in range(4)]
        self.levels = nn.ModuleList([conv_block(1, self.channels[0])] +
                                    [conv_block(a, b) for a, b in zip(self.channels, self.channels[1:])])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # the study transforms give ImageNet-normalised RGB copies of a grey image: back to one channel
        x = x.mean(1, keepdim=True)
        x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-6)
        features = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


class ResNetEncoder(nn.Module):
    """A torchvision ResNet-family body (``body`` holds its weights under torchvision's names, no ``fc``)."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        body = get_model(check_arch(arch), weights=None)
        body.fc = nn.Identity()
        self.body = body
        layers = (body.layer1, body.layer2, body.layer3, body.layer4)
        # a stage's output width is that of its last batch norm (BasicBlock: bn2, Bottleneck: bn3)
        self.channels = [body.bn1.num_features] + [
            [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features for layer in layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        stem = b.relu(b.bn1(b.conv1(x)))
        features = [stem]
        x = b.maxpool(stem)
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """From the coarsest feature map up: upsample, concatenate the next finer map, two convolutions.

    ``channels[i]`` is the output of the block that ends at encoder level ``i``; the last output has the
    finest level's resolution.
    """

    def __init__(self, encoder_channels: list[int], channels: list[int]) -> None:
        super().__init__()
        if len(channels) != len(encoder_channels) - 1:
            raise ValueError(f"{len(encoder_channels)} encoder levels need {len(encoder_channels) - 1} decoder "
                             f"widths, got {channels}")
        ins = [encoder_channels[-1]] + channels[:0:-1]
        self.blocks = nn.ModuleList([conv_block(c_in + skip, c_out) for c_in, skip, c_out in
                                     zip(ins, encoder_channels[-2::-1], channels[::-1])])
        self.out_channels = channels[0]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:]), skip], 1))
        return x


def zone_summary(mask: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` heat-map logits -> ``[N, 12]``: mean and max opacity probability per zone."""
    heat = mask.sigmoid()
    return torch.cat([F.adaptive_avg_pool2d(heat, ZONES).flatten(1), F.adaptive_max_pool2d(heat, ZONES).flatten(1)], 1)
