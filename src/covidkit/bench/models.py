"""``covidkit bench models``: what one training step of each full-size model costs, measured on this machine.

The ``full`` profile's networks at their full sizes (ResNeXt-101 32x8d for 01 at 224 px, Faster R-CNN with a
ResNeXt-101 FPN trained at 512 px, YOLO11-L at 640 px, the study U-Net on ResNeXt-101 at 512 px, DeCoVNet at
224 x 336 with 64 slices, CogSeg at 256 -> 512 px), one training step (forward, loss, backward, optimizer) at
batch 1 and 2: the seconds, and the activation memory: the tensors autograd saves for the backward pass (what a
GPU holds per batch beside the weights, their gradients and the optimizer state), summed over distinct
storages, parameters excluded, float32. Beside them, the parameters and the optimizer's state in MiB.
``covidkit bench estimate`` turns these into an estimate of the full run on a GPU.

On a GPU (``--device cuda``, with ``--amp bfloat16`` or ``float16`` as the training engine runs it) the seconds
are the mean of several synchronised steps after two warm-up steps, the activations are in the autocast dtype, and
``peak_mib`` is what the CUDA allocator held at its peak during a step: weights, gradients, optimizer state and
activations, measured rather than added up (the CUDA context and cuDNN's workspaces outside torch's allocator
excluded).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from covidkit.engine.device import autocast_context


@dataclass
class ModelCost:
    name: str
    params_mib: float
    optimizer_mib: float
    seconds: dict[int, float]  # per batch size: one training step
    activation_mib: dict[int, float]  # per batch size: what autograd saves for the backward pass
    device: str = "cpu"
    amp: str | None = None  # the autocast dtype on CUDA
    peak_mib: dict[int, float] = field(default_factory=dict)  # per batch size, CUDA only: the allocator's peak


def _mib(n_floats: int) -> float:
    return 4 * n_floats / 2**20


def _classifier(batch: int, device: torch.device):
    from covidkit.data.nih import LABELS
    from covidkit.models.backbones import build_classifier

    model = build_classifier("resnext101_32x8d", len(LABELS)).to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 2, (batch, len(LABELS)), device=device).float()
    return model, lambda: nn.functional.binary_cross_entropy_with_logits(model(x), y), "sgd"


def _fasterrcnn(batch: int, device: torch.device):
    from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn

    model = build_fasterrcnn(arch="resnext101_32x8d", spec=DetectorSpec(input_size=512)).to(device)
    model.train()
    images = [torch.rand(3, 1024, 1024, device=device) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[200.0, 300.0, 420.0, 560.0], [600.0, 320.0, 800.0, 600.0]], device=device),
                "labels": torch.ones(2, dtype=torch.int64, device=device)} for _ in range(batch)]
    return model, lambda: sum(model(images, targets).values()), "sgd"


def _yolo(batch: int, device: torch.device):
    import tempfile

    from covidkit.models.yolo import setup_ultralytics

    setup_ultralytics(tempfile.gettempdir() + "/covidkit-bench")  # offline, settings out of the home folder
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo11l.yaml", nc=1, verbose=False).to(device)
    model.args = get_cfg()
    data = {"img": torch.rand(batch, 3, 640, 640), "batch_idx": torch.arange(batch).repeat_interleave(2).float(),
            "cls": torch.zeros(2 * batch, 1), "bboxes": torch.tensor([[0.3, 0.5, 0.2, 0.3], [0.7, 0.5, 0.2, 0.3]] * batch)}
    data = {k: v.to(device) for k, v in data.items()}
    return model, lambda: model.loss(data)[0].sum(), "sgd"


def _study(batch: int, device: torch.device):
    from covidkit.models.study import StudySpec, build_study_model

    model = build_study_model(StudySpec(encoder="resnext101_32x8d", width=32, input_size=512)).to(device)
    x = torch.randn(batch, 3, 512, 512, device=device)
    label = torch.randint(0, 4, (batch,), device=device)
    mask = torch.rand(batch, 1, 512, 512, device=device).round()

    def step():
        out = model(x)
        return (nn.functional.cross_entropy(out["study"], label)
                + nn.functional.binary_cross_entropy_with_logits(out["mask"], mask))
    return model, step, "sgd"


def _decovnet(batch: int, device: torch.device):
    from covidkit.ct.decovnet.model import DeCoVNet

    model = DeCoVNet().to(device)
    x, y = torch.randn(batch, 2, 64, 224, 336, device=device), torch.randint(0, 2, (batch,), device=device)
    return model, lambda: nn.functional.cross_entropy(model(x), y), "adam"


def _cogseg(batch: int, device: torch.device):
    from covidkit.ct.cogseg.model import CogSeg, CogSegConfig

    model = CogSeg(CogSegConfig(base_channels=32)).to(device)
    x, y = torch.randn(batch, 1, 256, 256, device=device), torch.randint(0, 4, (batch, 512, 512), device=device)

    def step():
        out = model(x)
        logits = out["seg"] if isinstance(out, dict) else out[0]
        return nn.functional.cross_entropy(logits, y)
    return model, step, "adam"


MODELS: dict[str, Callable[[int, torch.device], tuple[nn.Module, Callable[[], torch.Tensor], str]]] = {
    "01 ResNeXt-101 32x8d classifier, 224 px": _classifier,
    "03 Faster R-CNN ResNeXt-101 FPN, 512 px": _fasterrcnn,
    "02/04 YOLO11-L, 640 px": _yolo,
    "06 study U-Net, ResNeXt-101 encoder, 512 px": _study,
    "11 DeCoVNet, 64 x 224 x 336": _decovnet,
    "10 CogSeg, 256 -> 512 px": _cogseg,
}


def saved_for_backward(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The loss, and the MiB of the distinct non-parameter storages autograd saved for its backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    return loss, sum(saved.values()) / 2**20


def _step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, device: torch.device,
          amp: str | None, scaler: torch.amp.GradScaler | None) -> float:
    """One training step as the engine runs it (autocast, the float16 scaler); the MiB autograd saved."""
    with autocast_context(device, enabled=amp is not None, dtype=amp or "float16"):
        loss, saved = saved_for_backward(model, loss_fn)
    if scaler is not None:
        scaler.scale(loss.float()).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.float().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batches=(1, 2), device: str | torch.device = "cpu", amp: str | None = None,
            steps: int | None = None) -> ModelCost:
    """One model's cost at each batch size. ``steps`` timed steps (default: 1 on the CPU, 5 on a GPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    amp = amp if cuda else None
    steps = steps or (5 if cuda else 1)
    build = MODELS[name]
    seconds, activation_mib, peak_mib = {}, {}, {}
    params = optimizer = 0.0
    for batch in batches:
        torch.manual_seed(0)
        model, loss_fn, kind = build(batch, device)
        weights = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.SGD(weights, lr=1e-3, momentum=0.9) if kind == "sgd" else torch.optim.Adam(weights, lr=1e-5))
        scaler = torch.amp.GradScaler("cuda") if amp == "float16" else None
        params = _mib(sum(p.numel() for p in model.parameters()))
        optimizer = _mib(sum(p.numel() for p in weights)) * (1 if kind == "sgd" else 2)
        for _ in range(2 if cuda else 1):  # warm-up: lazy allocations, optimizer state, cuDNN's algorithm search
            _step(model, loss_fn, opt, device, amp, scaler)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            activation_mib[batch] = _step(model, loss_fn, opt, device, amp, scaler)
        _sync(device)
        seconds[batch] = (time.perf_counter() - start) / steps
        if cuda:
            peak_mib[batch] = torch.cuda.max_memory_allocated(device) / 2**20
        del model, opt, loss_fn
        if cuda:
            torch.cuda.empty_cache()
    return ModelCost(name, params, optimizer, seconds, activation_mib, str(device), amp, peak_mib)


