"""The pipeline's stages: one module per numbered notebook, in order (this package's own module stays light:
``covidkit --help`` imports it).

Each stage module has a ``Config`` dataclass (the stage's single source of defaults; the profile sections use
its field names; the notebook's ``parameters`` cell carries only ``NOTEBOOK_PARAMETERS``: the profile, the folders,
the dry-run switch and a dict of overrides, ``StageConfig.from_namespace``), a
``run(cfg) -> Result`` that does the work, ``describe(result) -> str`` (what ``main`` prints), and ``main()``,
so that ``covidkit run STAGE`` and ``python -m covidkit.stages.<module>`` (under ``torchrun`` too) run the
same code as the notebook. A renamed setting keeps its old name as a deprecated alias: the ``Config``
declares ``RENAMED: ClassVar[dict[str, str]] = {"old": "new"}`` (``renamed_settings``). Each module's docstring
says what the stage reads and writes (paths from ``covidkit.layout``); one that writes outside its folder
``<run_dir>/<notebook>`` says so in ``outputs(layout, settings)`` (``covidkit.records`` hashes them). A stage's
``run`` first records the settings it runs with (``write_settings``: ``<stage folder>/config.yaml``, which the
report shows).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import MISSING, dataclass, fields
from types import ModuleType

from covidkit.deprecated import moved, show_deprecations, warn_renamed
from covidkit.profiles import ProfileError, load_profile, merge_section, parse_overrides

STAGES = {  # notebook -> module of covidkit.stages
    "00_prepare_data": "prepare",
    "01_pretrain_nih_resnext": "nih_pretrain",
    "02_pretrain_rsna_yolo": "rsna_yolo",
    "03_train_siim_fasterrcnn": "siim_fasterrcnn",
    "04_train_siim_yolo": "siim_yolo",
    "05_ensemble_wbf": "ensemble_wbf",
    "06_study_level": "study_level",
    "07_make_submission": "submission",
    "08_pseudo_label": "pseudo_label",
    "10_ct_cogseg": "ct_cogseg",
    "11_ct_decovnet": "ct_decovnet",
}


def notebook_of(stage: str) -> str:
    """The notebook name of a stage given as ``06``, ``06_study_level`` or ``study_level``."""
    for notebook, module in STAGES.items():
        if stage in (notebook, module, notebook[:2]):
            return notebook
    raise ProfileError(f"unknown stage {stage!r}; known: {', '.join(STAGES)} (or their modules: "
                       f"{', '.join(STAGES.values())})")


def stage_module(stage: str) -> ModuleType:
    return importlib.import_module(f"covidkit.stages.{STAGES[notebook_of(stage)]}")


# a notebook's parameters cell: the profile, the folders, the dry-run switch, and every other setting in one dict
NOTEBOOK_PARAMETERS = ("profile", "input_dir", "run_dir", "dry_run", "overrides")
DRY_RUN_ITEMS = 4  # a dry run's images (or volumes, slices) per split or fold
DRY_RUN_STEPS = 2  # a dry run's optimizer steps per model


@dataclass
class StageConfig:
    """What every stage takes: the input folder (the datasets), the run folder, and the dry-run switch.

    ``dry_run``: every stage runs with its settings as they are (models, sizes, folds, TTA, export) on a few
    items per split (``max_items``: of each held-out fold, and of each fold model's training rows) and one or
    two optimizer steps per model (``max_steps``): the whole path of a long run, in minutes
    (``covidkit pipeline --dry-run``).
    """

    input_dir: str = "input"
    run_dir: str = "runs/smoke"
    dry_run: bool = False

    @classmethod
    def from_params(cls, params: dict):
        """From a profile section merged with ``common``: the keys the stage takes (``section_parameters``
        has checked that the section itself holds no other)."""
        return cls(**{k: v for k, v in params.items() if k in field_names(cls)})

    @classmethod
    def from_namespace(cls, namespace: dict):
        """From a notebook's parameters (its globals after the ``parameters`` cell): ``profile``'s ``common`` and
        stage sections (None: no profile, the defaults), then ``input_dir``, ``run_dir``, ``dry_run`` where not
        None, then ``overrides`` (a key that is not a field is an error). ``covidkit pipeline`` passes no profile
        and every resolved setting in ``overrides``."""
        notebook = notebook_of(cls.__module__.rsplit(".", 1)[1])
        given = {k: namespace[k] for k in ("input_dir", "run_dir", "dry_run") if namespace.get(k) is not None}
        settings = {**given, **renamed_settings(cls, notebook, namespace.get("overrides") or {})}
        profile = namespace.get("profile")
        if profile:
            return cls.from_params(section_parameters(profile, notebook, settings, drop_none=False))
        check_settings(cls, notebook, settings)
        return cls.from_params(settings)

    @property
    def max_items(self) -> int | None:
        return DRY_RUN_ITEMS if self.dry_run else None

    @property
    def max_steps(self) -> int | None:
        return DRY_RUN_STEPS if self.dry_run else None

    @property
    def layout(self):
        """The run folder's ``covidkit.layout.RunLayout``."""
        from covidkit.layout import RunLayout

        return RunLayout(self.run_dir)


def notebook_of_config(cfg) -> str:
    """The notebook of a stage's Config instance (from the module that defines its class)."""
    return notebook_of(type(cfg).__module__.rsplit(".", 1)[1])


def settings_yaml(cfg) -> str:
    """A stage Config's resolved settings as YAML (field order; tuples as lists)."""
    import json
    from dataclasses import asdict

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(asdict(cfg), default=str)), sort_keys=False)


