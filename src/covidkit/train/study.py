"""Notebook 06: the K-fold study-level model, its out-of-fold study mAP and the image ``none`` probability.

One model per validation split of ``folds.csv`` (from 00): a U-Net whose encoder is the NIH backbone of
01 (``encoder: nih``), another backbone file, a ResNet-family architecture from random weights, or the
small plain encoder (see ``covidkit.models.study``). Every training image carries its study's label; the
loss is cross-entropy over the four study classes plus the opacity heat map trained on the box masks
(and, optionally, "this image has no box" on the heat map's maximum). SGD with momentum and the
cosine-with-floor schedule of the engine (``optimizer: adamw`` is offered for short CPU runs). Each
split's *last* epoch predicts its held-out images (with the same flip TTA as 07): a study's
probabilities are the mean over its images, scored with the competition's AP (each study is one box
``0 0 1 1`` of its class).

The image ``none`` rule (``none_rule: auto``) is chosen on the out-of-fold images and scored honestly:
each fold's images take the rule that scores best on the other folds' images. With ``stack_boxes``,
a study stacker (``covidkit.stacking``) is fitted on the OOF rows and 05's boxes, scored out of fold on
00's patient-grouped folds, and saved for 07.

``fold_groups`` merges the K folds into fewer splits (split = fold % fold_groups; patients still never
cross a split), so every image still gets an out-of-fold prediction.

Multi-GPU: ``torchrun --nproc_per_node 4 -m covidkit.train.study --profile full``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision import tv_tensors
from tqdm import tqdm

from covidkit.data.nih import read_grey
from covidkit.data.detection import PreparedImages
from covidkit.data.siim import COMPETITION, STUDY_CLASSES, prepared_train_table
from covidkit.metrics import ONE_PIXEL_BOX, average_precision
from covidkit.train.nih import backbone_path
from covidkit.oof import OofPredictions
from covidkit.profiles import config_from_params
from covidkit.stacking import STACKER_JSON
from covidkit.models.backbones import load_backbone
from covidkit.models.study import (
    MODEL_FILE, NEGATIVE, NONE_RULES, NOTEBOOK, StudySpec, build_study_model, none_probability,
    predict_outputs, save_study_model, train_transform,
)
from covidkit.train import TrainConfig, cosine_with_floor, fit, init_distributed, load_weights, seed_everything, to_device
from covidkit.train.distributed import barrier, dist_info

OOF_IMAGES_CSV = "oof_images.csv"  # per image: split, label, has_box, p_<class>..., p_none_head
OOF_STUDIES_CSV = "oof_studies.csv"  # per study: split, label, p_<class>... (mean over its images)
OOF_STUDIES_STACKED_CSV = "oof_studies_stacked.csv"  # as OOF_STUDIES_CSV, the stacker's OOF probabilities
SUMMARY_JSON = "summary.json"  # the OOF APs (study classes, mAP, none by rule) and the class priors
CONFUSION_PNG = "confusion_matrix.png"
PROB_COLUMNS = [f"p_{c}" for c in STUDY_CLASSES]
OPTIMIZERS = ("sgd", "adamw")
AUTO = "auto"  # none_rule: chosen on the out-of-fold images


def output_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / NOTEBOOK


@dataclass
class StudyTrainConfig:
    """Parameters of notebook 06 (names as in its ``parameters`` cell and the profile section)."""

    input_dir: str
    run_dir: str
    seed: int = 42
    encoder: str = "nih"  # "nih": 01's backbone.pt; a backbone file; a ResNet-family name (random init); "plain"
    width: int = 16  # the decoder's finest channels (and the plain encoder's first level)
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_floor: float = 0.05
    dropout: float = 0.5
    class_weight_power: float = 0.0  # cross-entropy class weights count^-power (0: none, 1: balanced)
    none_weight: float = 0.0  # weight of the "image has no box" loss on the heat map's maximum
    mask_weight: float = 1.0  # weight of the opacity heat-map loss (0: off)
    none_rule: str = "auto"  # none_probability's rule: "auto" (chosen out of fold), "head", "negative" or "boxes"
    stack_boxes: bool = False  # fit covidkit.stacking's study stacker on the OOF outputs and 05's fused boxes
    stack_c: float = 1.0  # its inverse L2 strength (scikit-learn's C)
    equalize: bool = False  # histogram-equalise every image (training and inference)
    fold_groups: int | None = None  # None: one model per fold of folds.csv
    hflip_tta: bool = False
    eval_every: int = 1
    num_workers: int = 4
    amp: bool = True
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.none_rule not in (AUTO, *NONE_RULES):
            raise ValueError(f"none_rule must be {AUTO!r} or one of {NONE_RULES}, got {self.none_rule!r}")

    @classmethod
    def from_params(cls, params: dict) -> StudyTrainConfig:
        """From a profile section (unknown keys are an error)."""
        return config_from_params(cls, params, NOTEBOOK)

    @property
    def backbone_checkpoint(self) -> Path | None:
        """The backbone file the encoder starts from (None: random weights)."""
        if self.encoder == "nih":
            return backbone_path(self.run_dir)
        return Path(self.encoder) if self.encoder.endswith((".pt", ".pth")) else None

    def spec(self, prepared_size: int) -> StudySpec:
        checkpoint = self.backbone_checkpoint
        encoder = load_backbone(checkpoint)[0] if checkpoint is not None else self.encoder
        return StudySpec(encoder=encoder, width=self.width, image_size=self.image_size, prepared_size=prepared_size,
                         dropout=self.dropout, equalize=self.equalize)


@dataclass
class StudyTrainResult:
    images: pd.DataFrame  # OOF per image (OOF_IMAGES_CSV)
    studies: pd.DataFrame  # OOF per study (OOF_STUDIES_CSV)
    summary: dict  # SUMMARY_JSON
    metrics: pd.DataFrame  # per split and epoch (the engine's metrics.csv rows)
    models: list[Path]
    out_dir: Path
    stacked: pd.DataFrame | None = None  # the stacker's OOF per study (stack_boxes), as ``studies``
    boxes: OofPredictions | None = None  # 05's fused OOF boxes the none rule and the stacker used


class StudyImageDataset(PreparedImages):
    """``(image, target)`` per row of a prepared train table; ``target``: ``label``, ``none``, ``mask``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        grey, boxes = self.image_and_boxes(index)
        mask = np.zeros(grey.shape, np.uint8)
        for x1, y1, x2, y2 in boxes:
            mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
        image, mask = self.transform(tv_tensors.Image(torch.from_numpy(grey)[None]),
                                     tv_tensors.Mask(torch.from_numpy(mask)[None]))
        row = self.table.iloc[index]
        target = {"label": STUDY_CLASSES.index(row["label"]), "none": float(len(boxes) == 0),
                  "mask": mask.as_subclass(torch.Tensor).float()}
        return image, target


