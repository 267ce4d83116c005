"""The YOLO notebooks' work: RSNA pretraining (02) and K-fold SIIM fine-tuning with OOF predictions (04).

Each notebook writes into ``<run_dir>/<notebook name>/`` (``run_dir``: the pipeline's run folder)::

    ultralytics/                    ultralytics' settings, fonts, DDP launch files (covidkit.models.yolo)
    02_pretrain_rsna_yolo/
        data/                       the RSNA data as a YOLO dataset (images, labels, rsna.yaml, meta.csv)
        train/                      the run: args.yaml, results.csv, plots, weights/{best,last}.pt
    04_train_siim_yolo/
        data/                       the SIIM training images as a YOLO dataset, one data YAML per fold
        fold<k>/                    one fine-tuning run per fold
        oof.csv, oof_images.csv     out-of-fold opacity boxes, original pixels (covidkit.oof format)
        oof_untrained.csv, ...      the same for the untrained model (when a baseline is asked for)
        summary.json                per-fold and out-of-fold AP@0.5, and the untrained baseline
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import scale_boxes
from covidkit.data import rsna, siim, yolo_format
from covidkit.data.rsna import RsnaYoloDataset
from covidkit.models import pretrained, yolo
from covidkit.models.yolo import YoloRun, YoloTrainConfig
from covidkit.oof import OofPredictions, box_rows, opacity_ap, per_fold_ap, write_oof

RSNA_NOTEBOOK = "02_pretrain_rsna_yolo"
SIIM_NOTEBOOK = "04_train_siim_yolo"
OOF_CSV = "oof.csv"
UNTRAINED_OOF_CSV = "oof_untrained.csv"
SUMMARY_JSON = "summary.json"


def output_dir(run_dir: str | Path, notebook: str) -> Path:
    return Path(run_dir) / notebook


@dataclass
class RsnaPretraining:
    dataset: RsnaYoloDataset
    run: YoloRun


def pretrain_rsna(input_dir: str | Path, run_dir: str | Path, cfg: YoloTrainConfig, image_size: int = 512,
                  val_fraction: float = 0.1, limit: int | None = None, workers: int | None = None,
                  resume: bool = True) -> RsnaPretraining:
    """Convert ``<input_dir>/rsna-pneumonia-detection-challenge`` and pretrain ``cfg.model`` on it.

    Weights end in ``pretrained_weights(run_dir)``.
    """
    yolo.setup_ultralytics(run_dir)
    cfg = replace(cfg, model=starting_model(cfg.model, input_dir))
    out = output_dir(run_dir, RSNA_NOTEBOOK)
    dataset = rsna.convert_to_yolo(Path(input_dir) / rsna.COMPETITION, out / "data", size=image_size,
                                   val_fraction=val_fraction, seed=cfg.seed, workers=workers, limit=limit)
    run = yolo.train_yolo(cfg, dataset.data_yaml, out / "train", resume=resume)
    return RsnaPretraining(dataset, run)


def starting_model(model: str, input_dir: str | Path) -> str:
    """What 02 starts from: a model YAML as it is (random weights); a ``.pt`` checkpoint (ultralytics' COCO
    ``yolo11l.pt``) from ``<input_dir>/weights/`` or a path, else, with a one-line warning, its YAML."""
    if Path(model).suffix != ".pt":
        return model
    found = pretrained.resolve(model, input_dir, stage=RSNA_NOTEBOOK)
    return str(found) if found is not None else Path(model).with_suffix(".yaml").name


def pretrained_weights(run_dir: str | Path) -> Path:
    """The weights notebook 02 leaves for notebook 04."""
    return output_dir(run_dir, RSNA_NOTEBOOK) / "train" / "weights" / "best.pt"


def yolo_models(run_dir: str | Path) -> list[Path]:
    """The fold models of 04 in a run: the weights each ``fold<k>`` run predicted its OOF images with."""
    runs = sorted((p.parent for p in output_dir(run_dir, SIIM_NOTEBOOK).glob("fold*/results.csv")),
                  key=lambda p: int(p.name.removeprefix("fold")))
    return [yolo.finished_run(run).weights for run in runs]


@dataclass
class SiimYoloResult:
    """The K-fold fine-tuning: one run per fold, OOF predictions and their AP@0.5."""

    runs: dict[int, YoloRun]
    oof: OofPredictions
    out_dir: Path
    fold_ap: pd.Series
    ap: float
    baseline_ap: float | None


def predict_fold(model, table: pd.DataFrame, fold: int, imgsz: int, device: str | None, conf: float) -> OofPredictions:
    """Predictions for the rows of ``table`` (prepared PNGs), boxes scaled back to original pixels."""
    from PIL import Image

    predicted = yolo.predict_boxes(model, list(table["path"]), imgsz=imgsz, device=device, conf=conf)
    parts = []
    for row, (boxes, scores) in zip(table.itertuples(index=False), predicted):
        with Image.open(row.path) as png:  # header only
            png_hw = (png.height, png.width)
        parts.append(box_rows(row.image_id, fold, scale_boxes(boxes, png_hw, (row.orig_height, row.orig_width)),
                              scores))
    images = pd.DataFrame({"image_id": table["image_id"], "fold": fold})
    return OofPredictions.from_parts(parts, images)


def truth(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """``{image_id: [N, 4] boxes}`` in original pixels."""
    return dict(zip(table["image_id"], table["boxes"]))


def untrained_predictions(table: pd.DataFrame, cfg: YoloTrainConfig, model_yaml: str,
                          conf: float) -> OofPredictions:
    """Predictions on ``table`` of ``model_yaml`` with its random initial weights (seed ``cfg.seed``)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = yolo.load_model(model_yaml)
    return OofPredictions.concat(predict_fold(model, part, fold, cfg.imgsz, cfg.device, conf)
                                 for fold, part in table.groupby("fold"))


