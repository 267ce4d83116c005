"""The study-level model: shapes, checkpoints, resizing, the none probability, OOF scoring, and learning."""
from __future__ import annotations

import functools

import cv2
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from covidkit.data.nih import LABELS
from covidkit.data.siim import STUDY_CLASSES
from covidkit.models import build_classifier, save_backbone
from covidkit.models.study import (
    StudySpec, build_study_model, load_study_model, model_inputs, none_probability, predict_outputs,
    save_study_model,
)
from covidkit.prepare import resize_square
from covidkit.data.study import StudyImageDataset
from covidkit.models.study import train_transform
from covidkit.stages.study_level import Config as StudyTrainConfig, class_weights, predict_table, study_step
from covidkit.study_scores import PROB_COLUMNS, none_ap, none_comparison, study_aps, study_probabilities
from covidkit.engine import TrainConfig, fit
from covidkit.oof import OofPredictions

def predict_study_probs(model, spec, images, **kwargs) -> np.ndarray:
    return predict_outputs(model, spec, images, **kwargs)[0]


SPEC = StudySpec(encoder="resnet18", width=8, input_size=64, prepared_size=96)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_study_model(SPEC).eval()


def test_forward_shapes_and_probabilities():
    model = _model()
    out = model(torch.randn(3, 3, 64, 64))
    assert out["study"].shape == (3, 4) and out["none"].shape == (3,) and out["mask"].shape == (3, 1, 64, 64)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(300, 200), (96, 96), (50, 80)]]
    probs = predict_study_probs(model, SPEC, images)
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    study, none = predict_outputs(model, SPEC, images, hflip_tta=True)
    assert none.shape == (3,) and ((none > 0) & (none < 1)).all()
    assert not np.allclose(study, probs)  # the flipped view counts
    assert predict_study_probs(model, SPEC, []).shape == (0, 4)
    with pytest.raises(ValueError, match="2-D uint8"):
        predict_study_probs(model, SPEC, [np.zeros((10, 10), np.float32)])


def test_any_size_is_resized_as_the_prepared_pngs(tmp_path):
    """An original-size image gives exactly what its prepared PNG (00's resize, written and read) gives."""
    model = _model()
    rng = np.random.default_rng(1)
    original = cv2.GaussianBlur(rng.integers(0, 256, (517, 431), dtype=np.uint8), (7, 7), 2)
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), resize_square(original, SPEC.prepared_size))
    prepared = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(predict_study_probs(model, SPEC, [original]),
                                  predict_study_probs(model, SPEC, [prepared]))
    smaller = resize_square(original, 200)
    assert not np.array_equal(predict_study_probs(model, SPEC, [smaller]), predict_study_probs(model, SPEC, [original]))


def test_save_load_round_trip(tmp_path):
    model = _model(3)
    path = save_study_model(model, SPEC, tmp_path / "06_study_level" / "split1" / "study_model.pt", model_fold=1)
    save_study_model(_model(4), SPEC, tmp_path / "06_study_level" / "split0" / "study_model.pt", model_fold=0)
    loaded, spec = load_study_model(path)
    assert spec == SPEC and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    images = [np.random.default_rng(2).integers(0, 256, (120, 100), dtype=np.uint8)]
    np.testing.assert_array_equal(predict_study_probs(model, SPEC, images), predict_study_probs(loaded, spec, images))
    from covidkit.layout import RunLayout

    assert [p.parent.name for p in RunLayout(tmp_path).study_level.models()] == ["split0", "split1"]
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a covidkit study model"):
        load_study_model(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="run 06_study_level"):
        load_study_model(tmp_path / "missing.pt")


