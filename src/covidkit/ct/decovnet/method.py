"""DeCoVNet end to end: preprocessing, the lung U-Net, the classifier, evaluation and localization.

:func:`run_decovnet` is what stage 11 (``covidkit.stages.ct_decovnet``) calls. For a ``ct-covid-volumes/``
folder (see :mod:`covidkit.ct.decovnet.volumes`) it

1. reads every volume in HU, resamples it to ``target_spacing``, windows it to 8 bits
   ([-1200, 600] HU) and computes its unsupervised lung mask (:mod:`covidkit.ct.decovnet.lungmask`);
2. trains the 2D lung U-Net on axial slices of the training cases with those masks as labels, and
   segments every volume with it, slice by slice;
3. crops each volume and its U-Net lung mask to the lung bounding box and resizes the slices to
   ``input_size`` (224 x 336 in the paper), keeping all slices: the classifier's two input channels, the
   image mapped to 0-1 over ``input_window`` and set to 0 outside the lung mask (``mask_outside_lungs``),
   and the mask;
4. trains DeCoVNet (cross-entropy, Adam with cosine decay, batches of ``batch_size`` volumes padded with
   empty slices to the longest, classes balanced by sampling; by default the released code's augmentation:
   rotation up to 10 degrees, translation up to 10 %, scale 0.8-1.2, shear up to 10 degrees, brightness
   0.5-1.5, contrast 0.7-1.3, no flip; stage 11 uses a milder one, ``covidkit.stages.ct_decovnet.MILD_AUGMENT``);
5. scores the held-out cases (ROC and precision-recall curves with their AUCs, accuracy, sensitivity,
   specificity at 0.5) and localizes the lesion of each one (:mod:`covidkit.ct.decovnet.localize`), with the
   hit rate where lesion masks exist.

Both trainings use the shared engine (:mod:`covidkit.engine`): checkpoints, resume, metrics CSV and
loss plots in ``<work_dir>/lung_unet/`` and ``<work_dir>/classifier/``. The held-out
split is scored every epoch only to draw its curves: the reported model is the last epoch's, no model
is selected on the held-out cases.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import InitVar, asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from covidkit.ct.decovnet.cache import cache_key, data_digest, is_cached, save_npz, source_stamp, weights_digest
from covidkit.ct.decovnet.model import DeCoVNet
from covidkit.deprecated import warn_renamed
from covidkit.ct.decovnet.baselines import hu_histogram, hu_share, histogram_baseline_auc, share_auc
from covidkit.ct.decovnet.localize import (Localization, LocalizationConfig, class_activation_map, hit_rate, is_hit,
                                  localize)
from covidkit.ct.decovnet.lungmask import (LungSliceDataset, LungUNet, UnsupervisedLungConfig, choose_lung_mask,
                                  lung_unet_step, predict_lung_mask, resize_slices, unsupervised_lung_mask)
from covidkit.ct.decovnet.volumes import (LUNG_WINDOW, CTCase, CTVolume, read_cases, read_nifti, read_volume,
                                 resample, window)
from covidkit.engine import TrainConfig, class_balanced_weights, cosine_with_floor, fit, seed_everything
from covidkit.engine.device import model_device

@dataclass
class AugmentConfig:
    """The released code's augmentation: one random affine map for every slice and both channels, then
    brightness and contrast of the image (each slice blended with its own mean, as PIL does)."""

    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    translate: float = 0.1  # fraction of each side, uniform in [-translate, translate]
    scale: tuple[float, float] = (0.8, 1.2)
    shear: float = 10.0  # degrees
    brightness: tuple[float, float] = (0.5, 1.5)  # factor on the 8-bit values
    contrast: tuple[float, float] = (0.7, 1.3)  # factor around each slice's mean


@dataclass
class DeCoVNetConfig:
    """Every knob of the pipeline; the defaults are the paper's where it gives them, except the
    classifier's training (batch, learning rate, schedule, masked image: the README says why)."""

    target_spacing: tuple[float | None, float | None, float | None] = (5.0, 1.0, 1.0)  # mm (z, y, x)
    input_size: tuple[int, int] = (224, 336)  # classifier slices (height, width)
    test_fraction: float = 0.3  # stratified hold-out when labels.csv has no split column
    seed: int = 42
    # lung U-Net
    lung_input_size: int = 256
    lung_width: int = 16
    lung_epochs: int = 10
    lung_batch_size: int = 16
    lung_lr: float = 1e-3
    lung_slices_per_case: int = 32
    lung_min_dice: float = 0.5  # below this Dice with the unsupervised mask, the U-Net's mask is replaced by it
    # classifier
    epochs: int = 100
    lr: float = 1e-3  # Adam, cosine decay to 5 % (the paper: 1e-5, constant, batch 1)
    batch_size: int = 8  # volumes per step; batch norm needs several (the paper: 1)
    weight_decay: float = 0.0
    mask_outside_lungs: bool = True  # the image channel is 0 outside the lung mask (the paper: the whole box)
    # HU mapped to 0-1 in the image channel, clipped (the paper: its 8-bit window, -1200 to 600; None keeps it).
    # Narrow, the aerated lung is 0 like the masked-out body, and what is left is the density above it
    input_window: tuple[float, float] | None = (-800.0, -200.0)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation
    localization: LocalizationConfig = field(default_factory=LocalizationConfig)
    unsupervised: UnsupervisedLungConfig = field(default_factory=UnsupervisedLungConfig)
    num_workers: int = 0
    progress: bool = True
    max_cases: int | None = None  # cases per split, both labels (a dry run); None: all
    max_steps: int | None = None  # optimizer steps per network (a dry run); None: the epochs'
    lung_size: InitVar[int | None] = None  # deprecated name of lung_input_size

    def __post_init__(self, lung_size: int | None) -> None:
        if lung_size is not None:
            warn_renamed("DeCoVNetConfig.lung_size", "DeCoVNetConfig.lung_input_size")
            self.lung_input_size = lung_size