def train_siim_folds(prepared_dir: str | Path, competition_dir: str | Path, run_dir: str | Path,
                     cfg: YoloTrainConfig, folds: list[int] | None = None, resume: bool = True,
                     conf: float = 0.001, baseline_model: str | None = None,
                     fold_groups: int | None = None) -> SiimYoloResult:
    """Fine-tune ``cfg.model`` on every validation split of ``folds.csv``; OOF predictions and AP@0.5.

    ``fold_groups`` merges the K folds into fewer splits (split = fold mod ``fold_groups``, as
    in 03: patients still never cross), so a cheap run trains fewer models and still predicts
    every image out of fold; None: one split per fold. The run of split k is ``fold<k>/``.
    ``folds``: the splits to validate on (default: all; OOF then covers every training image).
    ``baseline_model``: a model YAML whose untrained AP is computed for comparison (None: skip).
    OOF rows keep each image's fold of ``folds.csv``.
    """
    yolo.setup_ultralytics(run_dir)
    out = output_dir(run_dir, SIIM_NOTEBOOK)
    table = siim.prepared_train_table(prepared_dir, competition_dir)
    table["split"] = table["fold"] % fold_groups if fold_groups else table["fold"]
    all_splits = sorted(table["split"].unique())
    folds = all_splits if folds is None else [int(f) for f in folds]
    unknown = sorted(set(folds) - set(all_splits))
    if unknown:
        raise ValueError(f"folds {unknown} are not among the splits {all_splits} of folds.csv")
    data_root = yolo_format.write_siim_dataset(table, out / "data")

    runs, pieces = {}, []
    for split in folds:
        data_yaml = yolo_format.write_siim_fold(table, data_root, split, column="split")
        runs[split] = yolo.train_yolo(cfg, data_yaml, out / f"fold{split}", resume=resume)
        model = yolo.load_model(runs[split].weights)
        held_out = table[table["split"] == split]
        pieces.extend(predict_fold(model, part, fold, cfg.imgsz, cfg.device, conf)
                      for fold, part in held_out.groupby("fold"))
    oof = OofPredictions.concat(pieces)
    write_oof(out / OOF_CSV, oof)

    gt = truth(table)
    baseline_ap = None
    if baseline_model:
        # conf 0: an untrained head scores everything near its prior (~1e-4), below any threshold; its
        # AP is that of its boxes, not of an empty prediction
        untrained = untrained_predictions(table[table["split"].isin(folds)], cfg, baseline_model, conf=0.0)
        write_oof(out / UNTRAINED_OOF_CSV, untrained)
        baseline_ap = opacity_ap(untrained, gt)
    result = SiimYoloResult(runs=runs, oof=oof, out_dir=out, fold_ap=per_fold_ap(oof, gt), ap=opacity_ap(oof, gt),
                            baseline_ap=baseline_ap)
    summary = {"oof_ap50": _number(result.ap), "untrained_ap50": _number(result.baseline_ap),
               "fold_ap50": {int(k): _number(v) for k, v in result.fold_ap.items()},
               "folds": [int(f) for f in folds], "images": len(oof.images), "model": str(cfg.model)}
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    return result


def _number(value: float | None) -> float | None:
    """JSON has no NaN (AP of a fold without ground-truth boxes): None instead."""
    return None if value is None or np.isnan(value) else float(value)


NOTEBOOKS = {"rsna": RSNA_NOTEBOOK, "siim": SIIM_NOTEBOOK}
CONFIG_KEYS = ("model", "imgsz", "epochs", "batch", "device", "workers", "seed", "save_period")


def train_config(params: dict) -> YoloTrainConfig:
    """The training configuration of a notebook's parameters (as in its profile section)."""
    return YoloTrainConfig(**{k: params[k] for k in CONFIG_KEYS if k in params}, overrides=params.get("hyp") or {})


def main(argv: list[str] | None = None) -> None:
    """The work of notebook 02 (``rsna``) or 04 (``siim``) from a shell, with a profile's parameters."""
    from covidkit.profiles import profile_argument_parser, section_parameters

    parser = profile_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(NOTEBOOKS), help="rsna: notebook 02; siim: notebook 04")
    args = parser.parse_args(argv)
    params = section_parameters(args.profile, NOTEBOOKS[args.stage], input_dir=args.input, run_dir=args.run_dir)
    run_dir = params["run_dir"]
    if args.stage == "rsna":
        result = pretrain_rsna(params["input_dir"], run_dir, train_config(params), image_size=params["imgsz"],
                               val_fraction=params.get("val_fraction", 0.1), limit=params.get("limit"),
                               resume=params.get("resume", True))
        print(f"weights: {result.run.weights}")
        return
    params["model"] = params.get("model") or str(pretrained_weights(run_dir))
    siim_result = train_siim_folds(Path(run_dir) / "prepared", Path(params["input_dir"]) / siim.COMPETITION, run_dir,
                                   train_config(params), folds=params.get("folds"), resume=params.get("resume", True),
                                   conf=params.get("conf", 0.001), baseline_model=params.get("baseline_model"),
                                   fold_groups=params.get("fold_groups"))
    print(siim_result.fold_ap.to_string(float_format="%.4f"))
    print(f"OOF opacity AP@0.5: {siim_result.ap:.4f}   untrained: {siim_result.baseline_ap}")
    print(f"OOF predictions: {siim_result.out_dir / OOF_CSV}")


if __name__ == "__main__":
    main()