@pytest.mark.parametrize("encoder", ["plain", "resnet18"])
def test_heat_map_is_full_size_and_gives_none(encoder, tmp_path):
    """Both encoders of the one family: the heat map at the input's size, none = no pixel with opacity."""
    spec = StudySpec(encoder=encoder, width=8, input_size=64, prepared_size=96)
    torch.manual_seed(0)
    model = build_study_model(spec).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["study"].shape == (2, 4) and out["mask"].shape == (2, 1, 64, 64)
    torch.testing.assert_close(out["none"], -out["mask"].amax(dim=(1, 2, 3)))
    path = save_study_model(model, spec, tmp_path / "m.pt")
    loaded, loaded_spec = load_study_model(path)
    images = [np.random.default_rng(2).integers(0, 256, (120, 100), dtype=np.uint8)]
    assert loaded_spec == spec
    np.testing.assert_array_equal(predict_outputs(model, spec, images)[1], predict_outputs(loaded, spec, images)[1])


def test_a_plain_encoder_takes_no_backbone(tmp_path):
    spec = StudySpec(encoder="plain", width=8, input_size=64, prepared_size=96)
    with pytest.raises(ValueError, match="encoder a plain"):
        build_study_model(spec, save_backbone(build_classifier("resnet18", len(LABELS)), tmp_path / "b.pt", "resnet18"))


def test_plain_encoder_ignores_exposure_and_contrast():
    """The plain encoder standardises each image: a linear change of the grey levels leaves its outputs alone."""
    spec = StudySpec(encoder="plain", width=8, input_size=64, prepared_size=64)
    torch.manual_seed(0)
    model = build_study_model(spec).eval()
    image = cv2.GaussianBlur(np.random.default_rng(3).integers(20, 120, (64, 64)).astype(np.uint8), (5, 5), 1)
    brighter = image * 2 + 10  # no clipping below 255
    study, none = predict_outputs(model, spec, [image, brighter])
    np.testing.assert_allclose(study[0], study[1], atol=1e-4)
    np.testing.assert_allclose(none[0], none[1], atol=1e-4)
    other = predict_outputs(model, spec, [np.ascontiguousarray(image.T)])[1]
    assert abs(other[0] - none[0]) > 1e-4  # it does look at the image


def test_backbone_of_01_is_loaded_and_checked(tmp_path):
    torch.manual_seed(5)
    nih = build_classifier("resnet18", len(LABELS))
    path = save_backbone(nih, tmp_path / "backbone.pt", "resnet18")
    model = build_study_model(SPEC, path)
    assert torch.equal(model.encoder.body.layer3[0].conv1.weight, nih.layer3[0].conv1.weight)
    with pytest.raises(ValueError, match="is a resnet18"):
        build_study_model(StudySpec(encoder="resnet34", input_size=64, prepared_size=96), path)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown architecture"):
        StudySpec(encoder="vgg16")
    with pytest.raises(ValueError, match="none_rule"):
        StudyTrainConfig(input_dir="i", run_dir="r", none_rule="max")
    assert StudySpec.from_json(SPEC.to_json()) == SPEC


