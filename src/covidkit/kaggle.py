"""A Kaggle dataset that turns a models folder into a competition submission, offline (``covidkit kaggle bundle``).

The competition scores submissions made by a notebook that runs on Kaggle with the internet off. The bundle
is a folder to upload as a Kaggle dataset and attach to such a notebook::

    wheels/                 covidkit's wheel and every package prediction needs beyond what Kaggle's GPU image
                            has (torch, torchvision and what they need), at the versions installed here
    models/                 a copy of the models folder, manifest and hashes included
    submission.ipynb        the notebook to run on Kaggle: installs from wheels/, predicts, validates, summarises
    dataset-metadata.json   for ``kaggle datasets create -p OUT_DIR``
    README.md               what is inside, the sizes, how to attach it

The wheels are downloaded from the package registry when the bundle is made (the only network use of
covidkit), for manylinux x86_64 and the chosen Python; ``wheel_cache`` serves those already downloaded.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

KAGGLE_COMPETITION_DIR = "/kaggle/input/siim-covid19-detection"
KAGGLE_OUT = "/kaggle/working/submission.csv"
NOTEBOOK = "submission.ipynb"
PROVIDED = ("torch", "torchvision")  # in Kaggle's GPU image; with what they need, never bundled
# installed with --no-deps: ultralytics asks for opencv-python, which clashes with the opencv-python-headless
# covidkit uses (both provide cv2); its runtime needs are covidkit's own dependencies
NO_DEPS = ("ultralytics",)
# Kaggle's image runs Ubuntu 22.04 (glibc 2.35): wheels for any manylinux glibc up to 2.35 run there. pip matches
# each platform tag exactly, so every one is named.
PLATFORMS = (*(f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)), "manylinux2014_x86_64", "manylinux2010_x86_64",
             "manylinux1_x86_64")


class BundleError(ValueError):
    """The bundle cannot be made; the message is the one-line reason."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_environment(python: str) -> dict[str, str]:
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _requirements_of(name: str, python: str, extras: frozenset[str] = frozenset()) -> list[tuple[str, frozenset[str]]]:
    """``(name, extras)`` of what ``name`` (with ``extras``) requires on Linux x86_64 with ``python``, from its
    installed metadata."""
    from packaging.requirements import Requirement

    env = _marker_environment(python)
    out = []
    for text in distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append((_canonical(req.name), frozenset(req.extras)))
    return out


def _closure(roots: list[str], python: str, stop: set[str] = frozenset()) -> set[str]:
    """Every installed distribution ``roots`` need, transitively, extras included (``stop``: not followed)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(_canonical(r), frozenset()) for r in roots]
    while todo:
        item = todo.pop()
        if item in seen or item[0] in stop:
            continue
        seen.add(item)
        try:
            todo.extend(_requirements_of(*item[:1], python, item[1]))
        except PackageNotFoundError:
            raise BundleError(f"{item[0]} is needed for prediction but is not installed here (run `make install`)") from None
    return {name for name, _ in seen}


def provided_by_kaggle(python: str) -> set[str]:
    """torch, torchvision and everything they need: Kaggle's image has them, built to work together."""
    return _closure(list(PROVIDED), python)


def prediction_requirements(python: str = "3.11") -> dict[str, str]:
    """``{name: version}`` of what the bundle's wheels hold: covidkit's dependencies and ``NO_DEPS``, with
    everything they need, at the versions installed here, minus what Kaggle provides."""
    from importlib.metadata import version

    provided = provided_by_kaggle(python)
    names = _closure(["covidkit", *NO_DEPS], python, stop=provided | {_canonical(n) for n in NO_DEPS})
    names |= {_canonical(n) for n in NO_DEPS}
    names -= provided | {"covidkit"}
    return {name: version(name) for name in sorted(names)}


def _wheel_name(path: Path) -> tuple[str, str]:
    """``(canonical name, version)`` of a wheel file."""
    from packaging.utils import parse_wheel_filename

    name, ver, _, _ = parse_wheel_filename(path.name)
    return _canonical(name), str(ver)


def _wheel_fits(path: Path, python: str) -> bool:
    """Whether a wheel installs on CPython ``python`` on manylinux x86_64 (packaging's tag sets, as pip's)."""
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    version = tuple(int(p) for p in python.split("."))
    supported = {*cpython_tags(version, platforms=PLATFORMS), *compatible_tags(version, platforms=PLATFORMS)}
    return bool(parse_wheel_filename(path.name)[3] & supported)


