"""The SIIM layout helpers: ids, the two label CSVs, the DICOM tree."""
from __future__ import annotations

import numpy as np
import pytest

from covidkit.data import siim


def test_row_ids_round_trip():
    assert siim.image_row_id("abc") == "abc_image"
    assert siim.study_row_id("abc") == "abc_study"
    assert siim.strip_suffix("abc_image") == "abc" and siim.strip_suffix("x_study") == "x"
    with pytest.raises(ValueError, match="ends in neither"):
        siim.strip_suffix("abc")


def test_read_study_labels(tmp_path):
    path = tmp_path / "study.csv"
    path.write_text("id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,Atypical Appearance\n"
                    "s1_study,0,1,0,0\ns2_study,0,0,0,1\ns3_study,1,0,0,0\n")
    labels = siim.read_study_labels(path)
    assert labels.to_dict("list") == {"study_id": ["s1", "s2", "s3"], "label": ["typical", "atypical", "negative"]}
    path.write_text(path.read_text() + "s4_study,0,1,1,0\n")
    with pytest.raises(ValueError, match="exactly one class.*s4_study"):
        siim.read_study_labels(path)


def test_read_image_labels_parses_the_boxes_column(tmp_path):
    path = tmp_path / "image.csv"
    path.write_text(
        "id,boxes,label,StudyInstanceUID\n"
        "i1_image,\"[{'x': 10.5, 'y': 20, 'width': 100, 'height': 50}, {'x': 1, 'y': 2, 'width': 3, 'height': 4}]\","
        "opacity 1 10.5 20 110.5 70 opacity 1 1 2 4 6,s1\n"
        "i2_image,,none 1 0 0 1 1,s1\n")
    labels = siim.read_image_labels(path)
    assert list(labels["image_id"]) == ["i1", "i2"] and list(labels["study_id"]) == ["s1", "s1"]
    np.testing.assert_allclose(labels["boxes"][0], [[10.5, 20, 110.5, 70], [1, 2, 4, 6]])
    assert labels["boxes"][1].shape == (0, 4)
    path.write_text("id,boxes\n")
    with pytest.raises(ValueError, match="missing columns"):
        siim.read_image_labels(path)


def test_dicom_paths_follow_the_kaggle_tree(tmp_path):
    for study, series, image in [("s1", "r1", "i1"), ("s1", "r1", "i2"), ("s2", "r9", "i3")]:
        folder = tmp_path / "train" / study / series
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{image}.dcm").write_bytes(b"")
    (tmp_path / "train" / "stray.dcm").write_bytes(b"")  # not at the study/series/image depth
    paths = siim.dicom_paths(tmp_path, "train")
    assert sorted(paths) == ["i1", "i2", "i3"]
    assert paths["i3"] == tmp_path / "train" / "s2" / "r9" / "i3.dcm"
