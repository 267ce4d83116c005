"""Lung masks for DeCoVNet: an unsupervised segmentation, and a 2D U-Net trained on it and applied slice by slice.

As in DeCoVNet, the U-Net's training masks come from an unsupervised method, so no lung annotation is
needed: :func:`unsupervised_lung_mask` thresholds air, drops the air outside the body, keeps the large
3D connected components and fills holes (vessels, lesions) slice by slice. The U-Net
(:class:`LungUNet`) learns those masks from axial slices windowed to 8 bits and is then applied to
every slice (:func:`predict_lung_mask`), which is robust where the threshold is not (dense lesions along
the pleura, noise). Where the two masks disagree grossly, the unsupervised one is kept
(:func:`choose_lung_mask`): an undertrained U-Net marks all the air, the air around the body included, as
lung, and the lung box is then the whole field of view.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from covidkit.engine.device import model_device

IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], bool)  # 2D connectivity inside each slice


@dataclass
class UnsupervisedLungConfig:
    air_hu: float = -320.0  # lung parenchyma and air lie below, soft tissue above
    min_fraction: float = 0.1  # a kept component has at least this fraction of the largest one's volume
    max_components: int = 2  # the two lungs (one when they touch)
    closing_mm: float = 10.0  # in-plane closing radius: takes in juxta-pleural lesions and vessels


def largest_components(mask: np.ndarray, max_components: int = 2, min_fraction: float = 0.1) -> np.ndarray:
    """The ``max_components`` largest 3D connected components (6-connectivity) that have at least
    ``min_fraction`` of the largest one's size."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:max_components]
    keep = [i + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(labels, keep)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)).astype(bool)


def close_and_fill_slices(mask: np.ndarray, radius: int) -> np.ndarray:
    """Per slice: binary closing with a disk of ``radius`` pixels, then hole filling."""
    out = np.empty_like(mask, dtype=bool)
    disk = _disk(radius) if radius > 0 else None
    for k, plane in enumerate(mask):
        if disk is not None:
            # pad so that the closing does not glue the mask to the image border
            padded = np.pad(plane, radius + 1)
            plane = ndimage.binary_closing(padded, disk)[radius + 1:-radius - 1, radius + 1:-radius - 1]
        out[k] = ndimage.binary_fill_holes(plane)
    return out


def unsupervised_lung_mask(hu: np.ndarray, spacing: tuple[float, float, float],
                           cfg: UnsupervisedLungConfig | None = None) -> np.ndarray:
    """Lungs of a ``[T, H, W]`` HU volume without any learning: threshold, connected components, hole filling."""
    cfg = cfg or UnsupervisedLungConfig()
    air = hu < cfg.air_hu
    labels, _ = ndimage.label(air, structure=IN_PLANE)  # 2D components, labelled slice by slice
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    inside = air & ~np.isin(labels, border[border > 0])  # drop the air around the body
    lungs = largest_components(inside, cfg.max_components, cfg.min_fraction)
    radius = int(round(cfg.closing_mm / min(spacing[1], spacing[2])))
    return close_and_fill_slices(lungs, radius)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def choose_lung_mask(unet: np.ndarray, unsupervised: np.ndarray | None,
                     min_dice: float = 0.5) -> tuple[np.ndarray, bool]:
    """The U-Net's mask, or the non-empty unsupervised one when their Dice is below ``min_dice``;
    returns the mask and whether it fell back to the unsupervised one."""
    if unsupervised is None or not unsupervised.any() or dice(unet, unsupervised) >= min_dice:
        return unet, False
    return unsupervised.astype(bool), True


# ---------------------------------------------------------------------------------------------- U-Net


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class LungUNet(nn.Module):
    """A 2D U-Net (Ronneberger et al. 2015) with batch norm: ``[B, 1, H, W]`` in 0-1 -> ``[B, 1, H, W]`` logits.

    ``H`` and ``W`` must be multiples of ``2 ** depth``; ``width`` channels at full resolution, doubling
    at each level.
    """

    def __init__(self, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([_DoubleConv(1, chans[0])] + [_DoubleConv(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_DoubleConv(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 ** self.depth or x.shape[-2] % 2 ** self.depth:
            raise ValueError(f"LungUNet input {tuple(x.shape[-2:])} must be multiples of {2 ** self.depth}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def resize_slices(volume: np.ndarray, size: tuple[int, int], interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Each ``[H, W]`` slice of ``[T, H, W]`` resized to ``size`` = (height, width)."""
    return np.stack([cv2.resize(plane, (size[1], size[0]), interpolation=interpolation) for plane in volume])


class LungSliceDataset(torch.utils.data.Dataset):
    """Axial slices (uint8 ``[N, S, S]``) with their lung masks for the U-Net; random horizontal flips."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, train: bool = True) -> None:
        if images.shape != masks.shape:
            raise ValueError(f"images {images.shape} and masks {masks.shape} differ")
        self.images, self.masks, self.train = images, masks, train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(self.images[i]).float().div(255.0)[None]
        mask = torch.from_numpy(self.masks[i].astype(np.float32))[None]
        if self.train and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def lung_unet_step(model: nn.Module, batch, device) -> tuple[torch.Tensor, dict]:
    """Engine ``train_step``: binary cross-entropy of the lung mask."""
    images, masks = (t.to(device) for t in batch)
    loss = F.binary_cross_entropy_with_logits(model(images), masks)
    return loss, {}


@torch.no_grad()
def predict_lung_mask(model: nn.Module, image: np.ndarray, size: int, batch_size: int = 16,
                      device: torch.device | str | None = None) -> np.ndarray:
    """Lung mask of a windowed uint8 ``[T, H, W]`` volume: the U-Net on each slice resized to ``size`` (on the
    model's device by default), probabilities resized back, thresholded at 0.5, largest 3D components kept."""
    model.eval()
    device = device or model_device(model)
    t, h, w = image.shape
    small = resize_slices(image, (size, size))
    probs = []
    for start in range(0, t, batch_size):
        x = torch.from_numpy(small[start:start + batch_size]).float().div(255.0)[:, None].to(device)
        probs.append(torch.sigmoid(model(x))[:, 0].float().cpu().numpy())
    prob = resize_slices(np.concatenate(probs), (h, w), interpolation=cv2.INTER_LINEAR)
    return largest_components(prob > 0.5)
