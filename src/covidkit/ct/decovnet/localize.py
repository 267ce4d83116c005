"""Weakly supervised lesion localization for DeCoVNet: class activation maps + 3D connected components.

As in the paper, two unsupervised cues are combined, both on the classifier's input grid:

1. the **class activation map** (CAM) of the COVID class (:func:`class_activation_map`): where the
   network looks;
2. **candidate lesion voxels**: lung voxels denser than aerated lung (ground glass and above), with thin
   structures (vessels, noise) removed by an in-plane opening (:func:`lesion_candidates`); their local
   density (the candidate mask smoothed over a few millimetres) is high inside a lesion and low at the
   edge of a vessel or a fissure that survived the opening.

A candidate voxel's evidence is the CAM times that density. The lesion's centre is the voxel of most
evidence, and the localized lesion is the 3D connected component around it of the voxels with at least half
its evidence (:func:`localize_lesion`). When the CAM is zero on every candidate, the CAM's maximum inside the
lungs is taken. A prediction *hits* when its centre lies inside a labelled lesion (:func:`hit_rate`).

The density matters: the CAM of a network trained on a hundred volumes is coarse (on the dev runs, 31-36 %
of its strongest 2 % of lung voxels lie in a lesion), and taking the CAM region that overlaps the largest
candidate component, as this module did before, hit 0.38-0.57 of the positives of the dev runs; weighting
by density, 0.81-0.86 (README).

The CAM weighs the channels of the residual blocks' output by how much the COVID logit, over the other
class's, grows with each of them: the gradient of that margin with respect to the features, averaged over
the volume (Grad-CAM, Selvaraju et al. 2017, which is the CAM itself for a network that ends in global
average pooling and one linear layer). The CAM is the weighted channel sum, upsampled trilinearly to the
input, negative values set to zero, divided by its maximum. The released code linearises the ProClf
instead (each convolution averaged over its support, chained with the fully connected layers, max pools
and ReLUs ignored); for a network trained here that CAM was nowhere positive in the held-out volumes, so
no lesion was found (README).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from covidkit.ct.decovnet.model import DeCoVNet
from covidkit.ct.decovnet.volumes import LUNG_WINDOW


@dataclass
class LocalizationConfig:
    rule: str = "density"  # "density": candidate density alone (no network); "cam": CAM x candidate density
    candidate_hu: float = -720.0  # candidate lesions: lung voxels above this (ground glass and denser)
    opening_radius: int = 2  # in-plane opening (pixels of the classifier input) that removes vessels
    density_sigma: tuple[float, float, float] = (0.7, 2.0, 2.0)  # (t, y, x) voxels: ~6 mm on smoke's 8 x 2.8 x 2.8 mm grid
    region_fraction: float = 0.5  # the localized lesion: connected voxels with this fraction of the centre's evidence
    window: tuple[float, float] = LUNG_WINDOW  # how the 8-bit input was windowed


@dataclass
class Localization:
    """The localized lesion (``[T, H, W]`` bool), its centre ``(t, y, x)`` (``None`` when nothing was found) and
    the number of candidate components (3D connected components of the candidate voxels)."""

    lesion: np.ndarray
    centre: tuple[float, float, float] | None
    candidates: int


def cam_channel_weights(model: DeCoVNet, features: torch.Tensor, target: int = 1) -> torch.Tensor:
    """One weight per channel of ``features`` (``[1, C, T, H, W]``, the residual blocks' output): the
    gradient of the ``target`` logit minus the mean logit, averaged over the volume."""
    with torch.enable_grad():
        features = features.detach().float().requires_grad_(True)
        logits = model.classifier(features)[0]
        (grad,) = torch.autograd.grad(logits[target] - logits.mean(), features)
    return grad[0].mean(dim=(1, 2, 3))


def class_activation_map(model: DeCoVNet, x: torch.Tensor, target: int = 1,
                         features: torch.Tensor | None = None) -> np.ndarray:
    """CAM of class ``target`` for one input ``[1, C, T, H, W]`` -> ``[T, H, W]`` in [0, 1]. ``features``: the
    input's ``model.forward_features``, where the caller has them already."""
    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"class_activation_map takes one volume [1, C, T, H, W], got {tuple(x.shape)}")
    model.eval()
    if features is None:
        with torch.no_grad():
            features = model.forward_features(x)
    features = features.float()
    weights = cam_channel_weights(model, features, target)
    cam = torch.einsum("c,cthw->thw", weights, features[0])
    cam = F.interpolate(cam[None, None], size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]
    cam = cam.clamp(min=0)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu().numpy()


