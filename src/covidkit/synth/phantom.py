"""A chest radiograph phantom: anatomy on a working canvas, then an acquisition to full size.

The phantom is built in a radiodensity space (higher = more attenuating = brighter on a
MONOCHROME2 display) on a square canvas of ``CANVAS`` pixels, from separate layers (body,
lungs, mediastinum, bones, vessels, devices, lesions) so that findings can edit one layer
(a pneumothorax removes the lung markings, emphysema darkens the lungs). ``develop`` turns
the layers into a processed radiograph at canvas resolution; ``acquire`` warps it to the
detector size with cubic interpolation (scale, small rotation and shift: the lungs are never
at a fixed place) and adds full-resolution quantum noise.

Image left is the patient's right, as on a PA radiograph: side 0 is the image-left lung.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.interpolate import splev, splprep

CANVAS = 768  # side of the working canvas, pixels


@dataclass(frozen=True)
class AnatomyMods:
    """Anatomical changes a finding implies (defaults: a normal chest)."""

    heart_scale: float = 1.0            # cardiomegaly: > 1.2
    lung_scale: float = 1.0             # emphysema: larger lungs
    dome_scale: float = 1.0             # emphysema: flat diaphragm (< 1)
    lucency: float = 1.0                # emphysema: darker lungs
    vessel_density: float = 1.0         # emphysema: fewer markings
    dome_lift: tuple[float, float] = (0.0, 0.0)  # atelectasis: raised hemidiaphragm (fraction of lung height)


@dataclass
class Chest:
    """A phantom on the canvas: landmarks, lung masks and the layers it is developed from."""

    cx: float                     # body midline
    apex_y: float                 # lung apices
    base_y: float                 # costophrenic angles
    hw: float                     # half width of the thorax at the lungs
    mediastinum: float            # half width of the upper mediastinum
    hila: list[tuple[float, float]]
    lungs: np.ndarray             # [2, H, W] bool, image-left and image-right lung
    heart: np.ndarray             # [H, W] float32 soft mask
    body: np.ndarray              # [H, W] float32 soft mask
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    severity: float = 1.0         # scales every opacity drawn (< 1: a faint study nobody boxed)
    mods: AnatomyMods = AnatomyMods()
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # of the fixed masks

    @property
    def shape(self) -> tuple[int, int]:
        return self.lungs.shape[1:]

    @property
    def lung_height(self) -> float:
        return self.base_y - self.apex_y

    def add(self, name: str, layer: np.ndarray) -> None:
        """Add ``layer`` onto the layer ``name`` (created when missing)."""
        if name in self.layers:
            self.layers[name] = self.layers[name] + layer
        else:
            self.layers[name] = layer.astype(np.float32)

    def uv(self) -> tuple[np.ndarray, np.ndarray]:
        """Thoracic coordinates of every canvas pixel: ``u`` 0 at the mediastinum .. 1 at the
        lateral lung edge (either side), ``v`` 0 at the apices .. 1 at the costophrenic angles."""
        h, w = self.shape
        xs = np.abs(np.arange(w, dtype=np.float32) - self.cx)[None, :]
        ys = np.arange(h, dtype=np.float32)[:, None]
        u = (xs - self.mediastinum) / (self.hw - self.mediastinum)
        v = (ys - self.apex_y) / self.lung_height
        return np.broadcast_to(u, (h, w)), np.broadcast_to(v, (h, w))

    def lung_coords(self, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixels of one lung on a 4 px grid: ``(points [N, 2] as x, y; u [N]; v [N])``, u and v as in ``uv``."""
        if ("coords", side) in self.cache:
            return self.cache["coords", side]
        ys, xs = np.nonzero(self.lungs[side, ::4, ::4])
        xs, ys = xs * 4 + 2, ys * 4 + 2
        lateral = np.abs(xs - self.cx)
        u = np.clip((lateral - self.mediastinum) / (self.hw - self.mediastinum), 0, 1)
        v = np.clip((ys - self.apex_y) / self.lung_height, 0, 1)
        self.cache["coords", side] = np.stack([xs, ys], axis=1).astype(np.float64), u, v
        return self.cache["coords", side]


