"""The training engine: schedules, samplers, checkpoints, exact resume, accumulation, clipping,
detection-style batches, 3D batch-1 inputs, and DDP with two gloo processes under torchrun."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, RandomSampler

from covidkit.engine import (
    TrainConfig,
    WeightedSampler,
    autocast_context,
    class_balanced_weights,
    collate_lists,
    cosine_with_floor,
    fit,
    load_checkpoint,
    load_weights,
    seed_everything,
    to_device,
)
from covidkit.engine.device import model_device
from covidkit.engine.distributed import DistInfo
from covidkit.engine.loaders import make_train_sampler

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread would only spin-wait and burn CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NoisyImages(Dataset):
    """Tiny 1x8x8 images whose augmentation draws from torch, numpy and python's random."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = x + torch.from_numpy(np.random.normal(0, 0.1, x.shape).astype(np.float32))
        return x * random.uniform(0.9, 1.1), self.y[i]


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def classify_step(model, batch, device):
    x, y = to_device(batch, device)
    logits = model(x)
    return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}


def sgd_nesterov(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def config(run_dir, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), epochs=3, batch_size=4, seed=5, progress=False, plots=False)
    return TrainConfig(**{**base, **kw})


def fresh_model(init_seed: int = 0) -> nn.Module:
    seed_everything(init_seed)
    return tiny_net()


class Interrupt(Exception):
    pass


def interrupt_after(epoch: int):
    def hook(e, row):
        if e == epoch:
            raise Interrupt

    return hook


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def without_time(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


# --- schedules, samplers, helpers -------------------------------------------------------------

def test_cosine_with_floor_values_at_start_middle_end_and_after():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = cosine_with_floor(opt, total_steps=10, floor=0.05)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx((0.5 * 0.95 + 0.05) * 0.1)
    assert lrs[10] == pytest.approx(0.005)
    assert lrs[12] == pytest.approx(0.005)
    assert all(a > b for a, b in zip(lrs[:10], lrs[1:11]))


def test_weighted_sampler_is_epoch_seeded_split_across_ranks_and_balanced():
    labels = [0] * 90 + [1] * 10
    weights = class_balanced_weights(labels)
    assert weights[0] == pytest.approx(1 / 90) and weights[-1] == pytest.approx(1 / 10)

    def draw(epoch, rank=0, replicas=1, n=None):
        s = WeightedSampler(weights, num_samples=n, seed=3, num_replicas=replicas, rank=rank)
        s.set_epoch(epoch)
        return list(s)

    assert draw(0) == draw(0) and draw(0) != draw(1)
    whole = draw(4, n=2000)
    assert 0.4 < np.mean([labels[i] for i in whole]) < 0.6  # minority drawn as often as majority
    r0, r1 = draw(4, 0, 2, n=2000), draw(4, 1, 2, n=2000)
    assert len(r0) == len(r1) == 1000
    assert r0 == whole[0::2] and r1 == whole[1::2]


def test_custom_samplers_must_be_resumable_and_rank_aware():
    data = NoisyImages(8)
    cfg = config("unused")
    with pytest.raises(TypeError, match="set_epoch"):
        make_train_sampler(data, cfg, DistInfo(), sampler=RandomSampler(data))
    single = WeightedSampler([1.0] * 8)
    with pytest.raises(ValueError, match="num_replicas"):
        make_train_sampler(data, cfg, DistInfo(rank=0, world_size=2), sampler=single)
    with pytest.raises(ValueError, match="either"):
        make_train_sampler(data, cfg, DistInfo(), sampler=single, sample_weights=[1.0] * 8)
    with pytest.raises(ValueError, match="7 sample weights"):
        make_train_sampler(data, cfg, DistInfo(), sample_weights=[1.0] * 7)


def test_each_epoch_has_its_own_order_and_repeats_it():
    from covidkit.engine.loaders import make_train_loader

    data = torch.arange(32)
    cfg = config("unused", batch_size=32, num_workers=1)
    sampler = make_train_sampler(data, cfg, DistInfo())

    def order(epoch):
        return next(iter(make_train_loader(data, sampler, cfg, epoch, DistInfo()))).tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(1)) == list(range(32))


def test_to_device_and_collate_keep_nested_structure():
    batch = collate_lists([(torch.ones(1, 5, 4), {"boxes": torch.zeros(2, 4)}),
                           (torch.ones(1, 3, 7), {"boxes": torch.zeros(0, 4)})])
    images, targets = batch
    assert [im.shape for im in images] == [(1, 5, 4), (1, 3, 7)]
    moved = to_device(batch, "cpu")
    assert isinstance(moved, tuple) and isinstance(moved[1][0], dict)
    assert moved[1][1]["boxes"].shape == (0, 4)


