"""Synthetic axial chest CT slices in the two MedSeg layouts (see :mod:`covidkit.ct.cogseg.medseg`).

Each slice is a phantom in Hounsfield units: air, a body with a fat layer, a spine, two lungs with vessels
(bright lines and dots, not lesions), and lesions of the three labelled kinds. The aerated lung varies with
inspiration (-900 to -820 HU) and, as in a supine patient, grows denser towards the back (up to +20 to +150 HU
at the most posterior pixels); image noise varies between slices (10-35 HU, as dose and kernel do).

- ground-glass (label 1): hazy patches, mostly peripheral, +120 to +450 HU over the lung (-720 to -340 HU,
  5th-95th percentile, the faint end overlapping the dependent lung), of uneven density, with soft edges;
  vessels show through;
- consolidation (label 2): dense patches near soft-tissue density with sharper edges;
- pleural effusion (label 3): a dependent, crescent-shaped band of fluid along the posterior lung base.

Written as ``medseg-covid19/tr_im.nii.gz`` + ``tr_mask.nii.gz`` (slices stacked on the last axis) and
``medseg-radiopaedia/rp_im/<i>.nii.gz`` + ``rp_msk/<i>.nii.gz`` (one volume each), as the real sets are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from covidkit.ct.cogseg.medseg import (
    MEDSEG_DIR, MEDSEG_IMAGES, MEDSEG_MASKS, RADIOPAEDIA_DIR, RP_IMAGES, RP_MASKS, slice_to_nifti,
)

AIR_HU, FAT_HU, TISSUE_HU, LUNG_HU, BONE_HU = -1000.0, -100.0, 40.0, -860.0, 700.0


@dataclass
class CTSynthConfig:
    """Sizes of the synthetic CT sets (defaults: the shapes of the real ones, 100 slices and 9 volumes)."""

    seed: int = 0
    medseg_slices: int = 100
    medseg_size: int = 512
    rp_volumes: int = 9
    rp_depth: int = 12
    rp_size: int = 630


def _ellipse_mask(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    """A filled ellipse; centre and axes in pixels (x, y)."""
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (round(centre[0]), round(centre[1])), (max(1, round(axes[0])), max(1, round(axes[1]))),
                angle, 0, 360, 1, thickness=-1)
    return mask.astype(bool)


def _blob(rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """An irregular blob: the union of 2-4 random ellipses around ``centre``."""
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(2, 5)):
        c = (centre[0] + rng.normal(0, radius * 0.4), centre[1] + rng.normal(0, radius * 0.4))
        axes = (radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.4, 0.9))
        mask |= _ellipse_mask(size, c, axes, rng.uniform(0, 180))
    return mask


def _lungs(rng: np.random.Generator, size: int, z: float) -> np.ndarray:
    """Two lungs with wavy borders, largest mid-volume (``z`` in [0, 1] runs head to feet)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size / 2) - 1.0
    scale = 0.75 + 0.25 * np.sin(np.pi * np.clip(z, 0.05, 0.95))
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        cx, cy = side * rng.uniform(0.34, 0.40), rng.uniform(-0.06, 0.02)
        rx, ry = rng.uniform(0.22, 0.27) * scale, rng.uniform(0.36, 0.42) * scale
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.06 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.04 * np.sin(5 * theta + rng.uniform(0, 6.3))
        # posterior (bottom) part wider than the anterior, as in supine chest CT
        ry_side = np.where(yy > cy, ry * 1.08, ry)
        lungs |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry_side) ** 2 <= wobble ** 2
    return lungs


def _vessels(rng: np.random.Generator, size: int, lungs: np.ndarray) -> np.ndarray:
    """Branching bright lines from the hila and scattered dots (vessels cut across), inside the lungs."""
    canvas = np.zeros((size, size), np.uint8)
    px = size / 512
    for side in (-1, 1):
        hilum = np.array([size / 2 + side * 0.2 * size, size / 2])
        for _ in range(rng.integers(6, 10)):
            start, angle = hilum.copy(), rng.uniform(-np.pi, np.pi)
            width = rng.uniform(2.0, 4.0) * px
            for _ in range(rng.integers(3, 6)):
                length = rng.uniform(0.04, 0.09) * size
                end = start + length * np.array([np.cos(angle), np.sin(angle)])
                cv2.line(canvas, tuple(map(round, start)), tuple(map(round, end)), 1, max(1, round(width)))
                start, angle, width = end, angle + rng.normal(0, 0.4), width * 0.75
    ys, xs = np.nonzero(lungs)
    for i in rng.choice(len(ys), size=min(len(ys), rng.integers(40, 100)), replace=False):
        cv2.circle(canvas, (int(xs[i]), int(ys[i])), max(1, round(rng.uniform(1.0, 3.0) * px)), 1, -1)
    return canvas.astype(bool) & lungs


