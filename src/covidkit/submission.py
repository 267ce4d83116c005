"""Write and check ``id,PredictionString`` submissions.

Rows, as the competition wants them:

- ``<study_id>_study``: all four study classes with their probabilities,
  ``negative p 0 0 1 1 typical p 0 0 1 1 indeterminate p 0 0 1 1 atypical p 0 0 1 1``;
- ``<image_id>_image``: the opacity boxes, ``opacity conf x1 y1 x2 y2 ...``, then
  ``none p 0 0 1 1`` with the probability that the image has no opacity.

Predicting every class on every row costs nothing in VOC AP (a low-confidence detection
only comes after the confident ones) and can only add recall.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import as_boxes, format_prediction_string
from covidkit.data.siim import (
    IMAGE_CLASSES,
    IMAGE_SUFFIX,
    STUDY_CLASSES,
    STUDY_SUFFIX,
    image_row_id,
    study_row_id,
)

SUBMISSION_COLUMNS = ["id", "PredictionString"]
ONE_PIXEL_BOX = (0.0, 0.0, 1.0, 1.0)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ImagePrediction:
    """One image: ``boxes`` ``[N, 4]`` x1, y1, x2, y2 in original pixels, their ``scores`` ``[N]``,
    and ``none_prob``, the probability that the image has no opacity."""

    boxes: np.ndarray
    scores: np.ndarray
    none_prob: float


StudyProbs = Mapping[str, float] | Sequence[float]


def _check_confidences(values, what: str) -> None:
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        raise ValueError(f"{what}: confidences must lie in [0, 1], got {values[bad][:5].tolist()}")


def image_prediction_string(boxes, scores, none_prob: float) -> str:
    """``opacity conf x1 y1 x2 y2 ... none none_prob 0 0 1 1``."""
    boxes = as_boxes(boxes)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    _check_confidences([*scores, none_prob], "image prediction")
    groups = [("opacity", s, *b) for s, b in zip(scores, boxes)]
    groups.append(("none", none_prob, *ONE_PIXEL_BOX))
    return format_prediction_string(groups)


def study_prediction_string(probs: StudyProbs) -> str:
    """``negative p 0 0 1 1 typical p 0 0 1 1 indeterminate p 0 0 1 1 atypical p 0 0 1 1``.

    ``probs``: ``{class: p}`` with the four STUDY_CLASSES, or four numbers in that order.
    """
    if isinstance(probs, Mapping):
        if set(probs) != set(STUDY_CLASSES):
            raise ValueError(f"study probabilities need exactly the classes {STUDY_CLASSES}, got {sorted(probs)}")
        probs = [probs[c] for c in STUDY_CLASSES]
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(probs) != len(STUDY_CLASSES):
        raise ValueError(f"expected {len(STUDY_CLASSES)} study probabilities ({STUDY_CLASSES}), got {len(probs)}")
    _check_confidences(probs, "study prediction")
    return format_prediction_string((c, p, *ONE_PIXEL_BOX) for c, p in zip(STUDY_CLASSES, probs))


def _check_bare_ids(ids, suffix: str) -> None:
    suffixed = [i for i in ids if str(i).endswith((IMAGE_SUFFIX, STUDY_SUFFIX))]
    if suffixed:
        raise ValueError(f"pass ids without their suffix (the writer adds {suffix!r}), got {suffixed[:3]}")


def submission_frame(
    image_predictions: Mapping[str, ImagePrediction],
    study_predictions: Mapping[str, StudyProbs],
    order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The ``id, PredictionString`` frame of these predictions.

    ``image_predictions`` is keyed by image id, ``study_predictions`` by study id (both without
    suffix). Rows follow ``order`` (row ids, e.g. ``sample["id"]``; every one must be predicted and
    nothing else), else the studies then the images in the order given.
    """
    _check_bare_ids(image_predictions, IMAGE_SUFFIX)
    _check_bare_ids(study_predictions, STUDY_SUFFIX)
    rows = {study_row_id(s): study_prediction_string(p) for s, p in study_predictions.items()}
    rows |= {
        image_row_id(i): image_prediction_string(p.boxes, p.scores, p.none_prob)
        for i, p in image_predictions.items()
    }
    if order is not None:
        order = [str(row_id) for row_id in order]
        missing = [row_id for row_id in order if row_id not in rows]
        extra = sorted(set(rows) - set(order))
        if missing or extra:
            raise ValueError(f"predictions do not match the row order: {len(missing)} rows without prediction "
                             f"(e.g. {missing[:3]}), {len(extra)} predictions not in it (e.g. {extra[:3]})")
        rows = {row_id: rows[row_id] for row_id in order}
    return pd.DataFrame({"id": list(rows), "PredictionString": list(rows.values())}, columns=SUBMISSION_COLUMNS)


