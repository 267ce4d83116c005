"""Stage 05: weighted boxes fusion of the two detectors' out-of-fold boxes, and its parameters for 07.

Reads 03's and 04's ``oof.csv`` (+ ``oof_images.csv``), 00's ``meta.csv`` (original sizes) and the training
labels. Writes ``<run_dir>/05_ensemble_wbf/``: ``ap_table.csv`` / ``ap_table.md`` (opacity AP@0.5 of each
detector and of the fusion on the same OOF images), ``oof.csv`` (the fused OOF boxes with the saved
parameters; 06 reads them), ``fusion.json`` (what 07 fuses with), ``operating_point.json`` (the best-F1 score
threshold of those boxes: what the web page shows by default), ``grid.csv`` (with a ``grid``) and
``pr_curves.png``. The table's row "prior boxes" is the trivial baseline (``covidkit.baselines.prior_box_oof``: the
mean training box of each lung zone at a constant score, each fold's from the other folds' images). With a grid,
the parameters are chosen on the OOF images; the row "tuned on the other folds' images" is the honest score of that
choice (``covidkit.ensemble.tuned_out_of_fold``), read as the mean of its folds' APs (the table's ``ap50_fold_mean``,
``covidkit.oof.fold_mean_ap``): its learning checks compare that column of every row.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.baselines import prior_box_oof
from covidkit.data.siim import COMPETITION, read_image_labels
from covidkit.ensemble import (
    FusionParams, ap_table, best_fusion, common_images, fuse_oof, grid_fusions, operating_point, precision_recall,
    tuned_out_of_fold,
)
from covidkit.oof import OofPredictions, opacity_ap, read_oof, restrict, write_oof
from covidkit.plots import pr_curves, plt
from covidkit.prepare import image_sizes
from covidkit.learning import AP_MARGIN, DETECTOR_FIGURE, RIVAL_MARGIN, LearningCheck, image_score_spread
from covidkit.layout import RunLayout
from covidkit.report import (
    Missing, detector_oofs, examples_figure, figure_html, image_meta, label_boxes, pick_examples, prior_box_aps,
    study_titles, table_html,
)
from covidkit.stages import StageConfig, stage_main, write_settings

ENSEMBLE = "WBF ensemble"
TUNED = "WBF ensemble, parameters tuned on these images"
TUNED_OOF = "WBF ensemble, parameters tuned on the other folds' images"
PRIOR_BOXES = "prior boxes"  # the trivial baseline row
FOLD_MEAN_FIGURE = f"{DETECTOR_FIGURE}, mean over 00's folds"


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['siim-covid19-detection']
UPSTREAM = ['00_prepare_data', '03_train_siim_fasterrcnn', '04_train_siim_yolo']


@dataclass
class Config(StageConfig):
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # Faster R-CNN, YOLO
    iou_thr: float = 0.55  # boxes of different models overlapping more than this are fused
    skip_box_thr: float = 0.0  # boxes scoring below this are dropped before the fusion
    conf_type: str = "avg"  # "avg", "max", "box_and_model_avg" or "absent_model_aware_avg"
    nms_iou_thr: float | None = 0.5  # NMS after the fusion, None for none
    max_boxes: int | None = 20  # each model's best boxes per image that take part
    grid: dict | None = None  # e.g. {"iou_thr": [0.55, 0.4], "weights": [[1, 1], [1, 2]]}; None: no tuning

    def params(self) -> FusionParams:
        return FusionParams(weights=tuple(self.weights), iou_thr=self.iou_thr, skip_box_thr=self.skip_box_thr,
                            conf_type=self.conf_type, nms_iou_thr=self.nms_iou_thr, max_boxes=self.max_boxes)


@dataclass
class Result:
    table: pd.DataFrame  # opacity AP@0.5 per model on the shared OOF images (index: model)
    oofs: dict[str, OofPredictions]  # the same rows' predictions, on those images
    params: FusionParams  # what 07 uses (the tuned ones when a grid was given)
    grid: pd.DataFrame | None
    truth: dict[str, np.ndarray]
    operating_point: dict  # the best-F1 score threshold of the fused boxes
    out_dir: Path


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    """A GitHub Markdown table of ``frame`` with its index (``DataFrame.to_markdown`` needs tabulate,
    which covidkit does not depend on for one table)."""
    frame = frame.reset_index()
    cells = [[float_format.format(v) if isinstance(v, float) else str(v) for v in row]
             for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def prior_boxes(images: pd.DataFrame, truth: dict[str, np.ndarray],
                sizes: dict[str, tuple[int, int]]) -> OofPredictions:
    """The prior-box detector on ``images`` (``image_id, fold``): each fold's boxes from the other folds' images."""
    ids = images["image_id"].tolist()
    table = images[["image_id", "fold"]].assign(boxes=[truth[i] for i in ids], orig_height=[sizes[i][0] for i in ids],
                                                orig_width=[sizes[i][1] for i in ids])
    return prior_box_oof(table, by="fold")


def run(cfg: Config) -> Result:
    write_settings(cfg)
    layout = cfg.layout
    singles = {"Faster R-CNN": read_oof(layout.siim_fasterrcnn.oof), "YOLO": read_oof(layout.siim_yolo.oof)}
    sizes = image_sizes(layout.prepare.dir)
    labels = read_image_labels(Path(cfg.input_dir) / COMPETITION / "train_image_level.csv")
    truth = dict(zip(labels["image_id"], labels["boxes"]))
    shared = common_images(list(singles.values()))
    if not shared:
        raise ValueError("the OOF predictions of 03 and 04 share no image")
    oofs = {name: restrict(oof, shared) for name, oof in singles.items()}
    params = cfg.params()
    oofs[ENSEMBLE] = fuse_oof(list(singles.values()), sizes, params)
    grid = None
    if cfg.grid:
        fusions = grid_fusions(list(singles.values()), sizes, cfg.grid, base=params)
        tuned, grid = best_fusion(fusions, truth, cfg.grid)
        if fusions[0][1].images["fold"].nunique() > 1:
            oofs[TUNED_OOF] = tuned_out_of_fold(fusions, truth)[0]
        if tuned != params:
            oofs[TUNED] = next(oof for p, oof in fusions if p == tuned)
        params = tuned
    oofs[PRIOR_BOXES] = prior_boxes(oofs["Faster R-CNN"].images, truth, sizes)
    table = ap_table(oofs, truth)

    out = layout.ensemble_wbf
    out.dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.ap_table)
    out.ap_table_md.write_text(markdown_table(table))
    fused = oofs[TUNED if TUNED in oofs else ENSEMBLE]
    write_oof(out.fused_oof, fused)
    params.save(out.fusion)
    point = operating_point(fused, truth)
    out.operating_point.write_text(json.dumps(point, indent=2) + "\n")
    if grid is not None:
        grid.to_csv(out.grid, index=False)
    curves = {f"{name} (AP {table.loc[name, 'ap50']:.3f})": precision_recall(oof, truth) for name, oof in oofs.items()}
    fig = pr_curves(curves, "opacity, IoU > 0.5, out of fold")
    fig.savefig(out.pr_curves, dpi=100)
    plt.close(fig)
    return Result(table=table, oofs=oofs, params=params, grid=grid, truth=truth, operating_point=point,
                  out_dir=out.dir)


def describe(result: Result) -> str:
    return markdown_table(result.table) + f"fusion parameters for 07: {result.params.to_dict()}"


def learning_checks(layout: RunLayout, input_dir: Path | None) -> list[LearningCheck]:
    """The fusion's OOF AP (05's table) against the better single detector (a rival: ``RIVAL_MARGIN``, ties
    allowed) and against the prior-box detector."""
    from covidkit.oof import read_oof

    stage, out = "05_ensemble_wbf", layout.ensemble_wbf
    if not out.dir.is_dir():
        return []
    if not out.ap_table.is_file():
        return [LearningCheck.absent(stage, ENSEMBLE, DETECTOR_FIGURE, name, f"{out.ap_table.name} not written")
                for name in ("the better detector alone", PRIOR_BOXES)]
    table = pd.read_csv(out.ap_table, index_col=0)
    row = TUNED_OOF if TUNED_OOF in table.index else ENSEMBLE
    # the tuned-per-fold row is read per fold (covidkit.oof.fold_mean_ap), and so are the rows it is compared to
    column, figure = (("ap50_fold_mean", FOLD_MEAN_FIGURE) if row == TUNED_OOF and "ap50_fold_mean" in table
                      else ("ap50", DETECTOR_FIGURE))
    table = table[column]
    value = float(table[row])
    singles = table.reindex(["Faster R-CNN", "YOLO"]).dropna()
    if singles.empty:
        rival = LearningCheck.absent(stage, row, figure, "the better detector alone",
                                     f"no single detector's AP in {out.ap_table.name}")
    else:
        best = singles.idxmax()
        rival = LearningCheck(stage, row, figure, value, float(singles[best]), f"{best} alone", RIVAL_MARGIN,
                              rival=True)
    if PRIOR_BOXES in table.index and np.isfinite(table[PRIOR_BOXES]):
        fused = read_oof(out.fused_oof) if out.fused_oof.is_file() else None
        spread = None if fused is None else image_score_spread(fused.boxes, fused.images)
        prior = LearningCheck(stage, row, figure, value, float(table[PRIOR_BOXES]), PRIOR_BOXES, AP_MARGIN,
                              spread)
    else:
        prior = LearningCheck.absent(stage, row, figure, PRIOR_BOXES,
                                     f"no row {PRIOR_BOXES!r} in {out.ap_table.name}")
    return [rival, prior]


def detectors_section(layout: RunLayout, input_dir: Path | None) -> str:
    """OOF opacity AP@0.5 of each detector and the fusion, PR curves, and 05's table."""
    from covidkit.ensemble import precision_recall

    parts = []
    table_path = layout.ensemble_wbf.ap_table
    if table_path.is_file():
        parts += ["<h3>Single models and the fusion, same OOF images (05)</h3>",
                  table_html(pd.read_csv(table_path, index_col=0))]
    else:
        parts.append(f'<p class="missing">05 single-vs-fused table: not run ({table_path} missing)</p>')
    oofs = detector_oofs(layout)
    if not oofs:
        raise Missing("not run: no OOF boxes of 03, 04 or 05")
    truth = label_boxes(input_dir)
    priors = prior_box_aps(layout)
    rows = [{"model": name, "images": len(oof.images), "boxes": len(oof.boxes), "opacity AP@0.5": opacity_ap(oof, truth),
             "prior boxes AP@0.5": priors.get(name, np.nan)} for name, oof in oofs.items()]
    curves = {f"{name} (AP {row['opacity AP@0.5']:.3f})": precision_recall(oof, truth)
              for (name, oof), row in zip(oofs.items(), rows)}
    parts += ["<h3>OOF opacity AP@0.5 of every model on all its OOF images</h3>",
              table_html(pd.DataFrame(rows).set_index("model")),
              figure_html(pr_curves(curves, "opacity, IoU > 0.5, out of fold"))]
    return "\n".join(parts)


