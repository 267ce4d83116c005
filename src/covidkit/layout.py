"""The run folder: where every stage reads and writes. Nothing else spells a path inside a run.

``RunLayout(run_dir)`` has one attribute per stage, named like the stage's module (``layout.study_level``), each
naming that stage's folder and files::

    <run_dir>/
      prepared/                    00: <split>/<image_id>.png, meta.csv, folds.csv, meta.json (the size), examples.png
                                   (every stage folder also holds config.yaml: the settings it ran with)
      01_pretrain_nih_resnext/     01: backbone.pt, auroc.csv, train/
      02_pretrain_rsna_yolo/       02: data/, train/ (weights/best.pt: 04's start)
      03_train_siim_fasterrcnn/    03: fold<k>/ (engine runs; detector.pt is the fold model), oof.csv, oof_untrained.csv
      04_train_siim_yolo/          04: data/, fold<k>/ (ultralytics runs), oof.csv, oof_untrained.csv, summary.json
      05_ensemble_wbf/             05: ap_table.csv/.md, oof.csv (fused), fusion.json, operating_point.json, grid.csv
      06_study_level/              06: fold<k>/study_model.pt, oof_images.csv, oof_studies.csv, summary.json, ...
      07_make_submission/          07: config.yaml (and, in a run with rounds, the round's submission.csv)
      08_pseudo_label/             08: pseudo_labels.csv, summary.json, pseudo_boxes.png, external/<name>/ (dedup)
      models/                      07: the exported models folder (covidkit.export)
      fresh_tests/                 07: seed<S>/ test sets and their submissions, scores.csv
      submission.csv               07 of a dry run (a normal run writes the profile's submission path)
      10_ct_cogseg/                10: <dataset>/<variant>/ (engine runs), ablation.csv, figures
      11_ct_decovnet/              11: prepared/, inputs/, lung_unet/, classifier/, predictions.csv, metrics.json
      notebooks/                   the executed notebooks
      stages.json, dry_run.json    each notebook's wall time and peak memory (a run, a dry run)
      report.html
      round<r>/                    covidkit pipeline --rounds K: round r's 03-08 folders, models/, fresh_tests/,
                                   records/ and round.json (00-02 stay in the run folder, read by every round)

``fold<k>/`` holds the model that holds out fold ``k`` (runs before issue 31 named 03's and 06's
``split<k>/``: the readers accept both). A stage's folder is named after its notebook, so the executed notebook
and what it wrote sit side by side.
Each stage records the settings it ran with in ``config.yaml`` of its folder (``RunLayout.settings``; 00's in
``prepared/``, 07's in ``07_make_submission/``).

A round folder (``RunLayout.round_dir(r)``, marked by its ``round.json``) is a run folder of its own for the stages
that run in every round (``ROUND_STAGES``): ``RunLayout(<run_dir>/round1)`` names round 1's 03-08 there, and 00,
01 and 02 (and their completion records) in the run folder above it (``RunLayout.base``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from covidkit import prepare
from covidkit.deprecated import warn_renamed

OOF_CSV = "oof.csv"  # a detector's out-of-fold boxes (covidkit.oof), beside oof_images.csv
UNTRAINED_OOF_CSV = "oof_untrained.csv"  # the same images predicted by the untrained twin
SUMMARY_JSON = "summary.json"
DETECTOR_FILE = "detector.pt"  # 03's fold model, in its fold's engine run folder
STUDY_MODEL_FILE = "study_model.pt"  # 06's fold model
SETTINGS_YAML = "config.yaml"  # the resolved settings a stage ran with (covidkit.stages.write_settings)
PREPARE_NOTEBOOK = "00_prepare_data"  # the one stage whose folder is not named after its notebook
SHARED_STAGES = ("00_prepare_data", "01_pretrain_nih_resnext", "02_pretrain_rsna_yolo")  # once per run, every round reads them
ROUND_STAGES = ("03_train_siim_fasterrcnn", "04_train_siim_yolo", "05_ensemble_wbf", "06_study_level",
                "07_make_submission", "08_pseudo_label")  # again in each round (covidkit pipeline --rounds)
ROUND_MARKER = "round.json"  # in a round folder: {"round": r}
ROUND_PREFIX = "round"


FOLD_PREFIX = "fold"  # each fold model's folder: fold<k>/ (k: the fold it holds out, covidkit.engine.kfold)
OLD_FOLD_PREFIX = "split"  # 03's and 06's name before issue 31, still read (an older run folder)


def _fold_dirs(root: Path, marker: str) -> list[Path]:
    """The fold folders of ``root`` holding ``marker`` (a file every finished fold has), in fold order; an older
    run's ``split<k>/`` counts, a ``fold<k>/`` beside it wins."""
    found = {}
    for prefix in (OLD_FOLD_PREFIX, FOLD_PREFIX):
        for path in root.glob(f"{prefix}*/{marker}"):
            index = path.parent.name.removeprefix(prefix)
            if index.isdigit():
                found[int(index)] = path.parent
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class Prepared:
    """00: the square PNGs, their table, the folds, and the size they were prepared at (``covidkit.prepare``)."""

    dir: Path

    @property
    def meta_csv(self) -> Path:
        return self.dir / prepare.META_CSV

    @property
    def folds_csv(self) -> Path:
        return self.dir / prepare.FOLDS_CSV

    @property
    def meta_json(self) -> Path:
        return self.dir / prepare.META_JSON

    def png(self, split: str, image_id: str) -> Path:
        return prepare.png_path(self.dir, split, image_id)

    @property
    def examples(self) -> Path:
        """00's figure: training images of each class with their boxes."""
        return self.dir / "examples.png"

    @property
    def size(self) -> int:
        """The side of the square PNGs, as 00 recorded it."""
        return prepare.prepared_size(self.dir)

    def train_table(self, competition_dir: str | Path):
        """The prepared training images joined with their folds and labels (``covidkit.prepare.train_table``)."""
        return prepare.train_table(self.dir, competition_dir)