def fetch_wheels(requirements: dict[str, str], out: Path, python: str, wheel_cache: Path | None = None,
                 offline: bool = False, log=print) -> list[Path]:
    """The wheel of each ``name==version`` for ``python`` on manylinux x86_64, in ``out``.

    Wheels already in ``wheel_cache`` are copied; the others are downloaded from the package registry with
    pip (and, with a cache, kept there too), unless ``offline``.
    """
    out.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    if wheel_cache is not None and wheel_cache.is_dir():
        for path in wheel_cache.glob("*.whl"):
            name, ver = _wheel_name(path)
            if requirements.get(name) == ver and _wheel_fits(path, python):
                found[name] = path
    missing = [f"{n}=={v}" for n, v in requirements.items() if n not in found]
    if missing and not offline:
        target = wheel_cache if wheel_cache is not None else out
        target.mkdir(parents=True, exist_ok=True)
        log(f"downloading {len(missing)} wheels for Python {python}, manylinux x86_64, from the package registry "
            "(the only network use of covidkit)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--python-version", python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
               "-d", str(target), *missing]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["pip download failed"]
            raise BundleError(f"no wheels for Python {python} on manylinux x86_64 for some of {', '.join(missing)}: "
                              f"{last[0].strip()}")
        for path in target.glob("*.whl"):
            name, ver = _wheel_name(path)
            if requirements.get(name) == ver and name not in found:
                found[name] = path
    absent = sorted(set(requirements) - set(found))
    if absent:
        raise BundleError(f"no wheel for Python {python} on manylinux x86_64: {', '.join(absent)}")
    copied = []
    for path in found.values():
        if path.parent.resolve() != out.resolve():
            shutil.copyfile(path, out / path.name)
        copied.append(out / path.name)
    return sorted(copied)


def build_covidkit_wheel(out: Path) -> Path:
    """covidkit's own wheel, built from this checkout (pure Python: any interpreter)."""
    from covidkit.pipeline import REPO_ROOT

    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise BundleError(f"covidkit's source tree is not at {REPO_ROOT}: the bundle builds covidkit's wheel from it")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-w", tmp, str(REPO_ROOT)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BundleError(f"could not build covidkit's wheel: {done.stderr.strip().splitlines()[-1:]}")
        [wheel] = Path(tmp).glob("covidkit-*.whl")
        return Path(shutil.copy(wheel, out / wheel.name))


def check_models(models_dir: Path) -> dict:
    """The models folder's manifest, every hash checked, every stage present; else a ``BundleError``."""
    from covidkit.export import read_manifest

    try:
        manifest = read_manifest(models_dir)
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(f"{models_dir} is not a usable models folder: {err}") from None
    missing = [stage for stage, files in manifest["models"].items() if not files]
    missing += [stage for stage in ("fasterrcnn", "yolo", "study") if stage not in manifest["models"]]
    if missing:
        raise BundleError(f"{models_dir} has no model for {', '.join(sorted(set(missing)))} (run 03, 04 and 06, then 07)")
    return manifest


