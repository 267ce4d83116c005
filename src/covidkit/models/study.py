"""The study-level model (notebook 06): a U-Net with a study head, its checkpoints, inference, ``none``.

One family in every profile, as in the competition's winning solutions: an encoder, a segmentation
decoder trained on the opacity boxes (an auxiliary heat map), and a study head.

- ``encoder``: the NIH backbone of notebook 01 (``"nih"``, whatever ResNet-family architecture 01
  trained: ResNeXt-101 32x8d in ``full``), a backbone file, a torchvision ResNet-family name (random
  weights), or ``"plain"``, the small U-Net encoder of ``covidkit.models.unet`` (from scratch);
- ``mask``: the heat map at the input's resolution, trained on the box masks; it makes the features say
  *where* opacity is, which is what tells the classes apart (bilateral and basal, one-sided or upper,
  lobar or nodular);
- ``none``: minus the heat map's largest logit (an image has no opacity when no pixel has one);
- ``study``: four logits over ``STUDY_CLASSES`` from the pooled bottleneck and the heat map's mean and
  maximum in six lung zones (upper, middle, lower on either side).

Inference takes uint8 grey images of any size and resizes them exactly as the training images were
made: ``covidkit.prepare.resize_square`` to the prepared size of 00, then the 06 evaluation transform.
A study's probabilities are the mean over its images.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from covidkit.data.siim import STUDY_CLASSES
from covidkit.deprecated import warn_renamed
from covidkit.models.backbones import check_arch, load_backbone
from covidkit.models.unet import PLAIN, PlainEncoder, ResNetEncoder, UNetDecoder, ZONES, zone_summary
from covidkit.prepare import resize_square
from covidkit.model_file import load_tagged, save_checkpoint
from covidkit.transforms import IMAGENET_MEAN, IMAGENET_STD

NOTEBOOK = "06_study_level"
STUDY_MODEL_FORMAT = "covidkit.study/2"  # /2: the U-Net family (encoder, decoder, heads)
NEGATIVE = STUDY_CLASSES.index("negative")


@dataclass
class StudySpec:
    """Everything needed to rebuild a study model and feed it (saved as JSON in each checkpoint)."""

    encoder: str = "resnext101_32x8d"  # a torchvision ResNet (ARCHS of covidkit.models.backbones) or "plain"
    width: int = 16  # the plain encoder's first-level channels; the decoder's finest level (x2, x4 ... up)
    input_size: int = 224  # the network's input side
    prepared_size: int = 1024  # side of 00's square PNGs: inference resizes to it first, as 00 did
    classes: list[str] = field(default_factory=lambda: list(STUDY_CLASSES))
    dropout: float = 0.5
    equalize: bool = False  # histogram-equalise each image first (exposure and contrast vary between films)
    image_size: InitVar[int | None] = None  # deprecated name of input_size (and the key in older model files)

    def __post_init__(self, image_size: int | None) -> None:
        if image_size is not None:
            warn_renamed("StudySpec.image_size", "StudySpec.input_size")
            self.input_size = image_size
        if self.encoder != PLAIN:
            check_arch(self.encoder)
        if self.input_size < 32 or self.prepared_size < 32:
            raise ValueError(f"image sizes must be >= 32, got {self.input_size} and {self.prepared_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StudySpec:
        return cls(**json.loads(text))


class StudyNet(nn.Module):
    """Encoder, U-Net decoder and the mask / none / study heads; ``forward`` returns a dict of logits."""

    def __init__(self, spec: StudySpec) -> None:
        super().__init__()
        self.encoder = PlainEncoder(spec.width) if spec.encoder == PLAIN else ResNetEncoder(spec.encoder)
        levels = len(self.encoder.channels) - 1
        self.decoder = UNetDecoder(self.encoder.channels, [spec.width * 2 ** i for i in range(levels)])
        self.mask_head = nn.Conv2d(self.decoder.out_channels, 1, kernel_size=1)
        self.study_head = nn.Sequential(
            nn.Dropout(spec.dropout), nn.Linear(self.encoder.channels[-1] + 2 * ZONES[0] * ZONES[1], len(spec.classes)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        mask = self.mask_head(self.decoder(features))
        if mask.shape[-2:] != x.shape[-2:]:  # a ResNet's finest level is at stride 2
            mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # the heat map is trained on the boxes alone (detached here); the study head reads it
        study = self.study_head(torch.cat([features[-1].mean(dim=(2, 3)), zone_summary(mask.detach())], 1))
        return {"study": study, "none": -mask.flatten(1).amax(1), "mask": mask}


def study_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor], class_weights: torch.Tensor | None = None,
               none_weight: float = 0.0, mask_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy over the study classes + the weighted heat-map and ``none`` terms; ``(total, parts)``.

    A target with ``soft`` and ``weight`` (a round with pseudo-labels): cross-entropy against the soft labels, each
    image's terms weighted by ``weight`` (a weighted mean over the batch)."""
    mask_target = F.adaptive_avg_pool2d(target["mask"], out["mask"].shape[-2:])
    if "soft" in target:
        w = target["weight"].float()
        mean = lambda x: (x * w).sum() / w.sum().clamp_min(1e-12)  # noqa: E731
        ce = mean(F.cross_entropy(out["study"].float(), target["soft"], weight=class_weights, reduction="none"))
        none = mean(F.binary_cross_entropy_with_logits(out["none"].float(), target["none"].float(), reduction="none"))
        mask = mean(F.binary_cross_entropy_with_logits(out["mask"].float(), mask_target, reduction="none")
                    .flatten(1).mean(1))
        return ce + none_weight * none + mask_weight * mask, {"ce": ce, "none_bce": none, "mask_bce": mask}
    ce = F.cross_entropy(out["study"].float(), target["label"], weight=class_weights)
    none = F.binary_cross_entropy_with_logits(out["none"].float(), target["none"].float())
    mask = F.binary_cross_entropy_with_logits(out["mask"].float(), mask_target)
    return ce + none_weight * none + mask_weight * mask, {"ce": ce, "none_bce": none, "mask_bce": mask}


