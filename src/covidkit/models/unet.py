"""A small U-Net for the study model when there is no pretrained backbone (``arch: unet``, the smoke profile).

Hand-written rather than taken from segmentation-models-pytorch: its U-Nets put a ResNet-sized encoder
with a stride-2 stem in front of the decoder. Trained from scratch on the 180 images of a smoke split,
smp's resnet18 U-Net (12 M parameters) overfit and found the faint opacities less well than this one
at width 16 (0.5 M parameters), whose first stage works at full resolution (out-of-fold ``none`` AP of
split 0: 0.32 against 0.51, same data and schedule).

Outputs as ``StudyNet``: the opacity heat map ``mask`` at the input's resolution; ``none`` = minus the
heat map's largest logit (an image has no opacity when no pixel has one); ``study`` logits from the
pooled bottleneck and the heat map's summary per lung zone (upper, middle, lower on either side: the
mean and the largest opacity probability), since the classes are defined by where opacities lie.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


ZONES = (3, 2)  # rows x sides of the heat-map summary the study head reads


def zone_summary(mask: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` heat-map logits -> ``[N, 12]``: mean and max opacity probability per zone."""
    heat = mask.sigmoid()
    return torch.cat([F.adaptive_avg_pool2d(heat, ZONES).flatten(1), F.adaptive_max_pool2d(heat, ZONES).flatten(1)], 1)


class SmallUNet(nn.Module):
    """Four levels of ``width * 2**i`` channels (max pooling down, nearest upsampling and skips back up)."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.5) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(4)]
        self.encoder = nn.ModuleList([conv_block(1, widths[0])] +
                                     [conv_block(a, b) for a, b in zip(widths, widths[1:])])
        self.decoder = nn.ModuleList([conv_block(widths[i + 1] + widths[i], widths[i]) for i in (2, 1, 0)])
        self.mask_head = nn.Conv2d(widths[0], 1, kernel_size=1)
        self.study_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1] + 2 * ZONES[0] * ZONES[1], num_classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # the study transforms give ImageNet-normalised RGB copies of a grey image: one channel, each
        # image standardised (exposure varies between films)
        x = x.mean(1, keepdim=True)
        x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-6)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        pooled = x.mean(dim=(2, 3))
        for block, skip in zip(self.decoder, skips[-2::-1]):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:]), skip], 1))
        mask = self.mask_head(x)
        # the heat map is trained on the boxes alone (detached here), the classifier reads it
        study = self.study_head(torch.cat([pooled, zone_summary(mask.detach())], 1))
        return {"study": study, "none": -mask.flatten(1).amax(1), "mask": mask}
