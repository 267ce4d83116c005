"""CogSeg throughput: slices per second of inference (segmentation path) and of a training step (full loss)."""
from __future__ import annotations

import time

import torch

from covidkit.ct.cogseg.model import CogSeg, CogSegConfig
from covidkit.ct.cogseg.losses import CogSegLoss, CogSegLossConfig
from covidkit.ct.cogseg.medseg import NUM_CLASSES


def _synced_seconds(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_cogseg(size: int = 512, batch_size: int = 4, steps: int = 5, warmup: int = 2, base_channels: int = 32,
                 device: str | None = None, amp: bool = True) -> dict:
    """Time CogSeg at output side ``size`` (input ``size // 2``) on random slices; prints and returns the rates.

    Inference: eval mode, segmentation path, softmax. Training: forward with the SR branch, the full CogSeg loss
    (CE + SR MSE + 4 L1 + edge-guided RMI), backward, Adam step. AMP on CUDA when ``amp``.
    """
    from covidkit.engine import autocast_context, default_device

    dev = torch.device(device) if device else default_device()
    torch.manual_seed(0)
    model = CogSeg(CogSegConfig(num_classes=NUM_CLASSES, base_channels=base_channels)).to(dev)
    loss_fn = CogSegLoss(NUM_CLASSES, CogSegLossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dev.type == "cuda")
    low = torch.rand(batch_size, 1, size // 2, size // 2, device=dev)
    image = torch.rand(batch_size, 1, size, size, device=dev)
    mask = torch.randint(0, NUM_CLASSES, (batch_size, size, size), device=dev)

    def infer():
        with torch.no_grad(), autocast_context(dev, amp):
            model.predict_proba(low)

    def train_step():
        with autocast_context(dev, amp):
            loss = loss_fn(model(low, with_sr=True), mask, image)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.eval()
    _synced_seconds(infer, dev, warmup)
    infer_s = _synced_seconds(infer, dev, steps)
    model.train()
    _synced_seconds(train_step, dev, warmup)
    train_s = _synced_seconds(train_step, dev, steps)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": size, "input_size": size // 2, "batch_size": batch_size, "base_channels": base_channels,
        "amp": amp and dev.type == "cuda",
        "infer_slices_per_s": batch_size * steps / infer_s,
        "train_slices_per_s": batch_size * steps / train_s,
    }
    print(f"CogSeg {size // 2}->{size}, batch {batch_size}, {result['device']}: "
          f"inference {result['infer_slices_per_s']:.2f} slices/s, training {result['train_slices_per_s']:.2f} slices/s")
    return result