def submission_notebook(slug: str, hflip_tta: bool):
    """The thin notebook Kaggle runs: install from the bundle's wheels, predict, validate, summarise."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    parameters = new_code_cell(
        f'competition_dir = "{KAGGLE_COMPETITION_DIR}"  # the competition, as Kaggle attaches it\n'
        f'models_dir = "/kaggle/input/{slug}/models"  # this bundle, attached as a dataset\n'
        f'wheels_dir = "/kaggle/input/{slug}/wheels"\n'
        f'out = "{KAGGLE_OUT}"\n'
        f"hflip_tta = {hflip_tta}                                     # as the models were validated\n"
        'device = "auto"                                       # CUDA when the session has one, else the CPU',
        metadata={"tags": ["parameters"]})
    cells = [
        new_markdown_cell(
            "# SIIM-FISABIO-RSNA COVID-19 Detection: submission with covidkit\n\n"
            "Runs offline. Installs covidkit and what it needs from the bundle's `wheels/` (torch and torchvision "
            "are the image's), checks every model file against its hash, predicts every row of "
            "`sample_submission.csv` exactly as `covidkit predict` does, validates the file and writes it to "
            "`out`. ultralytics is installed with `--no-deps`: it asks for `opencv-python`, which would clash "
            "with the `opencv-python-headless` covidkit uses."),
        parameters,
        new_code_cell(
            "import subprocess, sys\n\n"
            "pip = [sys.executable, '-m', 'pip', 'install', '--no-index', '--find-links', wheels_dir, '--quiet']\n"
            "subprocess.run(pip + ['covidkit'], check=True)\n"
            f"subprocess.run(pip + ['--no-deps', {', '.join(repr(n) for n in NO_DEPS)}], check=True)"),
        new_code_cell(
            "from pathlib import Path\n\n"
            "import pandas as pd\n\n"
            "from covidkit.predict import predict_competition\n"
            "from covidkit.submission import validate_files\n\n"
            "Path(out).parent.mkdir(parents=True, exist_ok=True)\n"
            "result = predict_competition(competition_dir, models_dir, out, device=device, hflip_tta=hflip_tta)\n"
            "problems = validate_files(out, Path(competition_dir) / 'sample_submission.csv')\n"
            "assert not problems, problems[:5]\n"
            "print(result.summary())"),
    ]
    book = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})
    nbformat.validate(book)
    return book


@dataclass
class Bundle:
    out_dir: Path
    wheels: list[Path]
    size_bytes: int


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def make_bundle(models_dir: str | Path, out_dir: str | Path, python: str = "3.11", title: str | None = None,
                wheel_cache: str | Path | None = None, offline: bool = False, log=print) -> Bundle:
    """Write the Kaggle dataset folder ``out_dir`` for ``models_dir`` (see the module docstring)."""
    import nbformat

    models_dir, out_dir = Path(models_dir), Path(out_dir)
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise BundleError(f"--python takes a version like 3.11, got {python!r}")
    manifest = check_models(models_dir)
    title = title or "covidkit bundle"
    if not 6 <= len(title) <= 50:
        raise BundleError(f"a Kaggle dataset title has 6 to 50 characters, got {title!r}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    wheels = fetch_wheels(prediction_requirements(python), out_dir / "wheels", python,
                          Path(wheel_cache) if wheel_cache else None, offline, log)
    wheels.append(build_covidkit_wheel(out_dir / "wheels"))
    shutil.copytree(models_dir, out_dir / "models")
    check_models(out_dir / "models")  # the copy, hash by hash
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    nbformat.write(submission_notebook(slug, bool(manifest.get("hflip_tta", False))), out_dir / NOTEBOOK)
    (out_dir / "dataset-metadata.json").write_text(json.dumps(
        {"title": title, "id": f"INSERT_YOUR_KAGGLE_USERNAME/{slug}", "licenses": [{"name": "CC0-1.0"}]}, indent=2) + "\n")
    sizes = {name: _size(out_dir / name) for name in ("wheels", "models")}
    (out_dir / "README.md").write_text(_readme(title, slug, python, wheels, sizes, manifest))
    bundle = Bundle(out_dir, wheels, _size(out_dir))
    log(f"{out_dir}: {len(wheels)} wheels ({_mib(sizes['wheels'])}), models ({_mib(sizes['models'])}), {NOTEBOOK}; "
        f"{_mib(bundle.size_bytes)} in all. Upload: kaggle datasets create -p {out_dir}")
    return bundle


def _readme(title: str, slug: str, python: str, wheels: list[Path], sizes: dict[str, int], manifest: dict) -> str:
    folds = ", ".join(f"{name} {len(files)}" for name, files in manifest["models"].items())
    return f"""# {title}

A Kaggle dataset made by `covidkit kaggle bundle`: everything an offline Kaggle notebook needs to write a
submission for the SIIM-FISABIO-RSNA COVID-19 Detection competition with covidkit.

| folder | what | size |
|---|---|---|
| `wheels/` | covidkit and {len(wheels) - 1} packages it needs, manylinux x86_64 wheels for Python {python} (torch and torchvision are Kaggle's) | {_mib(sizes['wheels'])} |
| `models/` | the models folder: fold models ({folds}), fusion parameters, manifest with SHA-256 of every file | {_mib(sizes['models'])} |
| `{NOTEBOOK}` | the notebook to run: installs from `wheels/`, predicts, validates, prints a summary | |

## Use it
1. Fill in your Kaggle user name in `dataset-metadata.json`, then `kaggle datasets create -p .` (or upload this
   folder on kaggle.com as a new dataset, slug `{slug}`).
2. Create a notebook in the competition, internet off, GPU on; add this dataset and the competition data.
3. Import `{NOTEBOOK}` (File > Import notebook), check `models_dir` and `wheels_dir` against the path Kaggle
   mounted the dataset at (`/kaggle/input/{slug}/...`), and submit. The notebook writes
   `/kaggle/working/submission.csv`.
"""