# ---------------------------------------------------------------------------------------------
# drawing helpers

def smooth_curve(points: np.ndarray, n: int = 200, closed: bool = False) -> np.ndarray:
    """A cubic spline through control points ``[K, 2]`` -> ``[n, 2]``."""
    k = min(3, len(points) - 1)
    tck, _ = splprep(points.T, s=0, k=k, per=int(closed))
    x, y = splev(np.linspace(0, 1, n), tck)
    return np.stack([x, y], axis=1)


def fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 4).astype(np.int32)], 1, lineType=cv2.LINE_AA, shift=2)
    return mask.astype(np.float32)


def stroke(shape: tuple[int, int], curve: np.ndarray, thickness: float, value: float = 1.0,
           layer: np.ndarray | None = None) -> np.ndarray:
    """Draw a polyline; thin strokes (< 1 px) are drawn 1 px wide and dimmed."""
    layer = np.zeros(shape, np.float32) if layer is None else layer
    t = max(1, int(round(thickness)))
    value = value * min(1.0, thickness)
    cv2.polylines(layer, [np.round(curve * 4).astype(np.int32)], False, float(value), t, cv2.LINE_AA, 2)
    return layer


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide ones are done at a lower resolution (same result to the eye, 10x faster)."""
    if sigma <= 0:
        return img
    if sigma < 8 or min(img.shape) < 64:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    f = sigma / 3
    h, w = img.shape
    small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), 3), (w, h), interpolation=cv2.INTER_LINEAR)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise normalised to unit standard deviation (coarse grid when wide)."""
    f = max(1.0, sigma / 2)
    h, w = shape
    small = (max(2, round(h / f)), max(2, round(w / f)))
    n = cv2.GaussianBlur(rng.standard_normal(small, dtype=np.float32), (0, 0), sigma / f)
    if small != shape:
        n = cv2.resize(n, (w, h), interpolation=cv2.INTER_LINEAR)
    return n / (n.std() + 1e-6)


# ---------------------------------------------------------------------------------------------
# anatomy

def lung_outline(cx: float, side: int, apex_y: float, base_y: float, hw: float, med: float,
                 dome_h: float, rng: np.random.Generator) -> np.ndarray:
    """Closed outline of one lung: a smooth upper/lateral border and a diaphragm dome.

    The two curves meet at a sharp costophrenic angle, as on a normal radiograph.
    """
    s = -1.0 if side == 0 else 1.0
    h = base_y - apex_y
    j = lambda scale: 1 + rng.normal(0, scale)  # noqa: E731  (small multiplicative jitter)
    cp = (0.96 * hw * j(0.02), base_y)
    dome_top = base_y - dome_h
    medial_base = (med * 1.25 * j(0.1), dome_top + 0.25 * dome_h)
    upper = np.array([
        medial_base,
        (med * 1.05, apex_y + 0.55 * h),
        (med * 0.95, apex_y + 0.2 * h),
        (0.35 * hw * j(0.06), apex_y + 0.015 * h),
        (0.55 * hw * j(0.05), apex_y + 0.02 * h * j(0.5)),
        (0.82 * hw * j(0.03), apex_y + 0.2 * h * j(0.08)),
        (0.98 * hw * j(0.02), apex_y + 0.55 * h * j(0.05)),
        cp,
    ])
    dome = np.array([
        cp,
        (0.78 * hw, dome_top + 0.45 * dome_h * j(0.1)),
        (0.5 * hw * j(0.05), dome_top),
        medial_base,
    ])
    curve = np.concatenate([smooth_curve(upper, 160), smooth_curve(dome, 80)[1:]])
    return np.stack([cx + s * curve[:, 0], curve[:, 1]], axis=1)


