"""Pretrained weights from local files: torchvision's names and hashes, ultralytics' checkpoints, a message when absent."""
from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from covidkit.models.backbones import build_classifier
from covidkit.models.pretrained import IMAGENET, PretrainedWeightsMissing, resolve, torchvision_file_name


def _torchvision_like(path_dir, arch: str = "resnet18"):
    """A full-model state dict of ``arch`` (fabricated: random weights), named as torchvision names its files:
    ``<arch>-<first 8 hex digits of its SHA-256>.pth``."""
    torch.manual_seed(0)
    model = build_classifier(arch, 1000)
    path_dir.mkdir(parents=True, exist_ok=True)
    tmp = path_dir / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    named = path_dir / f"{arch}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(named)
    return named, model


def test_torchvision_names():
    assert torchvision_file_name("resnext101_32x8d") == "resnext101_32x8d-110c445d.pth"
    assert torchvision_file_name("resnet18") == "resnet18-f37072fd.pth"


def test_a_torchvision_checkpoint_is_found_checked_and_loaded(tmp_path):
    path, model = _torchvision_like(tmp_path / "input" / "weights")
    found = resolve(path.name, tmp_path / "input", "resnet18")  # a file name: looked for in input/weights/
    assert found == path
    loaded = build_classifier("resnet18", 15, found)
    assert torch.equal(loaded.layer4[1].conv2.weight, model.layer4[1].conv2.weight)
    assert resolve(str(path), "elsewhere") == path  # or a path

    damaged = path.with_name(torchvision_file_name("resnet18"))  # the real name, other bytes
    path.rename(damaged)
    with pytest.raises(ValueError, match="does not start with f37072fd"):
        resolve(IMAGENET, tmp_path / "input", "resnet18")


def test_an_absent_file_is_one_line_and_random_weights(tmp_path):
    with pytest.warns(PretrainedWeightsMissing) as caught:
        assert resolve(IMAGENET, tmp_path / "input", "resnext101_32x8d", stage="01") is None
    [message] = [str(w.message) for w in caught]
    assert "\n" not in message and message.startswith("01: no torchvision's ImageNet weights of resnext101_32x8d")
    assert str(tmp_path / "input" / "weights" / "resnext101_32x8d-110c445d.pth") in message
    assert "training goes on from random weights" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(None, tmp_path) is None  # random weights asked for: nothing to say


def test_an_ultralytics_checkpoint_is_found_in_the_weights_folder(tmp_path):
    from covidkit.models.yolo import load_model, setup_ultralytics

    setup_ultralytics(tmp_path / "run")
    weights = tmp_path / "input" / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    load_model("yolo11n.yaml").save(weights / "yolo11n.pt")  # fabricated: the nano at random weights
    found = resolve("yolo11n.pt", tmp_path / "input")
    assert found == weights / "yolo11n.pt"
    assert load_model(found).model.yaml["nc"] == 80


def test_02_starts_from_the_yaml_when_the_checkpoint_is_absent(tmp_path):
    from covidkit.stages.rsna_yolo import starting_model

    assert starting_model("yolo11n.yaml", tmp_path) == "yolo11n.yaml"
    with pytest.warns(PretrainedWeightsMissing, match="02_pretrain_rsna_yolo: no pretrained weights at .*yolo11l.pt"):
        assert starting_model("yolo11l.pt", tmp_path) == "yolo11l.yaml"


def test_fabricated_weights_go_through_the_imagenet_and_yolo_paths(tmp_path):
    """What ``covidkit synth --weights`` writes for a dry run: found by ``weights: imagenet`` (any of torchvision's
    names of the architecture, hash checked) and by ``model: yolo11l.pt``, loaded into the networks."""
    from covidkit.models.pretrained import fabricate
    from covidkit.models.yolo import load_model

    checkpoint, yolo = fabricate(tmp_path, arch="resnet18", yolo="yolo11n")
    assert resolve(IMAGENET, tmp_path, "resnet18") == checkpoint != tmp_path / "weights" / torchvision_file_name("resnet18")
    model = build_classifier("resnet18", 15, checkpoint)
    assert torch.equal(model.conv1.weight, torch.load(checkpoint)["conv1.weight"])
    assert resolve("yolo11n.pt", tmp_path) == yolo
    assert sum(p.numel() for p in load_model(yolo).model.parameters()) > 2_000_000