@dataclass(frozen=True)
class NihPretrain:
    """01."""

    dir: Path

    @property
    def backbone(self) -> Path:
        return self.dir / "backbone.pt"

    @property
    def auroc_csv(self) -> Path:
        """Per label: AUROC trained and untrained, class counts, whether counted; then the counted mean."""
        return self.dir / "auroc.csv"

    @property
    def summary(self) -> Path:
        """The mean AUROC over the counted labels, trained and untrained."""
        return self.dir / "summary.json"

    @property
    def train(self) -> Path:
        return self.dir / "train"


@dataclass(frozen=True)
class RsnaYolo:
    """02."""

    dir: Path

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def train(self) -> Path:
        return self.dir / "train"

    @property
    def weights(self) -> Path:
        """The weights 04 starts from."""
        return self.train / "weights" / "best.pt"


@dataclass(frozen=True)
class Detector:
    """03 and 04: one training run per fold (``fold<k>/``), and the out-of-fold boxes."""

    dir: Path

    @property
    def oof(self) -> Path:
        return self.dir / OOF_CSV

    @property
    def untrained_oof(self) -> Path:
        return self.dir / UNTRAINED_OOF_CSV

    @property
    def summary(self) -> Path:
        return self.dir / SUMMARY_JSON

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def fold(self, k: int) -> Path:
        """The training run of the model that holds out fold ``k``."""
        return self.dir / f"{FOLD_PREFIX}{k}"

    def folds(self, marker: str) -> list[Path]:
        """The fold folders holding ``marker`` (a file every finished fold has), in fold order."""
        return _fold_dirs(self.dir, marker)

    def model(self, k: int) -> Path:
        """03's fold model ``k`` (``detector.pt``: weights and what rebuilds the network)."""
        return self.fold(k) / DETECTOR_FILE

    def models(self) -> list[Path]:
        """03's fold models, in fold order."""
        return [p / DETECTOR_FILE for p in self.folds(DETECTOR_FILE)]

    def split(self, k: int) -> Path:
        """Deprecated: ``fold``."""
        warn_renamed("Detector.split", "Detector.fold")
        return self.fold(k)

    def splits(self, marker: str) -> list[Path]:
        """Deprecated: ``folds``."""
        warn_renamed("Detector.splits", "Detector.folds")
        return self.folds(marker)


@dataclass(frozen=True)
class Ensemble:
    """05."""

    dir: Path

    @property
    def fused_oof(self) -> Path:
        return self.dir / OOF_CSV

    @property
    def fusion(self) -> Path:
        return self.dir / "fusion.json"

    @property
    def operating_point(self) -> Path:
        return self.dir / "operating_point.json"

    @property
    def ap_table(self) -> Path:
        return self.dir / "ap_table.csv"

    @property
    def ap_table_md(self) -> Path:
        return self.dir / "ap_table.md"

    @property
    def grid(self) -> Path:
        return self.dir / "grid.csv"

    @property
    def pr_curves(self) -> Path:
        return self.dir / "pr_curves.png"


