"""Pretrained weights as users have them: local files, never downloaded.

Every competitor starts from ImageNet or COCO weights. covidkit takes the files users already have, put under
``<input_dir>/weights/`` (see ``input/README.md``) or given as paths:

- torchvision's ImageNet checkpoints, under the file names torchvision caches them as
  (``resnext101_32x8d-110c445d.pth``: ``<arch>-<first hex digits of the file's SHA-256>.pth``). The name
  carries the hash torchvision publishes, so the file is checked against it, as ``torch.hub`` does;
- ultralytics' COCO checkpoints (``yolo11l.pt``); ultralytics publishes no hash;
- a NIH backbone of an earlier run of notebook 01 (``covidkit.models.backbones.save_backbone``).

``IMAGENET`` in a profile names torchvision's default ImageNet file for the architecture. When a file is
absent, one line says which file, where it goes, and that training goes on from random weights.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

WEIGHTS_DIR = "weights"  # under the input folder
IMAGENET = "imagenet"  # a profile's name for torchvision's default ImageNet weights of the architecture
HASHED_NAME = re.compile(r"-([a-f0-9]{8,})\.pth?$")  # torch.hub's HASH_REGEX: the hash prefix in the name


class PretrainedWeightsMissing(UserWarning):
    """A pretrained weights file is absent: training starts from random weights."""


def torchvision_file_name(arch: str) -> str:
    """The file name torchvision caches the default ImageNet weights of ``arch`` under."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT.url.rsplit("/", 1)[1]


def check_hash(path: Path) -> Path:
    """``path``, after checking its SHA-256 against the hash prefix of its name (when it has one)."""
    match = HASHED_NAME.search(path.name)
    if match:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(match.group(1)):
            raise ValueError(f"{path}: its SHA-256 {digest.hexdigest()[:12]}... does not start with {match.group(1)}, "
                             "the hash in its name (a damaged or different file)")
    return path


def weights_dir(input_dir: str | Path) -> Path:
    return Path(input_dir) / WEIGHTS_DIR


def resolve(weights: str | None, input_dir: str | Path, arch: str | None = None, stage: str = "") -> Path | None:
    """The local file a stage's ``weights`` setting names, checked, or None (random weights).

    ``weights``: None (random weights); ``IMAGENET`` (torchvision's default ImageNet file of ``arch`` in
    ``<input_dir>/weights/``, or else another ``<arch>-<hash>.pth`` there, such as its V2 weights); a file name (looked for in ``<input_dir>/weights/``) or a path. An absent
    file is a one-line warning, not an error: training goes on from random weights.
    """
    if weights is None:
        return None
    name = torchvision_file_name(arch) if weights == IMAGENET else weights
    path = Path(name)
    candidates = [path] if path.is_absolute() or path.parent != Path(".") else [weights_dir(input_dir) / name, path]
    if weights == IMAGENET:  # another of torchvision's ImageNet files of the architecture (e.g. its V2 weights)
        candidates += [p for p in sorted(weights_dir(input_dir).glob(f"{arch}-*.pth")) if HASHED_NAME.search(p.name)]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        what = f"torchvision's ImageNet weights of {arch}" if weights == IMAGENET else "pretrained weights"
        warnings.warn(f"{stage + ': ' if stage else ''}no {what} at {candidates[0]} (put the file there, or name "
                      "another): training goes on from random weights", PretrainedWeightsMissing, stacklevel=2)
        return None
    return check_hash(found)


def fabricate(input_dir: str | Path, arch: str = "resnext101_32x8d", yolo: str = "yolo11l") -> list[Path]:
    """Pretrained-weight files of the right shapes and random values in ``<input_dir>/weights/``: an ImageNet
    checkpoint of ``arch`` named as torchvision names its files (``<arch>-<its own hash>.pth``) and ultralytics'
    ``<yolo>.pt``. What a dry run loads to test the paths real files take (``covidkit synth --weights``)."""
    import tempfile

    import torch

    from covidkit.models.backbones import build_classifier
    from covidkit.models.yolo import load_model, setup_ultralytics

    out = weights_dir(input_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{arch}.tmp"
    torch.save(build_classifier(arch, 1000).state_dict(), tmp)
    checkpoint = out / f"{arch}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.replace(checkpoint)
    setup_ultralytics(tempfile.mkdtemp(prefix="covidkit-ultralytics-"))  # its settings, not in the weights folder
    load_model(f"{yolo}.yaml").save(out / f"{yolo}.pt")
    return [checkpoint, out / f"{yolo}.pt"]
