"""The synthetic datasets: layouts and CSV formats of the real ones, determinism, DICOM variety,
the radiological study patterns, and evidence that the opacities are really in the pixels."""
from __future__ import annotations

import re
import warnings
from functools import lru_cache
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from covidkit.boxes import label_from_boxes, parse_boxes_column
from covidkit.data.siim import COMPETITION, SOLUTION, SOLUTION_IMAGE_CSV, SOLUTION_STUDY_CSV, STUDY_COLUMNS
from covidkit.synth import SynthConfig, write_all, write_nih, write_rsna, write_siim
from covidkit.synth.dicomio import RECIPES, sample_style, to_stored, write_dicom
from covidkit.synth.lesions import FINDING_DRAWERS, NIH_FINDINGS, anatomy_mods, draw_findings, draw_study_pattern
from covidkit.synth.phantom import develop, render_anatomy, sample_exposure
from covidkit.synth.plan import class_counts, stream
from covidkit.synth.siim import StudyTask, plan_split, render_study

TINY = SynthConfig(seed=0, train_studies=12, test_studies=4, nih_images=6, rsna_images=6,
                   max_size=640, min_size=256, nih_size=256, rsna_size=256, nih_per_folder=4, workers=1,
                   ct=False)  # the CT writers have their own tests (test_ct_*, test_decovnet)
HEX12 = re.compile(r"^[0-9a-f]{12}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RLE, J2K = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_all(out, TINY)
    return out


def read_dicom(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():  # the SIIM hex ids are not valid UI syntax, as in the real files
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def display(ds: pydicom.Dataset, ref: pydicom.Dataset | None = None) -> np.ndarray:
    """Decoded pixels as shown: rescale, first window (else the 1-99 % range of ``ref``), MONOCHROME1 inverted."""
    def modality(d):
        return d.pixel_array.astype(np.float64) * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))

    a, ref_a = modality(ds), modality(ref if ref is not None else ds)
    if "WindowCenter" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = np.percentile(ref_a, [1, 99])
    a = np.clip((a - lo) / (hi - lo), 0, 1)
    return 1 - a if ds.PhotometricInterpretation == "MONOCHROME1" else a


def siim_paths(root: Path, split: str) -> dict[str, Path]:
    return {p.stem: p for p in (root / split).glob("*/*/*.dcm")}


# ---------------------------------------------------------------------------------------------
# layouts and formats


def test_siim_layout_and_csv_formats(synth):
    root = synth / COMPETITION
    study = pd.read_csv(root / "train_study_level.csv")
    image = pd.read_csv(root / "train_image_level.csv", keep_default_na=False)
    assert list(study.columns) == ["id", *STUDY_COLUMNS]
    assert list(image.columns) == ["id", "boxes", "label", "StudyInstanceUID"]
    assert len(study) == TINY.train_studies
    assert (study[STUDY_COLUMNS].sum(axis=1) == 1).all()
    assert (study[STUDY_COLUMNS].sum(axis=0) > 0).all(), "every class, even in a tiny set"
    assert study["id"].str.fullmatch(r"[0-9a-f]{12}_study").all()
    assert image["id"].str.fullmatch(r"[0-9a-f]{12}_image").all()
    assert set(image["StudyInstanceUID"]) == set(study["id"].str[:-6])
    for row in image.itertuples():
        assert row.label == label_from_boxes(parse_boxes_column(row.boxes))
        if row.boxes:
            assert row.boxes.startswith("[{'x': ") and row.label.startswith("opacity 1 ")
        else:
            assert row.label == "none 1 0 0 1 1"

    # every DICOM is in the CSVs, in its study's folder, and vice versa
    paths = siim_paths(root, "train")
    assert set(paths) == set(image["id"].str[:-6])
    for row in image.itertuples():
        assert paths[row.id[:-6]].parent.parent.name == row.StudyInstanceUID

    # sample submission: the test studies, then the test images; solution covers exactly the test split
    sub = pd.read_csv(root / "sample_submission.csv")
    sol_study = pd.read_csv(synth / SOLUTION / SOLUTION_STUDY_CSV)
    sol_image = pd.read_csv(synth / SOLUTION / SOLUTION_IMAGE_CSV, keep_default_na=False)
    test_paths = siim_paths(root, "test")
    test_studies = {p.parent.parent.name for p in test_paths.values()}
    n_studies = len(test_studies)
    assert list(sub.columns) == ["id", "PredictionString"]
    assert set(sub["id"][:n_studies]) == {f"{s}_study" for s in test_studies}
    assert set(sub["id"][n_studies:]) == {f"{i}_image" for i in test_paths}
    assert (sub["PredictionString"][:n_studies] == "negative 1 0 0 1 1").all()
    assert (sub["PredictionString"][n_studies:] == "none 1 0 0 1 1").all()
    assert set(sol_study["id"]) == {f"{s}_study" for s in test_studies}
    assert set(sol_image["id"]) == {f"{i}_image" for i in test_paths}
    assert list(sol_study.columns) == list(study.columns) and list(sol_image.columns) == list(image.columns)
    assert not set(test_paths) & set(paths)


