"""Synthetic chest CT volumes with COVID-19 labels, for DeCoVNet (see :mod:`covidkit.ct.decovnet.volumes`).

Each volume is a phantom in Hounsfield units: air, a body with a fat layer, a spine, two lungs whose
shape varies from case to case, branching vessels, a trachea and main bronchi, correlated noise and partial
volume (a point spread, so every edge has intermediate HU). Both classes share the confounders
(:class:`FindingRates`): dependent atelectasis, emphysema, scars, calcified granulomas; most negatives and some
positives have another disease (lobar consolidation, aspiration, perihilar edema, diffuse ground glass, nodules).
Positive volumes add a multifocal pneumonia over a lognormal share of the lung (median 8 %), mostly subpleural,
posterior and basal (:func:`_covid_pattern`):

- ground-glass opacities: mottled patches of -680 to -300 HU per patch, soft edges;
- in 40 % of the patients a consolidated core (-150 to +20 HU) in the larger patches.

No HU histogram rule separates the classes (docs/ct.md); the pattern does.

Written as ``ct-covid-volumes/``: ``volumes/<case>.nii.gz`` or ``volumes/<case>/`` (a DICOM series),
``lesions/<case>.nii.gz`` for the positives, ``labels.csv`` (``case_id,label`` with positive/negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from covidkit.ct.decovnet.volumes import (DATASET_DIR, LABELS_CSV, LESIONS_DIR, VOLUMES_DIR, write_dicom_series,
                                 write_nifti)

if TYPE_CHECKING:
    from covidkit.synth.config import SynthConfig

AIR_HU, FAT_HU, TISSUE_HU, LUNG_HU, BONE_HU, BLOOD_HU = -1000.0, -100.0, 40.0, -860.0, 700.0, 40.0


@dataclass
class CTVolumeSynthConfig:
    """Size of the synthetic volume set; the defaults fit the smoke profile on a CPU."""

    seed: int = 0
    cases: int = 140
    positive_fraction: float = 0.5
    dicom_fraction: float = 0.3  # the rest is NIfTI
    min_slices: int = 24
    max_slices: int = 40
    size: int = 128  # in-plane pixels (square)


@dataclass
class SynthVolume:
    """One phantom: HU ``[T, H, W]``, true lung and lesion masks, spacing ``(z, y, x)`` in mm."""

    hu: np.ndarray
    lungs: np.ndarray
    lesions: np.ndarray
    spacing: tuple[float, float, float]


def _grid(slices: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates: z in [0, 1] feet to head, y and x in [-1, 1] (y grows posterior)."""
    z = np.linspace(0.0, 1.0, slices, dtype=np.float32)[:, None, None]
    yx = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return z, yx[None, :, None], yx[None, None, :]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-variance correlated noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _lungs(rng: np.random.Generator, z, y, x) -> np.ndarray:
    """Two lungs: per side an ellipse whose radius follows a dome over z and random low-order harmonics."""
    lungs = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
    base, apex = rng.uniform(0.03, 0.1), rng.uniform(0.9, 0.97)
    for side in (-1.0, 1.0):
        cx, cy = side * rng.uniform(0.36, 0.42), rng.uniform(-0.06, 0.04)
        ax, ay = rng.uniform(0.25, 0.31), rng.uniform(0.42, 0.5)
        theta = np.arctan2((y - cy) / ay, (x - cx) / ax)
        wobble = 1.0 + sum(rng.uniform(0.0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
        t = np.clip((z - base) / (apex - base), 0.0, 1.0)
        # wide at the base (diaphragm), narrowing to the apex
        profile = np.where((z >= base) & (z <= apex), np.sqrt(np.clip(1.0 - t ** 2.2, 0, 1)) * (0.75 + 0.25 * np.sqrt(np.clip(t / 0.15, 0, 1))), 0)
        rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
        lungs |= rho < wobble * profile
    return lungs


def _tubes(shape, points: np.ndarray, radius: float, sampling) -> np.ndarray:
    """Voxels within ``radius`` (voxels in-plane) of a set of centre-line points ``[N, 3]``."""
    centre = np.zeros(shape, bool)
    idx = np.round(points).astype(int)
    keep = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    centre[tuple(idx[keep].T)] = True
    if not centre.any():
        return centre
    return ndimage.distance_transform_edt(~centre, sampling=sampling) <= radius


def _vessel_tree(rng: np.random.Generator, lungs: np.ndarray, sampling) -> tuple[np.ndarray, np.ndarray]:
    """Random walks from each lung's hilum outwards: large (proximal) and small (distal) centre lines."""
    t, h, w = lungs.shape
    large, small = [], []
    for side in (slice(0, w // 2), slice(w // 2, w)):
        zz, yy, xx = np.nonzero(lungs[:, :, side])
        if zz.size == 0:
            continue
        xx = xx + side.start
        hilum = np.array([np.median(zz), np.median(yy), np.median(xx)], float)
        hilum[2] += (w / 2 - hilum[2]) * 0.5  # medial
        for _ in range(rng.integers(24, 36)):
            direction = rng.normal(size=3) * np.array([0.5, 1.0, 1.0])
            direction /= np.linalg.norm(direction) + 1e-6
            point = hilum.copy()
            steps = int(rng.integers(w // 8, w // 4))
            for step in range(steps):
                direction += rng.normal(scale=0.25, size=3) * np.array([0.5, 1.0, 1.0])
                direction /= np.linalg.norm(direction) + 1e-6
                point = point + direction * np.array([0.4, 1.0, 1.0])
                (large if step < steps * 0.4 else small).append(point.copy())
    shape = lungs.shape
    return (_tubes(shape, np.array(large).reshape(-1, 3), 1.6, sampling),
            _tubes(shape, np.array(small).reshape(-1, 3), 0.8, sampling))


def _airways(z, y, x, lungs_top: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Trachea from the top down to the carina, then two main bronchi towards the lungs: lumen and wall."""
    carina = lungs_top - 0.35
    radius = 0.07
    dx = np.where(z >= carina, 0.0, np.clip((carina - z) * 1.6, 0, 0.3))  # bronchi diverge below the carina
    cy = -0.15
    lumen = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
    wall = np.zeros_like(lumen)
    above = z >= carina - 0.15
    for side in (-1.0, 1.0):
        r = np.sqrt((x - side * dx) ** 2 + (y - cy) ** 2)
        r_lumen = np.where(z >= carina, radius, radius * 0.7)
        lumen |= (r < r_lumen) & above
        wall |= (r < r_lumen + 2.5 / size) & above
    return lumen, wall & ~lumen


def _sheet_distance(lungs: np.ndarray, spacing, axis: int = 1, posterior: bool = True) -> np.ndarray:
    """Distance (mm) of each lung voxel from its column's most posterior (dependent) lung voxel along ``axis``."""
    n = lungs.shape[axis]
    idx = np.arange(n).reshape([-1 if a == axis else 1 for a in range(lungs.ndim)])
    last = np.where(lungs, idx, -1).max(axis=axis, keepdims=True)
    return np.where(lungs, (last - idx) * spacing[axis], np.inf).astype(np.float32)


def _patches(rng, lungs, score, share) -> np.ndarray:
    """The ``share`` of the lung voxels of highest ``score``."""
    if share <= 0 or not lungs.any():
        return np.zeros_like(lungs)
    return lungs & (score > np.quantile(score[lungs], 1.0 - min(share, 0.9)))


def _opacity(patches: np.ndarray) -> np.ndarray:
    """A soft edge: the opacity fades over about a voxel around each patch."""
    return np.clip(ndimage.gaussian_filter(patches.astype(np.float32), (0.5, 1.0, 1.0)) * 2.0, 0.0, 1.0)


def _ground_glass(rng, patches, lungs, lo: float, hi: float) -> np.ndarray:
    """Target HU of ground glass: one level per patch in [lo, hi], mottled."""
    labels, n = ndimage.label(ndimage.binary_dilation(patches, iterations=1))
    level = np.concatenate([[0.0], rng.uniform(lo, hi, n)]).astype(np.float32)[labels]
    return level + 40.0 * _smooth_field(rng, lungs.shape, (1.0, 2.0, 2.0))


def _dependent_density(rng, lungs, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Dependent atelectasis: a band along the posterior pleura, denser towards it, its thickness varying
    smoothly along the pleura (a gravity gradient, not patchy)."""
    dist = _sheet_distance(lungs, spacing)
    thick = rng.uniform(4.0, 22.0) * (1.0 + 0.4 * _smooth_field(rng, lungs.shape, (2.0, 8.0, 8.0)))
    weight = np.clip(1.0 - dist / np.maximum(thick, 1.0), 0.0, 1.0) * lungs
    return weight, np.full(lungs.shape, rng.uniform(-450.0, -50.0), np.float32)


def _emphysema(rng, lungs, z) -> np.ndarray:
    """Centrilobular emphysema: low-attenuation patches, upper-lobe predominant."""
    score = _smooth_field(rng, lungs.shape, (1.0, 2.0, 2.0)) + 1.2 * z
    return _patches(rng, lungs, score, rng.uniform(0.03, 0.2))


def _scars(rng, lungs, sampling) -> np.ndarray:
    """One to three linear fibrotic bands near the pleura."""
    voxels = np.argwhere(lungs)
    points = []
    for _ in range(rng.integers(1, 4)):
        start = voxels[rng.integers(len(voxels))].astype(float)
        direction = rng.normal(size=3) * np.array([0.3, 1.0, 1.0])
        direction /= np.linalg.norm(direction) + 1e-6
        points += [start + direction * s for s in np.arange(0, rng.uniform(8, 25), 0.5)]
    return _tubes(lungs.shape, np.array(points), rng.uniform(0.7, 1.4), sampling) & lungs


def _other_disease(rng, lungs, spacing, z, y, x) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """A non-COVID lung disease: lobar (bacterial) consolidation, aspiration, perihilar edema, diffuse
    mosaic ground glass (e.g. PCP, hypersensitivity) or subsolid nodules. Returns opacity, target HU,
    the disease's mask and its name."""
    t, h, w = lungs.shape
    kind = rng.choice(["lobar", "aspiration", "edema", "diffuse", "nodules"], p=[0.25, 0.15, 0.2, 0.25, 0.15])
    side = np.zeros_like(lungs)
    side[:, :, slice(0, w // 2) if rng.random() < 0.5 else slice(w // 2, w)] = True
    depth_mm = ndimage.distance_transform_edt(lungs, sampling=spacing)
    field = _smooth_field(rng, lungs.shape, tuple(min(4.0, 10.0 / s) for s in spacing))
    share = float(np.clip(rng.lognormal(np.log(0.08), 0.9), 0.01, 0.4))
    if kind == "lobar":  # one lobe (or a segment of it) beyond an oblique fissure, dense with a ground-glass rim
        normal = rng.normal(size=3) * np.array([1.0, 0.6, 0.3])
        plane = normal[0] * (z - rng.uniform(0.3, 0.7)) + normal[1] * y * 0.5 + normal[2] * x * 0.5
        region = lungs & side & (plane > 0)
        mask = _patches(rng, region, np.broadcast_to(plane, lungs.shape) + 0.05 * field, rng.uniform(0.3, 1.0))
        target = np.where(mask, rng.uniform(-120.0, 40.0), 0.0) + 25.0 * field
        return _opacity(ndimage.binary_dilation(mask)) * lungs, np.where(
            ndimage.binary_erosion(mask), target, rng.uniform(-650.0, -350.0)).astype(np.float32), mask, kind
    if kind == "aspiration":  # dependent, basal, mostly one side: patchy consolidation and ground glass
        score = field + 2.0 * y + 2.0 * (1.0 - z)
        mask = _patches(rng, lungs & side, score, share)
        target = np.where(field > 0.5, rng.uniform(-200.0, 20.0), rng.uniform(-650.0, -350.0)) + 30.0 * field
        return _opacity(mask) * lungs, target.astype(np.float32), mask, kind
    if kind == "edema":  # bilateral, central (perihilar), gravity-dependent ground glass
        score = 0.5 * field + depth_mm / 15.0 + 0.5 * y
        mask = _patches(rng, lungs, score, share * 1.5)
        return _opacity(mask) * lungs, _ground_glass(rng, mask, lungs, -700.0, -400.0), mask, kind
    if kind == "diffuse":  # mosaic ground glass, not peripheral, upper or even
        score = field + rng.uniform(0.0, 1.0) * z + 0.3 * depth_mm / 15.0
        mask = _patches(rng, lungs, score, share * 1.5)
        return _opacity(mask) * lungs, _ground_glass(rng, mask, lungs, -700.0, -350.0), mask, kind
    voxels = np.argwhere(lungs)  # solid and subsolid nodules
    centres = voxels[rng.integers(len(voxels), size=rng.integers(2, 8))].astype(float)
    sampling = tuple(s / spacing[1] for s in spacing)
    mask = _tubes(lungs.shape, centres, rng.uniform(2.0, 4.0), sampling) & lungs
    return (_opacity(mask) * lungs, np.full(lungs.shape, rng.uniform(-600.0, 20.0), np.float32), mask, kind)


def _covid_pattern(rng: np.random.Generator, lungs: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where and how dense a COVID-19 pneumonia is: multifocal patches of the lungs, mostly subpleural,
    posterior and basal, bilateral in most cases, over a lognormal share of the lung (median 8 %,
    10th-90th percentile about 2.5-25 %, mild cases included).

    Returns the opacity (0-1, soft edges), the target HU under it (ground glass -680 to -300 HU per
    patch, a dense core of -150 to +20 HU in some patients) and the patches' mask.
    """
    involvement = float(np.clip(rng.lognormal(np.log(0.08), 0.9), 0.01, 0.45))
    sigma_mm = rng.uniform(8.0, 16.0)  # patch size
    sigma = tuple(min(4.0, sigma_mm / s) for s in spacing)
    depth_mm = ndimage.distance_transform_edt(lungs, sampling=spacing)
    t, h, w = lungs.shape
    z = np.linspace(0.0, 1.0, t)[:, None, None]
    y = np.linspace(-1.0, 1.0, h)[None, :, None]
    score = (_smooth_field(rng, lungs.shape, sigma) + rng.uniform(0.8, 1.6) * np.exp(-depth_mm / 20.0)
             + 0.35 * y + 0.3 * (1.0 - z))  # subpleural, posterior (dependent) and basal predominance
    eligible = lungs.copy()
    if rng.random() < 0.2:  # unilateral in a fifth of the cases
        eligible[:, :, slice(0, w // 2) if rng.random() < 0.5 else slice(w // 2, w)] = False
    share = min(0.8, involvement * lungs.sum() / max(1, eligible.sum()))
    patches = eligible & (score > np.quantile(score[eligible], 1.0 - share))
    # a soft edge: the opacity fades over about a voxel around each patch
    opacity = np.clip(ndimage.gaussian_filter(patches.astype(np.float32), (0.5, 1.0, 1.0)) * 2.0, 0.0, 1.0)
    labels, n = ndimage.label(ndimage.binary_dilation(patches, iterations=1))
    ggo = np.concatenate([[0.0], rng.uniform(-680.0, -300.0, n)]).astype(np.float32)[labels]
    target = ggo + 40.0 * _smooth_field(rng, lungs.shape, (1.0, 2.0, 2.0))  # mottled, not flat
    if rng.random() < 0.4:  # consolidation at the core of the larger patches
        core = patches & (ndimage.distance_transform_edt(patches, sampling=spacing) > rng.uniform(4.0, 8.0))
        target = np.where(core, rng.uniform(-150.0, 20.0), target)
    return opacity * lungs, target.astype(np.float32), patches


@dataclass
class FindingRates:
    """How often each finding occurs; the confounders are drawn for both classes alike, other diseases mostly
    in the negatives (the population a CT classifier meets: patients scanned for other reasons)."""

    dependent_density: float = 0.6
    emphysema: float = 0.3
    scars: float = 0.35
    nodules: float = 0.4  # calcified granulomas
    other_disease_negative: float = 0.7
    other_disease_positive: float = 0.15


def synth_volume(rng: np.random.Generator, slices: int, size: int, positive: bool,
                 rates: FindingRates | None = None) -> SynthVolume:
    """One synthetic chest CT: positives carry a COVID-19 pneumonia, both classes the confounders."""
    rates = rates or FindingRates()
    fov = rng.uniform(320.0, 380.0)
    height = rng.uniform(230.0, 290.0)
    spacing = (height / slices, fov / size, fov / size)
    sampling = (spacing[0] / spacing[1], 1.0, 1.0)  # distances in in-plane voxels
    z, y, x = _grid(slices, size)
    shape = (slices, size, size)

    bx, by = rng.uniform(0.8, 0.9), rng.uniform(0.6, 0.7)
    body_r = np.broadcast_to(np.sqrt((x / bx) ** 2 + (y / by) ** 2), shape)
    hu = np.full(shape, AIR_HU, np.float32)
    hu[body_r < 1.0] = FAT_HU
    hu[body_r < 0.93] = TISSUE_HU
    spine = np.broadcast_to(np.sqrt(x ** 2 + (y - by * 0.72) ** 2) < 0.12, shape)
    hu[spine] = BONE_HU

    lungs = _lungs(rng, z, y, x) & (body_r < 0.88) & ~spine
    # inspiration depth and the gravity gradient vary from scan to scan
    aerated = rng.uniform(-900.0, -780.0) + rng.uniform(15.0, 70.0) * (np.broadcast_to(y, shape) + 1.0)
    hu[lungs] = (aerated + 15.0 * _smooth_field(rng, shape, (2, 6, 6)))[lungs]
    if rng.random() < rates.emphysema:
        hu[_emphysema(rng, lungs, z)] = rng.uniform(-990.0, -940.0)

    large, small = _vessel_tree(rng, lungs, sampling)
    vessels = (large | small) & lungs
    hu[vessels] = BLOOD_HU + rng.normal(0, 20.0)
    if rng.random() < rates.nodules:
        lung_voxels = np.argwhere(lungs)
        centres = lung_voxels[rng.integers(len(lung_voxels), size=rng.integers(1, 4))]
        nodules = _tubes(shape, centres.astype(float), rng.uniform(1.0, 2.2), sampling)  # calcified granulomas
        hu[nodules & lungs] = rng.uniform(150.0, 400.0)
    if rng.random() < rates.scars:
        hu[_scars(rng, lungs, sampling)] = rng.uniform(-150.0, 40.0)

    def overlay(opacity, target):  # vessels and nodules stay visible through an opacity
        return np.maximum(hu, hu + (target - hu) * opacity)

    if rng.random() < rates.dependent_density:
        hu = overlay(*_dependent_density(rng, lungs, spacing))
    if rng.random() < (rates.other_disease_positive if positive else rates.other_disease_negative):
        opacity, target, _, _ = _other_disease(rng, lungs, spacing, z, y, x)
        hu = overlay(opacity, target)
    lesions = np.zeros(shape, bool)
    if positive:
        opacity, target, lesions = _covid_pattern(rng, lungs, spacing)
        hu = overlay(opacity, target)

    top = np.nonzero(lungs.any(axis=(1, 2)))[0].max()
    lumen, wall = _airways(z, y, x, lungs_top=float(z[top, 0, 0]), size=size)
    hu[wall & ~lungs] = TISSUE_HU
    hu[lumen] = AIR_HU
    # partial volume: the scanner's point spread over thick slices mixes air and tissue at every edge
    hu = ndimage.gaussian_filter(hu, (rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)))
    hu += rng.uniform(15.0, 45.0) * _smooth_field(rng, shape, (0.3, 0.6, 0.6))
    return SynthVolume(np.clip(np.round(hu), -1024, 3000).astype(np.int16), lungs, lesions & lungs, spacing)


def write_ct_volumes(out: Path | str, cfg: CTVolumeSynthConfig | None = None) -> Path:
    """Write ``<out>/ct-covid-volumes/`` (see the module docstring); returns that folder."""
    cfg = cfg or CTVolumeSynthConfig()
    if cfg.cases < 2:
        raise ValueError("need at least 2 cases (one per class)")
    rng = np.random.default_rng(cfg.seed)
    root = Path(out) / DATASET_DIR
    n_pos = int(round(cfg.cases * cfg.positive_fraction))
    labels = rng.permutation([1] * n_pos + [0] * (cfg.cases - n_pos))
    dicom = rng.random(cfg.cases) < cfg.dicom_fraction
    first, second = rng.choice(cfg.cases, size=2, replace=False)
    dicom[first], dicom[second] = True, False  # at least one of each format, so both readers get used
    rows = []
    for i, label in enumerate(tqdm(labels, desc="synthetic CT volumes", unit="volume")):
        case_id = f"ct{i:04d}"
        slices = int(rng.integers(cfg.min_slices, cfg.max_slices + 1))
        volume = synth_volume(rng, slices, cfg.size, bool(label))
        if dicom[i]:
            write_dicom_series(root / VOLUMES_DIR / case_id, volume.hu, volume.spacing, patient_id=case_id, seed=i)
        else:
            write_nifti(root / VOLUMES_DIR / f"{case_id}.nii.gz", volume.hu, volume.spacing)
        if label:
            write_nifti(root / LESIONS_DIR / f"{case_id}.nii.gz", volume.lesions, volume.spacing, dtype=np.uint8)
        rows.append({"case_id": case_id, "label": "positive" if label else "negative"})
    pd.DataFrame(rows).to_csv(root / LABELS_CSV, index=False)
    return root


def write_ct_volume_set(out: Path, cfg: SynthConfig) -> str:
    """``covidkit.synth.WRITERS`` entry: ``cfg.ct_volumes`` volumes of the default size, seed ``cfg.seed``."""
    if not cfg.ct:
        return "CT volume set: skipped (ct=False)"
    root = write_ct_volumes(out, CTVolumeSynthConfig(seed=cfg.seed, cases=cfg.ct_volumes))
    labels = pd.read_csv(root / LABELS_CSV)
    positives = int((labels["label"] == "positive").sum())
    return f"{DATASET_DIR}: {len(labels)} CT volumes ({positives} positive, with lesion masks)"