def test_model_device_is_where_the_parameters_or_buffers_are():
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert model_device(nn.BatchNorm1d(2, affine=False).to("meta")) == torch.device("meta")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")  # nothing to go by


def test_autocast_is_float32_on_cpu():
    a = torch.randn(4, 4)
    with autocast_context("cpu", enabled=True, dtype="bfloat16"):
        assert (a @ a).dtype == torch.float32


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="amp_dtype"):
        config("x", amp_dtype="float8")
    with pytest.raises(ValueError, match="epochs"):
        config("x", epochs=0)
    with pytest.raises(TypeError, match="JSON"):
        config("x", hparams={"f": object()})


# --- fit: resume, run folder, options ---------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(tmp_path, num_workers):
    data = NoisyImages()
    kw = dict(scheduler_fn=cosine_with_floor)
    cfg = config(tmp_path / "full", num_workers=num_workers, accumulate_steps=2, clip_grad_norm=1.0)

    full = fresh_model()
    draw_randoms = lambda e, row: (torch.rand(3), np.random.rand(), random.random())  # noqa: E731
    fit(full, data, classify_step, sgd_nesterov, cfg, on_epoch_end=draw_randoms, **kw)

    cut = TrainConfig(**{**cfg.to_dict(), "run_dir": str(tmp_path / "cut")})
    with pytest.raises(Interrupt):
        fit(fresh_model(), data, classify_step, sgd_nesterov, cut, on_epoch_end=interrupt_after(1), **kw)
    after_one = fresh_model(init_seed=99)  # a different init: everything must come from last.pt
    load_weights(tmp_path / "cut" / "last.pt", after_one)
    resumed = fresh_model(init_seed=99)
    result = fit(resumed, data, classify_step, sgd_nesterov, cut, resume=True, **kw)

    assert_same_state(full, resumed)
    full_history = load_checkpoint(tmp_path / "full" / "last.pt")["history"]
    assert without_time(result.history) == without_time(full_history)
    assert not torch.equal(after_one[0].weight, resumed[0].weight.cpu())  # epochs 2-3 did train

    if num_workers == 0:  # the shuffling/augmentation streams matter: another data seed, other weights
        other = fresh_model()
        fit(other, data, classify_step, sgd_nesterov,
            TrainConfig(**{**cfg.to_dict(), "run_dir": str(tmp_path / "other"), "seed": 6}), **kw)
        assert not torch.equal(other[0].weight, full[0].weight)


def test_run_folder_has_config_metrics_plots_and_best_by_monitor(tmp_path):
    scripted = iter([0.2, 0.9, 0.5])
    snapshots = {}

    def evaluate(model, device):
        assert not model.training and not torch.is_grad_enabled()
        return {"val_score": next(scripted)}

    model = fresh_model()
    cfg = config(tmp_path, plots=True, monitor="val_score", monitor_mode="max", hparams={"arch": "tiny"})
    result = fit(model, NoisyImages(), classify_step, sgd_nesterov, cfg, evaluate=evaluate,
                 on_epoch_end=lambda e, row: snapshots.__setitem__(e, tiny_copy(model)))

    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    df = pd.read_csv(tmp_path / "metrics.csv")
    assert list(df["epoch"]) == [1, 2, 3]
    assert {"lr", "train_loss", "train_acc", "val_score", "time_s"} <= set(df.columns)
    assert list(df["val_score"]) == [0.2, 0.9, 0.5]
    assert json.loads((tmp_path / "metrics.json").read_text())[1]["val_score"] == 0.9
    for png in ("loss.png", "val_score.png", "lr.png", "train_acc.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.rglob(".*tmp*")]  # no temp file left behind

    assert (result.best_epoch, result.best_value) == (2, 0.9)
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] == 2 and "optimizer" not in best
    assert all(torch.equal(best["model"][k], v.cpu()) for k, v in snapshots[2].items())
    last = load_checkpoint(result.last_checkpoint)
    assert last["epoch"] == 3 and last["best"]["epoch"] == 2
    assert {"optimizer", "scheduler", "scaler", "rng", "history", "config"} <= set(last)
    assert all(torch.equal(last["model"][k], v.cpu()) for k, v in model.state_dict().items())