def write_submission(
    path: str | Path,
    image_predictions: Mapping[str, ImagePrediction],
    study_predictions: Mapping[str, StudyProbs],
    order: Sequence[str] | None = None,
) -> Path:
    """Write :func:`submission_frame` to ``path`` atomically (a temp file, then ``os.replace``)."""
    frame = submission_frame(image_predictions, study_predictions, order)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # next to the target (os.replace cannot cross file systems), with the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)
        from covidkit.atomic import disk_full_error, is_disk_full

        if is_disk_full(err):  # the previous submission, if any, is left as it was
            raise disk_full_error(path, needed=path.stat().st_size if path.exists() else None, written=written) from None
        raise
    return path


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a submission; ``line`` is 1-based in the file (header = line 1)."""

    line: int | None
    row_id: str | None
    message: str

    def __str__(self) -> str:
        if self.line is not None and self.row_id is not None:
            return f"line {self.line} ({self.row_id}): {self.message}"
        if self.line is not None:
            return f"line {self.line}: {self.message}"
        if self.row_id is not None:
            return f"{self.row_id}: {self.message}"
        return self.message


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def _allowed_classes(row_id: str) -> tuple[list[str], str]:
    """The classes a row may predict, and what to call the row in a message."""
    if row_id.endswith(STUDY_SUFFIX):
        return STUDY_CLASSES, "a study row"
    if row_id.endswith(IMAGE_SUFFIX):
        return IMAGE_CLASSES, "an image row"
    return STUDY_CLASSES + IMAGE_CLASSES, "this row"


def _group_problems(tokens: list[str], classes: list[str], kind: str) -> list[str]:
    """What is wrong with one ``class conf x1 y1 x2 y2`` group."""
    label, conf_text, *coord_texts = tokens
    problems = []
    if label not in classes:
        problems.append(f"unknown class {label!r} for {kind} (expected one of {', '.join(classes)})")
    conf = _number(conf_text)
    if conf is None:
        problems.append(f"confidence {conf_text!r} is not a number")
    elif not 0 <= conf <= 1:  # also catches nan
        problems.append(f"confidence {conf_text} not in [0, 1]")
    coords = [_number(t) for t in coord_texts]
    box_text = " ".join(coord_texts)
    if any(c is None for c in coords):
        problems.append(f"box {box_text!r} is not four numbers")
    elif not all(math.isfinite(c) for c in coords):
        problems.append(f"box {box_text} has non-finite coordinates")
    else:
        x1, y1, x2, y2 = coords
        if not x1 < x2:
            problems.append(f"box {box_text}: x1 must be < x2")
        if not y1 < y2:
            problems.append(f"box {box_text}: y1 must be < y2")
        if label in classes and label != "opacity" and tuple(coords) != ONE_PIXEL_BOX:
            problems.append(f"class {label} needs the box 0 0 1 1, got {box_text}")
    return problems


def prediction_string_problems(text: str, row_id: str) -> list[str]:
    """What is wrong with the ``PredictionString`` of row ``row_id`` (empty list when nothing)."""
    tokens = [] if pd.isna(text) else str(text).split()
    if not tokens:
        return ["empty PredictionString (each row needs at least one prediction)"]
    if len(tokens) % 6:
        return [f"{len(tokens)} tokens is not a multiple of 6 (class conf x1 y1 x2 y2)"]
    classes, kind = _allowed_classes(row_id)
    n_groups = len(tokens) // 6
    problems = []
    for g in range(n_groups):
        for message in _group_problems(tokens[6 * g:6 * g + 6], classes, kind):
            problems.append(f"{message} (group {g + 1})" if n_groups > 1 else message)
    return problems


def _column_problems(submission: pd.DataFrame) -> list[Problem]:
    columns = [str(c) for c in submission.columns]
    if columns == SUBMISSION_COLUMNS:
        return []
    return [Problem(1, None, f"columns are {','.join(columns)}; expected exactly {','.join(SUBMISSION_COLUMNS)}")]


def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame) -> list[Problem]:
    """Every problem of ``submission`` against the competition's ``sample`` submission.

    Line numbers assume one row per line under a header, as :func:`read_csv_lines` reads them:
    row ``i`` (0-based) is line ``i + 2``.
    """
    problems = _column_problems(submission)
    if "id" not in submission.columns:
        return problems
    expected = set(sample["id"].astype(str))
    texts = submission["PredictionString"] if "PredictionString" in submission.columns else None
    first_line: dict[str, int] = {}
    for pos, row_id in enumerate(submission["id"].astype(str)):
        line = pos + 2
        if not row_id.strip():
            problems.append(Problem(line, None, "empty id"))
            continue
        if row_id in first_line:
            problems.append(Problem(line, row_id, f"duplicate id (first on line {first_line[row_id]})"))
        else:
            first_line[row_id] = line
        if row_id not in expected:
            problems.append(Problem(line, row_id, "id not in the sample submission"))
        if texts is not None:
            problems += [Problem(line, row_id, m) for m in prediction_string_problems(texts.iloc[pos], row_id)]
    missing = [row_id for row_id in sample["id"].astype(str) if row_id not in first_line]
    problems += [Problem(None, row_id, "missing from the submission") for row_id in missing]
    return problems


def read_csv_lines(path: str | Path) -> pd.DataFrame:
    """A CSV as strings, one row per line (blank lines kept as empty rows, so that line numbers hold)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False)


