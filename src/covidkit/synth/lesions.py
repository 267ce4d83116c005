"""Lesions drawn into a phantom's lungs: opacities, the SIIM study patterns, and NIH findings.

Every lesion adds density to a layer of the ``Chest`` and returns the bounding box of its visible
part on the canvas. The SIIM and RSNA readers drew one large box around the opacities of a lung
zone, not one per lesion: the lesions of one reader's box share a ``region`` and ``boxes_of``
takes the union of their boxes. Opacities are irregular (sums of blurred random blobs, not
ellipses) and clipped to the lungs; a zone's opacity is several patches spread over it
(multifocal ground glass, some consolidation) joined by fainter confluent ground glass.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from covidkit.synth.phantom import AnatomyMods, Chest, blur, smooth_noise, stroke, vessel_tree

# ---------------------------------------------------------------------------------------------
# primitives


@dataclass(frozen=True)
class Lesion:
    kind: str             # ggo, consolidation, lobar, nodule, cavity, ...
    side: int             # 0: image-left lung, 1: image-right lung
    box: np.ndarray       # canvas x1, y1, x2, y2 of the visible lesion
    amplitude: float      # peak fraction of the lung's air replaced (0: none, 1: solid)
    region: int = 0       # lesions of one side and region make one reader's box


def opacify(chest: Chest, fraction: np.ndarray, win: tuple[slice, slice] | None = None) -> np.ndarray:
    """Replace ``fraction`` (0..1 map) of the lungs' air by fluid or tissue; returns the added density.

    A fully consolidated lung is as dense as soft tissue, not denser, and the vessels it
    engulfs vanish into it (the silhouette sign); through ground glass they stay visible.
    With ``win`` the maps cover only that window of the canvas (faster for small lesions), and
    opacities drawn this way overlap as a union: where patches overlap the lung holds the larger
    fraction, not their sum (overlapping ground glass stays ground glass). The returned density is
    the lesion's own (for its box), whatever was there before.
    """
    fraction = np.clip(fraction * chest.severity, 0, 1).astype(np.float32)
    if win is None:
        density = fraction * np.clip(-chest.layers["lungs"], 0, None)
        chest.add("lesions", density)
        chest.layers["vessels"] = chest.layers["vessels"] * (1 - fraction)
        return density
    if "filled" not in chest.cache:  # write into copies, never into arrays another chest shares
        chest.layers["vessels"] = chest.layers["vessels"].copy()
        chest.layers["lesions"] = chest.layers.get("lesions", np.zeros(chest.shape, np.float32)).copy()
        chest.cache["filled"] = np.zeros(chest.shape, np.float32)
    air = np.clip(-chest.layers["lungs"][win], 0, None)
    filled = chest.cache["filled"][win]
    union = np.maximum(filled, fraction)
    chest.layers["lesions"][win] += (union - filled) * air
    chest.layers["vessels"][win] *= np.clip(1 - union, 0, 1) / np.maximum(1 - filled, 1e-3)
    chest.cache["filled"][win] = union
    return fraction * air


def roi(center: tuple[float, float], radius: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    x, y = center
    r = int(np.ceil(radius))
    return (slice(max(0, int(y) - r), min(shape[0], int(y) + r + 1)),
            slice(max(0, int(x) - r), min(shape[1], int(x) + r + 1)))


def irregular_mask(rng: np.random.Generator, shape: tuple[int, int], center: tuple[float, float],
                   radius: float, edge: float, lobes: tuple[int, int] = (3, 8), coarse: bool = False) -> np.ndarray:
    """A soft irregular patch: thresholded sum of random Gaussian lobes, edges blurred by ``edge``
    (``coarse``: the smooth field of a large patch computed on a coarser grid, faster)."""
    out = np.zeros(shape, np.float32)
    win = roi(center, radius * 2.2 + 3 * edge, shape)
    step = max(1, int(radius / 12)) if coarse else 1
    ys, xs = np.mgrid[win[0].start:win[0].stop:step, win[1].start:win[1].stop:step].astype(np.float32)
    field = np.zeros_like(xs)
    for _ in range(rng.integers(*lobes)):
        ox, oy = rng.normal(0, 0.45 * radius, 2)
        sig = radius * rng.uniform(0.3, 0.65)
        dist2 = (xs - center[0] - ox) ** 2 + (ys - center[1] - oy) ** 2
        field += rng.uniform(0.6, 1.0) * np.exp(-dist2 / (2 * sig ** 2))
    field /= field.max() + 1e-6
    field *= 1 + 0.35 * smooth_noise(rng, field.shape, max(1.5, radius * 0.12 / step))
    if step > 1:
        size = (win[1].stop - win[1].start, win[0].stop - win[0].start)
        field = cv2.resize(field, size, interpolation=cv2.INTER_LINEAR)
    mask = np.clip((field - 0.45) / 0.2, 0, 1)
    out[win] = blur(mask.astype(np.float32), edge)
    return out


def lung_mask(chest: Chest, side: int) -> np.ndarray:
    if ("lung_mask", side) not in chest.cache:
        chest.cache["lung_mask", side] = blur(chest.lungs[side].astype(np.float32), 1.5)
    return chest.cache["lung_mask", side]


def visible_box(density: np.ndarray, chest: Chest, rng: np.random.Generator, level: float = 0.3,
                win: tuple[slice, slice] | None = None) -> np.ndarray | None:
    """Bounding box of where ``density`` (the window ``win`` of the canvas) exceeds ``level`` of its
    visible peak, with a reader's margin."""
    win = win or (slice(0, chest.shape[0]), slice(0, chest.shape[1]))
    visible = density * (1 - 0.8 * chest.heart[win])
    peak = visible.max()
    if peak <= 0:
        return None
    ys, xs = np.nonzero(visible > level * peak)
    if len(xs) < 12:
        return None
    x1, y1 = xs.min() + win[1].start, ys.min() + win[0].start
    x2, y2 = xs.max() + 1 + win[1].start, ys.max() + 1 + win[0].start
    mx, my = (x2 - x1) * rng.uniform(0.02, 0.12) + 2, (y2 - y1) * rng.uniform(0.02, 0.12) + 2
    h, w = chest.shape
    return np.array([max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)], np.float64)


