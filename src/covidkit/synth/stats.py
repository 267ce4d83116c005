"""Label statistics of a SIIM or RSNA dataset folder, to compare the synthetic data with the real figures.

The real figures are in ``docs/data.md`` (from the published training labels). Both functions read
only the label CSVs and the DICOM headers, so they work on real and synthetic folders alike.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from covidkit.boxes import parse_boxes_column
from covidkit.data.siim import COMPETITION, STUDY_CLASSES, STUDY_COLUMNS, strip_suffix

PERCENTILES = [5, 25, 50, 75, 95]


def _header(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():  # the SIIM hex ids are not valid UI syntax
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def _shares(counts: pd.Series, top: int) -> dict[str, float]:
    """Share of each count 0..top-1 and of ``top`` or more (key ``f"{top}+"``)."""
    out = {str(k): float((counts == k).mean()) for k in range(top)}
    out[f"{top}+"] = float((counts >= top).mean())
    return out


def _pct(values) -> list[float]:
    values = np.asarray(values, np.float64)
    return [round(float(x), 3) for x in np.percentile(values, PERCENTILES)] if len(values) else []


def siim_label_statistics(input_dir: str | Path, split: str = "train") -> dict:
    """Hierarchy, box and image-size figures of the SIIM ``train`` split in ``input_dir``
    (the folder holding ``siim-covid19-detection/``)."""
    root = Path(input_dir) / COMPETITION
    studies = pd.read_csv(root / f"{split}_study_level.csv")
    studies["study_id"] = studies["id"].map(strip_suffix)
    studies["study_class"] = np.array(STUDY_CLASSES)[studies[STUDY_COLUMNS].to_numpy().argmax(1)]
    images = pd.read_csv(root / f"{split}_image_level.csv")
    images["image_id"] = images["id"].map(strip_suffix)
    headers = []
    for path in sorted((root / split).glob("*/*/*.dcm")):
        ds = _header(path)
        headers.append({"image_id": path.stem, "rows": int(ds.Rows), "cols": int(ds.Columns),
                        "patient_id": str(ds.PatientID)})
    images = images.merge(pd.DataFrame(headers), on="image_id", how="left")
    images = images.merge(studies[["study_id", "study_class"]], left_on="StudyInstanceUID", right_on="study_id")
    boxes = [parse_boxes_column(b) for b in images["boxes"]]
    images["n_boxes"] = [len(b) for b in boxes]
    positive = images["study_class"] != "negative"

    rows = []
    for b, h, w, cls in zip(boxes, images["rows"], images["cols"], images["study_class"]):
        for x1, y1, x2, y2 in b:
            rows.append({"w": (x2 - x1) / w, "h": (y2 - y1) / h, "cx": (x1 + x2) / 2 / w, "cls": cls})
    box = pd.DataFrame(rows, columns=["w", "h", "cx", "cls"])
    box["area"] = box["w"] * box["h"]
    two = [b for b, n in zip(boxes, images["n_boxes"]) if n == 2]
    w_two = images.loc[images["n_boxes"] == 2, "cols"].to_numpy()
    per_lung = [((b[:, 0] + b[:, 2]) / 2 < w / 2).sum() == 1 for b, w in zip(two, w_two)]

    per_study = images.groupby("study_id").agg(n=("image_id", "size"), boxed=("n_boxes", lambda s: (s > 0).sum()),
                                               cls=("study_class", "first"))
    multi = per_study[(per_study["n"] > 1) & (per_study["cls"] != "negative")]
    per_patient = images.groupby("patient_id")["study_id"].nunique()
    aspect = images["cols"] / images["rows"]
    return {
        "images": len(images), "studies": len(studies), "patients": int(per_patient.size),
        "study_classes": studies["study_class"].value_counts(normalize=True).round(3).to_dict(),
        "images_per_study": _shares(per_study["n"], 3),
        "studies_per_patient": {"mean": round(float(per_patient.mean()), 2), "max": int(per_patient.max()),
                                **_shares(per_patient, 5)},
        "multi_image_positive_studies": len(multi),
        "multi_image_exactly_one_boxed": float((multi["boxed"] == 1).mean()) if len(multi) else float("nan"),
        "negative_images_boxed": int((images.loc[~positive, "n_boxes"] > 0).sum()),
        "boxless_positive_images": float((images.loc[positive, "n_boxes"] == 0).mean()),
        "boxes_per_image": {c: _shares(images.loc[images["study_class"] == c, "n_boxes"], 4)
                            for c in STUDY_CLASSES[1:]},
        "two_boxes_one_per_side": float(np.mean(per_lung)) if per_lung else float("nan"),
        "box_left_share": float((box["cx"] < 0.5).mean()) if len(box) else float("nan"),
        "box_width": _pct(box["w"]), "box_height": _pct(box["h"]), "box_area": _pct(box["area"]),
        "box_area_median": {c: round(float(box.loc[box["cls"] == c, "area"].median()), 3)
                            for c in STUDY_CLASSES[1:]},
        "width": _pct(images["cols"]), "height": _pct(images["rows"]), "aspect": _pct(aspect),
    }


def rsna_label_statistics(input_dir: str | Path) -> dict:
    """Positive share, boxes per positive image and box sizes of ``rsna-pneumonia-detection-challenge/``."""
    from covidkit.synth.rsna import DATASET  # noqa: PLC0415  (the layout lives with its writer)

    root = Path(input_dir) / DATASET
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    per_image = labels.groupby("patientId")["Target"].sum()
    boxes = labels[labels["Target"] == 1].copy()
    sizes = {pid: _header(root / "stage_2_train_images" / f"{pid}.dcm") for pid in boxes["patientId"].unique()}
    boxes["w"] = boxes["width"] / boxes["patientId"].map(lambda p: int(sizes[p].Columns))
    boxes["h"] = boxes["height"] / boxes["patientId"].map(lambda p: int(sizes[p].Rows))
    n = per_image[per_image > 0]
    return {
        "images": int(per_image.size),
        "positive_share": float((per_image > 0).mean()),
        "boxes_per_positive_image": {"1": float((n == 1).mean()), "2": float((n == 2).mean()),
                                     "3+": float((n >= 3).mean())},
        "box_width": _pct(boxes["w"]), "box_height": _pct(boxes["h"]), "box_area": _pct(boxes["w"] * boxes["h"]),
    }