def study_step(model: nn.Module, batch, device: torch.device, class_weights: torch.Tensor | None,
               none_weight: float, mask_weight: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy over the study classes + the weighted auxiliary losses."""
    images, target = to_device(batch, device, non_blocking=True)
    out = model(images)
    weight = class_weights.to(device) if class_weights is not None else None
    ce = nn.functional.cross_entropy(out["study"].float(), target["label"], weight=weight)
    none = nn.functional.binary_cross_entropy_with_logits(out["none"].float(), target["none"].float())
    mask_target = nn.functional.adaptive_avg_pool2d(target["mask"], out["mask"].shape[-2:])
    mask = nn.functional.binary_cross_entropy_with_logits(out["mask"].float(), mask_target)
    return ce + none_weight * none + mask_weight * mask, {"ce": ce, "none_bce": none, "mask_bce": mask}


def class_weights(labels: pd.Series, power: float) -> torch.Tensor | None:
    """Cross-entropy weights ``count^-power`` over STUDY_CLASSES, mean 1 (``None`` when power is 0)."""
    if power == 0:
        return None
    counts = labels.value_counts().reindex(STUDY_CLASSES, fill_value=0).to_numpy(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return torch.as_tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def make_optimizer(model: nn.Module, cfg: StudyTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def predict_table(model: nn.Module, spec: StudySpec, table: pd.DataFrame, device: torch.device,
                  hflip_tta: bool = False, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
    """Per-image probabilities of every row of a prepared table: ``image_id, p_<class>..., p_none_head``."""
    study, none = [], []
    for start in tqdm(range(0, len(table), batch_size), desc="predict", leave=False, disable=not progress):
        images = [read_grey(p) for p in table["path"].iloc[start:start + batch_size]]
        s, n = predict_outputs(model, spec, images, device, hflip_tta, batch_size)
        study.append(s)
        none.append(n)
    probs = np.concatenate(study) if study else np.zeros((0, len(STUDY_CLASSES)))
    frame = pd.DataFrame(probs, columns=PROB_COLUMNS)
    frame.insert(0, "image_id", table["image_id"].to_numpy())
    frame["p_none_head"] = np.concatenate(none) if none else np.zeros(0)
    return frame


def study_probabilities(images: pd.DataFrame) -> pd.DataFrame:
    """Per study: the mean of its images' probabilities (``study_id, split, label, p_<class>...``)."""
    return (images.groupby("study_id", sort=True)
            .agg({"split": "first", "label": "first", **{c: "mean" for c in PROB_COLUMNS}})
            .reset_index())


def study_aps(studies: pd.DataFrame) -> dict[str, float]:
    """The competition AP of each study class (each study one ``0 0 1 1`` box) and their mean ``mAP``."""
    aps = {}
    for c, col in zip(STUDY_CLASSES, PROB_COLUMNS):
        gt = {s: ONE_PIXEL_BOX for s, label in zip(studies["study_id"], studies["label"]) if label == c}
        aps[c] = average_precision(gt, [(s, p, 0, 0, 1, 1) for s, p in zip(studies["study_id"], studies[col])])
    aps["mAP"] = float(np.nanmean([aps[c] for c in STUDY_CLASSES]))
    return aps


def none_ap(images: pd.DataFrame, none_probs) -> float:
    """The competition AP of ``none`` (an image without box is one ``0 0 1 1`` box) for given probabilities."""
    gt = {i: ONE_PIXEL_BOX for i, has_box in zip(images["image_id"], images["has_box"]) if not has_box}
    return average_precision(gt, [(i, float(p), 0, 0, 1, 1) for i, p in zip(images["image_id"], none_probs)])


def none_candidates(images: pd.DataFrame, studies: pd.DataFrame) -> dict[str, np.ndarray]:
    """The ``none`` estimates compared in 06, per image: the head, the image's and the study's P(negative)."""
    study_neg = images["study_id"].map(studies.set_index("study_id")[PROB_COLUMNS[NEGATIVE]])
    return {"head": images["p_none_head"].to_numpy(), "negative": images[PROB_COLUMNS[NEGATIVE]].to_numpy(),
            "study_negative": study_neg.to_numpy()}


def max_box_scores(images: pd.DataFrame, boxes: OofPredictions) -> np.ndarray:
    """The highest OOF box score of each image of ``images`` (0 where it has no box)."""
    best = boxes.boxes.groupby("image_id")["score"].max()
    return images["image_id"].map(best).fillna(0.0).to_numpy(np.float64)


def rule_probabilities(images: pd.DataFrame, boxes: OofPredictions | None) -> dict[str, np.ndarray]:
    """Per image, the ``none`` probability of each rule of ``none_probability`` (``boxes``: the detectors'
    OOF boxes; without them the rules that need boxes are left out)."""
    scores = max_box_scores(images, boxes) if boxes is not None else np.zeros(len(images))
    rules = NONE_RULES if boxes is not None else tuple(r for r in NONE_RULES if r != "boxes")
    return {rule: np.array([none_probability(neg, [s], head, rule=rule) for neg, s, head in
                            zip(images[PROB_COLUMNS[NEGATIVE]], scores, images["p_none_head"])])
            for rule in rules}


def choose_none_rule(images: pd.DataFrame, boxes: OofPredictions | None, setting: str = AUTO) -> dict:
    """The ``none`` rule 07 applies, and an honest OOF AP of that choice.

    ``setting`` ``auto``: the rule with the best ``none`` AP on all OOF images is chosen; its honest score
    takes, for each fold of 00, the rule that scores best on the other folds' images (as 05 scores its
    tuned fusion). A named rule is used as it is. Returns ``chosen``, ``ap_out_of_fold`` and each rule's
    ``ap`` on all images.
    """
    probs = rule_probabilities(images, boxes)
    aps = {rule: none_ap(images, p) for rule, p in probs.items()}
    if setting != AUTO:
        return {"chosen": setting, "ap_out_of_fold": aps[setting], "ap": aps}
    folds = images["fold"].to_numpy()
    honest = np.zeros(len(images))
    for fold in np.unique(folds):
        here = folds == fold
        best = max(probs, key=lambda r: none_ap(images[~here], probs[r][~here]))
        honest[here] = probs[best][here]
    return {"chosen": max(aps, key=aps.get), "ap_out_of_fold": none_ap(images, honest), "ap": aps}


def none_comparison(images: pd.DataFrame, studies: pd.DataFrame, boxes: OofPredictions | None = None) -> pd.DataFrame:
    """OOF ``none`` AP of each candidate, best first.

    Without boxes: the image head, the image's P(negative), the study's mean P(negative), which are
    also what ``none_probability`` gives for the rules ``head`` and ``negative`` when no box is
    found. With the detectors' OOF ``boxes`` (e.g. 05's fused ``oof.csv``): one row per rule of
    ``none_probability`` (named after the rule, as the profile's ``none_rule``), and the classifier
    estimates alone for comparison. Only images the boxes were evaluated on are compared, so every
    row scores the same images.
    """
    if boxes is not None:
        images = images[images["image_id"].isin(set(boxes.images["image_id"]))]
        studies = studies[studies["study_id"].isin(set(images["study_id"]))]
    candidates = none_candidates(images, studies)
    if boxes is not None:
        candidates = {f"{name} (classifier alone)": p for name, p in candidates.items()}
        candidates.update(rule_probabilities(images, boxes))
    rows = [{"candidate": name, "none_ap": none_ap(images, p), "images": len(images)} for name, p in candidates.items()]
    return pd.DataFrame(rows).sort_values("none_ap", ascending=False, kind="stable").set_index("candidate")


def summarise(images: pd.DataFrame, studies: pd.DataFrame) -> dict:
    """OOF study APs, ``none`` AP of each candidate, the class priors (about the AP of a constant guess)."""
    priors = studies["label"].value_counts(normalize=True).reindex(STUDY_CLASSES, fill_value=0).to_dict()
    return {
        "study_ap": study_aps(studies),
        "none_ap": {name: none_ap(images, p) for name, p in none_candidates(images, studies).items()},
        "prior": {**priors, "mAP": float(np.mean(list(priors.values()))), "none": float((~images["has_box"]).mean())},
        "studies": len(studies), "images": len(images),
    }


def training_table(cfg: StudyTrainConfig) -> pd.DataFrame:
    """The prepared train table of 00 with its validation ``split`` and ``has_box`` columns."""
    table = prepared_train_table(Path(cfg.run_dir) / "prepared", Path(cfg.input_dir) / COMPETITION)
    if table.empty:
        raise ValueError(f"no prepared training image under {Path(cfg.run_dir) / 'prepared'} (run 00 first)")
    table["split"] = table["fold"] % cfg.fold_groups if cfg.fold_groups else table["fold"]
    table["has_box"] = table["boxes"].map(len) > 0
    return table


def prepared_size(table: pd.DataFrame) -> int:
    """The side of 00's square PNGs (all the same)."""
    side = read_grey(table["path"].iloc[0]).shape
    if side[0] != side[1]:
        raise ValueError(f"prepared images are not square: {side}")
    return int(side[0])


def make_evaluate(val_table: pd.DataFrame, spec: StudySpec, cfg: StudyTrainConfig):
    """The engine's ``evaluate``: study mAP and head ``none`` AP of the held-out split."""
    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        images = val_table.merge(predict_table(model, spec, val_table, device), on="image_id")
        return {"val_map": study_aps(study_probabilities(images))["mAP"],
                "val_none_ap": none_ap(images, images["p_none_head"])}
    return evaluate


AFTER_TRAINING = ("stack_boxes", "stack_c", "none_rule")  # settings that do not touch the models: changing them keeps finished splits


def training_hparams(cfg: StudyTrainConfig) -> dict:
    """The settings a split's checkpoints are resumed against (``cfg`` without ``AFTER_TRAINING``)."""
    return {k: v for k, v in asdict(cfg).items() if k not in AFTER_TRAINING}


def train_split(table: pd.DataFrame, split: int, spec: StudySpec, cfg: StudyTrainConfig) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """Train on every split but ``split``; the last epoch predicts ``split``. Returns (OOF rows, metrics, model file)."""
    train_table, val_table = table[table["split"] != split], table[table["split"] == split]
    seed_everything(cfg.seed)
    model = build_study_model(spec, cfg.backbone_checkpoint)
    split_dir = output_dir(cfg.run_dir) / f"split{split}"
    train_cfg = TrainConfig(
        run_dir=str(split_dir / "train"), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.num_workers, amp=cfg.amp, eval_every=min(cfg.eval_every, cfg.epochs),
        drop_last=len(train_table) >= 2 * cfg.batch_size,  # no 1-image batch for batch norm, unless data is tiny
        progress=cfg.progress, hparams={**training_hparams(cfg), "split": split},
    )
    step = functools.partial(study_step, class_weights=class_weights(train_table["label"], cfg.class_weight_power),
                             none_weight=cfg.none_weight, mask_weight=cfg.mask_weight)
    result = fit(
        model, StudyImageDataset(train_table, train_transform(spec)), step,
        functools.partial(make_optimizer, cfg=cfg), train_cfg,
        scheduler_fn=functools.partial(cosine_with_floor, floor=cfg.lr_floor),
        evaluate=make_evaluate(val_table, spec, cfg), resume=cfg.resume,
    )
    load_weights(result.last_checkpoint, model)  # a finished resumed run returns before touching the model
    device = next(model.parameters()).device
    oof = predict_table(model, spec, val_table, device, cfg.hflip_tta, progress=cfg.progress)
    path = split_dir / MODEL_FILE
    if dist_info().is_main:
        save_study_model(model, spec, path, split=split, seed=cfg.seed, folds=sorted(val_table["fold"].unique().tolist()))
    return oof, pd.DataFrame(result.history).assign(split=split), path


def plot_confusion(studies: pd.DataFrame, path: Path, title: str = "study model"):
    """Row-normalised confusion matrix of the OOF studies (truth vs arg-max class), saved to ``path``."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    predicted = np.asarray(STUDY_CLASSES)[studies[PROB_COLUMNS].to_numpy().argmax(1)]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(studies["label"], predicted, labels=STUDY_CLASSES, ax=ax,
                                            colorbar=False, cmap="Blues")
    ax.set_title(f"study classes, out of fold (counts): {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


NONE_COMPARISON_CSV = "none_comparison.csv"  # OOF none AP of each candidate (none_comparison)


def write_oof_tables(out: Path, images: pd.DataFrame, studies: pd.DataFrame, summary: dict,
                     confusion_of: pd.DataFrame | None = None, none_table: pd.DataFrame | None = None) -> None:
    """06's outputs beside the models: the OOF tables, the summary, the none comparison, the confusion matrix.

    The matrix is of ``confusion_of`` (the stacker's OOF studies, what 07 applies) when given, else of ``studies``.
    """
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    images.to_csv(out / OOF_IMAGES_CSV, index=False)
    studies.to_csv(out / OOF_STUDIES_CSV, index=False)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    if none_table is not None:
        none_table.to_csv(out / NONE_COMPARISON_CSV)
    title = "study model + boxes" if confusion_of is not None else "study model"
    plt.close(plot_confusion(studies if confusion_of is None else confusion_of, out / CONFUSION_PNG, title))


def fused_boxes(run_dir: str | Path) -> OofPredictions | None:
    """05's fused OOF boxes of a run folder, or None (with a warning) when 05 has not run."""
    import warnings

    from covidkit.ensemble import NOTEBOOK as ENSEMBLE_NOTEBOOK, OOF_CSV as FUSED_OOF_CSV
    from covidkit.oof import read_oof

    path = Path(run_dir) / ENSEMBLE_NOTEBOOK / FUSED_OOF_CSV
    if not path.is_file():
        warnings.warn(f"{path} not found (run 05 first): no box-based none rule and no study stacker; "
                      "07 uses the study model alone")
        return None
    return read_oof(path)


def run_study_level(cfg: StudyTrainConfig) -> StudyTrainResult:
    """Train every split's model, choose the ``none`` rule, fit the stacker, write the OOF tables and plots."""
    info = init_distributed()
    out = output_dir(cfg.run_dir)
    table = training_table(cfg)
    spec = cfg.spec(prepared_size(table))
    pieces, metrics, models = [], [], []
    for split in sorted(int(s) for s in table["split"].unique()):
        oof, history, path = train_split(table, split, spec, cfg)
        pieces.append(oof)
        metrics.append(history)
        models.append(path)
    columns = ["image_id", "study_id", "split", "fold", "label", "has_box"]
    images = table[columns].merge(pd.concat(pieces, ignore_index=True), on="image_id")
    studies = study_probabilities(images)
    summary = summarise(images, studies)
    boxes = fused_boxes(cfg.run_dir)
    scored = images if boxes is None else images[images["image_id"].isin(set(boxes.images["image_id"]))]
    summary["none_rule"] = choose_none_rule(scored, boxes, cfg.none_rule)
    stacked = None
    if info.is_main:
        for stale in (out / STACKER_JSON, out / OOF_STUDIES_STACKED_CSV):  # of an earlier run: 07 must not export it
            stale.unlink(missing_ok=True)
        if cfg.stack_boxes and boxes is not None:
            stacked = stack_with_boxes(scored.reset_index(drop=True), boxes, cfg)
        if stacked is not None:
            summary["study_ap_stacked"] = study_aps(stacked)
            stacked.to_csv(out / OOF_STUDIES_STACKED_CSV, index=False)
        write_oof_tables(out, images, studies, summary, confusion_of=stacked,
                         none_table=none_comparison(images, studies, boxes))
    barrier()
    return StudyTrainResult(images, studies, summary, pd.concat(metrics, ignore_index=True), models, out, stacked,
                            boxes)


def stack_with_boxes(images: pd.DataFrame, boxes: OofPredictions, cfg: StudyTrainConfig) -> pd.DataFrame | None:
    """Fit the study stacker (``covidkit.stacking``) on the OOF images and 05's fused OOF ``boxes``.

    Saves it as ``stacker.json`` beside the models (07 exports it) and returns its own out-of-fold
    study probabilities, to be scored beside the study model's: each image predicted by a stacker fitted
    on the other folds of 00 (grouped by patient, as every other OOF figure), then averaged per study.
    Returns None, with a warning, when a class is missing from some fold's complement.
    """
    import warnings

    from covidkit.ensemble import read_image_sizes
    from covidkit.stacking import fit_stacker, oof_zone_scores, out_of_fold_probs, stacker_features

    folds = images["fold"].to_numpy()
    seen = [set(images.loc[folds != f, "label"]) for f in np.unique(folds)]
    if len(seen) < 2 or any(labels != set(STUDY_CLASSES) for labels in seen):
        warnings.warn("stack_boxes: too few studies of some class to fit and score a stacker on 00's folds; "
                      "07 uses the study model alone")
        return None
    sizes = read_image_sizes(Path(cfg.run_dir) / "prepared" / "meta.csv")
    x = stacker_features(images[PROB_COLUMNS].to_numpy(), oof_zone_scores(images["image_id"], boxes.boxes, sizes))
    y = images["label"].map(STUDY_CLASSES.index).to_numpy()
    oof = out_of_fold_probs(x, y, folds, cfg.stack_c)
    fit_stacker(x, y, cfg.stack_c).save(output_dir(cfg.run_dir) / STACKER_JSON)
    return study_probabilities(images.drop(columns=PROB_COLUMNS).join(pd.DataFrame(oof, columns=PROB_COLUMNS)))


def read_oof_images(run_dir: str | Path) -> pd.DataFrame:
    """06's per-image OOF table of a run folder (ids as strings)."""
    return pd.read_csv(output_dir(run_dir) / OOF_IMAGES_CSV, dtype={"image_id": str, "study_id": str})


def read_oof_studies(run_dir: str | Path) -> pd.DataFrame:
    """06's per-study OOF table of a run folder (ids as strings)."""
    return pd.read_csv(output_dir(run_dir) / OOF_STUDIES_CSV, dtype={"study_id": str})


def main(argv: list[str] | None = None) -> None:
    from covidkit.profiles import profile_argument_parser, section_parameters

    args = profile_argument_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = section_parameters(args.profile, NOTEBOOK, input_dir=args.input, run_dir=args.run_dir)
    result = run_study_level(StudyTrainConfig.from_params(params))
    if dist_info().is_main:
        print(json.dumps(result.summary, indent=2))
        print(f"models: {[str(p) for p in result.models]}")


if __name__ == "__main__":
    main()
