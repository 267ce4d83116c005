"""Completion records: what lets ``covidkit pipeline`` skip the stages a run already finished.

``<run_dir>/records/<notebook>.json`` is written when a stage starts (``status: running``) and rewritten once
all its outputs are in place (``complete``); an interrupted or failed stage keeps ``interrupted`` / ``failed``.
It holds the stage's resolved settings (what the runner passes to its notebook: profile section, ``--set``
values, the folders), the fingerprint of its inputs (each dataset folder it reads: names, sizes, mtimes; the
digest of each upstream stage's record) and its outputs (size, mtime, SHA-256 of every file).

A stage is skipped when its record is complete and its settings, inputs and outputs are the same now
(``decide``); otherwise it runs again, and ``Decision.reason`` says why. When settings or inputs changed, or
the run is forced, its old outputs are removed first (``Decision.clean``): a checkpoint of other settings
cannot be resumed. A stage that was interrupted with the same settings keeps its outputs: it resumes inside
(the engine's ``last.pt``, finished folds kept).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from covidkit.atomic import atomic_write_text
from covidkit.layout import RunLayout
from covidkit.stages import STAGES, stage_module

RECORDS_DIR = "records"
RECORD_FORMAT = "covidkit.stage_record/1"

# Settings that change how a stage runs, not what it computes: a change keeps the record (and the checkpoints).
RUNNING_SETTINGS = frozenset({"workers", "progress", "device", "resume", "eval_batch_size"})

def record_path(run_dir: str | Path, stage: str) -> Path:
    """``<run_dir>/records/<stage>.json``; in a round folder, 00-02's are the run folder's (``RunLayout.records_dir``)."""
    return RunLayout(run_dir).records_dir(stage) / f"{stage}.json"


def read_record(run_dir: str | Path, stage: str) -> dict | None:
    """A stage's record; None when there is none (or it cannot be read: the stage then runs again)."""
    path = record_path(run_dir, stage)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def write_record(run_dir: str | Path, record: dict) -> None:
    atomic_write_text(record_path(run_dir, record["stage"]), json.dumps(record, indent=2, default=str) + "\n")


def record_digest(record: dict | None) -> str | None:
    """What a downstream stage remembers of an upstream one: its settings, inputs and output hashes."""
    if record is None or record.get("status") != "complete":
        return None
    content = {"settings": record["settings"], "inputs": record["inputs"],
               "outputs": {k: v["sha256"] for k, v in record["outputs"].items()}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- fingerprints


def folder_fingerprint(folder: Path) -> str | None:
    """Names, sizes and modification times of every file under ``folder`` (no reading): None when absent."""
    if not folder.exists():
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            try:
                st = path.stat()
            except OSError:
                continue
            digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# Settings naming a file a stage reads (a round's pseudo-label table): its fingerprint is an input.
FILE_SETTINGS = ("pseudo_labels",)


def file_fingerprint(path: Path) -> str | None:
    """A file's size and modification time (no reading); None when absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def input_fingerprint(stage: str, input_dir: Path, run_dir: Path, settings: dict | None = None) -> dict:
    """The datasets a stage reads, the records of the stages it reads from, and the files its settings name
    (``FILE_SETTINGS``, when set)."""
    module = stage_module(stage) if stage in STAGES else None  # a notebook of the user's own reads no stage
    data = {name: folder_fingerprint(input_dir / name) for name in getattr(module, "DATASETS", [])}
    data |= {key: file_fingerprint(Path(settings[key])) for key in FILE_SETTINGS if (settings or {}).get(key)}
    return {"data": data,
            "upstream": {up: record_digest(read_record(run_dir, up)) for up in getattr(module, "UPSTREAM", [])}}


def stage_outputs(stage: str, run_dir: Path, settings: dict) -> list[Path]:
    """The files and folders a stage writes: what its module's ``outputs(layout, settings)`` declares (00's
    prepared folder, 07's models and submission), else its folder ``<run_dir>/<stage>``."""
    module = stage_module(stage) if stage in STAGES else None  # a notebook of the user's own: its folder
    if hasattr(module, "outputs"):
        return module.outputs(RunLayout(run_dir), settings)
    return [run_dir / stage]


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for path in paths:
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                          and ".tmp" not in p.name)
    return out