def body_outline(cx: float, apex_y: float, hw: float, height: int, rng: np.random.Generator) -> np.ndarray:
    """Neck, shoulders (often running off the film) and chest wall down to the bottom of the canvas."""
    wall = hw * rng.uniform(1.1, 1.25)
    neck = hw * rng.uniform(0.3, 0.4)
    shoulder = hw * rng.uniform(1.4, 1.75)
    right = np.array([
        (neck, -10),
        (neck * 1.2, apex_y - 0.45 * hw),
        (shoulder * 0.7, apex_y - 0.4 * hw * rng.uniform(0.7, 1.3)),
        (shoulder, apex_y - 0.05 * hw),
        (wall * 1.05, apex_y + 0.8 * hw),
        (wall, apex_y + 1.6 * hw),
        (wall * rng.uniform(0.95, 1.08), height + 10),
    ])
    right = smooth_curve(right, 120)
    left = right[::-1] * np.array([-1, 1])
    outline = np.concatenate([left, right])
    return outline + np.array([cx, 0])


def heart_mask(shape: tuple[int, int], cx: float, apex_y: float, base_y: float, hw: float,
               scale: float, rng: np.random.Generator) -> np.ndarray:
    """Cardiac silhouette and aortic knob: a small right border, a long left border down to the apex."""
    h = base_y - apex_y
    j = lambda: rng.uniform(0.92, 1.08)  # noqa: E731
    hs = scale
    bottom = base_y - 0.16 * h
    pts = np.array([
        (cx - 0.2 * hw * j(), apex_y + 0.4 * h),           # superior vena cava
        (cx - 0.28 * hw * hs * j(), apex_y + 0.64 * h),    # right atrium
        (cx - 0.24 * hw * hs * j(), bottom),               # right cardiophrenic angle
        (cx + 0.2 * hw * hs, bottom + 0.05 * h),
        (cx + 0.55 * hw * hs * j(), bottom - 0.02 * h),    # apex of the left ventricle
        (cx + 0.5 * hw * hs * j(), apex_y + 0.66 * h),     # left ventricle
        (cx + 0.33 * hw * hs ** 0.5 * j(), apex_y + 0.5 * h),  # left atrial appendage
        (cx + 0.3 * hw * j(), apex_y + 0.4 * h),           # pulmonary trunk
        (cx + 0.3 * hw * j(), apex_y + 0.3 * h),           # aortic knob
        (cx + 0.16 * hw, apex_y + 0.2 * h),
        (cx - 0.18 * hw, apex_y + 0.24 * h),
    ])
    return fill(shape, smooth_curve(pts, 200, closed=True))