def oof_examples_section(layout: RunLayout, input_dir: Path | None) -> str:
    """OOF training images with true boxes (green) and the best available OOF boxes (orange)."""
    oofs = detector_oofs(layout)
    if not oofs:
        raise Missing("not run: no OOF boxes of 03, 04 or 05")
    name, oof = list(oofs.items())[-1]  # the fusion when 05 ran
    truth = label_boxes(input_dir)
    meta = image_meta(layout)
    ids = pick_examples(oof.images["image_id"].tolist(), truth)
    study = study_titles(layout)
    boxes = oof.boxes.groupby("image_id")
    preds = [boxes.get_group(i) if i in boxes.groups else oof.boxes.iloc[:0] for i in ids]
    fig = examples_figure(
        [layout.prepare.png("train", i) for i in ids], [truth[i] for i in ids],
        [p[["x1", "y1", "x2", "y2"]].to_numpy() for p in preds], [p["score"].to_numpy() for p in preds],
        [meta[i] for i in ids], [study.get(i, i[:12]) for i in ids])
    return f"<p>Boxes of {html.escape(name)}; green: truth, orange: predicted with score.</p>{figure_html(fig)}"


REPORT_SECTIONS = [  # the run report's sections of this stage (covidkit.report)
    ("Opacity detectors, out of fold (03, 04, 05)", lambda r: detectors_section(r.layout, r.input_dir)),
    ("Out-of-fold examples", lambda r: oof_examples_section(r.layout, r.input_dir)),
]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