def _key(path: Path, run_dir: Path) -> str:
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def output_hashes(paths: list[Path], run_dir: Path) -> dict[str, dict]:
    from covidkit.model_file import file_sha256

    out = {}
    for path in _files(paths):
        st = path.stat()
        out[_key(path, run_dir)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return out


def changed_output(recorded: dict[str, dict], run_dir: Path) -> str | None:
    """The first recorded output that is missing or whose content changed (hashed only when its size or
    modification time moved); None when all are as recorded."""
    from covidkit.model_file import file_sha256

    for key, entry in recorded.items():
        path = Path(key) if Path(key).is_absolute() else run_dir / key
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if (st.st_size, st.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
            continue
        if st.st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return f"{path} changed"
    return None


# --------------------------------------------------------------------------- the decision


@dataclass
class Decision:
    run: bool
    reason: str
    clean: bool = False  # remove the stage's outputs before it runs (settings or inputs changed, forced)


def current_names(stage: str | None, settings: dict) -> dict:
    """A record's settings (a notebook's parameters: the stage's settings are in ``overrides``) under their current
    names (``RENAMED`` of the stage's ``Config``): a renamed setting alone does not run a finished stage again."""
    renamed = getattr(stage_module(stage).Config, "RENAMED", {}) if stage in STAGES else {}

    def rename(values: dict) -> dict:
        return {renamed.get(k, k): v for k, v in values.items()}

    out = rename(settings)
    if isinstance(out.get("overrides"), dict):
        out["overrides"] = rename(out["overrides"])
    return out


def setting_changes(saved: dict, current: dict) -> list[str]:
    keys = sorted((set(saved) | set(current)) - RUNNING_SETTINGS)
    as_json = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  (tuples and lists compare equal)
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if as_json(saved.get(k)) != as_json(current.get(k))]


def input_changes(saved: dict, current: dict) -> list[str]:
    changes = [f"input {name} changed" for name, fp in current["data"].items() if saved["data"].get(name) != fp]
    changes += [f"{up} ran again" if current["upstream"][up] else f"{up} is not complete"
                for up in current["upstream"] if saved["upstream"].get(up) != current["upstream"][up]]
    return changes


def decide(record: dict | None, settings: dict, inputs: dict, run_dir: Path, forced: str | None = None) -> Decision:
    """Whether a stage runs, and why (``forced``: the reason it must, e.g. ``--force``)."""
    if forced:
        return Decision(True, forced, clean=True)
    if record is None:
        return Decision(True, "no completion record")
    changes = setting_changes(current_names(record.get("stage"), record["settings"]), settings)
    changed = ("settings changed: " + ", ".join(changes)) if changes else ""
    if not changed and input_changes(record["inputs"], inputs):
        changed = ", ".join(input_changes(record["inputs"], inputs))
    if record.get("status") != "complete":
        if changed:
            return Decision(True, f"{record.get('status', 'unfinished')} before, and {changed}: starting it afresh",
                            clean=True)
        return Decision(True, f"{record.get('status', 'unfinished')} before: resuming it (finished folds and the "
                              f"last checkpoints are kept)")
    if changed:
        return Decision(True, changed, clean=True)
    problem = changed_output(record["outputs"], run_dir)
    if problem:
        return Decision(True, f"output {problem}")
    return Decision(False, "complete")


@dataclass
class StageRecord:
    """The record of the stage that runs now."""

    run_dir: Path
    stage: str
    settings: dict
    inputs: dict
    started: float = field(default_factory=time.time)

    def _write(self, status: str, **extra) -> dict:
        record = {"format": RECORD_FORMAT, "stage": self.stage, "status": status, "settings": self.settings,
                  "inputs": self.inputs, "outputs": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                                   time.localtime(self.started)),
                  **extra}
        write_record(self.run_dir, record)
        return record

    def running(self) -> None:
        self._write("running")

    def stopped(self, status: str, error: str = "") -> None:
        """``interrupted`` or ``failed``: the stage runs again next time (resuming inside, settings unchanged)."""
        self._write(status, error=error, seconds=round(time.time() - self.started, 1))

    def complete(self, seconds: float, peak_rss_mib: float | None) -> dict:
        outputs = output_hashes(stage_outputs(self.stage, self.run_dir, self.settings), self.run_dir)
        return self._write("complete", outputs=outputs, seconds=round(seconds, 1), peak_rss_mib=peak_rss_mib,
                           finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
