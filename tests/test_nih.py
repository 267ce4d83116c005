"""NIH ChestX-ray14: the Kaggle layout, the dataset, the backbone checkpoint, a short pretraining run, and learning."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidkit.data.nih import LABELS, NihDataset, multi_hot, patient_split, read_nih_table
from covidkit.models.backbones import build_classifier, load_backbone, save_backbone
from covidkit.learning import AUROC_MARGIN
from covidkit.stages.nih_pretrain import (
    MEAN_ROW, Config as NihPretrainConfig, auroc_summary, auroc_table, per_label_auroc, run as run_nih_pretrain,
    with_mean_row,
)
from covidkit.transforms import ClassificationAugment, classification_transform

FINDINGS = ["No Finding", "Effusion|Mass", "Cardiomegaly", "No Finding", "Nodule|Effusion|Hernia",
            "Pneumonia", "No Finding", "Infiltration", "Effusion", "Mass", "No Finding", "Edema"]


def write_nih(root, n: int = 12, unlisted_on_disk: int = 0, missing_on_disk: int = 0):
    """A small ``nih-chest-xrays/`` folder: images split over ``images_00k/images/`` like the Kaggle copy."""
    nih = root / "nih-chest-xrays"
    rng = np.random.default_rng(0)
    names = [f"{i // 2:08d}_{i % 2:03d}.png" for i in range(n)]
    for i, name in enumerate(names[: n - missing_on_disk]):
        folder = nih / f"images_{i % 2 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 60, size=(96, 80), dtype=np.uint8)
        if "Effusion" in FINDINGS[i % len(FINDINGS)]:
            image[60:90, 10:70] = 220  # something a model can pick up
        cv2.imwrite(str(folder / name), image)
    for k in range(unlisted_on_disk):
        cv2.imwrite(str(nih / "images_001" / "images" / f"9999999{k}_000.png"), np.zeros((8, 8), np.uint8))
    pd.DataFrame({
        "Image Index": names,
        "Finding Labels": [FINDINGS[i % len(FINDINGS)] for i in range(n)],
        "Follow-up #": [i % 2 for i in range(n)],
        "Patient ID": [f"{i // 2:05d}" for i in range(n)],
        "Patient Age": 50, "Patient Gender": "M", "View Position": "PA",
    }).to_csv(nih / "Data_Entry_2017.csv", index=False)
    return nih


def test_read_nih_table_finds_images_in_the_kaggle_folders(tmp_path):
    nih = write_nih(tmp_path, n=12, unlisted_on_disk=2, missing_on_disk=1)
    table = read_nih_table(nih)
    assert len(table) == 11  # listed and on disk
    assert table["patient_id"].iloc[0] == "00000"  # ids stay strings
    row = table.set_index("image_id").loc["00000002_000.png"]  # "Nodule|Effusion|Hernia"
    assert {label for label in LABELS if row[label]} == {"Nodule", "Effusion", "Hernia"}
    assert table[LABELS].sum(axis=1).min() == 1  # every image has a label, No Finding included
    assert all(p.endswith(n) for p, n in zip(table["path"], table["image_id"]))


def test_unknown_label_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown NIH labels \\['Covid'\\]"):
        multi_hot(pd.Series(["Effusion|Covid"]))
    nih = write_nih(tmp_path, n=4)
    for png in nih.rglob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match="none of the 4 images"):
        read_nih_table(nih)


def test_patient_split_keeps_patients_together(tmp_path):
    table = read_nih_table(write_nih(tmp_path, n=12))
    train, val = patient_split(table, val_fraction=0.34, seed=1)
    assert len(train) + len(val) == 12 and len(val) > 0
    assert not set(train["patient_id"]) & set(val["patient_id"])


def test_dataset_returns_normalised_images_and_multi_hot_targets(tmp_path):
    table = read_nih_table(write_nih(tmp_path, n=4))
    aug = ClassificationAugment(resize=40, crop=32)
    image, target = NihDataset(table, classification_transform(aug, train=True))[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.tolist() == table.loc[1, LABELS].astype(float).tolist()


def test_per_label_auroc():
    targets = np.zeros((6, len(LABELS)), np.float32)
    targets[:3, 0] = 1  # Atelectasis: three positives, perfectly ranked below
    targets[:, -1] = 1  # No Finding: no negative -> undefined
    probs = np.tile(np.linspace(1, 0, 6)[:, None], (1, len(LABELS)))
    auroc = per_label_auroc(probs, targets)
    assert auroc.loc["Atelectasis", "auroc"] == 1.0
    assert math.isnan(auroc.loc["No Finding", "auroc"]) and auroc.loc["No Finding", "positives"] == 6


def test_the_reported_mean_counts_the_labels_with_enough_positives_beside_the_untrained_network():
    targets = np.zeros((8, len(LABELS)), np.float32)
    targets[:4, 0] = 1  # Atelectasis: 4 positives, 4 negatives
    targets[:2, 1] = 1  # Cardiomegaly: 2 positives
    targets[:, -1] = 1 - targets[:, 0]  # No Finding: 4 positives
    ranked = np.tile(np.linspace(1, 0, 8)[:, None], (1, len(LABELS)))  # perfect for the first 4 rows
    table = auroc_table(ranked, 1 - ranked, targets, min_positives=3)
    assert list(table.index[table["counted"]]) == ["Atelectasis", "No Finding"]
    assert table.loc["Atelectasis", "auroc"] == 1.0 and table.loc["Atelectasis", "untrained_auroc"] == 0.0
    summary = auroc_summary(table, 3, train_images=20)
    assert summary["counted_positives"] == {"Atelectasis": 4, "No Finding": 4}
    assert summary["mean_auroc"] == 0.5 and summary["untrained_mean_auroc"] == 0.5  # No Finding: 0 and 1
    assert summary["validation_images"] == 8 and summary["train_images"] == 20
    mean = with_mean_row(table).loc[MEAN_ROW]
    assert mean["auroc"] == 0.5 and mean["counted"]


def test_backbone_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", len(LABELS))
    path = save_backbone(model, tmp_path / "b.pt", "resnet18", note="x")
    arch, state = load_backbone(path)
    assert arch == "resnet18" and not any(k.startswith("fc.") for k in state)
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a covidkit backbone"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="run 01_pretrain_nih_resnext first"):
        load_backbone(tmp_path / "missing.pt")


def test_classifier_loads_a_local_weights_file(tmp_path):
    torch.manual_seed(1)
    imagenet_like = build_classifier("resnet18", 1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "resnet18.pth")
    model = build_classifier("resnet18", len(LABELS), weights=tmp_path / "resnet18.pth")
    assert model.fc.out_features == len(LABELS)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_classifier("vgg16", 3)


def test_cached_dataset_decodes_once_and_gives_the_uncached_images(tmp_path, monkeypatch):
    import covidkit.data.nih as nih

    table = read_nih_table(write_nih(tmp_path, n=4))
    transform = classification_transform(ClassificationAugment(resize=40, crop=32), train=False)
    cached, plain = NihDataset(table, transform, cache_size=40), NihDataset(table, transform)
    first = [cached[i][0] for i in range(4)]
    monkeypatch.setattr(nih, "read_grey", lambda path: pytest.fail(f"{path} decoded twice"))
    for i in range(4):
        assert torch.equal(cached[i][0], first[i])
        assert cached.grey(i).shape[0] == 40 or cached.grey(i).shape[1] == 40
    monkeypatch.undo()
    for i in range(4):  # area vs antialiased resize of noisy images: within ~6 grey levels (normalised units)
        assert (cached[i][0] - plain[i][0]).abs().mean() < 0.1


def test_short_pretraining_run_saves_a_backbone_and_resumes(tmp_path):
    write_nih(tmp_path / "input", n=12)
    cfg = NihPretrainConfig(input_dir=str(tmp_path / "input"), run_dir=str(tmp_path / "run"), arch="resnet18",
                            epochs=2, batch_size=4, input_size=32, workers=0, val_fraction=0.34,
                            optimizer="adamw", cache_images=True, progress=False)
    result = run_nih_pretrain(cfg)
    assert result.backbone == cfg.layout.nih_pretrain.backbone and result.backbone.is_file()
    assert list(result.metrics["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_auroc", "lr"} <= set(result.metrics.columns)
    assert list(result.auroc.index) == LABELS
    assert (result.out_dir / "train" / "plots" / "loss.png").is_file()
    assert (result.out_dir / "auroc.csv").is_file() and (result.out_dir / "summary.json").is_file()
    arch, state = load_backbone(result.backbone)
    assert arch == "resnet18"
    # the saved backbone is the last epoch's, not the initialisation
    torch.manual_seed(cfg.seed)
    assert not torch.equal(state["conv1.weight"], build_classifier("resnet18", len(LABELS)).conv1.weight)
    # a second call resumes the finished run instead of training again, and ends with the same weights
    again = run_nih_pretrain(cfg)
    assert list(again.metrics["epoch"]) == [1, 2]
    assert torch.equal(load_backbone(again.backbone)[1]["conv1.weight"], state["conv1.weight"])


@pytest.mark.slow
def test_pretraining_beats_its_untrained_twin_on_held_out_patients(tmp_path):
    from covidkit.synth import SynthConfig, write_nih as write_synthetic_nih

    write_synthetic_nih(tmp_path / "input", SynthConfig(seed=5, nih_images=160, nih_size=256, workers=1, ct=False))
    cfg = NihPretrainConfig(input_dir=str(tmp_path / "input"), run_dir=str(tmp_path / "run"), arch="resnet18",
                            epochs=4, batch_size=16, optimizer="adamw", val_fraction=0.4, input_size=64,
                            workers=0, cache_images=True, min_positives=8, progress=False)
    result = run_nih_pretrain(cfg)
    summary = result.summary
    assert summary == json.loads((result.out_dir / "summary.json").read_text())
    assert len(summary["counted_positives"]) >= 2 and summary["validation_images"] >= 40
    assert summary["untrained_mean_auroc"] < 0.65
    assert summary["mean_auroc"] > summary["untrained_mean_auroc"] + AUROC_MARGIN, summary
    assert result.metrics["val_auroc"].iloc[-1] == pytest.approx(summary["mean_auroc"], abs=1e-4)