def write_settings(cfg):
    """Write the settings a stage runs with to ``<stage folder>/config.yaml`` (rank 0 only; as ultralytics'
    ``args.yaml``), before it runs: a failed stage still says what it tried. Returns the path (None on other ranks)."""
    import os

    from covidkit.atomic import atomic_write_text

    if os.environ.get("RANK", "0") != "0":
        return None
    path = cfg.layout.settings(notebook_of_config(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, settings_yaml(cfg))
    return path


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def defaults(cls) -> dict:
    """``{field: default}`` of a Config dataclass (default factories called)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def renamed_settings(config, notebook: str, settings: dict) -> dict:
    """``settings`` with each old name of ``config.RENAMED`` (``{old: new}``) replaced by its new one, with a
    ``DeprecationWarning``; an old name given beside its new one is an error."""
    renamed = getattr(config, "RENAMED", {})
    out = {}
    for key, value in settings.items():
        if key not in renamed:
            out[key] = value
            continue
        if renamed[key] in settings:
            raise ProfileError(f"{notebook} sets both {key} and {renamed[key]}: {key} is the deprecated name of "
                               f"{renamed[key]}, keep {renamed[key]} only")
        warn_renamed(f"{notebook}.{key}", renamed[key])
        out[renamed[key]] = value
    return out


def check_settings(config, notebook: str, *settings: dict) -> None:
    """A key that the stage's ``Config`` does not have is an error (a typo must not pass silently)."""
    unknown = sorted({k for d in settings for k in d} - set(field_names(config)))
    if unknown:
        raise ProfileError(f"{notebook} has no setting {', '.join(unknown)} (its settings: "
                           f"{', '.join(field_names(config))})")


def section_parameters(profile: str, stage: str, overrides: dict | None = None, drop_none: bool = True) -> dict:
    """``common``, then the stage's section of ``profile``, then ``overrides`` (without their None values unless
    ``drop_none`` is False: a command line's options left out); a key of the section or of ``overrides`` that the
    stage's ``Config`` does not have is an error."""
    notebook = notebook_of(stage)
    config = stage_module(notebook).Config
    params = load_profile(profile)
    section = renamed_settings(config, notebook, params.get(notebook) or {})
    overrides = renamed_settings(config, notebook, overrides or {})
    check_settings(config, notebook, section, overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None or not drop_none}
    return merge_section({**params, notebook: section}, notebook, overrides)


def run_stage(stage: str, profile: str = "smoke", overrides: dict | None = None):
    """Run one stage with a profile's settings (what ``covidkit run`` and each stage's ``main`` do)."""
    module = stage_module(stage)
    cfg = module.Config.from_params(section_parameters(profile, stage, overrides))
    return module, module.run(cfg)


def stage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--profile", default="smoke", help="notebooks/profiles/<profile>.yaml (smoke, full)")
    parser.add_argument("--input", default=None, help="folder holding the dataset folders (default: the profile's)")
    parser.add_argument("--run-dir", default=None, help="run folder (default: the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the stage (value in YAML, e.g. --set epochs=3)")
    return parser


def overrides_of(args: argparse.Namespace) -> dict:
    return {"input_dir": args.input, "run_dir": args.run_dir, **parse_overrides(args.set)}


def stage_main(module_name: str, argv: list[str] | None = None) -> None:
    """A stage module's ``main``: ``python -m covidkit.stages.<stage> [--profile P] [--set key=value ...]``."""
    from covidkit.engine.distributed import dist_info

    if module_name == "__main__":  # python -m covidkit.stages.<stage>, torchrun -m ...: the module's own name
        module_name = sys.modules["__main__"].__spec__.name
    module = importlib.import_module(module_name)
    show_deprecations()
    args = stage_arguments(argparse.ArgumentParser(description=module.__doc__.splitlines()[0])).parse_args(argv)
    module, result = run_stage(module_name.rsplit(".", 1)[1], args.profile, overrides_of(args))
    if dist_info().is_main:
        print(module.describe(result))


# moved to the K-fold driver
__getattr__ = moved(__name__, {"limit_rows": "covidkit.engine.kfold.limit_rows",
                               "training_rows": "covidkit.engine.kfold.training_rows"})
