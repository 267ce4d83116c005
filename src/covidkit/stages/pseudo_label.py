"""Stage 08: pseudo-labels of unlabelled radiographs from the run's exported models folder (issue 33).

Off unless asked (``external: []``, ``include_test: false``): then the stage writes an empty table and says so.
With ``external: [name, ...]`` each folder ``<input_dir>/external/<name>/`` is prepared at 00's size and
deduplicated against 00's competition images (``covidkit.dedup.run_dedup``: a copy of a test image is dropped, a
copy of a training image dropped or mapped, ``train_duplicates``); the kept images, and with ``include_test`` the
competition's test images, are predicted by the models folder 07 exported (``covidkit.predict.Predictor``, as
``covidkit predict`` does). Each row keeps the four study-class probabilities (the soft label), the ``none``
probability and the fused boxes scoring at least ``box_threshold``; None takes 05's operating point (the best-F1
score on the out-of-fold boxes), so no test label chooses it.

Reads ``<run_dir>/prepared/`` (00), ``<run_dir>/models/`` (07, or ``models_dir``), 05's ``operating_point.json``,
``<input_dir>/external/<name>/``. Writes ``<run_dir>/08_pseudo_label/``: ``pseudo_labels.csv``
(``covidkit.pseudo``), ``summary.json``, ``pseudo_boxes.png``, ``external/<name>/`` (the deduplication). In a run
with rounds (``covidkit pipeline --rounds``) round r's table trains round r + 1's 03, 04 and 06.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from covidkit.atomic import atomic_write_text
from covidkit.data.siim import STUDY_CLASSES
from covidkit.layout import RunLayout
from covidkit.pseudo import PSEUDO_COLUMNS, empty_table, read_pseudo_labels, write_pseudo_labels
from covidkit.stages import StageConfig, stage_main, write_settings

EXTERNAL = "external"  # <input_dir>/external/<name>/

# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir>, and the stages whose outputs it reads.
DATASETS = [EXTERNAL]
UPSTREAM = ['00_prepare_data', '05_ensemble_wbf', '07_make_submission']


@dataclass
class Config(StageConfig):
    external: list[str] = field(default_factory=list)  # folders of <input_dir>/external/ to pseudo-label; []: none
    include_test: bool = False  # also the competition's test images (what the 1st place did on the public test)
    models_dir: str | None = None  # the models folder that predicts; None: 07's <run_dir>/models
    box_threshold: float | None = None  # lowest score of a pseudo-box; None: 05's operating point (out of fold)
    dedup_threshold: float = 0.78  # covidkit.dedup.DedupConfig.threshold (docs/pseudo-labels.md)
    train_duplicates: str = "drop"  # a copy of a training image: "drop", or "map" (kept, mapped to it)
    device: str | None = None  # None: cuda when a GPU is visible, else cpu
    hflip_tta: bool = False  # as 07 predicts
    workers: int | None = None  # preparing the external images; None: all cores
    progress: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.external) or self.include_test


@dataclass
class Result:
    table: pd.DataFrame  # pseudo_labels.csv's rows
    summary: dict
    out_dir: Path


def box_threshold(cfg: Config) -> tuple[float, str]:
    """The pseudo-box score threshold and where it came from (the setting, or 05's out-of-fold operating point)."""
    if cfg.box_threshold is not None:
        return float(cfg.box_threshold), "box_threshold setting"
    path = cfg.layout.ensemble_wbf.operating_point
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run 05 first, or set box_threshold")
    return float(json.loads(path.read_text())["threshold"]), f"05's operating point ({path.name}, best F1 out of fold)"


def external_images(cfg: Config) -> tuple[pd.DataFrame, dict]:
    """Every external folder prepared and deduplicated: the kept images (``image_id, dataset, path, orig_height,
    orig_width, mapped_to``) and, per folder, what dedup did."""
    from covidkit.data.external import external_png
    from covidkit.dedup import PREPARED, DedupConfig, kept_images, run_dedup

    dedup_cfg = DedupConfig(threshold=cfg.dedup_threshold, train_duplicates=cfg.train_duplicates)
    kept, counts = [], {}
    for name in cfg.external:
        folder = Path(cfg.input_dir) / EXTERNAL / name
        if not folder.is_dir():
            raise FileNotFoundError(f"no external folder {folder} (08's external: {cfg.external})")
        out = cfg.layout.pseudo_label.external(name)
        result = run_dedup(folder, cfg.layout.prepare.dir, out, dedup_cfg, workers=cfg.workers, progress=cfg.progress)
        matches = result.matches
        if cfg.max_items is not None:  # a dry run: a few images, the duplicates among them kept in view
            matches = matches.head(cfg.max_items)
        rows = kept_images(matches)
        meta = pd.read_csv(out / PREPARED / "meta.csv", dtype={"image_id": str}, keep_default_na=False)
        meta = meta.set_index("image_id").loc[rows["external_id"]]
        kept.append(pd.DataFrame({
            "image_id": rows["external_id"].to_numpy(), "source": EXTERNAL, "dataset": name,
            "path": [str(external_png(out / PREPARED, i)) for i in rows["external_id"]],
            "orig_height": meta["orig_height"].astype(int).to_numpy(),
            "orig_width": meta["orig_width"].astype(int).to_numpy(), "mapped_to": rows["mapped_to"].to_numpy()}))
        counts[name] = {"images": int(len(matches)), "dropped": int((matches["action"] == "drop").sum()),
                        "mapped": int((matches["action"] == "map").sum()), "dedup": result.line(),
                        **({"dedup_scores": result.scores} if result.scores else {})}
    return (pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()), counts


def test_images(cfg: Config) -> pd.DataFrame:
    """00's prepared competition test images, as ``external_images`` lists them."""
    from covidkit.dedup import competition_images

    test = competition_images(cfg.layout.prepare.dir)
    test = test[test["split"] == "test"]
    if cfg.max_items is not None:
        test = test.head(cfg.max_items)
    return pd.DataFrame({"image_id": test["image_id"].to_numpy(), "source": "test", "dataset": "test",
                         "path": test["png"].to_numpy(), "orig_height": test["orig_height"].to_numpy(),
                         "orig_width": test["orig_width"].to_numpy(), "mapped_to": ""})


def predict_images(images: pd.DataFrame, cfg: Config, threshold: float) -> pd.DataFrame:
    """Each image through the models folder: soft study labels, ``none``, the boxes scoring ``threshold`` or more.

    The predictor takes an image at its original size: the prepared PNG is stretched back to it (the models
    folder squares it again, as 00 did)."""
    from covidkit.engine.device import default_device
    from covidkit.images import read_grey
    from covidkit.predict import Predictor

    predictor = Predictor.load(cfg.models_dir or cfg.layout.submission.models, cfg.device or str(default_device()),
                               cfg.hflip_tta)
    rows = []
    for row in tqdm(images.itertuples(index=False), total=len(images), desc="pseudo-label", unit="img",
                    disable=not cfg.progress):
        square = read_grey(row.path)
        image = cv2.resize(square, (int(row.orig_width), int(row.orig_height)), interpolation=cv2.INTER_LINEAR)
        pred = predictor.predict(image)
        keep = pred.scores >= threshold
        rows.append({**row._asdict(), **{f"p_{c}": pred.study_probs[c] for c in STUDY_CLASSES},
                     "p_none": pred.none_prob, "boxes": pred.boxes[keep], "scores": pred.scores[keep]})
    return pd.DataFrame(rows, columns=PSEUDO_COLUMNS)


def run(cfg: Config) -> Result:
    write_settings(cfg)
    out = cfg.layout.pseudo_label
    out.dir.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        write_pseudo_labels(empty_table(), out.table)
        summary = {"enabled": False, "images": 0}
        atomic_write_text(out.summary, json.dumps(summary, indent=2) + "\n")
        return Result(empty_table(), summary, out.dir)
    threshold, origin = box_threshold(cfg)
    external, counts = external_images(cfg)
    images = pd.concat([external, test_images(cfg) if cfg.include_test else None], ignore_index=True)
    table = predict_images(images, cfg, threshold) if len(images) else empty_table()
    write_pseudo_labels(table, out.table)
    summary = {"enabled": True, "images": int(len(table)),
               "by_source": {str(k): int(v) for k, v in table["source"].value_counts().items()},
               "dropped_as_duplicates": int(sum(c["dropped"] for c in counts.values())),
               "mapped_to_training_images": int(sum(c["mapped"] for c in counts.values())),
               "with_pseudo_boxes": int(sum(len(b) > 0 for b in table["boxes"])),
               "box_threshold": threshold, "box_threshold_from": origin, "external": counts}
    atomic_write_text(out.summary, json.dumps(summary, indent=2) + "\n")
    if len(table):
        save_figure(table, out.figure)
    return Result(table, summary, out.dir)


def save_figure(table: pd.DataFrame, path: Path, n: int = 6) -> Path | None:
    """A few images (external first, those with pseudo-boxes first) with their pseudo-boxes and soft labels."""
    from covidkit.plots import plt, save

    order = table.assign(_ext=table["source"] != EXTERNAL, _none=[len(b) == 0 for b in table["boxes"]])
    shown = order.sort_values(["_ext", "_none"], kind="stable").head(n)
    fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3.4), squeeze=False)
    for ax, row in zip(axes[0], shown.itertuples(index=False)):
        image = cv2.resize(cv2.imread(row.path, cv2.IMREAD_GRAYSCALE), (int(row.orig_width), int(row.orig_height)))
        ax.imshow(image, cmap="gray")
        for (x1, y1, x2, y2), s in zip(row.boxes, row.scores):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="orange", lw=1.5))
            ax.text(x1, y1, f"{s:.2f}", color="orange", fontsize=7, va="bottom")
        best = max(STUDY_CLASSES, key=lambda c: getattr(row, f"p_{c}"))
        ax.set_title(f"{row.dataset}: {str(row.image_id)[-18:]}\n{best} {getattr(row, f'p_{best}'):.2f}, "
                     f"none {row.p_none:.2f}", fontsize=7)
        ax.axis("off")
    save(fig, path)
    return path


