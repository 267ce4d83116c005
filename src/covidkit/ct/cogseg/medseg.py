"""The two public COVID-19 CT segmentation sets of medicalsegmentation.com (MedSeg), as CogSeg used them.

Layouts under ``input_dir`` (the names of the published files)::

    medseg-covid19/          "COVID-19 CT segmentation dataset", 100 axial slices of 512 x 512
        tr_im.nii.gz         images, HU, slices on the last axis
        tr_mask.nii.gz       masks: 0 background, 1 ground-glass, 2 consolidation, 3 pleural effusion
    medseg-radiopaedia/      "Segmentation dataset nr. 2", 9 axial volumes from Radiopaedia (630 x 630 x Z)
        rp_im/1.nii.gz ... rp_im/9.nii.gz      (from rp_im.zip)
        rp_msk/1.nii.gz ... rp_msk/9.nii.gz    (from rp_msk.zip), same labels

Splits as in the paper: MedSeg 70 % train / 30 % test, Radiopaedia the first 6 volumes train, the last 3 test.
Slices are read as ``np.rot90`` of the NIfTI x-y plane (the usual radiological display), lung-windowed to
[0, 1] and resized to a square side.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

MEDSEG_DIR = "medseg-covid19"
MEDSEG_IMAGES = "tr_im.nii.gz"
MEDSEG_MASKS = "tr_mask.nii.gz"
RADIOPAEDIA_DIR = "medseg-radiopaedia"
RP_IMAGES = "rp_im"
RP_MASKS = "rp_msk"
DATASETS = ("medseg", "radiopaedia")

CLASS_NAMES = ("background", "ground-glass", "consolidation", "pleural effusion")
NUM_CLASSES = len(CLASS_NAMES)
LESION_CLASSES = (1, 2, 3)

# Paper augmentation of the small set
PAPER_ROTATIONS = (45, 90, 135, 180, 270)
PAPER_SCALES = (0.5, 0.75, 1.25, 1.5)


@dataclass
class CTSlices:
    """Axial slices: ``images [N, H, W]`` float32 in [0, 1] (lung window), ``masks [N, H, W]`` uint8 labels."""

    images: np.ndarray
    masks: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.shape != self.masks.shape or self.images.ndim != 3:
            raise ValueError(f"images {self.images.shape} and masks {self.masks.shape} must both be [N, H, W]")
        if not self.ids:
            self.ids = [str(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Sequence[int] | slice) -> CTSlices:
        idx = np.arange(len(self))[index]
        return CTSlices(self.images[idx], self.masks[idx], [self.ids[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence[CTSlices]) -> CTSlices:
        return CTSlices(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                        [i for p in parts for i in p.ids])


def lung_window(hu: np.ndarray, center: float = -600.0, width: float = 1500.0) -> np.ndarray:
    """HU -> [0, 1] float32 through the lung window (level -600, width 1500)."""
    low = center - width / 2
    return np.clip((np.asarray(hu, np.float32) - low) / width, 0.0, 1.0)


def nifti_to_slices(volume: np.ndarray) -> np.ndarray:
    """NIfTI ``[X, Y, Z]`` -> ``[Z, H, W]`` display-oriented slices (``np.rot90`` of each x-y plane)."""
    return np.ascontiguousarray(np.rot90(np.moveaxis(volume, -1, 0), k=1, axes=(1, 2)))


def slice_to_nifti(slices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_to_slices`."""
    return np.ascontiguousarray(np.moveaxis(np.rot90(slices, k=-1, axes=(1, 2)), 0, -1))


def read_nifti_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image and a mask NIfTI -> HU ``[N, H, W]`` float32 and labels ``[N, H, W]`` uint8, checked."""
    import nibabel as nib

    for path in (image_path, mask_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"missing {path}")
    image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(str(mask_path)).dataobj)
    if image.ndim == 2:
        image, mask = image[..., None], mask[..., None]
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"{image_path} {image.shape} and {mask_path} {mask.shape} must be matching 3-D volumes")
    mask = np.rint(mask).astype(np.int64)
    bad = sorted(set(np.unique(mask).tolist()) - set(range(NUM_CLASSES)))
    if bad:
        raise ValueError(f"{mask_path}: labels {bad} outside 0..{NUM_CLASSES - 1} ({', '.join(CLASS_NAMES)})")
    return nifti_to_slices(image), nifti_to_slices(mask.astype(np.uint8))


def resize_slices(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square ``size``: images with area (down) or linear (up) interpolation, masks with nearest."""
    if images.shape[1:] == (size, size):
        return images, masks
    interp = cv2.INTER_AREA if size < images.shape[1] else cv2.INTER_LINEAR
    out_images = np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in images])
    out_masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in masks])
    return out_images, out_masks


def _to_slices(hu: np.ndarray, masks: np.ndarray, size: int, prefix: str) -> CTSlices:
    images, masks = resize_slices(lung_window(hu), masks, size)
    return CTSlices(images.astype(np.float32), masks, [f"{prefix}_{i:03d}" for i in range(len(images))])


def load_medseg(root: Path, size: int = 512) -> CTSlices:
    """All slices of ``medseg-covid19/`` (``root`` is that folder)."""
    root = Path(root)
    hu, masks = read_nifti_pair(root / MEDSEG_IMAGES, root / MEDSEG_MASKS)
    return _to_slices(hu, masks, size, "medseg")


