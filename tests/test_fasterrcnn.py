"""The Faster R-CNN opacity detector: backbone loading, the detection dataset, training and prediction pieces."""
from __future__ import annotations

import functools

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from covidkit.data.detection import OpacityDataset, truth_boxes
from covidkit.data.nih import LABELS
from covidkit.stages.siim_fasterrcnn import (
    Config as FasterRcnnConfig, detection_step, predict_oof, train_fold, untrained_oof,
)
from covidkit.models import DetectorSpec, build_classifier, build_fasterrcnn, inference_size, save_backbone
from covidkit.models.fasterrcnn import predict_boxes
from covidkit.oof import opacity_ap
from covidkit.engine import collate_lists
from covidkit.engine.kfold import run_folds
from covidkit.layout import DETECTOR_FILE
from covidkit.transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionAugment, detection_transform


@pytest.fixture
def nih_backbone(tmp_path):
    torch.manual_seed(3)
    model = build_classifier("resnet18", len(LABELS))
    # non-default batch-norm statistics, so that loading them is visible too
    model.bn1.running_mean.uniform_(-1, 1)
    model.layer4[1].bn2.running_var.uniform_(0.5, 2)
    return model, save_backbone(model, tmp_path / "backbone.pt", "resnet18")


def test_detector_really_loads_the_nih_backbone(nih_backbone):
    classifier, path = nih_backbone
    detector = build_fasterrcnn(backbone_checkpoint=path, spec=DetectorSpec(input_size=128))
    body = detector.backbone.body.state_dict()
    source = classifier.state_dict()
    compared = 0
    for key, value in body.items():
        assert torch.equal(value, source[key]), key
        compared += 1
    # every conv and batch-norm tensor (frozen batch norms keep no num_batches_tracked)
    assert compared == len([k for k in source if not k.startswith("fc.") and "num_batches_tracked" not in k])
    fresh = build_fasterrcnn(arch="resnet18", spec=DetectorSpec(input_size=128))
    assert not torch.equal(fresh.backbone.body.conv1.weight, classifier.conv1.weight)
    assert detector.roi_heads.box_predictor.cls_score.out_features == 2


def test_trainable_batch_norms_start_from_the_nih_statistics(nih_backbone):
    classifier, path = nih_backbone
    detector = build_fasterrcnn(backbone_checkpoint=path, spec=DetectorSpec(input_size=128, frozen_batchnorm=False))
    bn = detector.backbone.body.bn1
    assert type(bn) is torch.nn.BatchNorm2d and bn.weight.requires_grad
    assert torch.equal(bn.running_mean, classifier.bn1.running_mean)
    assert type(build_fasterrcnn(backbone_checkpoint=path).backbone.body.bn1) is FrozenBatchNorm2d


def test_detector_checks_its_architecture(nih_backbone):
    _, path = nih_backbone
    with pytest.raises(ValueError, match="does not match"):
        build_fasterrcnn(arch="resnet34", backbone_checkpoint=path)
    with pytest.raises(ValueError, match="give arch or backbone_checkpoint"):
        build_fasterrcnn()
    with pytest.raises(ValueError, match="need 4 anchor sizes"):
        DetectorSpec(fpn_layers=(2, 3, 4), anchor_sizes=(32, 64, 128, 256, 512))


def _prepared_table(tmp_path, n: int = 3, size: int = 64) -> pd.DataFrame:
    """PNGs at the prepared size, boxes in original pixels (originals are 4x taller, 2x wider)."""
    rows = []
    for i in range(n):
        image = np.full((size, size), 30, np.uint8)
        image[16:40, 8:24] = 200
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), image)
        boxes = np.array([[16.0, 64.0, 48.0, 160.0]]) if i % 2 == 0 else np.zeros((0, 4))
        rows.append({"image_id": f"img{i}", "fold": i, "path": str(path), "orig_height": 4 * size,
                     "orig_width": 2 * size, "boxes": boxes})
    return pd.DataFrame(rows)


def test_dataset_scales_original_boxes_to_the_prepared_image(tmp_path):
    table = _prepared_table(tmp_path)
    dataset = OpacityDataset(table, detection_transform(DetectionAugment(), train=False))
    image, target = dataset[0]
    assert image.shape == (3, 64, 64)
    assert target["boxes"].tolist() == [[8.0, 16.0, 24.0, 40.0]]  # exactly the bright block
    assert target["labels"].tolist() == [1] and target["index"] == 0
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    with pytest.raises(ValueError, match="lacks columns"):
        OpacityDataset(table.drop(columns="boxes"), None)