@dataclass(frozen=True)
class StudyLevel:
    """06."""

    dir: Path

    def fold(self, k: int) -> Path:
        """The folder of the model that holds out fold ``k``."""
        return self.dir / f"{FOLD_PREFIX}{k}"

    def model(self, k: int) -> Path:
        return self.fold(k) / STUDY_MODEL_FILE

    def models(self) -> list[Path]:
        """The fold models, in fold order."""
        return [p / STUDY_MODEL_FILE for p in _fold_dirs(self.dir, STUDY_MODEL_FILE)]

    def split(self, k: int) -> Path:
        """Deprecated: ``fold``."""
        warn_renamed("StudyLevel.split", "StudyLevel.fold")
        return self.fold(k)

    @property
    def oof_images(self) -> Path:
        """Per image: model_fold, fold, label, has_box, p_<class>..., p_none_head."""
        return self.dir / "oof_images.csv"

    @property
    def oof_studies(self) -> Path:
        """Per study: the mean of its images' probabilities."""
        return self.dir / "oof_studies.csv"

    @property
    def oof_studies_stacked(self) -> Path:
        """As ``oof_studies``, the stacker's out-of-fold probabilities."""
        return self.dir / "oof_studies_stacked.csv"

    @property
    def summary(self) -> Path:
        """The OOF APs, the class priors, the none rule chosen."""
        return self.dir / SUMMARY_JSON

    @property
    def none_comparison(self) -> Path:
        return self.dir / "none_comparison.csv"

    @property
    def confusion(self) -> Path:
        return self.dir / "confusion_matrix.png"

    @property
    def stacker(self) -> Path:
        return self.dir / "stacker.json"


@dataclass(frozen=True)
class Submission:
    """07: the exported models folder and the fresh test sets."""

    run_dir: Path

    @property
    def models(self) -> Path:
        return self.run_dir / "models"

    @property
    def fresh_tests(self) -> Path:
        """The fresh test sets' folder (``covidkit.fresh_tests`` names what is inside)."""
        return self.run_dir / "fresh_tests"

    @property
    def dry_run_csv(self) -> Path:
        """A dry run's submission: in its run folder, never over a real one in ``submissions/``."""
        return self.run_dir / "submission.csv"

    @property
    def round_csv(self) -> Path:
        """In a run with rounds, the submission of a round before the last (the last writes the run's)."""
        return self.run_dir / "07_make_submission" / "submission.csv"


@dataclass(frozen=True)
class PseudoLabel:
    """08 (``covidkit.pseudo`` names the table's columns)."""

    dir: Path

    @property
    def table(self) -> Path:
        """One row per image predicted: soft study labels, ``none``, pseudo-boxes in original pixels."""
        return self.dir / "pseudo_labels.csv"

    @property
    def summary(self) -> Path:
        """Images predicted, dropped as duplicates, with pseudo-boxes; the box threshold and where it came from."""
        return self.dir / SUMMARY_JSON

    @property
    def figure(self) -> Path:
        """A few external images with their pseudo-boxes."""
        return self.dir / "pseudo_boxes.png"

    def external(self, name: str) -> Path:
        """One external folder's deduplication (``covidkit.dedup.run_dedup``: prepared/, matches.csv, pairs.png)."""
        return self.dir / "external" / name


@dataclass(frozen=True)
class CogSeg:
    """10."""

    dir: Path

    def dataset(self, name: str) -> Path:
        """One dataset's ablation: a folder per variant (``covidkit.ct.cogseg.ablation``)."""
        return self.dir / name

    @property
    def ablation(self) -> Path:
        """Every dataset's table."""
        return self.dir / "ablation.csv"

    def predictions(self, dataset: str) -> Path:
        return self.dir / f"predictions_{dataset}.png"

    def training_curves(self, dataset: str) -> Path:
        return self.dir / f"training_curves_{dataset}.png"


@dataclass(frozen=True)
class DeCoVNet:
    """11 (``covidkit.ct.decovnet.method.run_decovnet`` names what it writes inside ``dir``)."""

    dir: Path

    @property
    def classifier(self) -> Path:
        return self.dir / "classifier"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def predictions(self) -> Path:
        """The held-out cases: probability, predicted lesion centre, hit."""
        return self.dir / "predictions.csv"

    @property
    def roc_pr(self) -> Path:
        return self.dir / "roc_pr.png"

    @property
    def training_curves(self) -> Path:
        return self.dir / "training_curves.png"

    def localization(self, case_id: str) -> Path:
        return self.dir / f"localization_{case_id}.png"


