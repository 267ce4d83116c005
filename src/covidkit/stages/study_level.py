"""Stage 06: the K-fold study-level model, its out-of-fold study mAP, the image ``none`` rule and the stacker.

One model per fold (00's folds, merged by ``fold_groups``; ``covidkit.models.study``: a U-Net whose encoder is 01's NIH
backbone, another backbone file, a ResNet-family architecture from random weights, or the small plain
encoder). Every training image carries its study's label; the loss is cross-entropy over the four study
classes plus the opacity heat map on the box masks. Each fold's *last* epoch predicts its held-out images,
with the same flip TTA as 07 (``hflip_tta``). The ``none`` rule 07 applies is chosen on the OOF images and
scored honestly (``covidkit.study_scores.choose_none_rule``); with ``stack_boxes``, a study stacker
(``covidkit.stacking``) is fitted on the OOF rows and 05's fused boxes and scored on 00's folds. With 05's boxes,
the summary's ``box_count_rule`` is the trivial baseline the stacker must beat (``covidkit.baselines.box_count_rule``:
the study classes from the count of fused boxes above 05's best-F1 score, frequencies from the other folds).

Reads ``<run_dir>/prepared/`` (00), 01's ``backbone.pt`` (``encoder: nih``), 05's fused ``oof.csv``, the
training labels. Writes ``<run_dir>/06_study_level/``: ``fold<k>/study_model.pt`` (07 exports them),
``fold<k>/train/`` (engine runs), ``oof_images.csv``, ``oof_studies.csv``, ``summary.json``,
``none_comparison.csv``, ``confusion_matrix.png``, and with the stacker ``stacker.json`` and
``oof_studies_stacked.csv``. Several GPUs: ``torchrun --nproc_per_node 4 -m covidkit.stages.study_level``.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from covidkit.baselines import box_count_rule
from covidkit.images import read_grey
from covidkit.data.siim import COMPETITION, STUDY_CLASSES
from covidkit.data.study import StudyImageDataset
from covidkit.engine import TrainConfig, cosine_with_floor, fit, init_distributed, load_weights, seed_everything, to_device
from covidkit.engine.distributed import barrier, dist_info
from covidkit.engine.kfold import MODEL_FOLD, fold_table, run_folds
from covidkit.engine.optim import check_optimizer, optimizer_fn
from covidkit.models.backbones import backbone_file, load_backbone
from covidkit.models.study import (
    NONE_RULES, StudySpec, build_study_model, predict_outputs, save_study_model, study_loss, train_transform,
)
from covidkit.oof import OofPredictions, read_oof
from covidkit.plots import confusion_figure, pr_curves
from covidkit.prepare import image_sizes
from covidkit.learning import AP_MARGIN, LearningCheck, finite, read_json
from covidkit.layout import RunLayout
from covidkit.pseudo import add_pseudo_rows, stage_rows, with_soft_labels
from covidkit.report import figure_html, png_html, precision_recall_labels, require, table_html
from covidkit.stages import StageConfig, stage_main, write_settings
from covidkit.study_scores import (
    AUTO, PROB_COLUMNS, choose_none_rule, none_ap, none_comparison, study_aps, study_probabilities, summarise,
)

AFTER_TRAINING = ("stack_boxes", "stack_c", "none_rule")  # not training settings: changing them keeps finished folds


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = ['00_prepare_data', '01_pretrain_nih_resnext', '03_train_siim_fasterrcnn', '04_train_siim_yolo', '05_ensemble_wbf']


@dataclass
class Config(StageConfig):
    seed: int = 42
    encoder: str = "nih"  # "nih" (01's backbone.pt), a backbone file, a ResNet-family name, or "plain"
    width: int = 16  # the decoder's finest channels (and the plain encoder's first level)
    input_size: int = 224  # the network's input side
    equalize: bool = False  # histogram-equalise every image (training and inference)
    epochs: int = 10
    batch_size: int = 16
    optimizer: str = "sgd"  # "sgd" (Nesterov) or "adamw"
    lr: float = 0.01  # lr_0 of the cosine schedule
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_floor: float = 0.05  # the schedule ends at lr_floor * lr_0
    dropout: float = 0.5
    class_weight_power: float = 0.0  # cross-entropy class weights count^-power (1: balanced)
    none_weight: float = 0.0  # loss "image has no box" on the heat map's maximum
    mask_weight: float = 1.0  # loss of the opacity heat map on the box masks (0: off)
    none_rule: str = AUTO  # "auto" (chosen out of fold), or "head", "negative", "boxes"
    stack_boxes: bool = False  # fit the study stacker on the OOF outputs and 05's boxes; 07 applies it
    stack_c: float = 0.3  # the stacker's inverse L2 strength (README: chosen on dev seeds 46 and 47)
    fold_groups: int | None = None  # merge the folds of 00 into this many folds; None: one model per fold of 00
    pseudo_labels: str | None = None  # 08's pseudo_labels.csv (a round, docs/pseudo-labels.md); None: none
    pseudo_weight: float = 1.0  # loss weight of a pseudo-labelled image (its soft label's cross-entropy, its mask)
    hflip_tta: bool = False  # OOF prediction also on the flipped image (as 07 predicts)
    eval_every: int = 1  # validation metrics every N epochs (and at the last)
    workers: int = 4  # DataLoader workers
    amp: bool = True
    resume: bool = True  # continue an interrupted run, keep finished folds
    progress: bool = True

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.none_rule not in (AUTO, *NONE_RULES):
            raise ValueError(f"none_rule must be {AUTO!r} or one of {NONE_RULES}, got {self.none_rule!r}")

    @property
    def backbone_checkpoint(self) -> Path | None:
        """The backbone file the encoder starts from (None: random weights)."""
        return backbone_file(self.encoder, self.layout.nih_pretrain.backbone)

    def spec(self, prepared_size: int) -> StudySpec:
        checkpoint = self.backbone_checkpoint
        encoder = load_backbone(checkpoint)[0] if checkpoint is not None else self.encoder
        return StudySpec(encoder=encoder, width=self.width, input_size=self.input_size,
                         prepared_size=prepared_size, dropout=self.dropout, equalize=self.equalize)

    def training_hparams(self) -> dict:
        """The settings a fold's checkpoints are resumed against (all but ``AFTER_TRAINING``)."""
        return {k: v for k, v in asdict(self).items() if k not in AFTER_TRAINING}