def hu_to_level(hu: float, window: tuple[float, float] = LUNG_WINDOW) -> float:
    """The 8-bit value that ``hu`` has after windowing."""
    return (hu - window[0]) / (window[1] - window[0]) * 255.0


def lesion_candidates(image: np.ndarray, lungs: np.ndarray, cfg: LocalizationConfig | None = None) -> np.ndarray:
    """Unsupervised candidate lesion voxels of a windowed uint8 ``[T, H, W]`` volume: dense lung voxels
    without thin structures."""
    cfg = cfg or LocalizationConfig()
    dense = (image >= hu_to_level(cfg.candidate_hu, cfg.window)) & lungs.astype(bool)
    r = cfg.opening_radius
    if r <= 0:
        return dense
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy ** 2 + xx ** 2 <= r * r)[None]  # in-plane only: slices may be thick
    return ndimage.binary_opening(dense, structure=disk)


def localize_lesion(cam: np.ndarray, image: np.ndarray, lungs: np.ndarray,
                    cfg: LocalizationConfig | None = None) -> Localization:
    """The lesion of one volume from its CAM, its windowed image and its lung mask (all ``[T, H, W]``)."""
    cfg = cfg or LocalizationConfig()
    lungs = lungs.astype(bool)
    if cam.shape != lungs.shape or image.shape != lungs.shape:
        raise ValueError(f"cam {cam.shape}, image {image.shape} and lungs {lungs.shape} must have one shape")
    if not lungs.any() or cam[lungs].max() <= 0:
        return Localization(np.zeros_like(lungs), None, 0)
    candidates = lesion_candidates(image, lungs, cfg)
    _, n_candidates = ndimage.label(candidates)
    density = ndimage.gaussian_filter(candidates.astype(np.float32), cfg.density_sigma)
    evidence = np.where(candidates, cam * density, 0.0)
    if evidence.max() <= 0:  # no candidate, or the CAM is zero on all of them
        evidence = np.where(lungs, cam, 0.0)
    centre = np.unravel_index(int(np.argmax(evidence)), evidence.shape)
    regions, _ = ndimage.label(evidence >= cfg.region_fraction * evidence[centre])
    return Localization(regions == regions[centre], tuple(float(c) for c in centre), n_candidates)


def localize(cam: np.ndarray, image: np.ndarray, lungs: np.ndarray,
             cfg: LocalizationConfig | None = None) -> Localization:
    """The lesion by ``cfg.rule``: ``"cam"`` weighs the candidate density by the CAM (:func:`localize_lesion`),
    ``"density"`` takes the densest candidate region alone, the CAM replaced by the lung mask."""
    cfg = cfg or LocalizationConfig()
    if cfg.rule == "density":
        cam = lungs.astype(np.float32)
    elif cfg.rule != "cam":
        raise ValueError(f"unknown localization rule {cfg.rule!r} (cam or density)")
    return localize_lesion(cam, image, lungs, cfg)


def is_hit(centre: tuple[float, float, float] | None, lesions: np.ndarray) -> bool:
    """Whether the predicted centre (rounded to a voxel) lies inside a labelled lesion."""
    if centre is None:
        return False
    voxel = tuple(int(round(c)) for c in centre)
    if any(v < 0 or v >= s for v, s in zip(voxel, lesions.shape)):
        return False
    return bool(lesions[voxel])


def hit_rate(centres: list[tuple[float, float, float] | None], lesion_masks: list[np.ndarray]) -> float:
    """Fraction of cases whose predicted lesion centre lies inside one of their labelled lesions."""
    if len(centres) != len(lesion_masks):
        raise ValueError(f"{len(centres)} centres for {len(lesion_masks)} lesion masks")
    if not centres:
        return float("nan")
    return float(np.mean([is_hit(c, m) for c, m in zip(centres, lesion_masks)]))
