"""CogSeg: a U-Net encoder shared by a segmentation decoder and a super-resolution (SR) decoder.

Sang et al., "Super-resolution and infection edge-guided co-learning for COVID-19 CT segmentation",
ICASSP 2021. The network sees the slice downsampled by 2 (256 x 256 for 512 slices); both decoders return to
the original resolution: four U-Net up-stages (the "four scales" whose features the L1 losses tie together)
and one more x2 up-stage, then a 1x1 convolution: class logits for segmentation (softmax gives the per-pixel
probabilities), the reconstructed full-resolution slice for SR. The SR decoder runs only in training.
Where the paper is silent (widths, normalisation, up-sampling) this follows the original U-Net: two 3x3
conv-BN-ReLU per stage, 2x2 max-pool down, 2x2 transposed convolution up, base width 32 by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEPTH = 4  # down-samplings of the encoder = U-Net up-stages of each decoder


@dataclass
class CogSegConfig:
    in_channels: int = 1
    num_classes: int = 4
    base_channels: int = 32
    sr: bool = True  # build the SR decoder (off: the plain U-Net baseline)


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    """Returns the skip features (fine to coarse, ``DEPTH`` of them) and the bottleneck."""

    def __init__(self, in_ch: int, widths: list[int]):
        super().__init__()
        chans = [in_ch, *widths]
        self.stages = nn.ModuleList(DoubleConv(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips[:-1], skips[-1]


class UpStage(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = DoubleConv(out_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))


class Decoder(nn.Module):
    """``DEPTH`` U-Net up-stages with skips, one x2 up-stage without, a 1x1 head.

    Returns the head output at twice the input resolution and the features of the U-Net up-stages
    (coarse to fine).
    """

    def __init__(self, widths: list[int], out_channels: int):
        super().__init__()
        rev = widths[::-1]  # bottleneck first
        self.stages = nn.ModuleList(UpStage(rev[i], rev[i + 1], rev[i + 1]) for i in range(DEPTH))
        self.upscale = UpStage(widths[0], 0, widths[0])
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, features = bottleneck, []
        for stage, skip in zip(self.stages, skips[::-1]):
            x = stage(x, skip)
            features.append(x)
        return self.head(self.upscale(x)), features


class CogSeg(nn.Module):
    """Shared encoder, segmentation decoder, optional SR decoder.

    ``forward(low)`` takes ``[N, C, h, w]`` (h, w divisible by 16) and returns a dict: ``seg`` logits
    ``[N, classes, 2h, 2w]``, ``seg_features``; and when the SR branch runs (training, ``cfg.sr``) ``sr``
    ``[N, C, 2h, 2w]`` and ``sr_features``.
    """

    def __init__(self, cfg: CogSegConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CogSegConfig()
        widths = [cfg.base_channels * 2 ** i for i in range(DEPTH + 1)]
        self.encoder = Encoder(cfg.in_channels, widths)
        self.seg_decoder = Decoder(widths, cfg.num_classes)
        self.sr_decoder = Decoder(widths, cfg.in_channels) if cfg.sr else None

    def forward(self, low: torch.Tensor, with_sr: bool | None = None) -> dict:
        if low.shape[-1] % 2 ** DEPTH or low.shape[-2] % 2 ** DEPTH:
            raise ValueError(f"input side {tuple(low.shape[-2:])} must be divisible by {2 ** DEPTH}")
        with_sr = self.training if with_sr is None else with_sr
        skips, bottleneck = self.encoder(low)
        seg, seg_features = self.seg_decoder(bottleneck, skips)
        out = {"seg": seg, "seg_features": seg_features}
        if with_sr and self.sr_decoder is not None:
            out["sr"], out["sr_features"] = self.sr_decoder(bottleneck, skips)
        return out

    @torch.no_grad()
    def init_class_prior(self, frequencies: torch.Tensor) -> None:
        """Start the segmentation head at the class prior: bias ``log(frequency)``, so that the first steps
        need not spend themselves learning that most pixels are background (Lin et al., focal loss, 2017)."""
        prior = torch.as_tensor(frequencies, dtype=torch.float32).clamp_min(1e-6)
        self.seg_decoder.head.bias.copy_(torch.log(prior / prior.sum()))

    @torch.no_grad()
    def predict_proba(self, low: torch.Tensor) -> torch.Tensor:
        """Per-pixel class probabilities ``[N, classes, 2h, 2w]`` from the segmentation path alone."""
        return self.forward(low, with_sr=False)["seg"].float().softmax(dim=1)