def test_train_step_and_prediction_in_original_pixels(tmp_path, nih_backbone):
    _, path = nih_backbone
    table = _prepared_table(tmp_path)
    dataset = OpacityDataset(table, detection_transform(DetectionAugment(), train=True, size=96))
    torch.manual_seed(0)
    # the smoke profile's cheap shape: no stride-4 level, a small box head
    spec = DetectorSpec(input_size=96, fpn_layers=(2, 3, 4), anchor_sizes=(16, 32, 64, 128), proposals_train=64,
                        proposals_test=32, box_batch_size_per_image=32, representation_size=64)
    model = build_fasterrcnn(backbone_checkpoint=path, spec=spec)
    model.train()
    loss, logs = detection_step(model, collate_lists([dataset[0], dataset[1]]), torch.device("cpu"))
    assert set(logs) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert loss.requires_grad and torch.isfinite(loss)

    model.roi_heads.score_thresh = 0.0  # an untrained head scores low; keep every box to check the scaling
    with inference_size(model, 128):
        assert model.transform.min_size == (128,)
        oof = predict_oof(model, table, 64, 128, torch.device("cpu"), batch_size=2)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    assert list(oof.images["image_id"]) == ["img0", "img1", "img2"]
    assert len(oof.boxes) > 0
    # boxes come back in original pixels: x within the 128-pixel width, y within the 256-pixel height
    assert oof.boxes["x2"].max() <= 128 + 1e-3 and oof.boxes["y2"].max() <= 256 + 1e-3
    assert oof.boxes["y2"].max() > 64 + 1e-3  # some box lies below the prepared image's 64 pixels: really scaled

    # one image through predict_boxes (what 07's FasterRcnnFold calls): the OOF boxes of the same image, in
    # its 64 prepared pixels instead of the 128 x 256 original
    png = cv2.imread(table.loc[0, "path"], cv2.IMREAD_GRAYSCALE)
    [(boxes, scores)] = predict_boxes(model, [torch.from_numpy(png).float().div(255).expand(3, -1, -1)], 128)
    same = oof.boxes[oof.boxes["image_id"] == "img0"]
    assert len(boxes) == len(same) > 0
    np.testing.assert_allclose(boxes * [2, 4, 2, 4], same[["x1", "y1", "x2", "y2"]].to_numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores, same["score"].to_numpy(), rtol=1e-5)


def _blob_table(root, n: int, size: int, seed: int = 0) -> pd.DataFrame:
    """Bright ellipses on noise, boxed in 'original' pixels (2x wider, 3x taller than the PNGs); two folds."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = rng.normal(60, 12, (size, size)).clip(0, 255).astype(np.uint8)
        boxes = []
        for _ in range(1 + i % 2):
            w, h = rng.integers(size // 5, size // 3, 2)
            x, y = rng.integers(2, size - w - 2), rng.integers(2, size - h - 2)
            cv2.ellipse(image, (int(x + w / 2), int(y + h / 2)), (int(w / 2), int(h / 2)), 0, 0, 360, 190, -1)
            boxes.append([2 * x, 3 * y, 2 * (x + w), 3 * (y + h)])
        path = root / f"blob{i}.png"
        cv2.imwrite(str(path), image)
        rows.append({"image_id": f"blob{i}", "fold": i % 2, "model_fold": i % 2, "path": str(path),
                     "orig_height": 3 * size, "orig_width": 2 * size, "boxes": np.array(boxes, float)})
    return pd.DataFrame(rows)


def _backbone_with_measured_statistics(table: pd.DataFrame, path) -> None:
    """Random resnet18 weights, batch-norm statistics measured on the images: what pretraining provides
    at the least (the detector freezes batch norms, so they must describe real inputs)."""
    torch.manual_seed(0)
    model = build_classifier("resnet18", len(LABELS))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over what it sees
    transform = detection_transform(DetectionAugment(), train=False)
    images = torch.stack([transform(torch.from_numpy(cv2.imread(p, cv2.IMREAD_GRAYSCALE))[None]) for p in table["path"]])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    model.train()
    with torch.no_grad():
        model((images - mean) / std)
    save_backbone(model, path, "resnet18")


@pytest.mark.slow
def test_training_beats_the_untrained_detector_on_a_held_out_fold(tmp_path):
    table = _blob_table(tmp_path, n=48, size=96)
    _backbone_with_measured_statistics(table, tmp_path / "backbone.pt")
    cfg = FasterRcnnConfig(
        input_dir=str(tmp_path), run_dir=str(tmp_path / "run"), backbone=str(tmp_path / "backbone.pt"),
        input_size=96, infer_size=96, fpn_layers=[2, 3, 4], anchor_sizes=[16, 32, 64, 128], proposals_train=128,
        proposals_test=50, box_batch_size_per_image=32, representation_size=128, epochs=6, batch_size=4,
        optimizer="adamw", lr=1e-3, workers=0, eval_batch_size=8, progress=False,
    )
    [(oof, history)] = run_folds(table, functools.partial(train_fold, cfg=cfg, prepared_size=96), only=[1])
    assert cfg.layout.siim_fasterrcnn.folds(DETECTOR_FILE) == [tmp_path / "run" / "03_train_siim_fasterrcnn" / "fold1"]
    held_out = table[table["model_fold"] == 1]
    assert sorted(oof.images["image_id"]) == sorted(held_out["image_id"])  # only the held-out fold
    truth = truth_boxes(held_out)
    trained, untrained = opacity_ap(oof, truth), opacity_ap(untrained_oof(held_out, cfg, 96), truth)
    assert list(history["epoch"]) == [1, 2, 3, 4, 5, 6] and history["val_ap50"].iloc[-1] == pytest.approx(trained)
    assert untrained < 0.05
    assert trained > untrained + 0.15, (trained, untrained)
