"""RSNA pneumonia labels and their conversion to a YOLO dataset, on the real chest radiograph."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from covidkit.data import rsna
from covidkit.data.yolo_format import read_yolo_labels
from covidkit.dicom import read_info

# (patientId, x, y, width, height, Target): two boxes, one box, three without, one unreadable file
ROWS = [
    ("p-two", 300.0, 400.0, 500.0, 600.0, 1),
    ("p-two", 1000.0, 500.0, 400.0, 700.0, 1),
    ("p-one", 250.5, 800.25, 320.0, 410.0, 1),
    ("p-none-a", None, None, None, None, 0),
    ("p-none-b", None, None, None, None, 0),
    ("p-none-c", None, None, None, None, 0),
    ("p-broken", None, None, None, None, 0),
]


def write_labels_csv(path: Path, rows=ROWS) -> Path:
    pd.DataFrame(rows, columns=rsna.LABEL_COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def rsna_dir(tmp_path_factory, real_radiograph) -> Path:
    """An RSNA folder in the Kaggle layout: the real radiograph under each patient id, one truncated file."""
    root = tmp_path_factory.mktemp("rsna") / rsna.COMPETITION
    images = root / rsna.IMAGES_DIR
    images.mkdir(parents=True)
    for pid in {r[0] for r in ROWS} - {"p-broken"}:
        shutil.copyfile(real_radiograph, images / f"{pid}.dcm")
    (images / "p-broken.dcm").write_bytes(real_radiograph.read_bytes()[:4000])
    write_labels_csv(root / rsna.LABELS_CSV)
    return root


@pytest.fixture(scope="module")
def converted(rsna_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rsna_yolo")
    return rsna.convert_to_yolo(rsna_dir, out, size=128, val_fraction=0.34, seed=3, workers=2)


def test_read_labels_groups_boxes_per_image(tmp_path):
    labels = rsna.read_labels(write_labels_csv(tmp_path / "labels.csv")).set_index("image_id")["boxes"]
    assert sorted(labels.index) == sorted({r[0] for r in ROWS})
    np.testing.assert_allclose(labels["p-two"], [[300, 400, 800, 1000], [1000, 500, 1400, 1200]])
    np.testing.assert_allclose(labels["p-one"], [[250.5, 800.25, 570.5, 1210.25]])
    assert labels["p-none-a"].shape == (0, 4)


@pytest.mark.parametrize("rows, message", [
    ([("a", None, None, None, None, 1)], "without a box"),
    ([("a", 1.0, 2.0, 3.0, 4.0, 1), ("a", None, None, None, None, 0)], "both Target 0 and 1"),
])
def test_read_labels_rejects_inconsistent_rows(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        rsna.read_labels(write_labels_csv(tmp_path / "labels.csv", rows))


def test_read_labels_names_missing_columns(tmp_path):
    pd.DataFrame({"patientId": ["a"], "Target": [0]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match="missing columns"):
        rsna.read_labels(tmp_path / "labels.csv")


def test_label_files_hold_the_csv_boxes_normalised(converted, real_radiograph):
    info = read_info(real_radiograph)
    hw = (info.height, info.width)
    expected = {"p-two": [[300, 400, 800, 1000], [1000, 500, 1400, 1200]], "p-one": [[250.5, 800.25, 570.5, 1210.25]]}
    for pid, boxes in expected.items():
        lines = (converted.root / "labels" / f"{pid}.txt").read_text().splitlines()
        assert len(lines) == len(boxes)
        assert all(line.split()[0] == "0" for line in lines)
        np.testing.assert_allclose(read_yolo_labels(converted.root / "labels" / f"{pid}.txt", hw), boxes, atol=0.01)
    x1, y1, x2, y2 = expected["p-one"][0]
    cx, cy, w, h = (float(v) for v in (converted.root / "labels" / "p-one.txt").read_text().split()[1:])
    assert cx == pytest.approx((x1 + x2) / 2 / info.width, abs=1e-6)
    assert cy == pytest.approx((y1 + y2) / 2 / info.height, abs=1e-6)
    assert w == pytest.approx((x2 - x1) / info.width, abs=1e-6)
    assert h == pytest.approx((y2 - y1) / info.height, abs=1e-6)


def test_images_without_pneumonia_get_empty_label_files(converted):
    for pid in ("p-none-a", "p-none-b", "p-none-c"):
        assert (converted.root / "labels" / f"{pid}.txt").read_text() == ""


def test_images_are_square_pngs_of_the_requested_size(converted):
    for pid in ("p-two", "p-none-a"):
        image = cv2.imread(str(converted.root / "images" / f"{pid}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (128, 128) and image.dtype == np.uint8


def test_unreadable_file_is_reported_and_left_out(converted):
    meta = converted.meta.set_index("image_id")
    assert meta.loc["p-broken", "status"] == "failed" and meta.loc["p-broken", "error"]
    assert list(converted.failed["image_id"]) == ["p-broken"]
    assert not (converted.root / "labels" / "p-broken.txt").exists()
    saved = pd.read_csv(converted.root / "meta.csv")
    assert set(saved["image_id"]) == {r[0] for r in ROWS}
    assert saved.set_index("image_id").loc["p-two", "n_boxes"] == 2


def test_split_lists_cover_the_readable_images_once(converted):
    spec = yaml.safe_load(converted.data_yaml.read_text())
    assert spec["names"] == {0: "opacity"}
    train = Path(spec["train"]).read_text().split()
    val = Path(spec["val"]).read_text().split()
    assert not set(train) & set(val)
    assert sorted(Path(p).stem for p in train + val) == sorted({r[0] for r in ROWS} - {"p-broken"})
    assert all(Path(p).is_file() for p in train + val)
    assert len(val) == 2  # 34 % of 6 readable images