def bench_models(names: list[str] | None = None, batches=(1, 2), json_path: str | Path | None = None,
                 device: str = "cpu", amp: str | None = None) -> list[ModelCost]:
    """Measure each model (all by default) and print the table; ``json_path``: also write it there
    (what ``covidkit bench estimate`` reads). ``device="cuda"`` measures on the GPU, under ``amp`` autocast."""
    costs = []
    cuda = torch.device(device).type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"bench models on {where}, {amp if cuda and amp else 'float32'}")
    print(f"{'model':<46} {'params MiB':>10} {'optim MiB':>9} " +
          " ".join(f"{f's/step b{b}':>10} {f'act MiB b{b}':>12}" + (f" {f'peak MiB b{b}':>13}" if cuda else "")
                   for b in batches))
    for name in names or list(MODELS):
        cost = measure(name, batches, device=device, amp=amp)
        costs.append(cost)
        print(f"{cost.name:<46} {cost.params_mib:>10.0f} {cost.optimizer_mib:>9.0f} " +
              " ".join(f"{cost.seconds[b]:>10.3f} {cost.activation_mib[b]:>12.0f}"
                       + (f" {cost.peak_mib[b]:>13.0f}" if cost.peak_mib else "") for b in batches), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(cost) for cost in costs], indent=1))
    return costs


def load_costs(path: str | Path) -> list[ModelCost]:
    """The costs a ``bench models --json`` run wrote (JSON turns the batch sizes into strings: back to ints)."""
    return [ModelCost(c["name"], c["params_mib"], c["optimizer_mib"],
                      {int(b): s for b, s in c["seconds"].items()}, {int(b): m for b, m in c["activation_mib"].items()},
                      c.get("device", "cpu"), c.get("amp"), {int(b): m for b, m in c.get("peak_mib", {}).items()})
            for c in json.loads(Path(path).read_text())]