def describe(result: Result) -> str:
    s = result.summary
    if not s["enabled"]:
        return "08: off (external: [], include_test: false): an empty pseudo-label table written"
    return (f"{s['images']} images pseudo-labelled ({s['by_source']}), {s['dropped_as_duplicates']} external images "
            f"dropped as duplicates, {s['with_pseudo_boxes']} with pseudo-boxes (score >= {s['box_threshold']:.3f}: "
            f"{s['box_threshold_from']}); table: {result.out_dir / 'pseudo_labels.csv'}")


def pseudo_section(layout: RunLayout) -> str:
    """The pseudo-label table's counts and the figure of a few external images with their pseudo-boxes."""
    from covidkit.report import Missing, png_html

    path = layout.pseudo_label.summary
    if not path.is_file():
        raise Missing("not run: no 08_pseudo_label/summary.json")
    summary = json.loads(path.read_text())
    if not summary.get("enabled"):
        return "<p>Off (external: [], include_test: false): no pseudo-labels.</p>"
    keys = ("images", "by_source", "dropped_as_duplicates", "mapped_to_training_images", "with_pseudo_boxes",
            "box_threshold", "box_threshold_from")
    items = "".join(f"<li>{k}: {html.escape(str(summary.get(k)))}</li>" for k in keys)
    figure = png_html(layout.pseudo_label.figure.read_bytes()) if layout.pseudo_label.figure.is_file() else ""
    return f"<ul>{items}</ul>{figure}"