def sample_center(chest: Chest, rng: np.random.Generator, side: int, weight) -> tuple[float, float]:
    """A point of one lung drawn with probability ``weight(u, v)`` (u: 0 medial..1 lateral, v: 0 apex..1 base)."""
    points, u, v = chest.lung_coords(side)
    hidden = chest.heart[points[:, 1].astype(int), points[:, 0].astype(int)]  # behind the heart
    w = np.asarray(weight(u, v), np.float64) * (1 - 0.95 * hidden) + 1e-9
    return tuple(points[rng.choice(len(points), p=w / w.sum())])


def merge_boxes(boxes: list[np.ndarray], iou: float = 0.25, cover: float = 0.6) -> list[np.ndarray]:
    """Union boxes that overlap heavily (IoU above ``iou`` or one mostly inside the other)."""
    boxes = [b.copy() for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                iw = min(a[2], b[2]) - max(a[0], b[0])
                ih = min(a[3], b[3]) - max(a[1], b[1])
                if iw <= 0 or ih <= 0:
                    continue
                inter = iw * ih
                area_a = (a[2] - a[0]) * (a[3] - a[1])
                area_b = (b[2] - b[0]) * (b[3] - b[1])
                if inter / (area_a + area_b - inter) > iou or inter / min(area_a, area_b) > cover:
                    boxes[i] = np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


# ---------------------------------------------------------------------------------------------
# opacities


def full_window(chest: Chest) -> tuple[slice, slice]:
    return slice(0, chest.shape[0]), slice(0, chest.shape[1])


def ground_glass(chest: Chest, rng: np.random.Generator, side: int, center, radius: float,
                 amplitude: float, zone: bool = False) -> Lesion | None:
    """Hazy, low-contrast opacity with soft edges: vessels stay visible through it.

    ``zone``: part of a zone's opacity, drawn in a window and as a union with the others (``opacify``).
    """
    edge = 0.3 * radius
    mask = irregular_mask(rng, chest.shape, center, radius, edge=edge, coarse=zone)
    win = roi(center, radius * 2.2 + 3 * edge, chest.shape) if zone else full_window(chest)  # mask > 0 inside
    texture = 1 + 0.15 * smooth_noise(rng, mask[win].shape, 6.0)
    density = opacify(chest, amplitude * mask[win] * texture * lung_mask(chest, side)[win], win if zone else None)
    box = visible_box(density, chest, rng, win=win if zone else None)
    return None if box is None else Lesion("ggo", side, box, amplitude)


def consolidation(chest: Chest, rng: np.random.Generator, side: int, center, radius: float,
                  amplitude: float, bronchograms: bool | None = None, zone: bool = False) -> Lesion | None:
    """Dense opacity with fairly sharp edges, a hazy rim, and sometimes air bronchograms (``zone``: as in
    ``ground_glass``)."""
    core = irregular_mask(rng, chest.shape, center, radius, edge=0.12 * radius + 1, lobes=(2, 5), coarse=zone)
    rim = irregular_mask(rng, chest.shape, center, radius * 1.3, edge=0.25 * radius, coarse=zone)
    win = roi(center, radius * 1.3 * 2.2 + 0.75 * radius, chest.shape) if zone else full_window(chest)
    core, rim = core[win], rim[win]
    fraction = amplitude * np.maximum(core, 0.35 * rim) * (1 + 0.06 * smooth_noise(rng, core.shape, 6.0))
    if bronchograms if bronchograms is not None else (radius > 0.08 * chest.lung_height and rng.random() < 0.4):
        tubes = air_bronchograms(chest, rng, side)[win]
        fraction -= 0.3 * amplitude * tubes * blur((core > 0.8).astype(np.float32), 2)
    density = opacify(chest, fraction * lung_mask(chest, side)[win], win if zone else None)
    box = visible_box(density, chest, rng, win=win if zone else None)
    return None if box is None else Lesion("consolidation", side, box, amplitude)


def air_bronchograms(chest: Chest, rng: np.random.Generator, side: int) -> np.ndarray:
    """Thin dark branching tubes from the hilum (air in the bronchi inside an opacity)."""
    tree = vessel_tree(chest.shape, chest.hila[side], side, chest.lung_height, rng, density=0.5, width0=2.0)
    return blur(np.clip(tree, 0, 1), 0.7)


def nodule(chest: Chest, rng: np.random.Generator, side: int, center, radius: float,
           amplitude: float, kind: str = "nodule") -> Lesion | None:
    """A round, well-defined, slightly lobulated opacity."""
    mask = np.zeros(chest.shape, np.float32)
    angle = rng.uniform(0, 180)
    axes = (int(radius * 4 * rng.uniform(0.85, 1.0)), int(radius * 4 * rng.uniform(0.85, 1.0)))
    cv2.ellipse(mask, (int(center[0] * 4), int(center[1] * 4)), axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA, 2)
    mask = blur(mask, max(0.8, 0.1 * radius))
    density = opacify(chest, amplitude * mask * lung_mask(chest, side))
    box = visible_box(density, chest, rng, level=0.4)
    return None if box is None else Lesion(kind, side, box, amplitude)


def cavity(chest: Chest, rng: np.random.Generator, side: int, center, radius: float,
           amplitude: float) -> Lesion | None:
    """A thick-walled ring with a lucent centre."""
    wall = irregular_mask(rng, chest.shape, center, radius, edge=0.08 * radius + 1, lobes=(2, 4))
    hole = np.zeros(chest.shape, np.float32)
    cv2.circle(hole, (int(center[0] * 4), int(center[1] * 4)), int(radius * 0.45 * 4), 1.0, -1, cv2.LINE_AA, 2)
    density = opacify(chest, amplitude * wall * (1 - blur(hole, 1.5)) * lung_mask(chest, side))
    box = visible_box(density, chest, rng)
    return None if box is None else Lesion("cavity", side, box, amplitude)


def lobe_mask(chest: Chest, rng: np.random.Generator, side: int, lobe: str) -> np.ndarray:
    """One lobe of a lung as seen on a frontal film, as a soft mask.

    Only the right upper lobe has a sharp lower edge (the horizontal fissure); the other lobes
    fade out, and the middle lobe hugs the heart border.
    """
    u, v = chest.uv()
    fissure = rng.uniform(0.38, 0.48) + 0.05 * (u - 0.5) ** 2
    ramp = lambda x, width: np.clip(0.5 + x / width, 0, 1)  # noqa: E731  (soft step)
    if lobe == "upper" and side == 0:
        region = ramp(fissure - v, 0.01)
    elif lobe == "upper":
        region = ramp(fissure + 0.12 - v, 0.15)
    elif lobe == "middle":
        region = ramp(v - fissure, 0.01) * ramp(rng.uniform(0.45, 0.6) - u, 0.3) * ramp(0.92 - v, 0.1)
    else:
        region = ramp(v - fissure - rng.uniform(0.05, 0.15), 0.2)
    return region * chest.lungs[side]


def lobar_consolidation(chest: Chest, rng: np.random.Generator, side: int, amplitude: float,
                        segment: float | None = None) -> Lesion | None:
    """Dense consolidation filling (most of) one lobe, with air bronchograms; with ``segment`` (a
    radius, fraction of the lung height) only the part of the lobe around a random point of it."""
    lobe = ("upper", "middle", "lower")[rng.choice(3, p=[0.35, 0.2, 0.45])] if side == 0 else \
        ("upper", "lower")[rng.choice(2, p=[0.4, 0.6])]
    region = lobe_mask(chest, rng, side, lobe)
    ys, xs = np.nonzero(region > 0.5)
    if len(xs) < 50:
        return None
    if segment is not None:
        i = rng.integers(len(xs))
        part = irregular_mask(rng, chest.shape, (xs[i], ys[i]), segment * chest.lung_height,
                              edge=0.1 * segment * chest.lung_height, lobes=(4, 8))
        region = region * np.clip(part * 1.5, 0, 1)
        ys, xs = np.nonzero(region > 0.5)
        if len(xs) < 50:
            return None
    center = (xs.mean(), ys.mean())
    radius = 0.6 * max(np.ptp(xs), np.ptp(ys))
    cover = irregular_mask(rng, chest.shape, center, radius, edge=0.08 * radius, lobes=(4, 8))
    cover = np.maximum(cover, rng.uniform(0.8, 0.95))
    fraction = amplitude * region * cover * (1 + 0.06 * smooth_noise(rng, chest.shape, 6.0))
    fraction -= 0.3 * amplitude * air_bronchograms(chest, rng, side) * region
    density = opacify(chest, blur(fraction, 1.2) * lung_mask(chest, side))
    box = visible_box(density, chest, rng)
    return None if box is None else Lesion("lobar", side, box, amplitude)


def ggo_amplitude(rng: np.random.Generator) -> float:
    """Ground-glass: from barely visible to obvious haze (fraction of the air replaced)."""
    return float(rng.uniform(0.15, 0.45))


def consolidation_amplitude(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.45, 0.85))