@dataclass
class Result:
    images: pd.DataFrame  # OOF per image
    studies: pd.DataFrame  # OOF per study
    summary: dict  # summary.json
    metrics: pd.DataFrame  # per fold and epoch (the engine's metrics.csv rows)
    models: list[Path]
    out_dir: Path
    stacked: pd.DataFrame | None = None  # the stacker's OOF per study (stack_boxes), as ``studies``
    boxes: OofPredictions | None = None  # 05's fused OOF boxes the none rule and the stacker used


def class_weights(labels: pd.Series, power: float) -> torch.Tensor | None:
    """Cross-entropy weights ``count^-power`` over STUDY_CLASSES, mean 1 (``None`` when power is 0)."""
    if power == 0:
        return None
    counts = labels.value_counts().reindex(STUDY_CLASSES, fill_value=0).to_numpy(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return torch.as_tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def study_step(model: nn.Module, batch, device: torch.device, class_weights: torch.Tensor | None,
               none_weight: float, mask_weight: float) -> tuple[torch.Tensor, dict]:
    """The engine's ``train_step``: ``covidkit.models.study.study_loss`` of a batch."""
    images, target = to_device(batch, device, non_blocking=True)
    weight = class_weights.to(device) if class_weights is not None else None
    return study_loss(model(images), target, weight, none_weight, mask_weight)


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


def training_table(cfg: Config) -> pd.DataFrame:
    """00's prepared train table with the ``model_fold`` and ``has_box`` columns."""
    table = fold_table(cfg.layout.prepare.train_table(Path(cfg.input_dir) / COMPETITION), cfg.fold_groups,
                       cfg.max_items)
    table["has_box"] = table["boxes"].map(len) > 0
    return table


def make_evaluate(val_table: pd.DataFrame, spec: StudySpec):
    """The engine's ``evaluate``: study mAP and head ``none`` AP of the held-out fold."""
    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        images = val_table.merge(predict_table(model, spec, val_table, device), on="image_id")
        return {"val_map": study_aps(study_probabilities(images))["mAP"],
                "val_none_ap": none_ap(images, images["p_none_head"])}
    return evaluate


def train_fold(fold: int, train_table: pd.DataFrame, val_table: pd.DataFrame, spec: StudySpec,
               cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The K-fold driver's ``train_fold``: train on ``train_table``, the last epoch predicts ``val_table`` (fold
    ``fold``). Returns (OOF rows, metrics, model file)."""
    if cfg.pseudo_labels:  # a round: its pseudo-labelled images join (never val_table); soft labels, loss weights
        train_table = with_soft_labels(add_pseudo_rows(train_table, stage_rows(cfg, sampling=False)), cfg.pseudo_weight)
    seed_everything(cfg.seed)
    model = build_study_model(spec, cfg.backbone_checkpoint)
    out = cfg.layout.study_level
    train_cfg = TrainConfig(
        run_dir=str(out.fold(fold) / "train"), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
        num_workers=cfg.workers, amp=cfg.amp, eval_every=min(cfg.eval_every, cfg.epochs), max_steps=cfg.max_steps,
        drop_last=len(train_table) >= 2 * cfg.batch_size,  # no 1-image batch for batch norm, unless data is tiny
        # "split": the key a run's checkpoints were fingerprinted with (resume); renaming it would restart them
        progress=cfg.progress, hparams={**cfg.training_hparams(), "split": fold},
    )
    step = functools.partial(study_step, class_weights=class_weights(train_table["label"], cfg.class_weight_power),
                             none_weight=cfg.none_weight, mask_weight=cfg.mask_weight)
    result = fit(
        model, StudyImageDataset(train_table, train_transform(spec)), step,
        optimizer_fn(cfg), train_cfg,
        scheduler_fn=functools.partial(cosine_with_floor, floor=cfg.lr_floor),
        evaluate=make_evaluate(val_table, spec), resume=cfg.resume,
    )
    load_weights(result.last_checkpoint, model)  # a finished resumed run returns before touching the model
    device = next(model.parameters()).device
    oof = predict_table(model, spec, val_table, device, cfg.hflip_tta, progress=cfg.progress)
    if dist_info().is_main:
        save_study_model(model, spec, out.model(fold), model_fold=fold, seed=cfg.seed,
                         folds=sorted(val_table["fold"].unique().tolist()))
    return oof, pd.DataFrame(result.history).assign(fold=fold), out.model(fold)


def fused_boxes(cfg: Config) -> OofPredictions | None:
    """05's fused OOF boxes, or None (with a warning) when 05 has not run."""
    path = cfg.layout.ensemble_wbf.fused_oof
    if not path.is_file():
        warnings.warn(f"{path} not found (run 05 first): no box-based none rule and no study stacker; "
                      "07 uses the study model alone")
        return None
    return read_oof(path)


def stack_with_boxes(images: pd.DataFrame, boxes: OofPredictions, cfg: Config) -> pd.DataFrame | None:
    """Fit the study stacker (``covidkit.stacking``) on the OOF images and 05's fused OOF ``boxes``.

    Saves it beside the models (07 exports it) and returns its own out-of-fold study probabilities, to be
    scored beside the study model's: each image predicted by a stacker fitted on the other folds of 00
    (grouped by patient, as every other OOF figure), then averaged per study. Returns None, with a warning,
    when a class is missing from some fold's complement.
    """
    from covidkit.stacking import fit_stacker, oof_box_features, out_of_fold_probs, stacker_features

    folds = images["fold"].to_numpy()
    seen = [set(images.loc[folds != f, "label"]) for f in np.unique(folds)]
    if len(seen) < 2 or any(labels != set(STUDY_CLASSES) for labels in seen):
        warnings.warn("stack_boxes: too few studies of some class to fit and score a stacker on 00's folds; "
                      "07 uses the study model alone")
        return None
    sizes = image_sizes(cfg.layout.prepare.dir)
    x = stacker_features(images[PROB_COLUMNS].to_numpy(), oof_box_features(images["image_id"], boxes.boxes, sizes))
    y = images["label"].map(STUDY_CLASSES.index).to_numpy()
    oof = out_of_fold_probs(x, y, folds, cfg.stack_c)
    fit_stacker(x, y, cfg.stack_c).save(cfg.layout.study_level.stacker)
    return study_probabilities(images.drop(columns=PROB_COLUMNS).join(pd.DataFrame(oof, columns=PROB_COLUMNS)))


def count_rule_summary(images: pd.DataFrame, boxes: OofPredictions, truth: dict[str, np.ndarray]) -> dict:
    """The box-count rule's OOF study APs on ``images``' studies, at the fused boxes' best-F1 score threshold
    (05's operating point)."""
    from covidkit.ensemble import operating_point
    from covidkit.oof import restrict

    boxes = restrict(boxes, images["image_id"])
    threshold = operating_point(boxes, truth)["threshold"]
    return {**study_aps(box_count_rule(images, boxes.boxes, threshold)), "threshold": threshold,
            "studies": int(images["study_id"].nunique())}


def write_tables(cfg: Config, images: pd.DataFrame, studies: pd.DataFrame, summary: dict,
                 stacked: pd.DataFrame | None, none_table: pd.DataFrame) -> None:
    """The OOF tables, the summary, the none comparison, and the confusion matrix of what 07 applies."""
    import matplotlib.pyplot as plt

    out = cfg.layout.study_level
    out.dir.mkdir(parents=True, exist_ok=True)
    images.to_csv(out.oof_images, index=False)
    studies.to_csv(out.oof_studies, index=False)
    if stacked is not None:
        stacked.to_csv(out.oof_studies_stacked, index=False)
    out.summary.write_text(json.dumps(summary, indent=2))
    none_table.to_csv(out.none_comparison)
    shown = studies if stacked is None else stacked
    fig = confusion_figure(shown["label"], np.asarray(STUDY_CLASSES)[shown[PROB_COLUMNS].to_numpy().argmax(1)],
                           STUDY_CLASSES, f"study classes, out of fold: {'study model' if stacked is None else 'study model + boxes'}")
    fig.savefig(out.confusion, dpi=100)
    plt.close(fig)


def run(cfg: Config) -> Result:
    write_settings(cfg)
    info = init_distributed()
    out = cfg.layout.study_level
    table = training_table(cfg)
    spec = cfg.spec(cfg.layout.prepare.size)
    pieces, metrics, models = zip(*run_folds(table, functools.partial(train_fold, spec=spec, cfg=cfg),
                                             max_items=cfg.max_items))
    columns = ["image_id", "study_id", MODEL_FOLD, "fold", "label", "has_box"]
    images = table[columns].merge(pd.concat(pieces, ignore_index=True), on="image_id")
    studies = study_probabilities(images)
    summary = summarise(images, studies)
    boxes = fused_boxes(cfg)
    scored = images if boxes is None else images[images["image_id"].isin(set(boxes.images["image_id"]))]
    summary["none_rule"] = choose_none_rule(scored, boxes, cfg.none_rule)
    if boxes is not None:
        summary["box_count_rule"] = count_rule_summary(scored, boxes, dict(zip(table["image_id"], table["boxes"])))
    stacked = None
    if info.is_main:
        for stale in (out.stacker, out.oof_studies_stacked):  # of an earlier run: 07 must not export it
            stale.unlink(missing_ok=True)
        if cfg.stack_boxes and boxes is not None:
            stacked = stack_with_boxes(scored.reset_index(drop=True), boxes, cfg)
        if stacked is not None:
            summary["study_ap_stacked"] = study_aps(stacked)
        write_tables(cfg, images, studies, summary, stacked, none_comparison(images, studies, boxes))
    barrier()
    return Result(images, studies, summary, pd.concat(metrics, ignore_index=True), list(models), out.dir, stacked, boxes)


def describe(result: Result) -> str:
    stacked = result.summary.get("study_ap_stacked", {}).get("mAP")
    return (f"OOF study mAP: {result.summary['study_ap']['mAP']:.3f}"
            + ("" if stacked is None else f", with the boxes (stacker) {stacked:.3f}")
            + ("" if "box_count_rule" not in result.summary else
               f", box-count rule {result.summary['box_count_rule']['mAP']:.3f}")
            + f"; none rule {result.summary['none_rule']['chosen']} "
              f"(OOF none AP {result.summary['none_rule']['ap_out_of_fold']:.3f})\nmodels: "
            + ", ".join(str(p) for p in result.models))


STUDY_FIGURE = "OOF study mAP"
BOX_COUNT_RULE = "box-count rule"  # covidkit.baselines.box_count_rule


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The study model against the class priors; the stacker (study model + boxes) against the priors and the
    box-count rule on 05's boxes; the none rule against the share of images without a box."""
    from covidkit.study_scores import PROB_COLUMNS

    stage, out = "06_study_level", layout.study_level
    if not out.dir.is_dir():
        return []
    summary = read_json(out.summary)
    if summary is None or not out.oof_studies.is_file():
        return [LearningCheck.absent(stage, "study model", STUDY_FIGURE, "class priors",
                                     f"{out.summary.name} or {out.oof_studies.name} not written")]
    prior = summary["prior"]
    spread = float(pd.read_csv(out.oof_studies)[PROB_COLUMNS].std(ddof=0).max())
    checks = [LearningCheck(stage, "study model", STUDY_FIGURE, summary["study_ap"]["mAP"],
                            prior["mAP"], "class priors", AP_MARGIN, spread)]
    if "study_ap_stacked" in summary:
        stacker, stacked = "study model + boxes (stacker)", summary["study_ap_stacked"]["mAP"]
        checks.append(LearningCheck(stage, stacker, STUDY_FIGURE, stacked, prior["mAP"], "class priors", AP_MARGIN))
        rule = summary.get("box_count_rule", {}).get("mAP")
        checks.append(LearningCheck(stage, stacker, STUDY_FIGURE, stacked, rule, BOX_COUNT_RULE, AP_MARGIN)
                      if finite(rule) else
                      LearningCheck.absent(stage, stacker, STUDY_FIGURE, BOX_COUNT_RULE,
                                           f"no box_count_rule in {out.summary.name}"))
    if "none_rule" in summary:
        rule = summary["none_rule"]
        checks.append(LearningCheck(stage, f"none ({rule['chosen']})", "OOF none AP",
                                    rule["ap_out_of_fold"], prior["none"], "the share of images without a box",
                                    AP_MARGIN))
    return checks


def study_section(layout: RunLayout) -> str:
    """06: OOF study APs, ``none`` APs, PR curves, confusion matrix."""
    from covidkit.study_scores import PROB_COLUMNS

    out = layout.study_level
    require(out.summary, out.oof_studies, out.oof_images)
    summary = json.loads(out.summary.read_text())
    studies = pd.read_csv(out.oof_studies, dtype={"study_id": str})
    images = pd.read_csv(out.oof_images, dtype={"image_id": str, "study_id": str})
    columns = {"OOF AP": summary["study_ap"], "prior": summary["prior"]}
    stacked_csv = out.oof_studies_stacked
    if "study_ap_stacked" in summary and stacked_csv.is_file():  # the stacker 07 applies: its curves are shown
        columns = {"OOF AP, study model": summary["study_ap"], "OOF AP, study model + boxes (07)": summary["study_ap_stacked"],
                   "prior": summary["prior"]}
        studies = pd.read_csv(stacked_csv, dtype={"study_id": str})
    if "box_count_rule" in summary:  # the trivial baseline of the stacker (covidkit.baselines.box_count_rule)
        columns["box-count rule"] = {k: summary["box_count_rule"][k] for k in summary["study_ap"]}
    table = pd.DataFrame(columns).loc[list(summary["study_ap"])]
    parts = [f"<p>{summary['studies']} studies, {summary['images']} images, out of fold.</p>", table_html(table)]
    none_csv = out.none_comparison
    none = pd.read_csv(none_csv, index_col=0) if none_csv.is_file() else pd.DataFrame(
        {"none_ap": summary["none_ap"]}).rename_axis("candidate")
    parts += ["<h3>Image-level <code>none</code> AP of each candidate rule</h3>", table_html(none)]
    curves = {c: precision_recall_labels(studies["label"] == c, studies[col]) for c, col in zip(STUDY_CLASSES, PROB_COLUMNS)}
    curves["none (head)"] = precision_recall_labels(~images["has_box"].astype(bool), images["p_none_head"])
    parts.append(figure_html(pr_curves(curves, "study classes and none, out of fold")))
    if out.confusion.is_file():
        parts += ["<h3>Confusion matrix</h3>", png_html(out.confusion.read_bytes())]
    return "\n".join(parts)


REPORT_SECTIONS = [  # the run report's sections of this stage (covidkit.report)
    ("Study classes and none, out of fold (06)", lambda r: study_section(r.layout)),
]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
