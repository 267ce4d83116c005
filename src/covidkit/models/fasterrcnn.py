"""torchvision Faster R-CNN for opacities: a ResNet-family backbone (NIH-pretrained) with FPN, 2 classes."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from covidkit.deprecated import warn_renamed
from covidkit.model_file import load_tagged, save_checkpoint, unwrap
from covidkit.models.backbones import check_arch, load_backbone
from covidkit.transforms import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 2  # background, opacity (covidkit.data.detection.OPACITY)
DETECTOR_FORMAT = "covidkit.fasterrcnn/1"  # a file format tag: kept when the export moved to 03
ROI_SIZE = 7  # RoIAlign output side, as in torchvision's Faster R-CNN


@dataclass
class DetectorSpec:
    """Shape and cost of the detector; the defaults are torchvision's ``fasterrcnn_resnet50_fpn``.

    On a CPU the FPN and RPN convolutions on the stride-4 level (``fpn_layers`` 1) and the box head
    (``proposals_*`` x ``representation_size``) cost more than a resnet18 itself; the smoke
    profile drops the first and shrinks the second.
    """

    input_size: int = 512  # training images are resized to this side (the prepared images are square)
    trainable_layers: int = 5  # backbone stages trained, from the top (5: all)
    fpn_layers: tuple[int, ...] = (1, 2, 3, 4)  # ResNet stages feeding the FPN
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per FPN level, plus one for its extra pool level
    # each level's size times these: several scales per octave (RetinaNet's 2^0, 2^1/3, 2^2/3) give a box
    # between two levels' sizes anchors that overlap it by the RPN's IoU 0.7 (torchvision's default: one)
    anchor_scales: tuple[float, ...] = (1.0,)
    # an anchor overlapping a box by this IoU is an RPN positive (torchvision: 0.7; a small box may have no
    # such anchor and then trains from its best-overlapping anchors alone)
    rpn_fg_iou: float = 0.7
    proposals_train: int = 2000  # RPN proposals kept per image, before and after NMS
    proposals_test: int = 1000
    box_batch_size_per_image: int = 512  # proposals sampled per image for the box loss
    box_positive_fraction: float = 0.25  # at most this share of them opacities
    representation_size: int = 1024  # width of the two-layer box head
    detections_per_img: int = 100
    score_thresh: float = 0.01  # low: the AP and the ensembles want the whole ranking
    # torchvision freezes batch norms (statistics of small detection batches are noisy); a backbone
    # that pretraining barely moved (smoke) learns faster with them trained
    frozen_batchnorm: bool = True
    train_size: InitVar[int | None] = None  # deprecated name of input_size (and the key in older detector files)

    def __post_init__(self, train_size: int | None) -> None:
        if train_size is not None:
            warn_renamed("DetectorSpec.train_size", "DetectorSpec.input_size")
            self.input_size = train_size
        self.fpn_layers, self.anchor_sizes = tuple(self.fpn_layers), tuple(self.anchor_sizes)
        self.anchor_scales = tuple(self.anchor_scales)
        if len(self.anchor_sizes) != len(self.fpn_layers) + 1:
            raise ValueError(f"{len(self.fpn_layers)} FPN levels + pool need {len(self.fpn_layers) + 1} anchor "
                             f"sizes, got {self.anchor_sizes}")


def build_fasterrcnn(arch: str | None = None, backbone_checkpoint: str | Path | None = None,
                     spec: DetectorSpec | None = None) -> FasterRCNN:
    """Faster R-CNN + FPN with the backbone of ``backbone_checkpoint`` (a ``save_backbone`` file).

    ``arch`` defaults to the checkpoint's; without a checkpoint the backbone is random. Batch norms
    are frozen by default, as in torchvision's detection models (statistics of small detection
    batches are too noisy): the backbone's running statistics come from the NIH pretraining.
    With ``spec.frozen_batchnorm`` False they start from those statistics and train.
    """
    spec = spec or DetectorSpec()
    state = None
    if backbone_checkpoint is not None:
        saved_arch, state = load_backbone(backbone_checkpoint)
        if arch is not None and arch != saved_arch:
            raise ValueError(f"arch {arch!r} does not match the checkpoint's {saved_arch!r} ({backbone_checkpoint})")
        arch = saved_arch
    if arch is None:
        raise ValueError("give arch or backbone_checkpoint")
    norm_layer = FrozenBatchNorm2d if spec.frozen_batchnorm else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=check_arch(arch), weights=None, norm_layer=norm_layer,
                                   trainable_layers=spec.trainable_layers, returned_layers=list(spec.fpn_layers))
    if state is not None:
        backbone.body.load_state_dict(state)
    levels = [str(i) for i in range(len(spec.fpn_layers))]  # the FPN's names for its levels
    return FasterRCNN(
        backbone, min_size=spec.input_size, max_size=spec.input_size,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(tuple(tuple(s * m for m in spec.anchor_scales) for s in spec.anchor_sizes),
                                             ((0.5, 1.0, 2.0),) * len(spec.anchor_sizes)),
        rpn_fg_iou_thresh=spec.rpn_fg_iou,
        rpn_pre_nms_top_n_train=spec.proposals_train, rpn_post_nms_top_n_train=spec.proposals_train,
        rpn_pre_nms_top_n_test=spec.proposals_test, rpn_post_nms_top_n_test=spec.proposals_test,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels, output_size=ROI_SIZE, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * ROI_SIZE**2, spec.representation_size),
        box_predictor=FastRCNNPredictor(spec.representation_size, NUM_CLASSES),
        box_batch_size_per_image=spec.box_batch_size_per_image, box_positive_fraction=spec.box_positive_fraction,
        box_detections_per_img=spec.detections_per_img, box_score_thresh=spec.score_thresh,
    )


@torch.no_grad()
def predict_boxes(model: FasterRCNN, images: Sequence[torch.Tensor], infer_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes [N, 4], scores [N])`` in each image's pixels, for float ``[3, H, W]`` images in [0, 1]
    (what 03's evaluation transform gives). Out-of-fold (03) and test predictions (07) both come through here."""
    model.eval()
    with inference_size(model, infer_size):
        outputs = model(list(images))
    return [(o["boxes"].float().cpu().numpy().astype(np.float64), o["scores"].float().cpu().numpy().astype(np.float64))
            for o in outputs]


def save_detector(model: FasterRCNN, arch: str, spec: DetectorSpec, infer_size: int, path: str | Path) -> Path:
    """One fold's detector: weights and what rebuilds the network (no optimizer state)."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return save_checkpoint({"format": DETECTOR_FORMAT, "arch": arch, "spec": asdict(spec), "infer_size": infer_size,
                            "state_dict": state}, path)


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[FasterRCNN, int]:
    """A fold's detector written by ``save_detector``, in eval mode, and its inference size."""
    ckpt = load_tagged(path, DETECTOR_FORMAT, "Faster R-CNN detector", "03_train_siim_fasterrcnn")
    model = build_fasterrcnn(arch=ckpt["arch"], spec=DetectorSpec(**ckpt["spec"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), int(ckpt["infer_size"])


@contextlib.contextmanager
def inference_size(model: FasterRCNN, size: int) -> Iterator[FasterRCNN]:
    """Let ``model`` resize its inputs to ``size`` inside the block (boxes still come back in input pixels)."""
    saved = model.transform.min_size, model.transform.max_size
    model.transform.min_size, model.transform.max_size = (size,), size
    try:
        yield model
    finally:
        model.transform.min_size, model.transform.max_size = saved