# ---------------------------------------------------------------------------------------------
# SIIM study patterns (the radiological definitions of the four study classes)


def patch(chest: Chest, rng: np.random.Generator, side: int, weight, p_consolidation: float,
          size: tuple[float, float], zone: bool = False) -> Lesion | None:
    """One opacity, ground-glass or consolidation, placed by ``weight`` in one lung."""
    center = sample_center(chest, rng, side, weight)
    radius = chest.lung_height * rng.uniform(*size)
    if rng.random() < p_consolidation:
        return consolidation(chest, rng, side, center, radius * 0.8, consolidation_amplitude(rng), zone=zone)
    return ground_glass(chest, rng, side, center, radius, ggo_amplitude(rng), zone=zone)


@dataclass(frozen=True)
class Zone:
    """Part of one lung in thoracic coordinates (u: 0 medial .. 1 lateral, v: 0 apex .. 1 base)."""

    u0: float
    u1: float
    v0: float
    v1: float

    def weight(self, u, v):
        return ((u >= self.u0) & (u <= self.u1) & (v >= self.v0) & (v <= self.v1)).astype(np.float64) + 1e-4


def sample_zone(rng: np.random.Generator, center_v: tuple[float, float], height: float, width: float,
                u_center: float | None = None) -> Zone:
    """A zone whose reader's box is about ``height`` (fraction of the lung height) by ``width`` (fraction
    of a lung's width), centred at height ``N(*center_v)``; lateral (touching the chest wall) unless
    ``u_center`` is given. The patch centres lie inside, the patches reach a little beyond."""
    h = float(np.clip(height * np.exp(rng.normal(0, 0.35)), 0.12, 0.95))
    w = float(np.clip(width * np.exp(rng.normal(0, 0.3)), 0.25, 1.1))
    vc = float(np.clip(rng.normal(*center_v), 0.08 + h / 2, 1.0 - 0.35 * h))
    inner_h, inner_w = max(0.02, h - 0.12), max(0.05, w - 0.2)  # a patch reaches beyond its centre
    if u_center is None:
        u1 = 0.95
        return Zone(u1 - inner_w, u1, vc - inner_h / 2, vc + inner_h / 2)
    uc = float(np.clip(u_center, inner_w / 2, 1 - inner_w / 2))
    return Zone(uc - inner_w / 2, uc + inner_w / 2, vc - inner_h / 2, vc + inner_h / 2)


