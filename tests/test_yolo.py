"""ultralytics set-up: offline safety, model loading, resume; a tiny training on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from covidkit.data import yolo_format
from covidkit.engine import yolo as engine_yolo
from covidkit.models import yolo

TINY = dict(imgsz=64, batch=4, workers=0, device="cpu", overrides={"warmup_epochs": 0, "plots": True})


def write_toy_dataset(root: Path, n: int = 8) -> Path:
    """``n`` 64 px images with one bright square each, two folds; returns fold 0's data YAML."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.integers(0, 60, (64, 64), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(4, 36, 2))
        image[y:y + 24, x:x + 24] = 220
        path = root / "png" / f"toy{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image)
        rows.append({"image_id": f"toy{i}", "fold": i % 2, "path": str(path), "orig_height": 128,
                     "orig_width": 128, "boxes": np.array([[2 * x, 2 * y, 2 * x + 48, 2 * y + 48]], float)})
    table = pd.DataFrame(rows)
    return yolo_format.write_siim_fold(table, yolo_format.write_siim_dataset(table, root / "yolo"), 0)


# Runs in a fresh interpreter (ultralytics reads its environment at import): every attempt to reach
# the network (DNS look-up or connection) is recorded and refused; training must still finish.
OFFLINE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    from pathlib import Path

    attempts = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args[:1]}")
            raise OSError(f"network refused by the test: {what}")
        return refused

    socket.socket.connect = refuse("connect")
    socket.socket.connect_ex = refuse("connect")
    socket.getaddrinfo = refuse("getaddrinfo")
    socket.create_connection = refuse("create_connection")

    sys.path.insert(0, sys.argv[3])
    from test_yolo import TINY, write_toy_dataset
    from covidkit.images import read_grey
    from covidkit.engine import yolo as engine_yolo
    from covidkit.models import yolo

    run_dir = Path(sys.argv[1])
    data_yaml = write_toy_dataset(Path(sys.argv[2]))
    yolo.setup_ultralytics(run_dir)
    import torch
    from ultralytics.utils import NUM_THREADS
    threads = NUM_THREADS + 1  # ultralytics would set NUM_THREADS (cores - 1) for the whole process
    torch.set_num_threads(threads)
    seen = []
    run = engine_yolo.train_yolo(engine_yolo.YoloTrainConfig(model="yolo11n.yaml", epochs=1, **TINY), data_yaml, run_dir / "train",
                                 callbacks={"on_train_epoch_start": lambda trainer: seen.append(torch.get_num_threads())})
    boxes = yolo.predict_boxes(yolo.load_model(run.weights), [read_grey(Path(sys.argv[2]) / "png" / "toy0.png")], imgsz=64)
    seen.append(torch.get_num_threads())
    print(json.dumps({"attempts": attempts, "epochs": len(run.metrics), "predicted": len(boxes),
                      "threads_kept": seen == [threads, threads]}))
""")


def run_offline_script(tmp_path: Path, prefix: list[str]) -> dict:
    script = tmp_path / "offline_train.py"
    script.write_text(OFFLINE_SCRIPT)
    env_path = str(Path(__file__).parent)
    proc = subprocess.run([*prefix, sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "data"),
                           env_path], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def network_namespace_prefix() -> list[str]:
    """``unshare -rn`` (a new network namespace: no interface but loopback) where allowed, else nothing."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


@pytest.mark.slow
def test_training_reaches_for_no_network(tmp_path):
    """Without network (where ``unshare`` may) and with every socket connection refused and recorded; torch's
    thread count stays the caller's during training and after prediction."""
    report = run_offline_script(tmp_path, network_namespace_prefix())
    assert report == {"attempts": [], "epochs": 1, "predicted": 1, "threads_kept": True}
    cfg_dir = yolo.config_dir(tmp_path / "run") / yolo.CONFIG_SUBDIR
    settings = json.loads((cfg_dir / "settings.json").read_text())
    assert settings["sync"] is False and settings["api_key"] == ""
    assert not any(settings[name] for name in yolo.INTEGRATIONS)
    assert (cfg_dir / "Arial.ttf").stat().st_size > 100_000  # the font plots use, local
    run = tmp_path / "run" / "train"
    for name in ("args.yaml", "results.csv", "results.png", "labels.jpg", "weights/best.pt", "weights/last.pt"):
        assert (run / name).is_file(), name


def test_model_names_that_would_download_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        yolo.load_model("yolo11n.pt")
    with pytest.raises(ValueError, match="model YAML"):
        yolo.load_model("yolo11n")


def test_fp16_is_not_offered():
    with pytest.raises(ValueError, match="fp16"):
        engine_yolo.YoloTrainConfig(precision="fp16")


