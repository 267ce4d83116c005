"""Stage 02: pretrain YOLO on RSNA pneumonia; notebook 04 fine-tunes the result on SIIM.

Reads ``<input_dir>/rsna-pneumonia-detection-challenge/`` (``stage_2_train_images/*.dcm``,
``stage_2_train_labels.csv``) and, for ``model: yolo11l.pt``, ``<input_dir>/weights/``.
Writes ``<run_dir>/02_pretrain_rsna_yolo/``: ``data/`` (the RSNA images as a YOLO dataset: PNGs,
``labels/*.txt``, ``rsna.yaml``, ``meta.csv``) and ``train/`` (the ultralytics run: ``args.yaml``,
``results.csv``, plots, ``weights/best.pt`` for 04). Nothing is downloaded; ultralytics runs offline
(``covidkit.models.yolo``). Several GPUs: ``device: "0,1,2,3"`` (ultralytics' own DDP; ``batch_size`` is the total).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from covidkit.data import rsna
from covidkit.data.rsna import RsnaYoloDataset
from covidkit.engine.yolo import YoloRun, YoloTrainConfig, train_yolo
from covidkit.models import pretrained
from covidkit.models.yolo import setup_ultralytics
from covidkit.stages import StageConfig, stage_main, write_settings

NOTEBOOK = "02_pretrain_rsna_yolo"


# What this stage reads (covidkit.records fingerprints them: a change reruns it): dataset folders of
# <input_dir> ("weights": pretrained files), and the stages whose outputs it reads.
DATASETS = ['rsna-pneumonia-detection-challenge', 'weights']
UPSTREAM = []


@dataclass
class Config(StageConfig):
    seed: int = 42  # training seed (ultralytics' deterministic mode) and the validation split
    model: str = "yolo11l.yaml"  # a model YAML (random weights), or a .pt checkpoint in input/weights/ or a path
    input_size: int = 1024  # side of the converted PNGs and of the training images
    epochs: int = 30
    batch_size: int = 16  # total over all GPUs
    device: str | None = None  # None: every visible GPU, else the CPU; or "cpu", "0", "0,1,2,3"
    workers: int = 8  # data-loading processes per GPU (ultralytics uses none on CPU)
    limit: int | None = None  # convert only this many images (a stratified sample); None: all
    val_fraction: float = 0.1  # held-out images for validation during training
    save_period: int = -1  # also keep epoch<N>.pt every N epochs (last.pt is written every epoch)
    resume: bool = True  # continue an interrupted run; a finished one is kept as it is
    hyp: dict = field(default_factory=dict)  # any other ultralytics training argument

    def train_config(self, model: str) -> YoloTrainConfig:
        return YoloTrainConfig.from_stage(self, model)


@dataclass
class Result:
    dataset: RsnaYoloDataset
    run: YoloRun


def starting_model(model: str, input_dir: str | Path) -> str:
    """A model YAML as it is (random weights); a ``.pt`` checkpoint (ultralytics' COCO ``yolo11l.pt``) from
    ``<input_dir>/weights/`` or a path, else, with a one-line warning, its YAML."""
    if Path(model).suffix != ".pt":
        return model
    found = pretrained.resolve(model, input_dir, stage=NOTEBOOK)
    return str(found) if found is not None else Path(model).with_suffix(".yaml").name


def run(cfg: Config) -> Result:
    write_settings(cfg)
    setup_ultralytics(cfg.run_dir)
    out = cfg.layout.rsna_yolo
    dataset = rsna.convert_to_yolo(Path(cfg.input_dir) / rsna.COMPETITION, out.data, size=cfg.input_size,
                                   val_fraction=cfg.val_fraction, seed=cfg.seed,
                                   limit=cfg.limit if cfg.max_items is None else 2 * cfg.max_items)
    run_ = train_yolo(cfg.train_config(starting_model(cfg.model, cfg.input_dir)), dataset.data_yaml, out.train,
                      resume=cfg.resume)
    return Result(dataset, run_)


def describe(result: Result) -> str:
    return f"weights for 04: {result.run.weights}"


def main(argv: list[str] | None = None) -> None:
    stage_main(__name__, argv)


if __name__ == "__main__":
    main()
