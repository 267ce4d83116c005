"""Training ultralytics YOLO (notebooks 02 and 04) with the engine's guarantees: seeds, resume, precision.

ultralytics has its own trainer (loop, EMA, loss, augmentation, DDP), so ``covidkit.engine.fit`` does not
run it; this module gives it what ``fit`` gives the other models: one bar of epochs, every epoch seeded
from its number, and an exact resume (ultralytics' ``last.pt`` keeps float16 EMA and optimizer states and no
raw weights; the float32 state is kept beside it). Call ``covidkit.models.yolo.setup_ultralytics`` first.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidkit.model_file import save_checkpoint, unwrap
from covidkit.models.yolo import keep_torch_threads, load_model, resolve_device

PRECISIONS = ("auto", "bf16", "fp32")
CONFIG_JSON = "covidkit_config.json"  # the YoloTrainConfig of a run, beside ultralytics' args.yaml


@dataclass
class YoloTrainConfig:
    """One ultralytics training run.

    ``model``: a model YAML (``yolo11n.yaml``, ``yolov8l.yaml``: ultralytics ships them; random
    weights) or the path of a local ``.pt`` weights file. ``device``: ``"cpu"``, ``"0"``,
    ``"0,1,2,3"`` (several GPUs: ultralytics' own DDP), or ``None`` for every visible GPU, else
    the CPU. ``batch`` is the total over all GPUs. ``overrides``: any other ultralytics training
    argument (augmentation, optimiser, ...).
    """

    model: str = "yolo11n.yaml"
    imgsz: int = 640
    epochs: int = 30
    batch: int = 16
    device: str | None = None
    workers: int = 4
    seed: int = 42
    patience: int = 100
    save_period: int = -1  # last.pt is written every epoch anyway; N > 0 also keeps epochN.pt every N
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp32 (see the module docstring)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stage(cls, cfg, model: str) -> YoloTrainConfig:
        """From a stage Config (02, 04): its fields of the same name (device, workers, seed, save_period, ...),
        ``input_size`` as ``imgsz``, ``batch_size`` as ``batch``, ``hyp`` as ``overrides``. ultralytics counts
        epochs, not steps: a dry run's few images make one step an epoch, so ``max_steps`` caps the epochs."""
        from covidkit.derived import derived

        epochs = cfg.epochs if cfg.max_steps is None else min(cfg.epochs, cfg.max_steps)
        return derived(cls, cfg, model=model, imgsz=cfg.input_size, epochs=epochs, batch=cfg.batch_size,
                       overrides=cfg.hyp)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r} "
                             "(fp16 is left out: ultralytics' fp16 check downloads a model)")


@dataclass
class YoloRun:
    """A finished training run: its folder (``args.yaml``, ``results.csv``, plots) and weights."""

    dir: Path
    best: Path
    last: Path
    metrics: pd.DataFrame

    @property
    def weights(self) -> Path:
        """``best.pt`` when validation picked one, else ``last.pt``."""
        return self.best if self.best.is_file() else self.last

    @property
    def imgsz(self) -> int:
        """The image size it trained at (the configuration ``train_yolo`` records in the run)."""
        return int(json.loads((self.dir / CONFIG_JSON).read_text())["imgsz"])


def amp_setting(precision: str, device: str) -> bool | str:
    """ultralytics' ``amp`` argument: ``"bf16"`` or ``False`` (never its fp16 mode, see the docstring)."""
    if device == "cpu" or precision == "fp32":
        return False
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return "bf16"
    return False


def run_state(run_dir: Path) -> str:
    """``"new"`` (no checkpoint), ``"interrupted"`` (resumable ``last.pt``) or ``"finished"``."""
    last = run_dir / "weights" / "last.pt"
    if not last.is_file():
        return "new"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    # ultralytics strips the optimizer and sets epoch -1 when a run ends (also on early stopping)
    return "finished" if ckpt.get("epoch", -1) == -1 else "interrupted"


def _epoch_bar(model, desc: str) -> None:
    """One tqdm bar of epochs per run (ultralytics' own per-batch bars are off)."""
    bars = []

    def on_train_start(trainer) -> None:
        bars.append(tqdm(desc=desc, total=trainer.epochs, initial=trainer.start_epoch, unit="epoch"))

    def on_fit_epoch_end(trainer) -> None:
        bars[-1].n = min(trainer.epoch + 1, trainer.epochs)  # the final validation calls this once more
        bars[-1].set_postfix(mAP50=round(float(trainer.metrics.get("metrics/mAP50(B)", float("nan"))), 4))

    def on_train_end(trainer) -> None:
        bars[-1].close()

    for event, fn in [("on_train_start", on_train_start), ("on_fit_epoch_end", on_fit_epoch_end),
                      ("on_train_end", on_train_end)]:
        model.add_callback(event, fn)


def _seed_each_epoch(model, seed: int) -> None:
    """Reseed python, numpy, torch and the loader's shuffling at each epoch's start from ``seed + epoch``.

    ultralytics seeds once per process and does not save its loader's RNG state, so a resumed
    run would shuffle and augment differently from an uninterrupted one. Seeding every epoch from
    its number makes each epoch's draws independent of what ran before, hence of an interruption
    (exact on CPU with ``workers=0`` and ``mosaic=0``: DataLoader workers are seeded when the
    loader is built, and mosaic draws partners from a buffer of recently loaded images that a
    resumed run starts empty; see also ``train_args``' ``close_mosaic``).
    """
    def on_train_epoch_start(trainer) -> None:
        loader = trainer.train_loader
        if getattr(loader, "num_workers", None) == 0 and hasattr(loader, "reset"):
            # ultralytics' loader keeps one iterator for the whole run: the sampler of the previous epoch
            # would draw once more from the generator when it runs out, and a new iterator draws a seed from
            # it. A fresh iterator, built before the reseeding, leaves the epoch's order as its first draw.
            loader.reset()
            loader.iterator = loader._get_iterator()
        epoch_seed = seed + trainer.epoch
        random.seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        torch.manual_seed(epoch_seed)
        generator = getattr(trainer.train_loader, "generator", None)
        if generator is not None:  # the RandomSampler's: it draws the epoch's order when the epoch starts
            generator.manual_seed(epoch_seed)

    model.add_callback("on_train_epoch_start", on_train_epoch_start)


