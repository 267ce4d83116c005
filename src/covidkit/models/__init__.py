"""Models: ResNet-family backbones (NIH pretraining) and the Faster R-CNN opacity detector."""
from covidkit.models.backbones import build_classifier, load_backbone, save_backbone
from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn, inference_size

__all__ = ["DetectorSpec", "build_classifier", "build_fasterrcnn", "inference_size", "load_backbone", "save_backbone"]