def _random_lung_point(rng: np.random.Generator, lungs: np.ndarray,
                       weights: np.ndarray | None = None) -> tuple[float, float]:
    """A lung pixel, uniformly or with probability proportional to ``weights`` (an image)."""
    ys, xs = np.nonzero(lungs)
    p = None if weights is None else weights[ys, xs] / weights[ys, xs].sum()
    i = rng.choice(len(ys), p=p)
    return float(xs[i]), float(ys[i])


def _peripheral_weights(lungs: np.ndarray) -> np.ndarray:
    """Higher near the pleura (decaying over ~10 % of the side): COVID-19 ground glass is mostly peripheral."""
    depth = cv2.distanceTransform(lungs.astype(np.uint8), cv2.DIST_L2, 3)
    return np.exp(-depth / (0.1 * lungs.shape[0]))


def _dependent_density(rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """HU added to the aerated lung towards the back: a supine patient's dependent lung is denser.

    Up to 20-150 HU at the most posterior pixels, rising steeply there, so that the normal posterior lung
    overlaps the faint end of ground glass and only its shape and local contrast tell them apart.
    """
    rows = np.nonzero(lungs.any(axis=1))[0]
    t = np.clip((np.arange(lungs.shape[0]) - rows.min()) / max(1, rows.max() - rows.min()), 0, 1)
    return (rng.uniform(20, 150) * t ** 3).astype(np.float32)[:, None]


def _atelectasis(rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """Unlabelled dependent atelectasis: 0-1 weight of a band along the posterior pleura, densest at the
    pleura, its thickness (2-7 % of the side) varying along it; not a lesion, but as dense as ground glass."""
    size = lungs.shape[0]
    rows = np.arange(size)[:, None]
    last = np.where(lungs, rows, -1).max(axis=0)  # each column's most posterior lung pixel
    wobble = cv2.resize(rng.normal(0, 1, (1, 8)).astype(np.float32), (size, 1), interpolation=cv2.INTER_CUBIC)[0]
    thickness = np.clip(rng.uniform(0.02, 0.07) * size * (1 + 0.35 * wobble), 1.0, None)
    weight = np.clip(1 - (last[None, :] - rows) / thickness[None, :], 0, 1) * lungs
    return cv2.GaussianBlur(weight.astype(np.float32), (0, 0), 1.5 * size / 512) * lungs


def _patchy(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth factor in about [0.6, 1.4]: ground glass is not of one density throughout."""
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (32, 32)).astype(np.float32), (0, 0), 1.2)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return 1 + 0.4 * field / (np.abs(field).max() + 1e-6)


def _effusion(rng: np.random.Generator, lungs: np.ndarray) -> np.ndarray:
    """A crescent along the posterior (bottom) border of one or both lungs: the dependent fluid."""
    size = lungs.shape[0]
    n, labels = cv2.connectedComponents(lungs.astype(np.uint8))
    effusion = np.zeros_like(lungs)
    sides = [k for k in range(1, n) if rng.random() < 0.7] or [int(rng.integers(1, n))]
    for k in sides:
        lung = labels == k
        thickness = max(2, round(rng.uniform(0.04, 0.08) * size))
        shifted = np.zeros_like(lung)
        shifted[:-thickness] = lung[thickness:]  # lung moved up: pixels whose pixel `thickness` below is lung
        ys = np.nonzero(lung)[0]
        posterior = np.arange(size)[:, None] > (ys.min() + ys.max()) / 2
        effusion |= lung & ~shifted & posterior
    return effusion


def ct_phantom(rng: np.random.Generator, size: int, z: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial slice: HU ``[size, size]`` int16 and label mask uint8 (0-3)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size / 2) - 1.0
    hu = np.full((size, size), AIR_HU, np.float32)
    bx, by = rng.uniform(0.82, 0.9), rng.uniform(0.6, 0.68)
    body = (xx / bx) ** 2 + ((yy - 0.05) / by) ** 2 <= 1
    inner = (xx / (bx - 0.06)) ** 2 + ((yy - 0.05) / (by - 0.06)) ** 2 <= 1
    hu[body] = FAT_HU
    hu[inner] = TISSUE_HU
    hu[(xx ** 2 + (yy - 0.48) ** 2) <= 0.09 ** 2] = BONE_HU

    lungs = _lungs(rng, size, z)
    texture = cv2.GaussianBlur(rng.normal(0, 25, (size, size)).astype(np.float32), (0, 0), 2)
    aerated = rng.uniform(-900, -820) + _dependent_density(rng, lungs) + texture  # inspiration varies
    hu[lungs] = aerated[lungs]
    hu[_vessels(rng, size, lungs)] = TISSUE_HU
    if rng.random() < 0.6:  # unlabelled dependent atelectasis, -650 to -200 HU at the pleura
        hu += (rng.uniform(-650, -200) - hu) * _atelectasis(rng, lungs)

    mask = np.zeros((size, size), np.uint8)
    px = size / 512
    if rng.random() < 0.85:  # ground-glass: faint haze added on top, vessels stay visible
        peripheral = _peripheral_weights(lungs)
        for _ in range(rng.integers(1, 6)):
            blob = _blob(rng, size, _random_lung_point(rng, lungs, peripheral), rng.uniform(0.05, 0.13) * size)
            soft = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), 5 * px)
            hu += rng.uniform(120, 450) * soft * _patchy(rng, size) * lungs
            mask[(soft > 0.5) & lungs] = 1
    if rng.random() < 0.5:  # consolidation: dense, replaces the lung (and its vessels)
        for _ in range(rng.integers(1, 4)):
            blob = _blob(rng, size, _random_lung_point(rng, lungs), rng.uniform(0.03, 0.08) * size)
            soft = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), 1.2 * px) * lungs
            hu = hu * (1 - soft) + rng.uniform(-60, 30) * soft
            mask[soft > 0.5] = 2
    if rng.random() < 0.35:  # effusion: homogeneous fluid
        effusion = _effusion(rng, lungs)
        hu[effusion] = rng.uniform(5, 20)
        mask[effusion] = 3

    noise = rng.uniform(10, 35)  # dose and kernel vary between scans
    # the scanner's point spread: partial volume gives every vessel, fissure and pleura an intermediate rim
    hu = cv2.GaussianBlur(hu, (0, 0), rng.uniform(1.2, 2.5) * px) + rng.normal(0, noise, (size, size)).astype(np.float32)
    return np.clip(hu, -1024, 3000).astype(np.int16), mask


def _save_volume(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    """``[N, H, W]`` slices -> NIfTI volumes with the slices on the last axis."""
    import nibabel as nib

    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(slice_to_nifti(image), np.eye(4)), image_path)
    nib.save(nib.Nifti1Image(slice_to_nifti(mask), np.eye(4)), mask_path)


def write_ct_slices(out: Path, cfg: CTSynthConfig | None = None) -> list[Path]:
    """Write the synthetic MedSeg (100 slices) and Radiopaedia (9 volumes) sets under ``out``; returns their folders."""
    cfg = cfg or CTSynthConfig()
    out = Path(out)
    rng = np.random.default_rng(cfg.seed)
    slices = [ct_phantom(rng, cfg.medseg_size, z=rng.uniform(0.2, 0.8))
              for _ in tqdm(range(cfg.medseg_slices), desc="synthetic MedSeg CT slices", leave=False)]
    medseg = out / MEDSEG_DIR
    _save_volume(np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices]),
                 medseg / MEDSEG_IMAGES, medseg / MEDSEG_MASKS)
    radiopaedia = out / RADIOPAEDIA_DIR
    for i in tqdm(range(1, cfg.rp_volumes + 1), desc="synthetic Radiopaedia CT volumes", leave=False):
        volume = [ct_phantom(rng, cfg.rp_size, z=(k + 0.5) / cfg.rp_depth) for k in range(cfg.rp_depth)]
        _save_volume(np.stack([s[0] for s in volume]), np.stack([s[1] for s in volume]),
                     radiopaedia / RP_IMAGES / f"{i}.nii.gz", radiopaedia / RP_MASKS / f"{i}.nii.gz")
    return [medseg, radiopaedia]


def write_ct_slice_sets(out: Path, cfg) -> str:
    """``covidkit.synth.WRITERS`` entry: both CT slice sets at their real sizes, seeded by ``cfg.seed``."""
    if not cfg.ct:
        return "CT slice sets: skipped (ct=False)"
    folders = write_ct_slices(out, CTSynthConfig(seed=cfg.seed))
    return f"{', '.join(str(f) for f in folders)}: MedSeg 100 CT slices, Radiopaedia 9 CT volumes (NIfTI)"