def test_siim_dicom_headers_match_the_layout(synth):
    root = synth / COMPETITION
    patients: dict[str, str] = {}
    for split in ("train", "test"):
        for image_id, path in siim_paths(root, split).items():
            ds = read_dicom(path)
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == image_id
            assert ds.SeriesInstanceUID == path.parent.name and ds.StudyInstanceUID == path.parent.parent.name
            assert all(HEX12.match(x) for x in (image_id, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID))
            assert ds.Modality in ("CR", "DX")
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
            assert ds.PatientSex in ("F", "M")
            assert (ds.Rows, ds.Columns) == ds.pixel_array.shape
            assert TINY.min_size <= min(ds.Rows, ds.Columns) and max(ds.Rows, ds.Columns) <= TINY.max_size
            patients.setdefault(ds.StudyInstanceUID, ds.PatientID)
            assert patients[ds.StudyInstanceUID] == ds.PatientID, "one patient per study"


def test_siim_dicom_variety(synth):
    seen = {"photometric": set(), "bits": set(), "syntax": set(), "windows": set(), "rescale": set()}
    for path in (synth / COMPETITION).glob("*/*/*/*.dcm"):
        ds = read_dicom(path)
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["bits"].add((ds.BitsAllocated, ds.BitsStored))
        seen["syntax"].add(str(ds.file_meta.TransferSyntaxUID))
        seen["windows"].add(len(np.atleast_1d(ds.WindowCenter)) if "WindowCenter" in ds else 0)
        seen["rescale"].add("RescaleSlope" in ds)
        pixels = ds.pixel_array
        assert pixels.dtype == (np.uint8 if ds.BitsAllocated == 8 else np.uint16)
        assert int(pixels.max()) < 2 ** ds.BitsStored
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert (8, 8) in seen["bits"] and len({b for _, b in seen["bits"]}) >= 4
    assert {RLE, J2K, "1.2.840.10008.1.2.1"} <= seen["syntax"]
    assert seen["windows"] >= {0, 1, 2}
    assert seen["rescale"] == {True, False}


@pytest.mark.parametrize("recipe", RECIPES)
def test_dicom_roundtrip_of_each_style(recipe, tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (200, 1))  # dense to the right
    style = sample_style(rng, recipe)
    stored = to_stored(ramp, style)
    path = tmp_path / "x.dcm"
    write_dicom(path, stored, style, study_uid="00086460a852", series_uid="9e8302230c91",
                sop_uid="65761e66de9f", patient_id="0a1b2c3d4e5f", patient_sex="F")
    ds = read_dicom(path)
    np.testing.assert_array_equal(ds.pixel_array, stored)
    assert ds.PhotometricInterpretation == style.photometric
    # MONOCHROME1 stores dense tissue as low values; once shown, dense is bright either way
    dense_stored_low = stored[0, -1] < stored[0, 0]
    assert dense_stored_low == (style.photometric == "MONOCHROME1")
    shown = display(ds)
    assert shown[:, -10:].mean() > shown[:, :10].mean() + 0.5


def test_siim_boxes_inside_their_images(synth):
    root = synth / COMPETITION
    image = pd.read_csv(root / "train_image_level.csv", keep_default_na=False)
    paths = siim_paths(root, "train")
    n_boxes = 0
    for row in image.itertuples():
        ds = read_dicom(paths[row.id[:-6]])
        for x1, y1, x2, y2 in parse_boxes_column(row.boxes):
            assert 0 <= x1 < x2 <= ds.Columns and 0 <= y1 < y2 <= ds.Rows
            n_boxes += 1
    assert n_boxes >= 5