def tiny_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    data = NoisyImages(8)
    cfg = config(tmp_path, epochs=1)
    model = fresh_model()
    fit(model, data, classify_step, sgd_nesterov, cfg)
    trained = tiny_copy(model)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(fresh_model(), data, classify_step, sgd_nesterov, cfg)
    with pytest.raises(ValueError, match="batch_size"):
        fit(fresh_model(), data, classify_step, sgd_nesterov, config(tmp_path, epochs=1, batch_size=2), resume=True)
    with pytest.raises(ValueError, match="hparams"):  # a stage's training setting
        fit(fresh_model(), data, classify_step, sgd_nesterov, config(tmp_path, epochs=1, hparams={"lr": 1.0}),
            resume=True)
    again = fresh_model(init_seed=1)
    how_it_runs = {"progress": False, "workers": 2, "resume": True}  # a stage's settings of how it runs
    result = fit(again, data, classify_step, sgd_nesterov,
                 config(tmp_path, epochs=1, num_workers=1, hparams=how_it_runs), resume=True)
    assert len(result.history) == 1  # finished: nothing retrained, weights come from last.pt
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    data = NoisyImages(16)

    def linear():
        seed_everything(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    a, b = linear(), linear()
    fit(a, data, classify_step, sgd, config(tmp_path / "a", epochs=2, batch_size=8, shuffle=False, amp=False))
    fit(b, data, classify_step, sgd, config(tmp_path / "b", epochs=2, batch_size=4, shuffle=False,
                                              accumulate_steps=2, amp=False))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert not torch.equal(a[1].weight.cpu(), linear()[1].weight)


def test_gradient_clipping_bounds_the_update(tmp_path):
    data = NoisyImages(4)
    moves = {}
    for clip in (None, 1e-3):
        model = fresh_model()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        cfg = config(tmp_path / str(clip), epochs=1, batch_size=4, clip_grad_norm=clip)
        fit(model, data, classify_step, lambda m: torch.optim.SGD(m.parameters(), lr=1.0), cfg)
        moves[clip] = (torch.cat([p.detach().flatten().cpu() for p in model.parameters()]) - before).norm().item()
    assert moves[1e-3] <= 1e-3 * (1 + 1e-5)
    assert moves[None] > 10 * moves[1e-3]


def test_max_steps_ends_the_run_after_that_many_optimizer_steps(tmp_path):
    """A dry run's limit: 24 samples in batches of 4 are 6 steps an epoch; 8 steps are one epoch and 2 batches."""
    steps = []

    def counting_step(model, batch, device):
        steps.append(len(batch[0]))
        return classify_step(model, batch, device)

    cfg = config(tmp_path / "limited", epochs=5, max_steps=8)
    result = fit(fresh_model(), NoisyImages(24), counting_step, sgd_nesterov, cfg, scheduler_fn=cosine_with_floor)
    assert len(steps) == 8 and [r["epoch"] for r in result.history] == [1, 2]
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 2
    # resuming the finished run trains no more
    fit(fresh_model(), NoisyImages(24), counting_step, sgd_nesterov, cfg, resume=True)
    assert len(steps) == 8


def test_epoch_scheduler_and_nonfinite_loss(tmp_path):
    data = NoisyImages(8)
    cfg = config(tmp_path / "epoch", scheduler_interval="epoch")
    result = fit(fresh_model(), data, classify_step, sgd_nesterov, cfg, scheduler_fn=cosine_with_floor)
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.05 * (0.75 * 0.95 + 0.05),
                                                               0.05 * (0.25 * 0.95 + 0.05)])

    def diverging_step(model, batch, device):
        loss, logs = classify_step(model, batch, device)
        return loss * float("nan"), logs

    with pytest.raises(FloatingPointError, match="nan"):
        fit(fresh_model(), data, diverging_step, sgd_nesterov, config(tmp_path / "nan"))