def zone_opacity(chest: Chest, rng: np.random.Generator, side: int, zone: Zone, region: int,
                 p_consolidation: float) -> list[Lesion]:
    """Multifocal opacity over one zone of a lung: patches spread over it (ground glass, some
    consolidation) and, often, faint confluent ground glass joining them."""
    area = (zone.u1 - zone.u0 + 0.2) * (zone.v1 - zone.v0 + 0.2)
    lesions = []
    for _ in range(int(np.clip(round(area * rng.uniform(8, 14)), 2, 7))):
        lesions.append(patch(chest, rng, side, zone.weight, p_consolidation, (0.06, 0.11), zone=True))
    if rng.random() < 0.6:
        points, u, v = chest.lung_coords(side)
        inside = zone.weight(u, v) > 0.5
        if inside.any():
            center = tuple(points[inside].mean(0))
            radius = 0.5 * chest.lung_height * max(zone.v1 - zone.v0, 0.6 * (zone.u1 - zone.u0), 0.1)
            lesions.append(ground_glass(chest, rng, side, center, radius, 0.6 * ggo_amplitude(rng), zone=True))
    return [replace(x, region=region) for x in lesions if x is not None]


def typical_pattern(chest: Chest, rng: np.random.Generator) -> list[Lesion]:
    """Multifocal, bilateral, peripheral, lower-zone opacities, mostly ground-glass: one reader's box
    per lung (two in one lung when an upper and a lower zone are apart)."""
    n_regions = [1, 1]
    draw = rng.random()
    if draw < 0.012:                      # unilateral (1 box)
        n_regions[int(rng.integers(2))] = 0
    elif draw < 0.075:                    # two separate zones in one lung (3 boxes), rarely in both
        n_regions[int(rng.integers(2))] = 2
        if draw > 0.068:
            n_regions = [2, 2]
    lesions = []
    for side in (0, 1):
        if n_regions[side] == 2:
            zones = [sample_zone(rng, (0.3, 0.04), 0.3, 0.7), sample_zone(rng, (0.78, 0.05), 0.35, 0.8)]
        else:
            zones = [sample_zone(rng, (0.6, 0.09), 0.61, 0.88)][: n_regions[side]]
        for region, zone in enumerate(zones):
            lesions += zone_opacity(chest, rng, side, zone, region, 0.25)
    return lesions