def build_study_model(spec: StudySpec, backbone_checkpoint: str | Path | None = None) -> StudyNet:
    """A fresh study model; its ResNet encoder from 01's checkpoint when given (same architecture required)."""
    model = StudyNet(spec)
    if backbone_checkpoint is not None:
        arch, state = load_backbone(backbone_checkpoint)
        if arch != spec.encoder:
            raise ValueError(f"backbone checkpoint {backbone_checkpoint} is a {arch}, the study model's encoder a "
                             f"{spec.encoder}")
        model.encoder.body.load_state_dict(state)
    return model


def save_study_model(model: nn.Module, spec: StudySpec, path: str | Path, **meta) -> Path:
    """One fold's model: weights + spec (+ ``meta``: fold, seed ...), written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint({"format": STUDY_MODEL_FORMAT, "spec": spec.to_json(), "state_dict": state,
                            "meta": json.dumps(meta)}, path)


def load_study_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[StudyNet, StudySpec]:
    """A fold checkpoint written by ``save_study_model``, in eval mode on ``device``."""
    ckpt = load_tagged(path, STUDY_MODEL_FORMAT, "study model", NOTEBOOK)
    spec = StudySpec.from_json(ckpt["spec"])
    model = StudyNet(spec)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), spec


def eval_transform(spec: StudySpec) -> v2.Compose:
    """Prepared grey uint8 ``[1, S, S]`` -> normalised float ``[3, input_size, input_size]``."""
    return v2.Compose([
        v2.Resize((spec.input_size, spec.input_size), antialias=True),
        *([v2.RandomEqualize(p=1.0)] if spec.equalize else []),
        v2.ToDtype(torch.float32, scale=True), v2.RGB(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(spec: StudySpec, rotate: float = 10.0, shift: float = 0.06, scale: float = 0.1,
                    brightness: float = 0.2, contrast: float = 0.2) -> v2.Compose:
    """Augmentations that move the opacity mask with the image, then the evaluation transform.

    A horizontal flip keeps every class (the definitions are symmetric: bilateral, one-sided,
    lower or upper zones), small affine moves and exposure changes mimic positioning and film.
    """
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomAffine(degrees=rotate, translate=(shift, shift), scale=(1 - scale, 1 + scale)),
        v2.ColorJitter(brightness=brightness, contrast=contrast),
        eval_transform(spec),
    ])


def model_inputs(images: Sequence[np.ndarray], spec: StudySpec) -> torch.Tensor:
    """Grey uint8 images of any size -> the batch the model sees (00's square resize, then 06's)."""
    transform = eval_transform(spec)
    batch = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected a 2-D uint8 grey image, got {image.dtype} of shape {image.shape}")
        square = image if image.shape == (spec.prepared_size,) * 2 else resize_square(image, spec.prepared_size)
        batch.append(transform(tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(square))[None])))
    return torch.stack(batch)


@torch.no_grad()
def predict_outputs(model: nn.Module, spec: StudySpec, images: Sequence[np.ndarray], device: str | torch.device = "cpu",
                    hflip_tta: bool = False, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(study_probs [N, 4], none_head_probs [N])`` of grey uint8 images of any size.

    With ``hflip_tta`` each image is also predicted flipped and the probabilities averaged.
    """
    model.eval()
    study, none = [], []
    for start in range(0, len(images), batch_size):
        x = model_inputs(images[start:start + batch_size], spec).to(device)
        views = [x, x.flip(-1)] if hflip_tta else [x]
        outs = [model(v) for v in views]
        study.append(torch.stack([o["study"].float().softmax(1) for o in outs]).mean(0).cpu())
        none.append(torch.stack([o["none"].float().sigmoid() for o in outs]).mean(0).cpu())
    if not study:
        return np.zeros((0, len(spec.classes)), np.float32), np.zeros(0, np.float32)
    return torch.cat(study).numpy(), torch.cat(none).numpy()


