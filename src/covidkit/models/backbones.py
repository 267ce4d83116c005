"""ResNet-family backbones: the NIH classifier and the checkpoint the detectors start from.

Nothing is downloaded: models are built with ``weights=None`` and, when a local weights file is
given (e.g. torchvision's ImageNet ``resnext101_32x8d-*.pth`` copied to the machine), loaded from it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model

from covidkit.model_file import load_tagged, save_checkpoint

BACKBONE_FORMAT = "covidkit.backbone/1"
# torchvision's ResNet family; detection.backbone_utils.resnet_fpn_backbone accepts the same names.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    return arch


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare state dict, or a checkpoint with ``state_dict``/``model``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build_classifier(arch: str, num_labels: int, weights: str | Path | None = None) -> nn.Module:
    """A torchvision ResNet-family model with a fresh ``num_labels`` head.

    ``weights``: a local file with the full model's state dict (ImageNet head included, which is
    then replaced); ``None`` starts from random initialisation.
    """
    model = get_model(check_arch(arch), weights=None)
    if weights is not None:
        model.load_state_dict(load_state_file(weights))
    model.fc = nn.Linear(model.fc.in_features, num_labels)
    return model


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The feature extractor's weights: everything but the classification head ``fc``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def save_backbone(model: nn.Module, path: str | Path, arch: str, **meta) -> Path:
    """Save the backbone of ``model`` (a ``build_classifier`` model, unwrapped) for the detectors."""
    return save_checkpoint({"format": BACKBONE_FORMAT, "arch": check_arch(arch), "state_dict": backbone_state(model),
                            "meta": meta}, path)


def backbone_file(choice: str | Path | None, pretrained: Path) -> Path | None:
    """The backbone file a stage starts from: ``pretrained`` (01's ``backbone.pt``) for None or ``"nih"``, a
    ``.pt``/``.pth`` file as given; None for anything else (an architecture name: random weights)."""
    if choice is None or choice == "nih":
        return pretrained
    return Path(choice) if str(choice).endswith((".pt", ".pth")) else None


def load_backbone(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(arch, state_dict)`` of a checkpoint written by ``save_backbone``."""
    ckpt = load_tagged(path, BACKBONE_FORMAT, "backbone checkpoint", "01_pretrain_nih_resnext")
    return ckpt["arch"], ckpt["state_dict"]