def indeterminate_pattern(chest: Chest, rng: np.random.Generator) -> list[Lesion]:
    """Opacities that are not the typical pattern: unilateral, or central (perihilar), or upper-zone."""
    mode = rng.choice(["unilateral", "central", "upper"], p=[0.62, 0.3, 0.08])
    lesions = []
    if mode == "unilateral":
        side = int(rng.integers(2))
        zones = [sample_zone(rng, (0.72, 0.12), 0.53, 0.78, u_center=rng.uniform(0.3, 0.7))]
        if rng.random() < 0.04:  # and a second zone in the same lung
            zones.append(sample_zone(rng, (0.25, 0.05), 0.25, 0.6, u_center=rng.uniform(0.3, 0.7)))
        for region, zone in enumerate(zones):
            lesions += zone_opacity(chest, rng, side, zone, region, 0.4)
    else:
        sides = [0, 1] if rng.random() < 0.85 else [int(rng.integers(2))]
        for side in sides:
            if mode == "central":
                zone = sample_zone(rng, (0.64, 0.07), 0.52, 0.6, u_center=0.22)
            else:
                zone = sample_zone(rng, (0.32, 0.05), 0.4, 0.8, u_center=rng.uniform(0.4, 0.7))
            lesions += zone_opacity(chest, rng, side, zone, 0, 0.35)
    return lesions


