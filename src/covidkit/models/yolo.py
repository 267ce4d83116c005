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
- models only from a YAML (random weights) or from a local weights file, never by name;
- training (``covidkit.engine.yolo``) in bf16 on GPUs that have it, else fp32: ultralytics' fp16 mode runs an
  AMP check that downloads a model, bf16 and fp32 skip that check.

On a CPU, ultralytics sets torch's thread count for the whole process to one less than the cores (one thread on
two cores) whenever it picks a device; ``keep_torch_threads`` gives the caller's count back, for YOLO itself and
for every model that runs after it in the same process.

The variables are read when ultralytics is imported, so ``setup_ultralytics`` must run before
it is (the environment carries over to the processes of multi-GPU training).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CONFIG_SUBDIR = "Ultralytics"  # ultralytics appends this to YOLO_CONFIG_DIR
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
# Prediction, out of fold (04) and on test images (07) alike: a low confidence keeps the low-scored boxes the AP
# needs (the VOC curve runs to full recall).
PREDICT_CONF = 0.001
PREDICT_IOU = 0.6
MAX_DETECTIONS = 100


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


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[int]:
    """Run ultralytics with torch's current CPU thread count (yielded), and restore it afterwards: its
    ``select_device`` sets it to ``NUM_THREADS`` (cores - 1) for the process."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def resolve_device(device: str | None) -> str:
    """``None`` or ``auto`` -> every visible GPU (``"0,1,..."``), else ``"cpu"``; other values pass through."""
    if device is not None and str(device) != "auto":
        if str(device) != "cpu" and not torch.cuda.is_available():  # "0", "cuda:0", "0,1" without a GPU
            from covidkit.engine.device import warn_no_cuda

            warn_no_cuda("device", device)
            return "cpu"
        return str(device)
    if torch.cuda.is_available():
        return ",".join(str(i) for i in range(torch.cuda.device_count()))
    return "cpu"


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


def predict_boxes(model, images: Sequence[np.ndarray], imgsz: int, device: str | None = None,
                  conf: float = PREDICT_CONF, batch: int = 16, progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes [N, 4] x1 y1 x2 y2 in each image's pixels, scores [N])`` of grey uint8 images.

    Each image is given to ultralytics as the 3-channel array OpenCV reads from a grey PNG (what training
    saw); out-of-fold (04) and test predictions (07) both come through here.
    """
    device = resolve_device(device).split(",")[0]  # prediction uses one device
    out = []
    for start in tqdm(range(0, len(images), batch), desc="predict", unit="batch", leave=False, disable=not progress):
        chunk = [np.repeat(np.asarray(image)[:, :, None], 3, axis=2) for image in images[start:start + batch]]
        with keep_torch_threads():
            results = model.predict(chunk, imgsz=imgsz, device=device, conf=conf, iou=PREDICT_IOU,
                                    max_det=MAX_DETECTIONS, verbose=False, half=False)
        for result in results:
            boxes = result.boxes
            out.append((boxes.xyxy.cpu().numpy().astype(np.float64), boxes.conf.cpu().numpy().astype(np.float64)))
    return out
