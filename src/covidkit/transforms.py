"""Image transforms: the NIH classification pipeline and box-aware detection augmentations.

Built from ``torchvision.transforms.v2``, which moves ``tv_tensors.BoundingBoxes`` with the image
through every geometric transform, so no box geometry is written by hand here. Inputs are
grey images as ``tv_tensors.Image`` of shape ``[1, H, W]``, dtype uint8; outputs are float
images with three identical channels, as the ImageNet-shaped backbones expect.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_REFERENCE_SIZE = 256  # the recipe's short side, at which ClassificationAugment.blur_sigma is given


@dataclass
class ClassificationAugment:
    """The NIH pretraining pipeline: resize short side, centre crop, and the train-time augmentations."""

    resize: int = 256
    crop: int = 224
    hflip_p: float = 0.5
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels at a short side of 256; scaled with ``resize``
    rotate_degrees: float = 20.0
    erase_p: float = 0.3
    erase_scale: tuple[float, float] = (0.01, 0.10)

    def blur_sigma_at_size(self) -> tuple[float, float]:
        """The blur in pixels at ``resize``: the same blur relative to the image at every input size."""
        scale = self.resize / BLUR_REFERENCE_SIZE
        return self.blur_sigma[0] * scale, self.blur_sigma[1] * scale


@dataclass
class DetectionAugment:
    """Train-time augmentations of the opacity detector (albumentations-style probabilities)."""

    hflip_p: float = 0.5
    affine_p: float = 0.5
    rotate_degrees: float = 20.0
    shift: float = 0.0625
    scale: float = 0.1
    color_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    blur_sharpen_p: float = 0.3
    cutout_p: float = 0.3
    cutout_scale: tuple[float, float] = (0.01, 0.05)
    min_box_size: float = 2.0


class Cutout(v2.RandomErasing):
    """Random erasing of the image only: boxes pass through unchanged (a partly hidden opacity is still one).

    ``v2.RandomErasing`` would pass the boxes through too, but warns on every call that it does.
    """

    _transformed_types = (tv_tensors.Image,)


def _to_model_input() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.RGB()]


def classification_transform(aug: ClassificationAugment, train: bool) -> v2.Compose:
    """Grey uint8 ``[1, H, W]`` -> normalised float ``[3, crop, crop]``; augmented when ``train``."""
    steps: list[v2.Transform] = [v2.Resize(aug.resize, antialias=True)]
    if train:
        steps += [
            v2.RandomHorizontalFlip(aug.hflip_p),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=aug.blur_sigma_at_size())], p=aug.blur_p),
            v2.RandomRotation(aug.rotate_degrees),
        ]
    steps += [v2.CenterCrop(aug.crop), *_to_model_input(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        steps.append(v2.RandomErasing(p=aug.erase_p, scale=aug.erase_scale, value=0.0))
    return v2.Compose(steps)


def detection_transform(aug: DetectionAugment, train: bool, size: int | None = None) -> v2.Compose:
    """``(image, target)`` -> float ``[3, H, W]`` image and its target with the boxes moved along.

    ``target`` holds ``boxes`` (``tv_tensors.BoundingBoxes``) and ``labels``. ``size`` resizes the
    image (and boxes) to a square first, so augmentation runs at the training resolution; the
    detector normalises the image itself. Boxes pushed out of the image, or shrunk below
    ``min_box_size``, are dropped with their labels.
    """
    steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)] if size else []
    if train:
        steps += [
            v2.RandomHorizontalFlip(aug.hflip_p),
            v2.RandomApply([v2.RandomAffine(
                degrees=aug.rotate_degrees, translate=(aug.shift, aug.shift), scale=(1 - aug.scale, 1 + aug.scale),
            )], p=aug.affine_p),
            v2.RandomApply([v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast)], p=aug.color_p),
            v2.RandomApply([v2.RandomChoice([
                v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5)),
                v2.RandomAdjustSharpness(sharpness_factor=2.0, p=1.0),
            ])], p=aug.blur_sharpen_p),
            Cutout(p=aug.cutout_p, scale=aug.cutout_scale, value=0),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=aug.min_box_size),
        ]
    return v2.Compose([*steps, *_to_model_input()])