class Volumes(Dataset):
    """CT-like volumes of different depths, one per batch; labels 0 (x6) and 1 (x2)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.randn(1, d, 6, 6, generator=g), int(d > 5)) for d in (3, 4, 5, 4, 3, 5, 6, 7)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return x + 0.05 * torch.randn_like(x), torch.tensor(y)


def test_batch_one_variable_size_volumes_with_class_balanced_sampling(tmp_path):
    data = Volumes()
    labels = [y for _, y in data.items]
    seen = []

    def step(model, batch, device):
        x, y = to_device(batch, device)
        seen.append((x.shape[2], int(y)))
        return F.cross_entropy(model(x), y), {}

    def net():
        seed_everything(0)
        return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool3d(1), nn.Flatten(),
                             nn.Linear(2, 2))

    def adam(model):
        return torch.optim.Adam(model.parameters(), lr=1e-2)

    kw = dict(sample_weights=class_balanced_weights(labels))
    cfg = config(tmp_path / "a", epochs=5, batch_size=1)
    a = net()
    fit(a, data, step, adam, cfg, **kw)
    assert len({depth for depth, _ in seen}) > 1
    assert 0.3 < np.mean([y for _, y in seen]) < 0.7  # balanced although only 2 of 8 are positive

    cut = config(tmp_path / "b", epochs=5, batch_size=1)
    with pytest.raises(Interrupt):
        fit(net(), data, step, adam, cut, on_epoch_end=interrupt_after(2), **kw)
    b = net()
    fit(b, data, step, adam, cut, resume=True, **kw)
    assert_same_state(a, b)


def test_torchvision_faster_rcnn_trains_on_lists_of_images_and_targets(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class Boxes(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0]]) if i < 2 else torch.zeros(0, 4)  # 3rd: no opacity
            labels = torch.ones(len(boxes), dtype=torch.int64)
            return torch.rand(3, 40 + 8 * i, 48), {"boxes": boxes, "labels": labels}

    seed_everything(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    model = FasterRCNN(backbone, num_classes=2, min_size=48, max_size=64,
                       rpn_anchor_generator=AnchorGenerator(((16, 32),), ((1.0,),)),
                       rpn_batch_size_per_image=16, box_batch_size_per_image=16)

    def detection_step(model, batch, device):
        images, targets = to_device(batch, device)
        losses = model(images, targets)
        return sum(losses.values()), losses

    def evaluate(model, device):
        out = model([torch.rand(3, 48, 48, device=device)])
        return {"val_detections": float(len(out[0]["boxes"]))}

    cfg = config(tmp_path, epochs=1, batch_size=2)
    result = fit(model, Boxes(), detection_step, sgd_nesterov, cfg, collate_fn=collate_lists, evaluate=evaluate)
    row = result.history[0]
    for name in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert np.isfinite(row[f"train_{name}"])
    parts = sum(row[f"train_{n}"] for n in ("loss_classifier", "loss_box_reg", "loss_objectness",
                                            "loss_rpn_box_reg"))
    assert row["train_loss"] == pytest.approx(parts, rel=1e-5)
    assert "val_detections" in row


# --- DDP: two gloo processes under torchrun ---------------------------------------------------

DDP_SCRIPT = """
import json, os, sys
import torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_train import NoisyImages, classify_step, sgd_nesterov, tiny_net
from covidkit.engine import TrainConfig, cosine_with_floor, fit, seed_everything

out = {out!r}
rank = int(os.environ["RANK"])
writes = []
real_replace = os.replace
def spy(src, dst, *a, **k):
    writes.append(str(dst))
    return real_replace(src, dst, *a, **k)
os.replace = spy

local = []
def step(model, batch, device):
    loss, logs = classify_step(model, batch, device)
    local.append(float(loss.detach()))
    return loss, logs

seed_everything(0 if rank == 0 else 1)  # different inits: DDP must broadcast rank 0's
model = tiny_net()
cfg = TrainConfig(run_dir=os.path.join(out, "run"), epochs=2, batch_size=4, seed=3, progress=False,
                  monitor="val_one", hparams={{"world": 2}})
result = fit(model, NoisyImages(16), step, sgd_nesterov, cfg, scheduler_fn=cosine_with_floor,
             evaluate=lambda m, d: {{"val_one": float(rank)}})
torch.save({{k: v.detach() for k, v in model.named_parameters()}}, os.path.join(out, f"params{{rank}}.pt"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"writes": writes, "history": result.history, "local_epoch1": sum(local[:2]) / 2}}, f)
torch.distributed.destroy_process_group()
"""


def test_ddp_two_gloo_processes_under_torchrun(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # the CPU path (gloo), also on a GPU box
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    run = tmp_path / "run"
    assert r1["writes"] == [] and r0["writes"]  # one writer
    assert {Path(w).name for w in r0["writes"]} >= {"last.pt", "best.pt", "metrics.csv", "config.json"}
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert without_time(r0["history"]) == without_time(r1["history"])
    # each rank saw its own half of the data; the logged loss is their average
    assert r0["local_epoch1"] != r1["local_epoch1"]
    assert r0["history"][0]["train_loss"] == pytest.approx((r0["local_epoch1"] + r1["local_epoch1"]) / 2)
    assert r0["history"][0]["val_one"] == 0.5
    last = load_checkpoint(run / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2 and last["epoch"] == 2
    assert len(pd.read_csv(run / "metrics.csv")) == 2