def test_none_probability_properties():
    # no box: the estimate itself, for either rule
    assert none_probability(0.7, np.zeros(0), 0.2) == pytest.approx(0.2)
    assert none_probability(0.7, [], 0.2, rule="negative") == pytest.approx(0.7)
    assert none_probability(0.7, [], None) == pytest.approx(0.7)  # no head output: P(negative)
    q = 0.6
    values = [none_probability(0.1, [s], q) for s in np.linspace(0, 1, 11)]
    assert all(0 <= v <= 1 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases with the box score
    assert values[-1] == pytest.approx(0.0)
    # only the best box counts, and a sure "none" is barely moved by a weak box
    assert none_probability(0.1, [0.3, 0.1], q) == pytest.approx(none_probability(0.1, [0.3], q))
    assert none_probability(0.0, [0.3], 0.99) > 0.98
    assert none_probability(0.0, [0.3], 0.5) < 0.5 * 0.85
    with pytest.raises(ValueError, match="finite"):
        none_probability(0.5, [np.nan])
    with pytest.raises(ValueError, match="rule"):
        none_probability(0.5, [], rule="max")
    # the detectors alone: 1 - the best box score, whatever the classifier says
    assert none_probability(0.9, [0.3, 0.6], 0.9, rule="boxes") == pytest.approx(0.4)
    assert none_probability(0.1, [], 0.1, rule="boxes") == pytest.approx(1.0)


def test_oof_scoring_matches_the_competition_rules():
    labels = ["negative", "typical", "typical", "atypical", "indeterminate", "negative"]
    images = pd.DataFrame({"image_id": [f"i{k}" for k in range(7)], "study_id": ["s0", "s1", "s2", "s3", "s4", "s5", "s5"],
                           "model_fold": 0, "label": labels + ["negative"],
                           "has_box": [False, True, True, True, True, False, True]})
    perfect = np.eye(4)[[STUDY_CLASSES.index(c) for c in images["label"]]]
    images[PROB_COLUMNS] = perfect
    images["p_none_head"] = (~images["has_box"]).astype(float)
    studies = study_probabilities(images)
    assert list(studies["study_id"]) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    aps = study_aps(studies)
    assert aps["mAP"] == pytest.approx(1.0) and all(aps[c] == pytest.approx(1.0) for c in STUDY_CLASSES)
    assert none_ap(images, images["p_none_head"]) == pytest.approx(1.0)
    # reversed confidences: the negatives come last
    assert none_ap(images, 1 - images["p_none_head"]) < 0.5
    boxes = OofPredictions(pd.DataFrame({"image_id": ["i1"], "fold": [0], "x1": [0.0], "y1": [0.0], "x2": [5.0],
                                         "y2": [5.0], "score": [0.9]}),
                           images[["image_id"]].assign(fold=0))
    alone = none_comparison(images, studies)
    assert list(alone.index[:1]) == ["head"] and set(alone.index) == {"head", "negative", "study_negative"}
    table = none_comparison(images, studies, boxes)
    assert set(table.index) == {"head", "negative", "boxes", "head (classifier alone)", "negative (classifier alone)",
                                "study_negative (classifier alone)"}
    assert table.loc["head", "none_ap"] == pytest.approx(1.0)
    # one box, on a positive image: the detectors alone rank that image last of seven, the rest tie
    expected = [none_probability(n, [s], h, rule="boxes") for n, s, h in
                zip(images["p_negative"], [0, 0.9, 0, 0, 0, 0, 0], images["p_none_head"])]
    assert table.loc["boxes", "none_ap"] == pytest.approx(none_ap(images, np.array(expected)))


def test_class_weights():
    labels = pd.Series(["typical"] * 6 + ["negative"] * 3 + ["atypical"])
    assert class_weights(labels, 0.0) is None
    w = class_weights(labels, 1.0)
    assert w[STUDY_CLASSES.index("indeterminate")] == 0  # absent class
    assert w[STUDY_CLASSES.index("atypical")] == pytest.approx(6 * w[STUDY_CLASSES.index("typical")])


def _blob_table(tmp_path, n: int = 16, size: int = 96) -> pd.DataFrame:
    """Prepared-like PNGs: class 'typical' has a bright box low on both sides, 'negative' none."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        label = "typical" if k % 2 else "negative"
        image = rng.normal(90, 12, (size, size)).clip(0, 255).astype(np.uint8)
        boxes = np.zeros((0, 4))
        if label == "typical":
            y = int(rng.integers(50, 70))
            boxes = np.array([[10, y, 35, y + 20], [60, y, 85, y + 20]], float)
            for x1, y1, x2, y2 in boxes.astype(int):
                image[y1:y2, x1:x2] = np.clip(image[y1:y2, x1:x2].astype(int) + 70, 0, 255)
        path = tmp_path / f"im{k}.png"
        cv2.imwrite(str(path), image)
        rows.append({"image_id": f"im{k}", "study_id": f"s{k}", "label": label, "path": str(path),
                     "orig_height": size * 2, "orig_width": size * 2, "boxes": boxes * 2, "model_fold": k // 2 % 2,
                     "has_box": len(boxes) > 0})
    return pd.DataFrame(rows)


def test_dataset_moves_the_box_mask_with_the_image(tmp_path):
    table = _blob_table(tmp_path, n=2)
    spec = StudySpec(encoder="resnet18", input_size=64, prepared_size=96)
    image, target = StudyImageDataset(table, train_transform(spec, rotate=0, shift=0, scale=0))[1]
    assert image.shape == (3, 64, 64) and target["mask"].shape == (1, 64, 64)
    assert target["label"] == STUDY_CLASSES.index("typical") and target["none"] == 0.0
    mask = target["mask"][0]
    assert 0.05 < mask.mean() < 0.3 and mask[:30].sum() == 0  # the boxes lie in the lower half
    flat = image.mean(0)
    assert flat[mask > 0].mean() > flat[mask == 0].mean() + 0.5  # the mask covers the bright boxes


def _heat_contrast(model, spec, table) -> float:
    """Mean heat-map probability inside the true boxes minus outside them, over the images with boxes."""
    dataset = StudyImageDataset(table[table["has_box"]], train_transform(spec, rotate=0, shift=0, scale=0,
                                                                        brightness=0, contrast=0))
    images, masks = zip(*[(image, target["mask"]) for image, target in dataset])
    with torch.no_grad():
        heat = model.eval()(torch.stack(images))["mask"].sigmoid()
    heat = torch.nn.functional.interpolate(heat, size=masks[0].shape[-2:], mode="bilinear")
    inside = torch.stack(masks) > 0.5
    return float(heat[inside].mean() - heat[~inside].mean())


@pytest.mark.parametrize("encoder", ["resnet18", "plain"])
def test_training_learns_the_tiny_task(tmp_path, encoder):
    """A few epochs on 8 synthetic images: the classes separate, and the heat map finds the boxes."""
    table = _blob_table(tmp_path)
    train, val = table[table["model_fold"] == 0], table[table["model_fold"] == 1]
    spec = StudySpec(encoder=encoder, width=8, input_size=64, prepared_size=96, dropout=0.1)
    torch.manual_seed(0)
    model = build_study_model(spec)

    def val_aps(m):
        probs = val[["image_id", "study_id", "model_fold", "label", "has_box"]].merge(
            predict_table(m, spec, val, torch.device("cpu")), on="image_id")
        return study_aps(study_probabilities(probs)), none_ap(probs, probs["p_none_head"])

    contrast_before = _heat_contrast(model, spec, val)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), epochs=6, batch_size=4, seed=0, progress=False, plots=False)
    step = functools.partial(study_step, class_weights=None, none_weight=0.5, mask_weight=1.0)
    fit(model, StudyImageDataset(train, train_transform(spec)), step,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), cfg)
    after, none_after = val_aps(model)
    contrast_after = _heat_contrast(model, spec, val)
    # two classes present: the AP of 'negative' and 'typical' (the others have no ground truth: nan)
    assert after["negative"] > 0.95 and after["typical"] > 0.95
    assert none_after > 0.95
    assert contrast_after > contrast_before + 0.08  # untrained: about 0 (measured 0.11 for the U-Net, 0.21 resnet18)


def test_config_from_profile_sections_rejects_unknown_keys():
    from covidkit.pipeline import load_profile

    for profile in ("smoke", "full"):
        section = load_profile(profile)["06_study_level"]
        cfg = StudyTrainConfig.from_params({"input_dir": "in", "run_dir": "run", **section})
        assert cfg.input_size == section["input_size"] and cfg.encoder == section["encoder"]
    assert StudyTrainConfig(input_dir="in", run_dir="run", encoder="plain").spec(256).encoder == "plain"
    from covidkit.profiles import ProfileError
    from covidkit.stages import section_parameters

    with pytest.raises(ProfileError, match="06_study_level has no setting epoch"):
        section_parameters("smoke", "06", {"epoch": 3})
    with pytest.raises(ValueError, match="optimizer"):
        StudyTrainConfig(input_dir="in", run_dir="run", optimizer="adam")


def test_equalize_makes_the_input_independent_of_exposure():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 120, (64, 64)).astype(np.uint8)
    brighter = (image.astype(np.int32) * 2).astype(np.uint8)  # a monotone change of exposure
    spec = StudySpec(encoder="resnet18", input_size=64, prepared_size=64)
    plain, equalised = model_inputs([image, brighter], spec), model_inputs([image, brighter], replace(spec, equalize=True))
    assert not torch.allclose(plain[0], plain[1])
    assert torch.allclose(equalised[0], equalised[1])