RESUME_STATE = "resume_state.pt"


def _exact_resume(model) -> None:
    """Keep the full-precision training state beside ``last.pt``, and restore it on resume.

    ultralytics' ``last.pt`` holds the EMA weights and the optimizer state in float16 and no raw
    model weights (a resumed run restarts from the EMA), so a resumed run drifts from an
    uninterrupted one. After each save the raw weights, the EMA and the optimizer state go to
    ``weights/resume_state.pt`` in float32; a resumed run loads them once its trainer is set up.
    With ``_seed_each_epoch`` this makes a resumed CPU run end with the uninterrupted run's weights.
    """
    def on_model_save(trainer) -> None:
        if trainer.epoch + 1 >= trainer.epochs:
            return  # the final save: nothing left to resume
        state = {"epoch": trainer.epoch, "model": unwrap(trainer.model).state_dict(),
                 "ema": trainer.ema.ema.state_dict(), "updates": trainer.ema.updates,
                 "optimizer": trainer.optimizer.state_dict()}
        save_checkpoint(state, trainer.wdir / RESUME_STATE)

    def on_train_start(trainer) -> None:
        path = trainer.wdir / RESUME_STATE
        if trainer.start_epoch == 0 or not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["epoch"] != trainer.start_epoch - 1:
            return  # written by another epoch than last.pt's: keep ultralytics' own resume
        unwrap(trainer.model).load_state_dict(state["model"])
        trainer.ema.ema.load_state_dict(state["ema"])
        trainer.ema.updates = state["updates"]
        trainer.optimizer.load_state_dict(state["optimizer"])

    def on_train_end(trainer) -> None:
        (trainer.wdir / RESUME_STATE).unlink(missing_ok=True)  # a finished run is not resumed

    model.add_callback("on_model_save", on_model_save)
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_end", on_train_end)


def train_args(cfg: YoloTrainConfig, data_yaml: Path, run_dir: Path) -> dict[str, Any]:
    """The keyword arguments of ``YOLO.train`` for ``cfg``."""
    device = resolve_device(cfg.device)
    return {
        "data": str(data_yaml), "project": str(run_dir.parent), "name": run_dir.name, "exist_ok": True,
        "imgsz": cfg.imgsz, "epochs": cfg.epochs, "batch": cfg.batch, "device": device,
        "workers": cfg.workers, "seed": cfg.seed, "deterministic": True, "patience": cfg.patience,
        "save_period": cfg.save_period, "amp": amp_setting(cfg.precision, device),
        # the weights of a local .pt model (False would start from random weights); a YAML has none
        "pretrained": str(Path(cfg.model).resolve()) if Path(cfg.model).suffix == ".pt" else False,
        "plots": True, "verbose": False,
        # without mosaic there is nothing to close; closing it rebuilds the loader mid-run, which draws from
        # the loader's generator and so breaks the equality of resumed and uninterrupted runs
        **({"close_mosaic": 0} if cfg.overrides.get("mosaic") == 0 else {}),
        **cfg.overrides,
    }


def train_yolo(cfg: YoloTrainConfig, data_yaml: str | Path, run_dir: str | Path, resume: bool = True,
               callbacks: dict | None = None) -> YoloRun:
    """Train into ``run_dir`` (weights in ``run_dir/weights``).

    With ``resume`` an interrupted run continues from its ``last.pt`` and a finished one is
    returned as it is; without, any previous run in ``run_dir`` is replaced. ``callbacks``:
    extra ultralytics callbacks ``{event: fn}``. Call ``setup_ultralytics`` first.
    """
    run_dir = Path(run_dir).resolve()
    state = run_state(run_dir)
    if state != "new" and not resume:
        shutil.rmtree(run_dir)
        state = "new"
    if state != "finished":
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_JSON).write_text(json.dumps(asdict(cfg), indent=2))
        model = load_model(run_dir / "weights" / "last.pt" if state == "interrupted" else cfg.model)
        _epoch_bar(model, run_dir.name)
        _seed_each_epoch(model, cfg.seed)
        _exact_resume(model)
        for event, fn in (callbacks or {}).items():
            model.add_callback(event, fn)
        args = train_args(cfg, Path(data_yaml).resolve(), run_dir)
        with keep_torch_threads() as threads:
            # the trainer has picked its device (and the thread count) by the time this runs
            model.add_callback("on_pretrain_routine_start", lambda trainer: torch.set_num_threads(threads))
            if state == "interrupted":
                model.train(resume=True, **{k: args[k] for k in ("data", "device", "workers")})
            else:
                model.train(**args)
    return finished_run(run_dir)


def finished_run(run_dir: str | Path) -> YoloRun:
    """The ``YoloRun`` of a training folder."""
    run_dir = Path(run_dir)
    results = run_dir / "results.csv"
    if not results.is_file():
        raise FileNotFoundError(f"{results} is missing: {run_dir} holds no finished ultralytics run")
    metrics = pd.read_csv(results)
    metrics.columns = metrics.columns.str.strip()
    return YoloRun(run_dir, run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt", metrics)