OLD_ATTRIBUTES = {"prepared": "prepare", "nih": "nih_pretrain", "fasterrcnn": "siim_fasterrcnn", "yolo": "siim_yolo",
                  "ensemble": "ensemble_wbf", "study": "study_level", "cogseg": "ct_cogseg", "decovnet": "ct_decovnet"}


class RunLayout:
    """Every stage's folder and files in one run folder (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        marker = self.root / ROUND_MARKER
        self.round = int(json.loads(marker.read_text())["round"]) if marker.is_file() else 0
        self.base = self.root.parent if self.round else self.root  # the run folder: 00, 01, 02
        # one attribute per stage, named like its module of covidkit.stages
        self.prepare = Prepared(self.base / "prepared")
        self.nih_pretrain = NihPretrain(self.base / "01_pretrain_nih_resnext")
        self.rsna_yolo = RsnaYolo(self.base / "02_pretrain_rsna_yolo")
        self.siim_fasterrcnn = Detector(self.root / "03_train_siim_fasterrcnn")
        self.siim_yolo = Detector(self.root / "04_train_siim_yolo")
        self.ensemble_wbf = Ensemble(self.root / "05_ensemble_wbf")
        self.study_level = StudyLevel(self.root / "06_study_level")
        self.submission = Submission(self.root)
        self.pseudo_label = PseudoLabel(self.root / "08_pseudo_label")
        self.ct_cogseg = CogSeg(self.root / "10_ct_cogseg")
        self.ct_decovnet = DeCoVNet(self.root / "11_ct_decovnet")
        self.notebooks = self.root / "notebooks"
        self.report = self.root / "report.html"
        self.stage_record = self.root / "stages.json"  # each notebook's wall time and peak memory
        self.dry_run_record = self.root / "dry_run.json"  # the same, of a dry run

    def stage_dir(self, notebook: str) -> Path:
        """The folder of a stage (given by its notebook name): named after the notebook, but 00's ``prepared/``."""
        if notebook == PREPARE_NOTEBOOK:
            return self.prepare.dir
        return (self.base if notebook in SHARED_STAGES else self.root) / notebook

    def records_dir(self, notebook: str) -> Path:
        """Where a stage's completion record lies (``covidkit.records``): 00-02's in the run folder."""
        return (self.base if notebook in SHARED_STAGES else self.root) / "records"

    def round_dir(self, r: int) -> Path:
        """Round ``r``'s folder (``covidkit pipeline --rounds``); round 0 is the run folder itself."""
        return self.base / f"{ROUND_PREFIX}{r}" if r else self.base

    def start_round(self, r: int) -> RunLayout:
        """Round ``r``'s layout, its folder created and marked."""
        folder = self.round_dir(r)
        if r:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ROUND_MARKER).write_text(json.dumps({"round": r}) + "\n")
        return RunLayout(folder)

    def rounds(self) -> list[RunLayout]:
        """Round 0 (this run folder) and every round folder under it, in order."""
        found = sorted(int(p.parent.name.removeprefix(ROUND_PREFIX)) for p in self.base.glob(f"{ROUND_PREFIX}*/{ROUND_MARKER}")
                       if p.parent.name.removeprefix(ROUND_PREFIX).isdigit())
        return [RunLayout(self.base)] + [RunLayout(self.round_dir(r)) for r in found if r]

    def settings(self, notebook: str) -> Path:
        """``config.yaml``: the resolved settings the stage ran with."""
        return self.stage_dir(notebook) / SETTINGS_YAML

    def __getattr__(self, name: str):
        """The attribute names before issue 31 (deprecated): ``prepared``, ``nih``, ``fasterrcnn``, ``yolo``,
        ``ensemble``, ``study``, ``cogseg``, ``decovnet``."""
        if name in OLD_ATTRIBUTES:
            warn_renamed(f"RunLayout.{name}", f"RunLayout.{OLD_ATTRIBUTES[name]}")
            return getattr(self, OLD_ATTRIBUTES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def is_dry_run(self) -> bool:
        """The folder holds a dry run: its record, and no normal run's."""
        return self.dry_run_record.is_file() and not self.stage_record.is_file()