def split_medseg(slices: CTSlices, train_fraction: float = 0.7) -> tuple[CTSlices, CTSlices]:
    """The first 70 % train, the rest test.

    The paper gives only the ratio; an ordered split keeps neighbouring slices, often from the same patient,
    on the same side.
    """
    n_train = int(round(len(slices) * train_fraction))
    if not 0 < n_train < len(slices):
        raise ValueError(f"cannot split {len(slices)} slices {train_fraction:.0%} / {1 - train_fraction:.0%}")
    return slices.subset(slice(0, n_train)), slices.subset(slice(n_train, None))


def radiopaedia_volumes(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of ``rp_im/<i>.nii.gz`` / ``rp_msk/<i>.nii.gz``, by volume number."""
    root = Path(root)
    images = {int(re.match(r"\d+", p.name).group()): p for p in (root / RP_IMAGES).glob("*.nii*")
              if re.match(r"\d+\.nii", p.name)}
    if not images:
        raise FileNotFoundError(f"no volumes in {root / RP_IMAGES} (expected 1.nii.gz ... 9.nii.gz from rp_im.zip)")
    pairs = []
    for number in sorted(images):
        mask = root / RP_MASKS / images[number].name
        if not mask.is_file():
            raise FileNotFoundError(f"{images[number]} has no mask {mask}")
        pairs.append((images[number], mask))
    return pairs


def load_radiopaedia(root: Path, size: int = 512, train_volumes: int = 6,
                     lesion_slices_only: bool = False) -> tuple[CTSlices, CTSlices]:
    """Train (first ``train_volumes`` volumes) and test (the rest) slices of ``medseg-radiopaedia/``.

    ``lesion_slices_only`` keeps the slices with at least one lesion pixel (the paper does not say whether it
    did; all slices by default).
    """
    pairs = radiopaedia_volumes(root)
    if len(pairs) <= train_volumes:
        raise ValueError(f"{root}: {len(pairs)} volumes, need more than the {train_volumes} training ones")
    volumes = []
    for image_path, mask_path in pairs:
        hu, masks = read_nifti_pair(image_path, mask_path)
        vol = _to_slices(hu, masks, size, f"rp{image_path.name.split('.')[0]}")
        if lesion_slices_only:
            vol = vol.subset(np.flatnonzero(vol.masks.reshape(len(vol), -1).max(axis=1) > 0))
        volumes.append(vol)
    return CTSlices.concat(volumes[:train_volumes]), CTSlices.concat(volumes[train_volumes:])


def load_ct_dataset(input_dir: Path, dataset: str, size: int = 512) -> tuple[CTSlices, CTSlices]:
    """(train, test) of ``"medseg"`` or ``"radiopaedia"`` from their folders in ``input_dir``."""
    input_dir = Path(input_dir)
    if dataset == "medseg":
        return split_medseg(load_medseg(input_dir / MEDSEG_DIR, size))
    if dataset == "radiopaedia":
        return load_radiopaedia(input_dir / RADIOPAEDIA_DIR, size)
    raise ValueError(f"unknown CT dataset {dataset!r}; known: {', '.join(DATASETS)}")


def _warp(image: np.ndarray, mask: np.ndarray, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
    out_image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=float(image.min()))
    out_mask = cv2.warpAffine(mask, matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    return out_image, out_mask


def augment_paper(slices: CTSlices, rotations: Sequence[float] = PAPER_ROTATIONS,
                  scales: Sequence[float] = PAPER_SCALES) -> CTSlices:
    """The originals plus each rotation (degrees) and each scale (about the centre) of every slice.

    With the paper's 5 rotations and 4 scales the set grows tenfold; areas uncovered by the transform are
    filled with the slice's minimum (air) and background label.
    """
    transforms = [(a, 1.0, f"rot{a:g}") for a in rotations] + [(0.0, s, f"scale{s:g}") for s in scales]
    images, masks, ids = [slices.images], [slices.masks], list(slices.ids)
    for angle, scale, name in transforms:
        warped = [_warp(im, m, angle, scale) for im, m in zip(slices.images, slices.masks)]
        images.append(np.stack([w[0] for w in warped]))
        masks.append(np.stack([w[1] for w in warped]))
        ids += [f"{i}_{name}" for i in slices.ids]
    return CTSlices(np.concatenate(images), np.concatenate(masks), ids)


class CTSegDataset(Dataset):
    """Training pairs: the slice downsampled by ``scale`` (the network input) and the full-resolution slice and mask.

    Items: ``(low [1, H/s, W/s], image [1, H, W], mask [H, W] long)``.
    """

    def __init__(self, slices: CTSlices, scale: int = 2):
        h, w = slices.images.shape[1:]
        if h % scale or w % scale:
            raise ValueError(f"slices of {h}x{w} do not divide by the downsampling factor {scale}")
        low = [cv2.resize(im, (w // scale, h // scale), interpolation=cv2.INTER_AREA) for im in slices.images]
        self.low = torch.from_numpy(np.stack(low)).unsqueeze(1)
        self.images = torch.from_numpy(slices.images).unsqueeze(1)
        self.masks = torch.from_numpy(slices.masks.astype(np.int64))

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.low[i], self.images[i], self.masks[i]