def pseudo_count(layout: RunLayout) -> int | None:
    """Images in a round folder's pseudo-label table (None when 08 has not written one)."""
    path = layout.pseudo_label.table
    return int(len(read_pseudo_labels(path))) if path.is_file() else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def round_row(layout: RunLayout) -> dict:
    """One round's figures: OOF opacity AP of 05's fusion (the row tuned on the other folds' images when 05 had a
    grid), OOF study mAP of 06 (and of its stacker), the mean test score of 07's fresh test sets, and how many
    pseudo-labelled images it trained on (the previous round's 08 table)."""
    from covidkit.fresh_tests import read_fresh_test_sets
    from covidkit.stages.ensemble_wbf import ENSEMBLE, TUNED_OOF

    row = {"round": layout.round, "pseudo-labelled images": 0}
    if layout.round:
        row["pseudo-labelled images"] = pseudo_count(RunLayout(layout.round_dir(layout.round - 1)))
    if layout.ensemble_wbf.ap_table.is_file():
        table = pd.read_csv(layout.ensemble_wbf.ap_table, index_col=0)
        row["OOF opacity AP@0.5 (05)"] = float(table.loc[TUNED_OOF if TUNED_OOF in table.index else ENSEMBLE, "ap50"])
    study = _read_json(layout.study_level.summary)
    row["OOF study mAP (06)"] = study.get("study_ap", {}).get("mAP")
    row["OOF study mAP, stacker (06)"] = study.get("study_ap_stacked", {}).get("mAP")
    fresh = read_fresh_test_sets(layout.submission.fresh_tests)
    row["fresh test score (07)"] = fresh.mean if fresh is not None and not fresh.per_seed.empty else None
    return row


def rounds_table(layout: RunLayout) -> pd.DataFrame:
    """``round_row`` of every round of the run (``RunLayout.rounds``)."""
    table = pd.DataFrame([round_row(r) for r in RunLayout(layout.base).rounds()]).set_index("round")
    figures = [c for c in table.columns if c != "pseudo-labelled images"]
    return table.astype({c: float for c in figures})  # a figure not written: NaN (n/a in the report)


def rounds_section(layout: RunLayout) -> str:
    """``rounds_table``; a run without rounds has its one row (``covidkit pipeline --rounds K`` adds rounds)."""
    from covidkit.report import Missing, table_html

    table = rounds_table(layout)
    if table.drop(columns="pseudo-labelled images").isna().all(axis=None):
        raise Missing("not run: no figure of 05, 06 or 07")
    text = ("Each round's out-of-fold figures are on the competition's labelled images only; the models folder and "
            "the submission are the last round's." if len(table) > 1 else
            "One round: covidkit pipeline --rounds K adds pseudo-label rounds (docs/pseudo-labels.md).")
    return f"<p>{html.escape(text)}</p>" + table_html(table, digits=4)


REPORT_SECTIONS = [  # the run report's sections of this stage (covidkit.report)
    ("Pseudo-labels (08)", lambda r: pseudo_section(r.layout)),
    ("Pseudo-label rounds", lambda r: rounds_section(r.layout)),
]


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