def rib_curves(cx: float, side: int, apex_y: float, h: float, hw: float, rng: np.random.Generator
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Posterior ribs (arching out from the spine, then down the chest wall) and their anterior
    parts (running down and medially from the chest wall, fading at the costal cartilage)."""
    s = -1.0 if side == 0 else 1.0
    t = np.linspace(0, 1, 40)
    posterior, anterior = [], []
    y = apex_y - 0.05 * h
    for i in range(11):
        spacing = h * (0.072 + 0.005 * i) * rng.uniform(0.95, 1.05)
        reach = 1.12 * hw * min(1.0, 0.55 + 0.2 * i)
        d = 0.08 * hw + t * reach
        yy = y + h * (-0.3 * t + 0.32 * t ** 2 + 0.13 * t ** 3)
        posterior.append(np.stack([cx + s * d, yy], axis=1))
        if 1 <= i < 8:
            ta = np.linspace(0, 1, 30)
            da = d[-1] - ta * (d[-1] - 0.32 * hw)
            ya = yy[-1] - 0.02 * h + 0.18 * h * ta - 0.06 * h * np.sin(np.pi * ta)
            anterior.append(np.stack([cx + s * da, ya], axis=1))
        y += spacing
    return posterior, anterior


def vessel_tree(shape: tuple[int, int], root: tuple[float, float], side: int, h: float,
                rng: np.random.Generator, density: float = 1.0, width0: float = 5.0) -> np.ndarray:
    """Branching lines from a hilum: a random binary tree whose branches thin, shorten and fade."""
    s = -1.0 if side == 0 else 1.0
    layer = np.zeros(shape, np.float32)
    n_main = max(3, int(round(6 * density)))
    stack = []
    for angle in np.linspace(-75, 80, n_main) + rng.normal(0, 8, n_main):
        stack.append((root[0], root[1], np.deg2rad(angle), 0.13 * h * rng.uniform(0.8, 1.2), width0))
    while stack:
        x, y, ang, length, width = stack.pop()
        if length < 5 or width < 0.5:
            continue
        # two slightly bent segments per branch; gravity makes vessels droop toward the bases
        bend = ang + rng.normal(0, 0.15)
        xm, ym = x + s * np.cos(ang) * length / 2, y + np.sin(ang) * length / 2 + 0.05 * length
        x2, y2 = xm + s * np.cos(bend) * length / 2, ym + np.sin(bend) * length / 2 + 0.07 * length
        stroke(shape, np.array([[x, y], [xm, ym], [x2, y2]]), width, (width / width0) ** 0.5, layer)
        for spread in (rng.uniform(12, 32), -rng.uniform(12, 32)):
            if rng.random() < 0.8 * density ** 0.3:
                stack.append((x2, y2, ang + np.deg2rad(spread), length * rng.uniform(0.68, 0.85),
                              width * rng.uniform(0.6, 0.75)))
    return layer


def clavicle(cx: float, side: int, apex_y: float, hw: float, h: float, rng: np.random.Generator) -> np.ndarray:
    s = -1.0 if side == 0 else 1.0
    lift = rng.uniform(-0.06, 0.04) * h
    pts = np.array([
        (0.1 * hw, apex_y + 0.03 * h),
        (0.4 * hw, apex_y + 0.0 * h + lift),
        (0.75 * hw, apex_y - 0.04 * h + lift),
        (1.05 * hw, apex_y - 0.1 * h + 1.5 * lift),
    ])
    curve = smooth_curve(pts, 60)
    return np.stack([cx + s * curve[:, 0], curve[:, 1]], axis=1)


def spine(shape: tuple[int, int], cx: float, hw: float, rng: np.random.Generator) -> np.ndarray:
    """Vertebral column: a bright band with endplates and pedicles."""
    height, width = shape
    layer = np.zeros(shape, np.float32)
    half = 0.085 * hw
    cv2.rectangle(layer, (int(cx - half), 0), (int(cx + half), height), 0.7, -1)
    step = 0.12 * hw * rng.uniform(0.9, 1.1)
    for y in np.arange(rng.uniform(0, step), height, step):
        cv2.line(layer, (int(cx - half), int(y)), (int(cx + half), int(y)), 0.9, 2)
        for s in (-1, 1):
            cv2.ellipse(layer, (int(cx + s * half * 0.7), int(y + step / 2)), (3, 5), 0, 0, 360, 0.9, 1)
    return blur(layer, 2.0)


def render_anatomy(rng: np.random.Generator, mods: AnatomyMods = AnatomyMods(),
                   view: str = "PA", female: bool = False) -> Chest:
    """Sample and draw a chest: body, lungs, mediastinum, heart, bones and lung markings."""
    shape = (CANVAS, CANVAS)
    size = rng.uniform(0.9, 1.08)  # patient size
    hw = CANVAS * 0.3 * size * mods.lung_scale ** 0.5 * rng.uniform(0.94, 1.06)
    h = CANVAS * 0.55 * size * mods.lung_scale * rng.uniform(0.9, 1.08)
    cx = CANVAS / 2 + rng.normal(0, 6)
    apex_y = CANVAS * 0.2 + rng.normal(0, 8) - (mods.lung_scale - 1) * 40
    base_y = apex_y + h
    med = 0.17 * hw * rng.uniform(0.85, 1.15) * (1.15 if view == "AP" else 1.0)

    lungs = np.zeros((2, *shape), bool)
    hila = []
    for side in (0, 1):
        dome_h = 0.2 * h * rng.uniform(0.8, 1.2) * mods.dome_scale
        side_base = base_y + (0.035 * h if side == 1 else 0.0) - mods.dome_lift[side] * h
        side_hw = hw * (0.95 if side == 1 else 1.0)
        outline = lung_outline(cx, side, apex_y, side_base, side_hw, med, dome_h, rng)
        lungs[side] = fill(shape, outline) > 0.5
        s = -1 if side == 0 else 1
        hila.append((cx + s * (med + 0.1 * hw), apex_y + 0.42 * h + rng.normal(0, 0.02 * h)))

    body = blur(fill(shape, body_outline(cx, apex_y, hw, CANVAS, rng)), 3)
    heart = blur(heart_mask(shape, cx, apex_y, base_y, hw, mods.heart_scale, rng), 2.0)
    chest = Chest(cx=cx, apex_y=apex_y, base_y=base_y, hw=hw, mediastinum=med, hila=hila,
                  lungs=lungs, heart=heart, body=body, mods=mods)

    # Soft tissue: thicker at the midline; a breast shadow over the lower lungs in some women.
    xs = np.arange(CANVAS, dtype=np.float32)
    thickness = np.sqrt(np.clip(1 - ((xs - cx) / (1.5 * hw)) ** 2, 0.05, 1))[None, :]
    chest.add("body", body * (0.55 + 0.35 * thickness))
    if female and rng.random() < 0.7:
        breast = np.zeros(shape, np.float32)
        for s in (-1, 1):
            c = (int((cx + s * 0.62 * hw) * 4), int((base_y - 0.22 * h) * 4))
            axes = (int(0.5 * hw * 4 * rng.uniform(0.9, 1.1)), int(0.3 * h * 4 * rng.uniform(0.9, 1.1)))
            cv2.ellipse(breast, c, axes, 0, 0, 180, 1.0, -1, cv2.LINE_AA, 2)
        chest.add("body", blur(breast, 6) * rng.uniform(0.04, 0.09) * body)

    # Lungs: air lowers the density, more so away from the chest wall (thicker lung); the heart
    # hides most of the lung behind it.
    depth = np.zeros(shape, np.float32)
    for side in (0, 1):
        dist = cv2.distanceTransform(lungs[side].astype(np.uint8), cv2.DIST_L2, 5)
        depth = np.maximum(depth, 1 - np.exp(-dist / (0.05 * h)))
    vertical = np.clip((np.arange(CANVAS) - apex_y) / h, 0, 1)[:, None]
    depth = blur(depth, 1.5) * (0.78 + 0.22 * np.sin(np.pi * vertical * 0.9)).astype(np.float32)
    depth *= 1 - 0.7 * heart
    chest.add("lungs", -0.5 * mods.lucency * depth * rng.uniform(0.9, 1.1))
    chest.add("lungs", 0.01 * smooth_noise(rng, shape, 3.0) * depth)  # parenchymal texture

    # Mediastinum and heart; the trachea and main bronchi are air in the mediastinum.
    mediastinum = np.zeros(shape, np.float32)
    cv2.rectangle(mediastinum, (int(cx - med), 0), (int(cx + med), int(base_y)), 1.0, -1)
    mediastinum = blur(np.maximum(mediastinum, heart), 3)
    chest.add("mediastinum", mediastinum * 0.05 + heart * 0.02)
    trachea = np.zeros(shape, np.float32)
    carina = (cx + 0.02 * hw, apex_y + 0.33 * h)
    tw = 0.07 * hw
    cv2.line(trachea, (int(cx), 0), (int(carina[0]), int(carina[1])), 1.0, int(tw * 2))
    for s in (-1, 1):
        end = (carina[0] + s * 0.2 * hw, carina[1] + 0.13 * h)
        cv2.line(trachea, (int(carina[0]), int(carina[1])), (int(end[0]), int(end[1])), 0.8, int(tw * 1.3))
    chest.add("mediastinum", -0.08 * blur(trachea, 3))
    chest.add("bones", spine(shape, cx, hw, rng) * 0.04)

    # Bones: ribs (cortex brighter than the marrow), clavicles, a scapula edge in AP films.
    ribs = np.zeros(shape, np.float32)
    cortex = np.zeros(shape, np.float32)
    for side in (0, 1):
        posterior, anterior = rib_curves(cx, side, apex_y, h, hw, rng)
        for curve in posterior:
            t = 0.04 * h * rng.uniform(0.9, 1.1)
            stroke(shape, curve, t, 1.0, ribs)
            stroke(shape, curve, t, 1.0, cortex)
            stroke(shape, curve, t - 3, -1.0, cortex)
        for curve in anterior:
            stroke(shape, curve, 0.045 * h, 0.4, ribs)
        clav = clavicle(cx, side, apex_y, hw, h, rng)
        stroke(shape, clav, 0.03 * h, 1.2, ribs)
        stroke(shape, clav, 0.03 * h, 0.6, cortex)
    rib_strength = rng.uniform(0.7, 1.3)
    bones = blur(ribs * 0.035 + np.clip(cortex, 0, 1) * 0.035, 1.5) * body * rib_strength * (1 - 0.7 * mediastinum)
    chest.add("bones", bones)
    heads = np.zeros(shape, np.float32)
    for s in (-1, 1):
        c = (int((cx + s * hw * rng.uniform(1.45, 1.65)) * 4), int((apex_y - 0.08 * h) * 4))
        cv2.circle(heads, c, int(0.11 * h * 4), 1.0, -1, cv2.LINE_AA, 2)
    chest.add("bones", blur(heads, 3) * 0.12 * body)
    if view == "AP":
        scap = np.zeros(shape, np.float32)
        for s in (-1, 1):
            tri = np.array([(cx + s * 1.15 * hw, apex_y - 0.05 * h), (cx + s * 0.75 * hw, apex_y + 0.1 * h),
                            (cx + s * 1.05 * hw, apex_y + 0.55 * h)])
            scap += fill(shape, tri)
        chest.add("bones", blur(scap, 5) * 0.04 * body)

    # Lung markings, dense at the hila and fading toward the periphery.
    vessels = np.zeros(shape, np.float32)
    hilum = np.zeros(shape, np.float32)
    for side in (0, 1):
        vessels += vessel_tree(shape, hila[side], side, h, rng, mods.vessel_density)
        cv2.circle(hilum, (int(hila[side][0]), int(hila[side][1])), int(0.05 * h), 1.0, -1)
    lung_any = blur(lungs.any(axis=0).astype(np.float32), 2)
    chest.add("vessels", (blur(vessels, 1.0) * 0.06 + blur(hilum, 0.05 * h) * 0.08) * lung_any)

    # Below the left dome: a gastric air bubble in some patients.
    if rng.random() < 0.5:
        bubble = np.zeros(shape, np.float32)
        c = (int((cx + 0.45 * hw) * 4), int((base_y + 0.04 * h) * 4))
        cv2.ellipse(bubble, c, (int(0.15 * hw * 4), int(0.05 * h * 4)), 0, 0, 360, 1, -1, cv2.LINE_AA, 2)
        chest.add("body", -0.1 * blur(bubble, 4) * (1 - lungs[1]))
    return chest


# ---------------------------------------------------------------------------------------------
# devices (independent of any label)

def add_devices(chest: Chest, rng: np.random.Generator, p: float = 0.3) -> None:
    """ECG electrodes and leads, a tube or line: bright metal and plastic on some films."""
    if rng.random() > p:
        return
    shape = chest.shape
    layer = np.zeros(shape, np.float32)
    cx, hw, h, top = chest.cx, chest.hw, chest.lung_height, chest.apex_y
    for _ in range(rng.integers(0, 5)):
        x, y = cx + rng.uniform(-1.2, 1.2) * hw, top + rng.uniform(-0.2, 1.1) * h
        cv2.circle(layer, (int(x), int(y)), int(rng.uniform(6, 9)), 1.0, 2, cv2.LINE_AA)
        cv2.circle(layer, (int(x), int(y)), 2, 1.0, -1, cv2.LINE_AA)
        wire = np.array([(x, y), (x + rng.normal(0, 60), y + rng.normal(40, 40)),
                         (x + rng.normal(0, 150), CANVAS + 20)])
        stroke(shape, smooth_curve(wire, 60), 1.5, 0.7, layer)
    if rng.random() < 0.5:  # endotracheal tube ending above the carina
        end = top + 0.25 * h
        for dx in (-4, 4):
            cv2.line(layer, (int(cx + dx), 0), (int(cx + dx * 0.8), int(end)), 0.5, 1, cv2.LINE_AA)
    if rng.random() < 0.4:  # central venous line from under a clavicle to the superior vena cava
        s = rng.choice([-1, 1])
        line = np.array([(cx + s * 0.9 * hw, top - 0.05 * h), (cx + s * 0.4 * hw, top + 0.05 * h),
                         (cx - 0.05 * hw, top + 0.3 * h)])
        stroke(shape, smooth_curve(line, 60), 2.0, 0.8, layer)
    if rng.random() < 0.2:  # nasogastric tube down the oesophagus into the stomach
        tube = np.array([(cx + 0.02 * hw, 0), (cx + 0.03 * hw, top + 0.6 * h), (cx + 0.1 * hw, chest.base_y),
                         (cx + 0.45 * hw, chest.base_y + 0.12 * h)])
        stroke(shape, smooth_curve(tube, 80), 2.0, 0.7, layer)
    chest.add("devices", blur(layer, 0.7) * 0.7)


def add_marker(img: np.ndarray, rng: np.random.Generator) -> None:
    """A side marker ('L' or 'R') in a corner, drawn as strokes (no fonts), burnt into ``img``."""
    h, w = img.shape
    size = max(12, int(min(h, w) * rng.uniform(0.025, 0.045)))
    x0 = int(rng.uniform(0.04, 0.12) * w) if rng.random() < 0.5 else int(w - rng.uniform(0.08, 0.16) * w)
    y0 = int(rng.uniform(0.04, 0.12) * h)
    t = max(2, size // 6)
    v = float(rng.uniform(0.85, 1.0))
    if rng.random() < 0.5:  # L
        pts = [(x0, y0), (x0, y0 + size), (x0 + size * 2 // 3, y0 + size)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, v, t)
    else:  # R
        cv2.line(img, (x0, y0), (x0, y0 + size), v, t)
        cv2.ellipse(img, (x0, y0 + size // 4), (size // 3, size // 4), 0, -90, 90, v, t)
        cv2.line(img, (x0, y0 + size // 2), (x0 + size // 2, y0 + size), v, t)


# ---------------------------------------------------------------------------------------------
# developing and acquiring

@dataclass(frozen=True)
class Exposure:
    """How the film was taken and processed (drawn independently of any label)."""

    black: float        # density shown as black
    white: float        # density shown as white
    gamma: float
    equalize: float     # strength of the local contrast equalisation (unsharp mask)
    noise: float        # quantum noise standard deviation at mid grey, full resolution
    structured: float   # low-frequency mottle amplitude
    grid: float         # anti-scatter grid line amplitude (0: none)


def sample_exposure(rng: np.random.Generator, poor: bool = False) -> Exposure:
    exp = Exposure(
        black=rng.uniform(-0.05, 0.12),
        white=rng.uniform(1.0, 1.25),
        gamma=rng.uniform(0.75, 1.35),
        equalize=rng.uniform(0.05, 0.4),
        noise=rng.uniform(0.012, 0.035),
        structured=rng.uniform(0.0, 0.015),
        grid=rng.uniform(0.004, 0.012) if rng.random() < 0.15 else 0.0,
    )
    if poor:  # an underexposed, low contrast film
        exp = Exposure(exp.black - 0.05, exp.white + 0.35, exp.gamma * 1.2, exp.equalize * 0.5,
                       exp.noise * 2.2, exp.structured * 2, exp.grid)
    return exp


def develop(chest: Chest, exposure: Exposure, rng: np.random.Generator) -> np.ndarray:
    """Sum the layers and process them like a CR/DX workstation: window, gamma, equalisation."""
    density = sum(chest.layers.values())
    if exposure.structured:
        density = density + exposure.structured * smooth_noise(rng, chest.shape, 25)
    img = np.clip((density - exposure.black) / (exposure.white - exposure.black), 0, 1) ** exposure.gamma
    img = img + exposure.equalize * (img - blur(img, 40))
    return np.clip(img, 0, 1).astype(np.float32)


def sample_view(chest: Chest, out_hw: tuple[int, int], rng: np.random.Generator,
                stretch: tuple[float, float] = (1.0, 1.0), roi_height: float = 1.3) -> np.ndarray:
    """Affine map canvas -> detector ``[2, 3]``: the thorax framed with jittered zoom, shift, rotation;
    widened by a factor drawn from ``stretch`` (broader chests, as on the landscape SIIM films)."""
    out_h, out_w = out_hw
    roi_w = 2.6 * chest.hw
    roi_h = roi_height * chest.lung_height
    center = np.array([chest.cx, chest.apex_y + 0.52 * chest.lung_height])
    zoom = min(out_w / roi_w, out_h / roi_h) * rng.uniform(0.88, 1.12)
    angle = np.deg2rad(rng.normal(0, 2.0))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom
    if stretch != (1.0, 1.0):
        rot = np.diag([rng.uniform(*stretch), 1.0]) @ rot
    shift = np.array([out_w / 2, out_h / 2]) + rng.normal(0, 0.03, 2) * np.array([out_w, out_h])
    return np.concatenate([rot, (shift - rot @ center)[:, None]], axis=1)


def acquire(developed: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], exposure: Exposure,
            rng: np.random.Generator) -> np.ndarray:
    """Warp the developed canvas onto the detector (cubic) and add full-resolution noise.

    Returns float32 ``[H, W]`` in 0..1, bright = dense (MONOCHROME2 sense).
    """
    out_h, out_w = out_hw
    img = cv2.warpAffine(developed, matrix.astype(np.float32), (out_w, out_h), flags=cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_REPLICATE)
    # Quantum noise: fewer photons reach the detector behind dense tissue, so it is noisier there.
    # Uniform rather than Gaussian draws: twice as fast, and indistinguishable once resampled.
    noise = rng.random((out_h, out_w), dtype=np.float32)
    noise -= 0.5
    noise *= exposure.noise * np.sqrt(12, dtype=np.float32)  # unit standard deviation, then scaled
    gain = img * np.float32(0.8)
    gain += np.float32(0.6)
    gain *= noise
    img += gain
    if exposure.grid:
        period = rng.uniform(3.0, 6.0)
        img += exposure.grid * np.sin(2 * np.pi * np.arange(out_w, dtype=np.float32) / period)[None, :]
    return np.clip(img, 0, 1, out=img)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Canvas boxes ``[N, 4]`` -> bounding boxes of their warped corners, clipped to the image."""
    if len(boxes) == 0:
        return np.zeros((0, 4))
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1]), np.stack([x2, y1]), np.stack([x1, y2]), np.stack([x2, y2])])
    pts = np.einsum("ij,kjn->kin", matrix[:, :2], corners) + matrix[:, 2][None, :, None]  # [4, 2, N]
    out = np.stack([pts[:, 0].min(0), pts[:, 1].min(0), pts[:, 0].max(0), pts[:, 1].max(0)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, out_hw[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, out_hw[0])
    return out
