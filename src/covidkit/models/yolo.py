"""ultralytics YOLO, set up so that nothing leaves the machine.

Out of the box ultralytics reaches the network in several places: anonymous usage analytics
(settings ``sync``), its Platform callbacks (with an API key), a font download (``Arial.ttf``,
for plots and dataset checks), ``yolo26n.pt`` for the fp16 AMP check on GPU, pretrained weights
when a model name ends in ``.pt``, pip auto-installs, and a PyPI update check. ``setup_ultralytics``
closes each of them:

- ``YOLO_OFFLINE=1`` (ultralytics' "online" flag is false: no analytics, no update check),
  ``YOLO_AUTOINSTALL=0``, ``ULTRALYTICS_API_KEY`` removed, and the settings ``sync``, ``api_key``
  and every logger integration (ClearML, Comet, DVC, MLflow, Ray Tune, TensorBoard, W&B) off;
- ``YOLO_CONFIG_DIR`` inside the run folder, so settings, fonts and DDP launch files stay there;
- matplotlib's DejaVu Sans copied there under the names ultralytics looks for, so it downloads
  no font;
- precision ``bf16`` on GPUs that have it, else fp32: ultralytics' fp16 mode runs an AMP check
  that downloads a model, bf16 and fp32 skip that check;
- models only from a YAML (random weights) or from a local weights file, never by name.

The variables are read when ultralytics is imported, so ``setup_ultralytics`` must run before
it is (the environment carries over to the processes of multi-GPU training).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidkit.train.checkpoint import save_checkpoint, unwrap

CONFIG_SUBDIR = "Ultralytics"  # ultralytics appends this to YOLO_CONFIG_DIR
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
PRECISIONS = ("auto", "bf16", "fp32")


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


def config_dir(run_dir: str | Path) -> Path:
    """Where ultralytics keeps its settings, fonts and DDP files for a run folder."""
    return Path(run_dir).resolve() / "ultralytics"


def _install_fonts(user_config_dir: Path) -> None:
    """Put matplotlib's DejaVu Sans where ultralytics looks for Arial (it downloads Arial otherwise)."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    user_config_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        target = user_config_dir / name
        if not target.is_file():
            shutil.copyfile(source, target)


def setup_ultralytics(run_dir: str | Path, verbose: bool = False):
    """Make ultralytics offline-safe with its configuration in ``run_dir``; returns the module.

    ``verbose=False`` keeps ultralytics' log at warnings (no per-batch progress lines: the
    training here shows one bar of epochs instead).
    """
    cfg_dir = config_dir(run_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_VERBOSE"] = "1" if verbose else "0"
    os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # a medical project sends nothing to a cloud platform
    _install_fonts(cfg_dir / CONFIG_SUBDIR)

    import ultralytics
    from ultralytics.utils import LOGGER, ONLINE, SETTINGS, USER_CONFIG_DIR

    if ONLINE:  # fixed at import: analytics and downloads would stay enabled in this process
        raise RuntimeError("ultralytics was imported before covidkit.models.yolo.setup_ultralytics, without "
                           "YOLO_OFFLINE=1; call setup_ultralytics first (restart the kernel)")
    if USER_CONFIG_DIR != cfg_dir / CONFIG_SUBDIR:
        # Imported earlier in this process, its config dir is fixed: equip that one, and point the
        # processes of multi-GPU training at it too, so they read the settings written below.
        _install_fonts(USER_CONFIG_DIR)
        os.environ["YOLO_CONFIG_DIR"] = str(USER_CONFIG_DIR.parent)
    SETTINGS.update({
        "sync": False, "api_key": "", "vscode_msg": False, "openvino_msg": False,
        **{key: str(USER_CONFIG_DIR / name) for key, name in
           [("datasets_dir", "datasets"), ("weights_dir", "weights"), ("runs_dir", "runs")]},
        **{name: False for name in INTEGRATIONS},
    })
    LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    return ultralytics


def resolve_device(device: str | None) -> str:
    """``None`` -> every visible GPU (``"0,1,..."``), else ``"cpu"``; other values pass through."""
    if device is not None:
        return str(device)
    if torch.cuda.is_available():
        return ",".join(str(i) for i in range(torch.cuda.device_count()))
    return "cpu"


def amp_setting(precision: str, device: str) -> bool | str:
    """ultralytics' ``amp`` argument: ``"bf16"`` or ``False`` (never its fp16 mode, see the docstring)."""
    if device == "cpu" or precision == "fp32":
        return False
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return "bf16"
    return False


def load_model(model: str | Path):
    """A YOLO from a model YAML (random weights) or a local weights file; never a download."""
    from ultralytics import YOLO

    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        return YOLO(str(model), task="detect")
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path}: give a local .pt path or a model YAML "
                                    "(nothing is downloaded)")
        return YOLO(str(path), task="detect")
    raise ValueError(f"model must be a model YAML (e.g. yolo11n.yaml) or a local .pt file, got {model!r}")


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
        (run_dir / "covidkit_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        model = load_model(run_dir / "weights" / "last.pt" if state == "interrupted" else cfg.model)
        _epoch_bar(model, run_dir.name)
        _seed_each_epoch(model, cfg.seed)
        _exact_resume(model)
        for event, fn in (callbacks or {}).items():
            model.add_callback(event, fn)
        args = train_args(cfg, Path(data_yaml).resolve(), run_dir)
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


def predict_boxes(model, paths: Sequence[str | Path], imgsz: int, device: str | None = None, conf: float = 0.001,
                  iou: float = 0.6, max_det: int = 100, batch: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes [N, 4] x1 y1 x2 y2 in the pixels of each image, scores [N])`` per image path.

    A low ``conf`` keeps the low-scored boxes AP needs (the VOC curve runs to full recall).
    """
    device = resolve_device(device).split(",")[0]  # prediction uses one device
    out = []
    for start in tqdm(range(0, len(paths), batch), desc="predict", unit="batch", leave=False):
        chunk = [str(p) for p in paths[start:start + batch]]
        for result in model.predict(chunk, imgsz=imgsz, device=device, conf=conf, iou=iou, max_det=max_det,
                                    verbose=False, half=False):
            boxes = result.boxes
            out.append((boxes.xyxy.cpu().numpy().astype(np.float64), boxes.conf.cpu().numpy().astype(np.float64)))
    return out


def predict_image(model, image: np.ndarray, prepared_size: int, imgsz: int, device: str | None = None,
                  conf: float = 0.001, iou: float = 0.6, max_det: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes [N, 4] in ``image``'s pixels, scores [N])`` for one uint8 grey image of any size.

    As for the out-of-fold predictions: resized to 00's square ``prepared_size``, given to
    ultralytics as the 3-channel array OpenCV reads from the PNG, boxes scaled back.
    """
    from covidkit.boxes import scale_boxes
    from covidkit.prepare import resize_square

    square = resize_square(image, prepared_size)
    bgr = np.repeat(square[:, :, None], 3, axis=2)
    result = model.predict([bgr], imgsz=imgsz, device=resolve_device(device).split(",")[0], conf=conf, iou=iou,
                           max_det=max_det, verbose=False, half=False)[0]
    boxes = result.boxes.xyxy.cpu().numpy().astype(np.float64)
    return scale_boxes(boxes, square.shape, image.shape[:2]), result.boxes.conf.cpu().numpy().astype(np.float64)