NONE_RULES = ("head", "negative", "boxes")


def none_probability(negative_prob: float, box_scores: np.ndarray, none_head_prob: float | None = None,
                     rule: str = "head") -> float:
    """The image-level ``none`` probability (no opacity in the image).

    ``rule`` names the estimate (notebook 06 chooses it on out-of-fold data, or the profile names it):

    - ``"head"``: the model's own image-level estimate ``none_head_prob``, trained on "this image
      has no box"; it sees the image rather than the study's label, so it also knows the positive
      images without a box. Without a head output, ``P(negative)``;
    - ``"negative"``: ``P(negative)`` of the image;
    - ``"boxes"``: the detectors alone, ``1 - s`` with ``s`` the highest fused box score.

    The first two estimates ``q`` are tempered by the detectors' boxes, as independent evidence of
    opacity: ``p = q * (1 - s)^(1 - q)``. A confident box lowers ``none`` most where the classifier
    is unsure; where the classifier is sure of ``none`` (``q`` near 1) one weak box changes little,
    and with no box ``p = q``. The result stays in ``[0, 1]`` and never increases with ``s``.
    """
    if rule not in NONE_RULES:
        raise ValueError(f"rule must be one of {NONE_RULES}, got {rule!r}")
    scores = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("box scores must be finite")
    s = float(np.clip(scores.max(), 0.0, 1.0)) if scores.size else 0.0
    if rule == "boxes":
        return 1.0 - s
    q = none_head_prob if rule == "head" and none_head_prob is not None else negative_prob
    q = float(np.clip(q, 0.0, 1.0))
    return q * (1.0 - s) ** (1.0 - q)