# ---------------------------------------------------------------------------------------------- preprocessing


@dataclass
class PreparedVolume:
    """A volume at the common spacing: 8-bit image, unsupervised lung mask, lesion mask (or None)."""

    image: np.ndarray
    lungs: np.ndarray | None
    lesions: np.ndarray | None
    spacing: tuple[float, float, float]


def prepare_volume(volume: CTVolume, cfg: DeCoVNetConfig, lesions: np.ndarray | None = None,
                   with_unsupervised: bool = True) -> PreparedVolume:
    """Resample to ``cfg.target_spacing``, window to 8 bits, unsupervised lung mask (when asked)."""
    hu, spacing = resample(volume.hu, volume.spacing, cfg.target_spacing, order=1)
    if lesions is not None:
        if lesions.shape != volume.hu.shape:
            raise ValueError(f"lesion mask {lesions.shape} and volume {volume.hu.shape} differ")
        lesions = resample(lesions.astype(np.uint8), volume.spacing, cfg.target_spacing, order=0)[0] > 0
    lungs = unsupervised_lung_mask(hu, spacing, cfg.unsupervised) if with_unsupervised else None
    return PreparedVolume(window(hu), lungs, lesions, spacing)


def lung_box(lungs: np.ndarray, margin: tuple[int, int, int] = (1, 4, 4)) -> tuple[slice, slice, slice]:
    """Bounding box of the lung mask with a margin, as slices; the whole volume when the mask is empty."""
    if not lungs.any():
        warnings.warn("empty lung mask: the classifier gets the whole volume", stacklevel=2)
        return tuple(slice(0, s) for s in lungs.shape)
    box = []
    for axis, m in enumerate(margin):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(lungs.any(axis=other))
        box.append(slice(max(0, idx[0] - m), min(lungs.shape[axis], idx[-1] + 1 + m)))
    return tuple(box)