def atypical_pattern(chest: Chest, rng: np.random.Generator) -> list[Lesion]:
    """A lobar (or segmental) consolidation, a nodular pattern, or a cavitating lesion."""
    mode = rng.choice(["lobar", "nodular", "cavity"], p=[0.5, 0.3, 0.2])
    if mode == "lobar":
        sides = [int(rng.integers(2))] if rng.random() < 0.8 else [0, 1]
        lesions = [lobar_consolidation(chest, rng, side, rng.uniform(0.7, 0.95),
                                       segment=rng.uniform(0.4, 0.55)) for side in sides]
    elif mode == "nodular":
        lesions = []
        sides = [0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]
        for side in sides:
            zone = sample_zone(rng, (0.75, 0.1), 0.65, 0.95, u_center=rng.uniform(0.35, 0.65))
            for _ in range(rng.integers(3, 8)):
                center = sample_center(chest, rng, side, zone.weight)
                lesions.append(nodule(chest, rng, side, center, chest.lung_height * rng.uniform(0.018, 0.04),
                                      rng.uniform(0.35, 0.7)))
    else:
        sides = [int(rng.integers(2))] if rng.random() < 0.85 else [0, 1]
        lesions = []
        for side in sides:
            center = sample_center(chest, rng, side, lambda u, v: v ** 2)
            lesions.append(cavity(chest, rng, side, center, chest.lung_height * rng.uniform(0.13, 0.2),
                                  rng.uniform(0.6, 0.9)))
    return [x for x in lesions if x is not None]


STUDY_PATTERNS = {
    "negative": lambda chest, rng: [],
    "typical": typical_pattern,
    "indeterminate": indeterminate_pattern,
    "atypical": atypical_pattern,
}


def draw_study_pattern(chest: Chest, rng: np.random.Generator, study_class: str) -> list[Lesion]:
    """Draw the lesions of a study class into ``chest``."""
    if study_class not in STUDY_PATTERNS:
        raise ValueError(f"unknown study class {study_class!r}; expected one of {list(STUDY_PATTERNS)}")
    return STUDY_PATTERNS[study_class](chest, rng)