def test_nih_layout(synth):
    root = synth / "nih-chest-xrays"
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    df = pd.read_csv(root / "Data_Entry_2017.csv")
    assert list(df.columns) == ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
                                "OriginalImagePixelSpacing[x", "y]", "Unnamed: 11"]
    assert len(df) == TINY.nih_images
    labels = set(NIH_FINDINGS) | {"No Finding"}
    for row in df.itertuples(index=False):
        name, found, follow_up, patient = row[0], row[1], row[2], row[3]
        assert name == f"{patient:08d}_{follow_up:03d}.png"
        assert set(found.split("|")) <= labels and ("No Finding" not in found or found == "No Finding")
    files = {p.name: p for p in root.glob("images_*/images/*.png")}
    assert set(files) == set(df["Image Index"])
    assert all(re.fullmatch(r"images_\d{3}", p.parent.parent.name) for p in files.values())
    assert max(sum(1 for _ in d.glob("images/*.png")) for d in root.glob("images_*")) <= TINY.nih_per_folder
    img = cv2.imread(str(next(iter(files.values()))), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint8 and img.shape == (TINY.nih_size, TINY.nih_size)
    train = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(df["Image Index"]) and train and test
    patient = dict(zip(df["Image Index"], df["Patient ID"]))
    assert not {patient[n] for n in train} & {patient[n] for n in test}, "split by patient"


def test_rsna_layout(synth):
    root = synth / "rsna-pneumonia-detection-challenge"
    labels = pd.read_csv(root / "stage_2_train_labels.csv")
    classes = pd.read_csv(root / "stage_2_detailed_class_info.csv")
    sub = pd.read_csv(root / "stage_2_sample_submission.csv")
    assert list(labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert list(classes.columns) == ["patientId", "class"]
    assert list(sub.columns) == ["patientId", "PredictionString"]
    assert list(labels["patientId"]) == list(classes["patientId"]), "one class row per label row"
    assert set(classes["class"]) == {"Lung Opacity", "No Lung Opacity / Not Normal", "Normal"}
    assert ((classes["class"] == "Lung Opacity") == (labels["Target"] == 1)).all()
    assert labels.loc[labels["Target"] == 0, ["x", "y", "width", "height"]].isna().all().all()
    boxes = labels[labels["Target"] == 1]
    assert (boxes[["width", "height"]] > 0).all().all()
    assert ((boxes["x"] + boxes["width"]) <= TINY.rsna_size).all()
    train = {p.stem: p for p in (root / "stage_2_train_images").glob("*.dcm")}
    test = {p.stem for p in (root / "stage_2_test_images").glob("*.dcm")}
    assert set(train) == set(labels["patientId"]) and len(train) == TINY.rsna_images
    assert set(sub["patientId"]) == test and len(test) == 2, "a tenth of the train images, at least 2"
    assert all(UUID.match(p) for p in [*train, *test])
    ds = read_dicom(next(iter(train.values())))
    assert ds.PatientID == ds.PatientName == next(iter(train))
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.Rows) == ("MONOCHROME2", 8, TINY.rsna_size)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.pixel_array.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes_whatever_the_workers(synth, tmp_path):
    write_siim(tmp_path, replace(TINY, workers=2))  # a process pool here, one process for the fixture
    write_nih(tmp_path, TINY)
    write_rsna(tmp_path, TINY)
    first = {p.relative_to(synth): p for p in synth.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path): p for p in tmp_path.rglob("*") if p.is_file()}
    assert set(first) == set(second)
    for rel, path in first.items():
        assert path.read_bytes() == second[rel].read_bytes(), rel


def test_another_seed_gives_other_data(synth, tmp_path):
    write_siim(tmp_path, replace(TINY, seed=1, train_studies=4, test_studies=1))
    ids0 = set(pd.read_csv(synth / COMPETITION / "train_image_level.csv")["id"])
    ids1 = set(pd.read_csv(tmp_path / COMPETITION / "train_image_level.csv")["id"])
    assert ids1 and not ids0 & ids1


