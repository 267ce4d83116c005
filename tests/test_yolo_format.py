"""Writing YOLO datasets: normalised xywh labels, SIIM images and folds, read back by ultralytics itself."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from covidkit.data import yolo_format


def test_lines_are_normalised_centre_width_height():
    # a 200 x 100 (w x h) box at x 100..300, y 50..150 in a 400 wide, 200 high image
    assert yolo_format.yolo_lines([[100, 50, 300, 150]], (200, 400)) == ["0 0.500000 0.500000 0.500000 0.500000"]
    assert yolo_format.yolo_lines([[0, 0, 40, 20]], (200, 400)) == ["0 0.050000 0.050000 0.100000 0.100000"]


def test_lines_clip_to_the_image_and_drop_empty_boxes():
    lines = yolo_format.yolo_lines([[-50, -10, 50, 30], [500, 10, 600, 20], [10, 10, 10, 30]], (100, 200))
    assert lines == ["0 0.125000 0.150000 0.250000 0.300000"]  # clipped to 0..50 x 0..30; the others vanish
    assert yolo_format.yolo_lines(np.zeros((0, 4)), (100, 200)) == []


def test_label_file_round_trip(tmp_path):
    boxes = np.array([[12.5, 30.0, 250.0, 190.5], [300.0, 10.0, 399.0, 60.0]])
    yolo_format.write_labels(tmp_path / "a.txt", boxes, (200, 400))
    np.testing.assert_allclose(yolo_format.read_yolo_labels(tmp_path / "a.txt", (200, 400)), boxes, atol=1e-3)
    yolo_format.write_labels(tmp_path / "empty.txt", np.zeros((0, 4)), (200, 400))
    assert (tmp_path / "empty.txt").read_text() == ""
    assert yolo_format.read_yolo_labels(tmp_path / "empty.txt", (200, 400)).shape == (0, 4)


@pytest.fixture
def siim_table(tmp_path) -> pd.DataFrame:
    """Six prepared 64 px PNGs from originals of various sizes, boxes in original pixels, three folds."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        path = tmp_path / "prepared" / "train" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 64), dtype=np.uint8))
        height, width = 1000 + 100 * i, 800 + 50 * i
        boxes = np.array([[100.0, 200.0, 400.0, 700.0]]) if i % 2 == 0 else np.zeros((0, 4))
        rows.append({"image_id": f"img{i}", "fold": i % 3, "path": str(path), "orig_height": height,
                     "orig_width": width, "boxes": boxes})
    return pd.DataFrame(rows)


def test_siim_dataset_links_images_and_writes_labels(siim_table, tmp_path):
    root = yolo_format.write_siim_dataset(siim_table, tmp_path / "yolo")
    for row in siim_table.itertuples():
        image = root / "images" / f"{row.image_id}.png"
        assert image.resolve() == Path(row.path).resolve()
        label = (root / "labels" / f"{row.image_id}.txt").read_text()
        if len(row.boxes):
            hw = (row.orig_height, row.orig_width)
            read = yolo_format.read_yolo_labels(root / "labels" / f"{row.image_id}.txt", hw)
            np.testing.assert_allclose(read, row.boxes, atol=1e-2)
            cx = float(label.split()[1])
            assert cx == pytest.approx(250 / row.orig_width, abs=1e-6)
        else:
            assert label == ""


def test_fold_yaml_validates_on_its_fold_and_trains_on_the_rest(siim_table, tmp_path):
    root = yolo_format.write_siim_dataset(siim_table, tmp_path / "yolo")
    for fold in range(3):
        spec = yaml.safe_load(yolo_format.write_siim_fold(siim_table, root, fold).read_text())
        train = [Path(p).stem for p in Path(spec["train"]).read_text().split()]
        val = [Path(p).stem for p in Path(spec["val"]).read_text().split()]
        assert sorted(val) == sorted(siim_table.loc[siim_table["fold"] == fold, "image_id"])
        assert sorted(train + val) == sorted(siim_table["image_id"])
        assert spec["names"] == {0: "opacity"}


def test_empty_split_is_an_error(siim_table, tmp_path):
    root = yolo_format.write_siim_dataset(siim_table, tmp_path / "yolo")
    with pytest.raises(ValueError, match="non-empty"):
        yolo_format.write_siim_fold(siim_table, root, fold=7)


def test_ultralytics_reads_the_labels_we_write(siim_table, tmp_path):
    from covidkit.models.yolo import setup_ultralytics

    setup_ultralytics(tmp_path / "run")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    root = yolo_format.write_siim_dataset(siim_table, tmp_path / "yolo")
    data = check_det_dataset(str(yolo_format.write_siim_fold(siim_table, root, 0)))
    dataset = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False)
    by_id = {Path(label["im_file"]).stem: label for label in dataset.labels}
    assert sorted(by_id) == sorted(siim_table.loc[siim_table["fold"] != 0, "image_id"])
    for row in siim_table[siim_table["fold"] != 0].itertuples():
        xywh = by_id[row.image_id]["bboxes"]  # normalised cx, cy, w, h
        expected = [line.split()[1:] for line in yolo_format.yolo_lines(row.boxes, (row.orig_height, row.orig_width))]
        np.testing.assert_allclose(xywh, np.array(expected, dtype=float).reshape(-1, 4), atol=1e-6)