def boxes_of(lesions: list[Lesion]) -> np.ndarray:
    """The readers' canvas boxes ``[N, 4]``: one per (side, region), around all its lesions; boxes
    that overlap heavily are merged, as a reader would draw one box."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for lesion in lesions:
        groups.setdefault((lesion.side, lesion.region), []).append(lesion.box)
    unions = [np.concatenate([np.min(b, 0)[:2], np.max(b, 0)[2:]]) for b in map(np.array, groups.values())]
    return np.array(merge_boxes(unions), np.float64).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14 findings: each visible the way a radiologist would name it


NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]


def anatomy_mods(findings: list[str], rng: np.random.Generator) -> AnatomyMods:
    """The anatomical changes the findings imply (heart size, lung volume, raised diaphragm)."""
    mods = {}
    if "Cardiomegaly" in findings:
        mods["heart_scale"] = rng.uniform(1.25, 1.5)
    if "Fibrosis" in findings:  # volume loss; with emphysema as well the volumes stay (emphysema overrides)
        mods["lung_scale"] = rng.uniform(0.84, 0.93)
    if "Emphysema" in findings:
        mods.update(lung_scale=rng.uniform(1.08, 1.16), dome_scale=rng.uniform(0.25, 0.5),
                    lucency=rng.uniform(1.2, 1.35), vessel_density=rng.uniform(0.45, 0.65))
    if "Atelectasis" in findings:
        lift = [0.0, 0.0]
        lift[int(rng.integers(2))] = rng.uniform(0.06, 0.12)
        mods["dome_lift"] = tuple(lift)
    return AnatomyMods(**mods)


def effusion(chest: Chest, rng: np.random.Generator, side: int | None = None) -> None:
    """Pleural fluid at a base: a meniscus rising laterally, the costophrenic angle blunted."""
    sides = [side] if side is not None else ([0, 1] if rng.random() < 0.3 else [int(rng.integers(2))])
    u, v = chest.uv()
    for s in sides:
        surface = 1 - rng.uniform(0.12, 0.4) - 0.2 * np.clip(u, 0, 1.2) ** 3  # meniscus: rising along the wall
        fluid = np.clip((v - surface) / 0.06, 0, 1) * lung_mask(chest, s)
        opacify(chest, fluid)
        chest.add("lesions", rng.uniform(0.02, 0.06) * fluid)  # the fluid layer is thicker than the lung it displaces


def pneumothorax(chest: Chest, rng: np.random.Generator) -> None:
    """Air between lung and chest wall: a rim without lung markings, bounded by a pleural line."""
    side = int(rng.integers(2))
    lung = chest.lungs[side].astype(np.uint8)
    dist = cv2.distanceTransform(lung, cv2.DIST_L2, 5)
    u, v = chest.uv()
    # widest at the apex and along the upper lateral wall, tapering toward the base and the hilum
    reach = np.maximum(np.clip(1.1 - v, 0, 1) * np.clip((u - 0.2) / 0.3, 0, 1), np.clip((0.3 - v) / 0.15, 0, 1))
    rim = ((dist < chest.hw * rng.uniform(0.08, 0.3) * reach) & (lung > 0)).astype(np.uint8)
    pleura = cv2.dilate(rim, np.ones((3, 3), np.uint8)) & lung & (1 - rim)  # the visceral pleural line
    rim = blur(rim.astype(np.float32), 1.0)
    chest.layers["vessels"] = chest.layers["vessels"] * (1 - rim)
    chest.add("lesions", -0.08 * rim + 0.12 * blur(pleura.astype(np.float32), 0.7))


def edema(chest: Chest, rng: np.random.Generator) -> None:
    """Bilateral perihilar haze (bat wing) with septal lines at the bases."""
    h, w = chest.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    haze = np.zeros(chest.shape, np.float32)
    for side in (0, 1):
        hx, hy = chest.hila[side]
        r = chest.hw * rng.uniform(0.45, 0.7)
        haze += np.exp(-((xs - hx) ** 2 + (ys - hy) ** 2) / (2 * r ** 2)) * lung_mask(chest, side)
    haze *= 1 + 0.2 * smooth_noise(rng, chest.shape, 12.0)
    lines = np.zeros(chest.shape, np.float32)
    for side in (0, 1):
        s = -1 if side == 0 else 1
        for _ in range(rng.integers(4, 10)):
            y = chest.base_y - chest.lung_height * rng.uniform(0.05, 0.25)
            x = chest.cx + s * chest.hw * rng.uniform(0.8, 0.98)
            stroke(chest.shape, np.array([[x, y], [x - s * chest.hw * rng.uniform(0.06, 0.12), y]]), 1.0, 1.0, lines)
    opacify(chest, rng.uniform(0.2, 0.4) * haze + 0.3 * blur(lines, 0.7) * chest.lungs.any(0))


def fibrosis(chest: Chest, rng: np.random.Generator) -> None:
    """Coarse reticular (net-like) opacities, peripheral and basal, from the zero crossings of a noise field.

    The net's mesh is a few millimetres to a centimetre (noise scale 4.5-7 canvas pixels, ~0.45 mm
    each), as on radiographs of pulmonary fibrosis; the lungs are smaller (``anatomy_mods``).
    """
    n = smooth_noise(rng, chest.shape, rng.uniform(4.5, 7.0))
    net = np.exp(-(n / 0.25) ** 2)
    u, v = chest.uv()
    u, v = np.clip(u, 0, 1), np.clip(v, 0, 1)
    zone = u ** 1.5 * (v if rng.random() < 0.7 else 1 - v)
    lungs = blur(chest.lungs.any(0).astype(np.float32), 1.5)
    opacify(chest, rng.uniform(0.25, 0.45) * blur(net, 0.7) * zone * lungs)


def pleural_thickening(chest: Chest, rng: np.random.Generator) -> None:
    """A dense band along the chest wall inside the lung edge, or an apical cap, tapering at its ends."""
    side = int(rng.integers(2))
    lung = chest.lungs[side].astype(np.uint8)
    dist = cv2.distanceTransform(lung, cv2.DIST_L2, 5)
    u, v = chest.uv()
    if rng.random() < 0.5:  # apical cap, thickest at the apex
        extent = np.clip(1 - v / 0.18, 0, 1)
    else:  # along the lateral chest wall, thickest in the middle of its length
        lo, length = rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.4)
        extent = np.clip(1 - np.abs(v - lo - length / 2) / (length / 2), 0, 1) * np.clip((u - 0.45) / 0.15, 0, 1)
    thickness = chest.hw * rng.uniform(0.04, 0.08) * np.sqrt(extent)  # a lens: rounded, tapering ends
    band = ((dist < thickness) & (lung > 0)).astype(np.float32)
    opacify(chest, blur(band, 1.5))
    chest.add("lesions", rng.uniform(0.03, 0.07) * blur(band, 1.5))


def hiatal_hernia(chest: Chest, rng: np.random.Generator) -> None:
    """A retrocardiac round soft-tissue mass with an air-fluid level."""
    c = (chest.cx + chest.hw * rng.uniform(0.0, 0.15), chest.base_y - chest.lung_height * rng.uniform(0.18, 0.25))
    r = chest.hw * rng.uniform(0.15, 0.22)
    sac = np.zeros(chest.shape, np.float32)
    cv2.circle(sac, (int(c[0] * 4), int(c[1] * 4)), int(r * 4), 1.0, -1, cv2.LINE_AA, 2)
    air = sac.copy()
    air[int(c[1] - r * rng.uniform(-0.1, 0.3)):] = 0
    chest.add("lesions", 0.03 * blur(sac, 1.5) - 0.18 * blur(air, 1.5))


def atelectasis(chest: Chest, rng: np.random.Generator) -> None:
    """Plate-like (linear) atelectasis: a dense band near a base, on the raised hemidiaphragm's side."""
    lift = chest.mods.dome_lift
    side = int(np.argmax(lift)) if max(lift) > 0 else int(rng.integers(2))
    center = sample_center(chest, rng, side, lambda u, v: v ** 4 * (0.3 + u))
    length = chest.hw * rng.uniform(0.35, 0.6)
    angle = np.deg2rad(rng.uniform(-20, 20))
    d = np.array([np.cos(angle), np.sin(angle)]) * length / 2
    band = stroke(chest.shape, np.array([np.subtract(center, d), np.add(center, d)]),
                  chest.lung_height * rng.uniform(0.025, 0.045))
    opacify(chest, rng.uniform(0.6, 0.9) * blur(band, 1.5) * lung_mask(chest, side))


