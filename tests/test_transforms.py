"""Transforms: boxes move with the image; the classification pipeline has the documented shape and statistics."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from covidkit.transforms import (
    IMAGENET_MEAN,
    ClassificationAugment,
    DetectionAugment,
    classification_transform,
    detection_transform,
)

# Every geometric augmentation always on, photometric ones too (they must leave the boxes alone).
ALWAYS = DetectionAugment(hflip_p=0.5, affine_p=1.0, color_p=1.0, blur_sharpen_p=1.0, cutout_p=0.0)


def _bright_rectangle(h: int = 200, w: int = 160, box=(40, 60, 100, 130)) -> tuple[tv_tensors.Image, dict]:
    image = torch.full((1, h, w), 20, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[0, y1:y2, x1:x2] = 230
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor([1]),
    }
    return tv_tensors.Image(image), target


def _bright_extent(image: torch.Tensor) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(image[0].numpy() > 0.5)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("seed", range(8))
def test_detection_augment_keeps_the_box_on_the_bright_rectangle(seed):
    torch.manual_seed(seed)
    image, target = _bright_rectangle()
    out_image, out_target = detection_transform(ALWAYS, train=True)(image, target)
    assert out_image.dtype == torch.float32 and out_image.shape[0] == 3
    (box,) = out_target["boxes"].tolist()
    ex1, ey1, ex2, ey2 = _bright_extent(out_image)
    tol = 2.0  # interpolation may smear an edge by a pixel
    assert box[0] - tol <= ex1 and box[1] - tol <= ey1 and ex2 <= box[2] + tol and ey2 <= box[3] + tol
    # ... and tightly: the enclosing box of a rectangle rotated by <= 20 degrees is at most ~1.6x its area
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    assert box_area <= 1.7 * (ex2 - ex1) * (ey2 - ey1)


def test_detection_augment_really_moves_things():
    image, target = _bright_rectangle()
    moved = 0
    for seed in range(6):
        torch.manual_seed(seed)
        _, out = detection_transform(ALWAYS, train=True)(image, target)
        moved += not torch.allclose(out["boxes"], target["boxes"])
    assert moved >= 5


def test_boxes_pushed_out_of_the_image_are_dropped_with_their_labels():
    image, target = _bright_rectangle(box=(0, 0, 3, 3))
    aug = DetectionAugment(hflip_p=0.0, affine_p=1.0, shift=0.0625, scale=0.1, color_p=0, blur_sharpen_p=0,
                           cutout_p=0, min_box_size=4.0)
    _, out = detection_transform(aug, train=True)(image, target)
    assert len(out["boxes"]) == len(out["labels"]) == 0


def test_cutout_erases_pixels_but_not_boxes():
    torch.manual_seed(0)
    image, target = _bright_rectangle()
    aug = DetectionAugment(hflip_p=0, affine_p=0, color_p=0, blur_sharpen_p=0, cutout_p=1.0, cutout_scale=(0.2, 0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain RandomErasing would warn about the boxes
        out_image, out = detection_transform(aug, train=True)(image, target)
    assert torch.equal(out["boxes"], target["boxes"].float())
    erased = (out_image[0] == 0).sum().item()
    assert erased == pytest.approx(0.2 * 200 * 160, rel=0.1)


def test_detection_resize_scales_boxes():
    image, target = _bright_rectangle(h=200, w=100, box=(10, 20, 50, 60))
    out_image, out = detection_transform(DetectionAugment(), train=False, size=100)(image, target)
    assert out_image.shape == (3, 100, 100)
    assert out["boxes"].tolist() == [[10, 10, 50, 30]]


def test_classification_eval_pipeline_shape_and_normalisation():
    grey = tv_tensors.Image(torch.full((1, 300, 400), 124, dtype=torch.uint8))
    out = classification_transform(ClassificationAugment(), train=False)(grey)
    assert out.shape == (3, 224, 224)
    # a uniform image at ImageNet's red mean (124/255 ~ 0.486) maps to ~0 in the red channel
    assert out[0].abs().max() < 0.01
    assert out[2].mean().item() == pytest.approx((124 / 255 - IMAGENET_MEAN[2]) / 0.225, abs=1e-3)


def test_classification_train_pipeline_augments():
    grey = torch.zeros((1, 256, 256), dtype=torch.uint8)
    grey[0, :, :64] = 255  # a bright band on the left: a flip moves it right
    grey = tv_tensors.Image(grey)
    aug = ClassificationAugment(resize=64, crop=56, hflip_p=1.0, blur_p=0, rotate_degrees=0, erase_p=0)
    out = classification_transform(aug, train=True)(grey)
    assert out.shape == (3, 56, 56)
    assert out[0, :, -1].mean() > out[0, :, 0].mean()
    erase = ClassificationAugment(resize=64, crop=56, hflip_p=0, blur_p=0, rotate_degrees=0, erase_p=1.0,
                                  erase_scale=(0.1, 0.1))
    flat = tv_tensors.Image(torch.full((1, 64, 64), 200, dtype=torch.uint8))
    erased = (classification_transform(erase, train=True)(flat)[0] == 0).sum().item()
    assert erased == pytest.approx(0.1 * 56 * 56, rel=0.15)