def _layout_problems(path: str | Path) -> list[Problem]:
    """An empty file, or rows with more or fewer fields than the header.

    Checked with the csv module before pandas reads the file: pandas would stop at the first
    such row, or silently take an extra first field as the index.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if not header:
            return [Problem(None, None, f"{path}: empty file (expected the header id,PredictionString)")]
        return [
            Problem(reader.line_num, fields[0] or None, f"{len(fields)} field(s), expected {len(header)}")
            for fields in reader
            if fields and len(fields) != len(header)
        ]


def validate_files(submission_path: str | Path, sample_path: str | Path) -> list[Problem]:
    """:func:`validate_submission` of two CSV files. An unreadable submission is one problem;
    an unreadable sample raises ``ValueError``."""
    try:
        sample = read_csv_lines(sample_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the sample submission {sample_path}: {err}") from None
    if "id" not in sample.columns:
        raise ValueError(f"{sample_path}: no id column; is it sample_submission.csv?")
    try:
        problems = _layout_problems(submission_path)
        if problems:
            return problems
        submission = read_csv_lines(submission_path)
    except FileNotFoundError:
        return [Problem(None, None, f"{submission_path}: no such file")]
    except (OSError, ValueError, csv.Error) as err:  # UnicodeDecodeError and pandas' errors are ValueErrors
        return [Problem(None, None, f"{submission_path}: not a readable CSV ({str(err).strip()})")]
    return validate_submission(submission, sample)