def _infiltration(chest: Chest, rng: np.random.Generator) -> None:
    for _ in range(rng.choice([1, 2], p=[0.6, 0.4])):
        patch(chest, rng, int(rng.integers(2)), lambda u, v: np.ones_like(u), 0.2, (0.07, 0.15))


def _pneumonia(chest: Chest, rng: np.random.Generator) -> None:
    patch(chest, rng, int(rng.integers(2)), lambda u, v: v + 0.3, 0.7, (0.08, 0.15))


def _consolidation(chest: Chest, rng: np.random.Generator) -> None:
    side = int(rng.integers(2))
    if rng.random() < 0.4:
        lobar_consolidation(chest, rng, side, rng.uniform(0.55, 0.9))
    else:
        patch(chest, rng, side, lambda u, v: np.ones_like(u), 1.0, (0.08, 0.15))


def _mass(chest: Chest, rng: np.random.Generator) -> None:
    side = int(rng.integers(2))
    center = sample_center(chest, rng, side, lambda u, v: np.ones_like(u))
    nodule(chest, rng, side, center, chest.lung_height * rng.uniform(0.06, 0.11), rng.uniform(0.55, 0.85), "mass")


def _nodules(chest: Chest, rng: np.random.Generator) -> None:
    for _ in range(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])):
        side = int(rng.integers(2))
        center = sample_center(chest, rng, side, lambda u, v: np.ones_like(u))
        nodule(chest, rng, side, center, chest.lung_height * rng.uniform(0.015, 0.035), rng.uniform(0.35, 0.7))


# Cardiomegaly and Emphysema live in the anatomy (see anatomy_mods); Atelectasis has both.
FINDING_DRAWERS = {
    "Atelectasis": atelectasis,
    "Cardiomegaly": lambda chest, rng: None,
    "Effusion": effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodules,
    "Pneumonia": _pneumonia,
    "Pneumothorax": pneumothorax,
    "Consolidation": _consolidation,
    "Edema": edema,
    "Emphysema": lambda chest, rng: None,
    "Fibrosis": fibrosis,
    "Pleural_Thickening": pleural_thickening,
    "Hernia": hiatal_hernia,
}


def draw_findings(chest: Chest, rng: np.random.Generator, findings: list[str]) -> None:
    """Draw NIH findings into a chest rendered with ``anatomy_mods(findings)``."""
    for name in findings:
        if name not in FINDING_DRAWERS:
            raise ValueError(f"unknown finding {name!r}; expected one of {NIH_FINDINGS}")
        FINDING_DRAWERS[name](chest, rng)