def classifier_arrays(image: np.ndarray, lungs: np.ndarray, lesions: np.ndarray | None,
                      input_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Image and lung mask (and lesions) cropped to the lung box, slices resized to ``input_size``."""
    box = lung_box(lungs)
    out = {
        "image": resize_slices(image[box], input_size, cv2.INTER_AREA),
        "lungs": resize_slices(lungs[box].astype(np.uint8), input_size, cv2.INTER_NEAREST),
        "box": np.array([[s.start, s.stop] for s in box]),
    }
    if lesions is not None:
        out["lesions"] = resize_slices(lesions[box].astype(np.uint8), input_size, cv2.INTER_NEAREST)
    return out


def to_input(arrays: dict[str, np.ndarray], mask_outside_lungs: bool = True,
             input_window: tuple[float, float] | None = None) -> torch.Tensor:
    """``[2, T, H, W]`` float: the image in 0-1 (0 outside the lungs when asked) and the lung mask. The image is
    the 8-bit window (:data:`LUNG_WINDOW`) scaled to 0-1, or ``input_window`` (HU) mapped to 0-1 and clipped.
    Masked, the strongest responses the network max-pools are in the lungs, not at the chest wall."""
    image = torch.from_numpy(arrays["image"]).float().div(255.0)
    if input_window is not None:
        lo, hi = ((v - LUNG_WINDOW[0]) / (LUNG_WINDOW[1] - LUNG_WINDOW[0]) for v in input_window)
        if not hi > lo:
            raise ValueError(f"input_window must rise, got {input_window}")
        image = ((image - lo) / (hi - lo)).clamp(0.0, 1.0)
    lungs = torch.from_numpy(arrays["lungs"]).float()
    return torch.stack([image * lungs if mask_outside_lungs else image, lungs])


def pad_slices(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate volumes ``[2, T_i, H, W]`` of different lengths: empty slices after the shorter ones."""
    slices = max(x.shape[1] for x, _ in batch)
    xs = [F.pad(x, (0, 0, 0, 0, 0, slices - x.shape[1])) for x, _ in batch]
    return torch.stack(xs), torch.stack([y for _, y in batch])


# ---------------------------------------------------------------------------------------------- augmentation


def augment_volume(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[2, T, H, W]`` (image in 0-1, lung mask): the same random affine map on every slice and both
    channels, then brightness and contrast on the image."""

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator))

    _, _, h, w = x.shape
    x = TF.affine(x, angle=uniform(-cfg.rotation, cfg.rotation),
                  translate=[round(uniform(-cfg.translate, cfg.translate) * w),
                             round(uniform(-cfg.translate, cfg.translate) * h)],
                  scale=uniform(*cfg.scale), shear=[uniform(-cfg.shear, cfg.shear)],
                  interpolation=InterpolationMode.BILINEAR)
    image = TF.adjust_brightness(x[0][:, None], uniform(*cfg.brightness))
    image = TF.adjust_contrast(image, uniform(*cfg.contrast))[:, 0]
    return torch.stack([image, x[1]])


class VolumeDataset(Dataset):
    """Classifier inputs saved by :func:`run_decovnet` (``inputs/<case>.npz``) with their labels."""

    def __init__(self, files: list[Path], labels: list[int], augment: AugmentConfig | None = None,
                 mask_outside_lungs: bool = True, input_window: tuple[float, float] | None = None) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files for {len(labels)} labels")
        self.files, self.labels, self.augment = list(files), list(labels), augment
        self.mask_outside_lungs, self.input_window = mask_outside_lungs, input_window

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.files[i]) as arrays:
            x = to_input({"image": arrays["image"], "lungs": arrays["lungs"]}, self.mask_outside_lungs,
                         self.input_window)
        if self.augment is not None:
            x = augment_volume(x, self.augment)
        return x, torch.tensor(self.labels[i])


def decovnet_step(model: torch.nn.Module, batch, device) -> tuple[torch.Tensor, dict]:
    """Engine ``train_step``: cross-entropy of the two logits."""
    x, y = (t.to(device) for t in batch)
    return F.cross_entropy(model(x), y), {}


# ---------------------------------------------------------------------------------------------- metrics


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision), accuracy, sensitivity and specificity at ``threshold``."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    pred = probs >= threshold
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    return {
        "roc_auc": float(skm.roc_auc_score(labels, probs)) if both else float("nan"),
        "pr_auc": float(skm.average_precision_score(labels, probs)) if both else float("nan"),
        "accuracy": float((tp + tn) / len(labels)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
    }


# ---------------------------------------------------------------------------------------------- stages


def split_cases(cases: list[CTCase], test_fraction: float, seed: int) -> tuple[list[CTCase], list[CTCase]]:
    """The ``split`` column of labels.csv when it has one, else a stratified hold-out."""
    if all(c.split is not None for c in cases):
        train = [c for c in cases if c.split == "train"]
        test = [c for c in cases if c.split == "test"]
        if not train or not test:
            raise ValueError("labels.csv split column needs both 'train' and 'test' rows")
        return train, test
    train, test = train_test_split(cases, test_size=test_fraction, random_state=seed,
                                   stratify=[c.label for c in cases])
    return list(train), list(test)


def prepare_cases(cases: list[CTCase], out_dir: Path, cfg: DeCoVNetConfig) -> dict[str, Path]:
    """Stage 1 for every case (cached): ``prepared/<case>.npz`` with image, unsupervised lungs, lesions."""
    paths = {}
    for case in tqdm(cases, desc="read + resample + unsupervised lungs", unit="volume", disable=not cfg.progress):
        path = out_dir / f"{case.case_id}.npz"
        key = cache_key(spacing=cfg.target_spacing, unsupervised=asdict(cfg.unsupervised),
                        volume=source_stamp(case.volume), lesions=source_stamp(case.lesions))
        if not is_cached(path, key):
            volume = read_volume(case.volume)
            lesions = read_nifti(case.lesions).hu > 0 if case.lesions is not None else None
            prepared = prepare_volume(volume, cfg, lesions)
            save_npz(path, image=prepared.image, lungs=prepared.lungs, lesions=prepared.lesions,
                     spacing=np.array(prepared.spacing), key=np.array(key))
        paths[case.case_id] = path
    return paths


def lung_training_slices(files: list[Path], cfg: DeCoVNetConfig) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``lung_slices_per_case`` evenly spaced axial slices per case, resized to ``lung_input_size``."""
    images, masks = [], []
    size = (cfg.lung_input_size, cfg.lung_input_size)
    for path in files:
        with np.load(path) as arrays:
            image, lungs = arrays["image"], arrays["lungs"]
        keep = np.unique(np.linspace(0, len(image) - 1, min(len(image), cfg.lung_slices_per_case)).astype(int))
        images.append(resize_slices(image[keep], size, cv2.INTER_AREA))
        masks.append(resize_slices(lungs[keep].astype(np.uint8), size, cv2.INTER_NEAREST))
    return np.concatenate(images), np.concatenate(masks)


def train_lung_unet(files: list[Path], run_dir: Path, cfg: DeCoVNetConfig,
                    device: torch.device | str | None = None) -> LungUNet:
    """The 2D lung U-Net trained on the unsupervised masks of ``files`` (engine run in ``run_dir``)."""
    images, masks = lung_training_slices(files, cfg)
    train_cfg = TrainConfig(run_dir=str(run_dir), epochs=cfg.lung_epochs, batch_size=cfg.lung_batch_size,
                            seed=cfg.seed, num_workers=cfg.num_workers, progress=cfg.progress,
                            max_steps=cfg.max_steps,
                            hparams={"model": "LungUNet", "width": cfg.lung_width, "size": cfg.lung_input_size,
                                     "lr": cfg.lung_lr, "slices": int(len(images)), "data": data_digest(files)})
    seed_everything(cfg.seed)
    model = LungUNet(width=cfg.lung_width)
    fit(model, LungSliceDataset(images, masks), lung_unet_step,
        lambda m: torch.optim.Adam(m.parameters(), lr=cfg.lung_lr), train_cfg, device=device, resume=True)
    return model.eval()


def lung_mask(lung_model: LungUNet, image: np.ndarray, unsupervised: np.ndarray | None, cfg: DeCoVNetConfig,
              device: torch.device | str = "cpu") -> tuple[np.ndarray, bool]:
    """The U-Net lung mask of a windowed volume, or its unsupervised mask where the two disagree grossly
    (:func:`covidkit.ct.decovnet.lungmask.choose_lung_mask`); and whether it fell back."""
    unet = predict_lung_mask(lung_model, image, cfg.lung_input_size, device=device)
    return choose_lung_mask(unet, unsupervised, cfg.lung_min_dice)


def make_classifier_inputs(prepared: dict[str, Path], lung_model: LungUNet, out_dir: Path, cfg: DeCoVNetConfig,
                           device: torch.device | str | None = None) -> dict[str, Path]:
    """Stage 3 for every case (cached): lung mask, crop, resize -> ``inputs/<case>.npz`` (``fallback``: the
    unsupervised mask replaced the U-Net's). ``device``: the U-Net's own by default."""
    paths = {}
    device = device or model_device(lung_model)
    lung_model.to(device)
    lung_digest = weights_digest(lung_model)
    for case_id, src in tqdm(prepared.items(), desc="U-Net lungs + crop", unit="volume", disable=not cfg.progress):
        path = out_dir / f"{case_id}.npz"
        paths[case_id] = path
        with np.load(src) as arrays:
            # lung_size: the key's name in the caches written before lung_input_size was renamed
            key = cache_key(prepared=str(arrays["key"]), lung_model=lung_digest, lung_size=cfg.lung_input_size,
                            lung_min_dice=cfg.lung_min_dice, input_size=cfg.input_size)
            if is_cached(path, key):
                continue
            image, unsupervised = arrays["image"], arrays["lungs"]
            lesions = arrays["lesions"] if "lesions" in arrays else None
        lungs, fallback = lung_mask(lung_model, image, unsupervised, cfg, device)
        save_npz(path, **classifier_arrays(image, lungs, lesions, cfg.input_size), fallback=np.array(fallback),
                 key=np.array(key))
    return paths


@torch.no_grad()
def predict_volume(model: DeCoVNet, arrays: dict[str, np.ndarray], cfg: DeCoVNetConfig,
                   device: torch.device | str | None = None) -> tuple[float, np.ndarray, Localization]:
    """COVID probability, CAM and localized lesion of one classifier input (on the model's device by default)."""
    model.eval()
    x = to_input(arrays, cfg.mask_outside_lungs, cfg.input_window)[None].to(device or model_device(model))
    features = model.forward_features(x)  # once, for the probability and the CAM
    prob = float(torch.softmax(model.classifier(features), dim=1)[0, 1])
    cam = class_activation_map(model, x, target=1, features=features)
    return prob, cam, localize(cam, arrays["image"], arrays["lungs"], cfg.localization)


def _held_out_evaluator(dataset: VolumeDataset):
    """Engine ``evaluate``: loss and ROC AUC on the held-out cases (for the curves only)."""

    def evaluate(model: torch.nn.Module, device) -> dict[str, float]:
        losses, probs = [], []
        for i in range(len(dataset)):
            x, y = dataset[i]
            logits = model(x[None].to(device))
            losses.append(float(F.cross_entropy(logits, y[None].to(device))))
            probs.append(float(torch.softmax(logits.float(), dim=1)[0, 1]))
        labels = np.array(dataset.labels)
        auc = skm.roc_auc_score(labels, probs) if len(np.unique(labels)) == 2 else float("nan")
        return {"val_loss": float(np.mean(losses)), "val_auc": float(auc)}

    return evaluate


def train_decovnet(train: VolumeDataset, held_out: VolumeDataset | None, run_dir: Path, cfg: DeCoVNetConfig,
                   device: torch.device | str | None = None) -> DeCoVNet:
    """DeCoVNet trained with the engine: class-balanced sampling, Adam with cosine decay; batches of
    ``cfg.batch_size`` volumes (the last, smaller one dropped: batch norm of one volume is noise)."""
    batch_size = min(cfg.batch_size, len(train))
    train_cfg = TrainConfig(run_dir=str(run_dir), epochs=cfg.epochs, batch_size=batch_size, drop_last=True,
                            seed=cfg.seed, num_workers=cfg.num_workers, progress=cfg.progress, max_steps=cfg.max_steps,
                            hparams={"model": "DeCoVNet", "input_size": list(cfg.input_size), "lr": cfg.lr,
                                     "batch_size": batch_size, "schedule": "cosine_with_floor",
                                     "mask_outside_lungs": cfg.mask_outside_lungs, "weight_decay": cfg.weight_decay,
                                     "input_window": list(train.input_window) if train.input_window else None,
                                     "augment": asdict(cfg.augment) if cfg.augment else None,
                                     "data": data_digest(train.files, train.labels)})
    seed_everything(cfg.seed)
    model = DeCoVNet(input_size=cfg.input_size)
    fit(model, train, decovnet_step,
        lambda m: torch.optim.Adam(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), train_cfg,
        scheduler_fn=cosine_with_floor, collate_fn=pad_slices, sample_weights=class_balanced_weights(train.labels),
        evaluate=_held_out_evaluator(held_out) if held_out is not None else None, device=device, resume=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- runner


@dataclass
class DeCoVNetRun:
    """What :func:`run_decovnet` produced; everything is also on disk under ``work_dir``."""

    work_dir: Path
    metrics: dict[str, float]
    predictions: pd.DataFrame
    lung_model: LungUNet
    model: DeCoVNet
    inputs: dict[str, Path]

    def case_arrays(self, case_id: str) -> dict[str, np.ndarray]:
        with np.load(self.inputs[case_id]) as arrays:
            return dict(arrays)


def evaluate_cases(model: DeCoVNet, inputs: dict[str, Path], cases: list[CTCase], cfg: DeCoVNetConfig,
                   device: torch.device | str | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-case predictions (probability, predicted centre, hit) and the summary metrics: ``hit_rate`` by the
    configured rule (``localization``), ``hit_rate_cam`` and ``hit_rate_density`` by each rule."""
    rows, lesion_masks = [], []
    centres = {"cam": [], "density": []}
    rules = {rule: replace(cfg.localization, rule=rule) for rule in centres}
    for case in tqdm(cases, desc="evaluate + localize", unit="volume", disable=not cfg.progress):
        with np.load(inputs[case.case_id]) as data:
            arrays = dict(data)
        prob, cam, loc = predict_volume(model, arrays, cfg, device)
        row = {"case_id": case.case_id, "label": case.label, "prob": prob, "pred": int(prob >= 0.5),
               "slices": int(arrays["image"].shape[0]), "centre": loc.centre, "hit": None}
        if case.label == 1 and "lesions" in arrays and arrays["lesions"].any():
            row["hit"] = is_hit(loc.centre, arrays["lesions"])
            lesion_masks.append(arrays["lesions"])
            for rule, found in centres.items():
                other = loc if rule == cfg.localization.rule else localize(cam, arrays["image"], arrays["lungs"], rules[rule])
                found.append(other.centre)
        rows.append(row)
    predictions = pd.DataFrame(rows)
    metrics = classification_metrics(predictions["label"].to_numpy(), predictions["prob"].to_numpy())
    metrics["hit_rate"] = hit_rate(centres[cfg.localization.rule], lesion_masks)
    for rule, found in centres.items():
        metrics[f"hit_rate_{rule}"] = hit_rate(found, lesion_masks)
    metrics["hit_cases"] = len(lesion_masks)
    metrics["localization"] = cfg.localization.rule
    return predictions, metrics


def volume_histograms(prepared: dict[str, Path], cases: list[CTCase],
                      window_hu: tuple[float, float] = LUNG_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bin HU histogram (:func:`covidkit.ct.decovnet.baselines.hu_histogram`) and the -700 to -200 HU
    share of each case's whole resampled volume (no mask), its 8-bit image mapped back to HU."""
    hists, shares = [], []
    for case in cases:
        with np.load(prepared[case.case_id]) as arrays:
            hu = arrays["image"].astype(np.float32) / 255.0 * (window_hu[1] - window_hu[0]) + window_hu[0]
        hists.append(hu_histogram(hu))
        shares.append(hu_share(hu))
    return np.array(hists), np.array(shares)


def baseline_metrics(prepared: dict[str, Path], train: list[CTCase], test: list[CTCase], seed: int = 0) -> dict[str, float]:
    """The trivial baselines on the held-out cases: ``hist_auc`` (logistic regression on the whole volume's HU
    histogram, trained on the training cases) and ``hu_share_auc`` (the -700 to -200 HU share, no training)."""
    train_hists, _ = volume_histograms(prepared, train)
    test_hists, test_shares = volume_histograms(prepared, test)
    train_labels, test_labels = [c.label for c in train], [c.label for c in test]
    both = len(set(test_labels)) == 2 and len(set(train_labels)) == 2
    return {
        "hist_auc": histogram_baseline_auc(train_hists, train_labels, test_hists, test_labels, seed) if both else float("nan"),
        "hu_share_auc": share_auc(test_shares, test_labels) if len(set(test_labels)) == 2 else float("nan"),
    }


def lung_fallbacks(files) -> int:
    """How many classifier inputs use the unsupervised lung mask instead of the U-Net's."""
    count = 0
    for path in files:
        with np.load(path) as arrays:
            count += bool(arrays["fallback"])
    return count


def limit_cases(cases: list[CTCase], n: int | None) -> list[CTCase]:
    """``n`` of ``cases``, the labels taking turns (all of them when ``n`` is None)."""
    if n is None:
        return cases
    by_label = [[c for c in cases if c.label == label] for label in sorted({c.label for c in cases})]
    turns = [c for group in zip(*[iter(g) for g in by_label]) for c in group]
    rest = [c for c in cases if c not in turns]
    return (turns + rest)[:n]


def run_decovnet(dataset_dir: Path | str, work_dir: Path | str, cfg: DeCoVNetConfig | None = None,
                 device: torch.device | str | None = None) -> DeCoVNetRun:
    """The whole pipeline on a ``ct-covid-volumes/`` folder; writes ``work_dir``: ``prepared/``, ``inputs/``
    (cached arrays), ``lung_unet/``, ``classifier/`` (engine runs), ``predictions.csv``, ``metrics.json``."""
    cfg = cfg or DeCoVNetConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(work_dir)
    train, test = split_cases(read_cases(dataset_dir), cfg.test_fraction, cfg.seed)
    train, test = limit_cases(train, cfg.max_cases), limit_cases(test, cfg.max_cases)
    cases = train + test
    prepared = prepare_cases(cases, work / "prepared", cfg)
    lung_model = train_lung_unet([prepared[c.case_id] for c in train], work / "lung_unet", cfg, device)
    inputs = make_classifier_inputs(prepared, lung_model, work / "inputs", cfg, device)
    train_set = VolumeDataset([inputs[c.case_id] for c in train], [c.label for c in train], cfg.augment,
                              cfg.mask_outside_lungs, cfg.input_window)
    test_set = VolumeDataset([inputs[c.case_id] for c in test], [c.label for c in test],
                             mask_outside_lungs=cfg.mask_outside_lungs, input_window=cfg.input_window)
    model = train_decovnet(train_set, test_set, work / "classifier", cfg, device)
    predictions, metrics = evaluate_cases(model, inputs, test, cfg, device)
    metrics["train_cases"] = len(train)
    metrics["test_cases"] = len(test)
    metrics["lung_fallbacks"] = lung_fallbacks(inputs.values())
    metrics.update(baseline_metrics(prepared, train, test, cfg.seed))
    predictions.to_csv(work / "predictions.csv", index=False)
    (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame([metrics]).to_csv(work / "metrics.csv", index=False)
    return DeCoVNetRun(work, metrics, predictions, lung_model, model, inputs)