def test_a_fresh_test_set_is_a_test_split_alone(tmp_path):
    from covidkit.cli import main

    assert main(["synth", "--out", str(tmp_path), "--seed", "9", "--test-studies", "3", "--test-only",
                 "--max-size", "256"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [COMPETITION, SOLUTION]
    assert sorted(p.name for p in (tmp_path / COMPETITION).iterdir()) == ["sample_submission.csv", "test"]
    studies = pd.read_csv(tmp_path / SOLUTION / SOLUTION_STUDY_CSV)
    images = pd.read_csv(tmp_path / SOLUTION / SOLUTION_IMAGE_CSV)
    sample = pd.read_csv(tmp_path / COMPETITION / "sample_submission.csv")
    assert len(studies) == 3 and set(sample["id"]) == set(studies["id"]) | set(images["id"])
    assert len(siim_paths(tmp_path / COMPETITION, "test")) == len(images)


# ---------------------------------------------------------------------------------------------
# the study patterns and the lesions


@lru_cache
def patterns(study_class: str) -> list:
    """``(chest, lesions)`` of 12 phantoms drawn with a study class (rendered once per test module)."""
    out = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        chest = render_anatomy(rng)
        out.append((chest, draw_study_pattern(chest, rng, study_class)))
    return out


def sample_patterns(study_class: str, n: int = 12):
    return patterns(study_class)[:n]


def centre_uv(chest, box) -> tuple[float, float]:
    """Box centre as (0 medial .. 1 lateral, 0 apex .. 1 base)."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return ((abs(x - chest.cx) - chest.mediastinum) / (chest.hw - chest.mediastinum),
            (y - chest.apex_y) / chest.lung_height)


def test_negative_studies_have_no_opacity():
    rng = np.random.default_rng(0)
    chest = render_anatomy(rng)
    assert draw_study_pattern(chest, rng, "negative") == [] and "lesions" not in chest.layers


def test_typical_pattern_is_bilateral_peripheral_and_basal():
    uv = []
    for chest, lesions in sample_patterns("typical"):
        assert {lesion.side for lesion in lesions} == {0, 1}
        uv += [centre_uv(chest, lesion.box) for lesion in lesions]
    u, v = np.array(uv).T
    assert (v > 0.5).mean() > 0.7, "lower zones"
    assert u.mean() > 0.6, "periphery"


def test_indeterminate_pattern_is_unilateral_central_or_upper():
    """Not the typical pattern; its boxes sit as low as typical ones (real median 0.62 vs 0.57), but less peripheral."""
    typical_u = np.mean([centre_uv(c, x.box)[0] for c, les in sample_patterns("typical") for x in les])
    all_u = []
    for chest, lesions in sample_patterns("indeterminate"):
        assert lesions
        u, v = np.array([centre_uv(chest, x.box) for x in lesions]).T
        one_lung = len({x.side for x in lesions}) == 1
        assert one_lung or u.mean() < 0.5 or v.mean() < 0.5
        all_u += list(u)
    assert np.mean(all_u) < typical_u - 0.05


def test_atypical_pattern_is_lobar_nodular_or_cavitary():
    for chest, lesions in sample_patterns("atypical"):
        kinds = {x.kind for x in lesions}
        assert len(kinds) == 1 and kinds <= {"lobar", "nodule", "cavity"}
        if kinds == {"lobar"}:  # one lung, sometimes both
            assert len(lesions) <= 2 and len({x.side for x in lesions}) == len(lesions)
            for lobar in lesions:
                assert lobar.amplitude >= 0.7 and lobar.box[3] - lobar.box[1] > 0.2 * chest.lung_height
        if kinds == {"nodule"}:
            sizes = [max(x.box[2] - x.box[0], x.box[3] - x.box[1]) for x in lesions]
            assert len(lesions) >= 2 and max(sizes) < 0.2 * chest.lung_height


def test_lesion_boxes_lie_on_the_lungs():
    for study_class in ("typical", "indeterminate", "atypical"):
        for chest, lesions in sample_patterns(study_class, 6):
            for lesion in lesions:
                x1, y1, x2, y2 = lesion.box.astype(int)
                on_lung = chest.lungs[lesion.side, y1:y2, x1:x2].mean()
                assert on_lung > 0.3, (study_class, lesion.kind, on_lung)


def test_ground_glass_is_faint_and_consolidation_dense():
    """Contrast of each lesion over its box, in units of the full-resolution pixel noise."""
    cnr: dict[str, list[float]] = {}
    for study_class in ("typical", "atypical"):
        for seed, (chest, lesions) in enumerate(sample_patterns(study_class)):
            exposure = sample_exposure(np.random.default_rng(100 + seed))
            with_lesions = develop(chest, exposure, np.random.default_rng(1))
            layers = {k: v for k, v in chest.layers.items() if k != "lesions"}
            without = develop(replace(chest, layers=layers), exposure, np.random.default_rng(1))
            for lesion in lesions:
                x1, y1, x2, y2 = lesion.box.astype(int)
                contrast = (with_lesions - without)[y1:y2, x1:x2].mean()
                noise = exposure.noise * (0.6 + 0.8 * without[y1:y2, x1:x2].mean())
                cnr.setdefault(lesion.kind, []).append(contrast / noise)
    ggo, dense = np.array(cnr["ggo"]), np.array(cnr["consolidation"] + cnr.get("lobar", []))
    assert (ggo > 0).all()
    assert 0.5 < np.median(ggo) < 3, "ground glass: only slightly above the pixel noise"
    # a zone's patches lie close together, so a box's mean also holds some of its neighbours'
    assert np.median(dense) > 1.7 * np.median(ggo)


def test_opacities_brighten_their_boxes_in_the_decoded_files(tmp_path):
    """A study and its twin without lesions (same anatomy, film and noise), decoded and windowed
    (MONOCHROME1 inverted): each box is brighter in the study, and the boxes hold most of the difference."""
    studies = [s for s in plan_split("train", 16, stream(3, "siim"), set()) if s.study_class != "negative"][:5]
    recipes = [0, 1, 6, 3, None]  # MONOCHROME1 RLE, MONOCHROME2 J2K, MONOCHROME1 rescaled, 8 bit, random
    n_boxes = 0
    for study, recipe in zip(studies, recipes):
        image = replace(study.images[0], boxed=True, recipe=recipe)
        study = replace(study, faint=False, poor=False, images=(image,))
        (row,) = render_study(StudyTask(study, str(tmp_path / "with"), 256, 640))
        render_study(StudyTask(replace(study, study_class="negative"), str(tmp_path / "without"), 256, 640))
        rel = Path(study.split, study.study_id, study.images[0].series_id, f"{study.images[0].image_id}.dcm")
        ref = read_dicom(tmp_path / "without" / rel)
        diff = display(read_dicom(tmp_path / "with" / rel), ref) - display(ref, ref)
        inside = np.zeros(diff.shape, bool)
        for x1, y1, x2, y2 in parse_boxes_column(row["boxes"]).astype(int):
            assert diff[y1:y2, x1:x2].mean() > 0.005
            inside[y1:y2, x1:x2] = True
            n_boxes += 1
        positive = np.clip(diff, 0, None)
        if inside.any():
            assert positive[inside].sum() > 0.6 * positive.sum()
    assert n_boxes >= 5


def test_every_nih_finding_changes_the_image():
    exposure = sample_exposure(np.random.default_rng(0))

    def shown(findings: list[str]) -> np.ndarray:
        rng = np.random.default_rng(1)
        chest = render_anatomy(np.random.default_rng(50), anatomy_mods(findings, rng))
        draw_findings(chest, rng, findings)
        return develop(chest, exposure, np.random.default_rng(0))

    normal = shown([])
    for name in NIH_FINDINGS:
        changed = np.abs(shown([name]) - normal) > 0.03
        assert changed.sum() > 100, name
    assert set(FINDING_DRAWERS) == set(NIH_FINDINGS)


# ---------------------------------------------------------------------------------------------
# configuration and planning


def test_class_counts_keep_every_class_and_the_proportions():
    probs = {"a": 0.27, "b": 0.47, "c": 0.17, "d": 0.08}
    small = class_counts(4, probs, np.random.default_rng(0))
    assert sorted(small) == ["a", "b", "c", "d"]
    big = pd.Series(class_counts(1000, probs, np.random.default_rng(0))).value_counts(normalize=True)
    for name, p in probs.items():
        assert abs(big[name] - p) < 0.01


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="train_studies=-1"):
        SynthConfig(train_studies=-1)
    with pytest.raises(ValueError, match="nih_per_folder"):
        SynthConfig(nih_per_folder=0)
    with pytest.raises(ValueError, match="ct_volumes"):
        SynthConfig(ct_volumes=1)
    SynthConfig(ct=False, ct_volumes=0)  # no CT: no volume count to check
