"""``covidkit bench models``: what one training step of each full-size model costs, measured on this machine.

The ``full`` profile's networks at their full sizes (ResNeXt-101 32x8d for 01 at 224 px, Faster R-CNN with a
ResNeXt-101 FPN trained at 512 px, YOLO11-L at 640 px, the study U-Net on ResNeXt-101 at 512 px, DeCoVNet at
224 x 336 with 64 slices, CogSeg at 256 -> 512 px), one training step (forward, loss, backward, optimizer) at
batch 1 and 2: the seconds, and the growth of the process's peak resident memory over the step (activations
and gradients; the first step also allocates the optimizer's state). Beside them, the parameters and the
optimizer's state in MiB (float32). The README turns these into an estimate of the full run on a GPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from covidkit.bench.memory import peak_rss_mib, reset_peak_rss


@dataclass
class ModelCost:
    name: str
    params_mib: float
    optimizer_mib: float
    seconds: dict[int, float]  # per batch size: one training step
    step_mib: dict[int, float]  # per batch size: peak resident memory growth during the step


def _mib(n_floats: int) -> float:
    return 4 * n_floats / 2**20


def _classifier(batch: int):
    from covidkit.data.nih import LABELS
    from covidkit.models.backbones import build_classifier

    model = build_classifier("resnext101_32x8d", len(LABELS))
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 2, (batch, len(LABELS))).float()
    return model, lambda: nn.functional.binary_cross_entropy_with_logits(model(x), y), "sgd"


def _fasterrcnn(batch: int):
    from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn

    model = build_fasterrcnn(arch="resnext101_32x8d", spec=DetectorSpec(train_size=512))
    model.train()
    images = [torch.rand(3, 1024, 1024) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[200.0, 300.0, 420.0, 560.0], [600.0, 320.0, 800.0, 600.0]]),
                "labels": torch.ones(2, dtype=torch.int64)} for _ in range(batch)]
    return model, lambda: sum(model(images, targets).values()), "sgd"


def _yolo(batch: int):
    import tempfile

    from covidkit.models.yolo import setup_ultralytics

    setup_ultralytics(tempfile.gettempdir() + "/covidkit-bench")  # offline, settings out of the home folder
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11l.yaml", nc=1, verbose=False)
    model.args = get_cfg()
    data = {"img": torch.rand(batch, 3, 640, 640), "batch_idx": torch.arange(batch).repeat_interleave(2).float(),
            "cls": torch.zeros(2 * batch, 1), "bboxes": torch.tensor([[0.3, 0.5, 0.2, 0.3], [0.7, 0.5, 0.2, 0.3]] * batch)}
    return model, lambda: model.loss(data)[0].sum(), "sgd"


def _study(batch: int):
    from covidkit.models.study import StudySpec, build_study_model

    model = build_study_model(StudySpec(encoder="resnext101_32x8d", width=32, image_size=512))
    x = torch.randn(batch, 3, 512, 512)
    label, mask = torch.randint(0, 4, (batch,)), torch.rand(batch, 1, 512, 512).round()

    def step():
        out = model(x)
        return (nn.functional.cross_entropy(out["study"], label)
                + nn.functional.binary_cross_entropy_with_logits(out["mask"], mask))
    return model, step, "sgd"


def _decovnet(batch: int):
    from covidkit.ct.decovnet.model import DeCoVNet

    model = DeCoVNet()
    x, y = torch.randn(batch, 2, 64, 224, 336), torch.randint(0, 2, (batch,))
    return model, lambda: nn.functional.cross_entropy(model(x), y), "adam"


def _cogseg(batch: int):
    from covidkit.ct.cogseg.model import CogSeg, CogSegConfig

    model = CogSeg(CogSegConfig(base_channels=32))
    x, y = torch.randn(batch, 1, 256, 256), torch.randint(0, 4, (batch, 512, 512))

    def step():
        out = model(x)
        logits = out["seg"] if isinstance(out, dict) else out[0]
        return nn.functional.cross_entropy(logits, y)
    return model, step, "adam"


MODELS: dict[str, Callable[[int], tuple[nn.Module, Callable[[], torch.Tensor], str]]] = {
    "01 ResNeXt-101 32x8d classifier, 224 px": _classifier,
    "03 Faster R-CNN ResNeXt-101 FPN, 512 px": _fasterrcnn,
    "02/04 YOLO11-L, 640 px": _yolo,
    "06 study U-Net, ResNeXt-101 encoder, 512 px": _study,
    "11 DeCoVNet, 64 x 224 x 336": _decovnet,
    "10 CogSeg, 256 -> 512 px": _cogseg,
}


def measure(name: str, batches=(1, 2)) -> ModelCost:
    build = MODELS[name]
    seconds, step_mib = {}, {}
    params = optimizer = 0.0
    for batch in batches:
        torch.manual_seed(0)
        model, loss_fn, kind = build(batch)
        weights = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.SGD(weights, lr=1e-3, momentum=0.9) if kind == "sgd" else torch.optim.Adam(weights, lr=1e-5))
        params = _mib(sum(p.numel() for p in model.parameters()))
        optimizer = _mib(sum(p.numel() for p in weights)) * (1 if kind == "sgd" else 2)
        loss_fn().backward()  # one warm-up step: lazy allocations, optimizer state
        opt.step()
        opt.zero_grad(set_to_none=True)
        reset_peak_rss()
        before = peak_rss_mib()  # right after the reset: the current resident memory
        start = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds[batch] = time.perf_counter() - start
        step_mib[batch] = max(peak_rss_mib() - before, 0.0)
        del model, opt
    return ModelCost(name, params, optimizer, seconds, step_mib)


def bench_models(names: list[str] | None = None, batches=(1, 2)) -> list[ModelCost]:
    """Measure each model (all by default) and print the table."""
    costs = []
    print(f"{'model':<46} {'params MiB':>10} {'optim MiB':>9} " +
          " ".join(f"{f's/step b{b}':>10} {f'MiB b{b}':>8}" for b in batches))
    for name in names or list(MODELS):
        cost = measure(name, batches)
        costs.append(cost)
        print(f"{cost.name:<46} {cost.params_mib:>10.0f} {cost.optimizer_mib:>9.0f} " +
              " ".join(f"{cost.seconds[b]:>10.2f} {cost.step_mib[b]:>8.0f}" for b in batches), flush=True)
    return costs