def test_cpu_trains_in_fp32():
    assert engine_yolo.amp_setting("auto", "cpu") is False
    assert engine_yolo.amp_setting("bf16", "cpu") is False
    assert yolo.resolve_device("cpu") == "cpu"


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path):
    data_yaml = write_toy_dataset(tmp_path / "data")
    yolo.setup_ultralytics(tmp_path / "run")
    tiny = {**TINY, "overrides": {**TINY["overrides"], "plots": False}}
    cfg = engine_yolo.YoloTrainConfig(model="yolo11n.yaml", epochs=2, save_period=1, **tiny)
    run_dir = tmp_path / "run" / "train"

    def stop_after_first_epoch(trainer):
        raise Interrupt  # after last.pt of epoch 1 is saved (on_model_save comes after the save)

    with pytest.raises(Interrupt):
        engine_yolo.train_yolo(cfg, data_yaml, run_dir, callbacks={"on_model_save": stop_after_first_epoch})
    assert engine_yolo.run_state(run_dir) == "interrupted"
    assert (run_dir / "weights" / "epoch0.pt").is_file()

    started = []
    run = engine_yolo.train_yolo(cfg, data_yaml, run_dir,
                          callbacks={"on_train_start": lambda trainer: started.append(trainer.start_epoch)})
    assert started == [1]  # the second epoch only
    assert engine_yolo.run_state(run_dir) == "finished"
    assert list(run.metrics["epoch"]) == [1, 2]
    assert (run_dir / "weights" / "epoch1.pt").is_file()

    finished = run.last.stat().st_mtime_ns
    again = engine_yolo.train_yolo(cfg, data_yaml, run_dir, callbacks={"on_train_start": started.append})
    assert len(started) == 1 and again.last.stat().st_mtime_ns == finished  # a finished run is kept

    # resume=False replaces a run; a .pt model starts from its weights (not from random ones)
    weights = tmp_path / "pretrained.pt"
    shutil.copyfile(run.weights, weights)
    start = torch.load(weights, map_location="cpu", weights_only=False)["model"].float().state_dict()
    first = {}

    def record_start(trainer):
        first.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    replaced = engine_yolo.train_yolo(engine_yolo.YoloTrainConfig(model=str(weights), epochs=1, **tiny), data_yaml, run_dir,
                               resume=False, callbacks={"on_train_start": record_start})
    assert list(replaced.metrics["epoch"]) == [1] and not (run_dir / "weights" / "epoch1.pt").exists()
    convs = [k for k, v in start.items() if v.ndim == 4]
    assert len(convs) > 10 and all(torch.allclose(first[k], start[k], atol=1e-3) for k in convs)


def test_ultralytics_imported_online_first_is_an_error(tmp_path):
    """ultralytics fixes its online flag at import: set up after an online import must refuse to go on."""
    script = textwrap.dedent("""
        import socket, sys
        socket.getaddrinfo = lambda *args, **kwargs: [("resolved",)]  # pretend DNS works: ultralytics is online
        import ultralytics.utils
        assert ultralytics.utils.ONLINE
        from covidkit.models import yolo
        try:
            yolo.setup_ultralytics(sys.argv[1])
        except RuntimeError as err:
            print(err)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "call setup_ultralytics first" in proc.stdout


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    data_yaml = write_toy_dataset(tmp_path / "data")
    yolo.setup_ultralytics(tmp_path / "run")
    # exact under the smoke profile's conditions: CPU, workers 0, no mosaic, an optimizer step every batch
    tiny = {**TINY, "overrides": {**TINY["overrides"], "plots": False, "mosaic": 0.0, "nbs": TINY["batch"]}}
    cfg = engine_yolo.YoloTrainConfig(model="yolo11n.yaml", epochs=3, seed=7, **tiny)

    def final_weights(into: dict):
        def on_train_end(trainer):
            into["model"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            into["ema"] = {k: v.detach().clone() for k, v in trainer.ema.ema.state_dict().items()}
        return on_train_end

    straight: dict = {}
    engine_yolo.train_yolo(cfg, data_yaml, tmp_path / "run" / "straight", callbacks={"on_train_end": final_weights(straight)})

    def stop_after_second_epoch(trainer):
        if trainer.epoch == 1:
            raise Interrupt

    interrupted = tmp_path / "run" / "interrupted"
    with pytest.raises(Interrupt):
        engine_yolo.train_yolo(cfg, data_yaml, interrupted, callbacks={"on_model_save": stop_after_second_epoch})
    assert (interrupted / "weights" / engine_yolo.RESUME_STATE).is_file()
    resumed: dict = {}
    engine_yolo.train_yolo(cfg, data_yaml, interrupted, callbacks={"on_train_end": final_weights(resumed)})
    assert not (interrupted / "weights" / engine_yolo.RESUME_STATE).exists()

    for part in ("model", "ema"):
        floats = [k for k, v in straight[part].items() if v.is_floating_point()]
        assert len(floats) > 100
        diffs = {k: float((straight[part][k].float() - resumed[part][k].float()).abs().max()) for k in floats}
        assert max(diffs.values()) == 0, (part, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
    # and training moved the weights: the comparison is not between two untouched models
    start = yolo.load_model("yolo11n.yaml").model.state_dict()
    assert not all(torch.equal(start[k], straight["model"][k].to(start[k].dtype)) for k in floats if k in start)
