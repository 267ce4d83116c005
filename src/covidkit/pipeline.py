"""``covidkit pipeline``: the numbered notebooks in order, with papermill and a profile's settings.

Each notebook is a thin front of one stage module (``covidkit.stages``); the profile
(``covidkit.profiles``) gives it the ``common`` values it declares plus its own section. The executed copies
go to ``<run_dir>/notebooks/``; a failing notebook stops the run with its name, cell and error (a known fault
in one line: ``covidkit.faults``).

A run that is started again skips the stages it finished (``covidkit.records``: their settings, inputs and
outputs unchanged), says why it runs the others, and resumes the interrupted one inside (its engine runs
continue from ``last.pt``). Ctrl-C marks the current stage interrupted and says how to continue.

``rounds`` (``--rounds K``): after the run (round 0), K pseudo-label rounds (docs/pseudo-labels.md). Round r runs
03-07 in its own folder (``RunLayout.round_dir``) with ``pseudo_labels`` = round r - 1's 08 table, then, but in
the last round, its own 08. The models folder and the submission of the run are the last round's.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from covidkit.layout import ROUND_STAGES, RunLayout
from covidkit.profiles import REPO_ROOT, load_profile, merge_section, notebooks_dir
from covidkit.stages import STAGES, field_names, renamed_settings, stage_module

class PipelineError(RuntimeError):
    """A notebook failed, or a profile does not fit the notebooks."""


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: it is marked interrupted; ``str()`` says how to continue."""


def list_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; ``only`` keeps those whose name starts with one of its items."""
    books = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if any(b.stem.startswith(prefix) for prefix in only)]
        if not books:
            raise PipelineError(f"no notebook matches {only}")
    return books


def notebook_parameters(notebook: Path, profile: dict, overrides: dict) -> dict:
    """The parameters papermill injects into ``notebook``: the folders and the dry-run switch, and every other
    setting of its stage (``common`` values, its section, overrides) in one ``overrides`` dict, with no
    ``profile`` (``covidkit.stages.StageConfig.from_namespace``). A notebook without ``overrides`` parameter gets
    the values it declares.

    A section key that is not a setting of the notebook's stage (``covidkit.stages``) is an error.
    """
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    section = profile.get(notebook.stem) or {}
    known = declared
    if notebook.stem in STAGES:  # a renamed setting's old name: its new one (covidkit.stages.renamed_settings)
        config = stage_module(notebook.stem).Config
        known = set(field_names(config))
        section = renamed_settings(config, notebook.stem, section)
        overrides = renamed_settings(config, notebook.stem, overrides)
    unknown = sorted(set(section) - (known if "overrides" in declared else known & declared))
    if unknown:
        raise PipelineError(f"profile section {notebook.stem} sets {unknown}, which {notebook.name} does not declare")
    merged = merge_section({**profile, notebook.stem: section}, notebook.stem, overrides)
    params = {k: v for k, v in merged.items() if k in declared}
    if "overrides" in declared:
        params |= {"profile": None, "overrides": {k: v for k, v in merged.items() if k in known - declared}}
    return params


@dataclass
class NotebookRun:
    name: str
    output: Path
    seconds: float
    peak_rss_mib: float | None = None  # of the notebook's kernel
    skipped: bool = False  # complete from an earlier run (seconds and memory are that run's)

def _peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (Linux ``VmHWM``), in MiB; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


KERNEL_PEAKS: list[float | None] = []  # the peak memory of each kernel, read as it shuts down


def ipc_kernel_manager() -> type:
    """A kernel manager whose kernel talks over Unix sockets instead of TCP on localhost, and which records
    the kernel's peak resident memory (``KERNEL_PEAKS``) before shutting it down.

    With networking switched off (``unshare -rn``) there is no loopback interface, so a kernel on
    TCP never answers; on Unix sockets it does, and no port is opened on the machine.
    """
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IpcKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        async def _async_shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
            pid = getattr(self.provisioner, "pid", None)
            KERNEL_PEAKS.append(_peak_rss_mib(pid) if pid else None)
            await super()._async_shutdown_kernel(now=now, restart=restart)

        shutdown_kernel = _async_shutdown_kernel  # jupyter_client binds the public name to the base method

    return IpcKernelManager


def run_notebook(notebook: Path, profile: dict, run_dir: Path, overrides: dict,
                 params: dict | None = None) -> NotebookRun:
    """Execute one notebook; the executed copy goes to ``run_dir/notebooks/``."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from covidkit.faults import explain

    out = RunLayout(run_dir).notebooks / notebook.name
    out.parent.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(notebook, profile, overrides) if params is None else params
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook), str(out), parameters=params, kernel_name="python3",
            cwd=str(REPO_ROOT), progress_bar=False, kernel_manager_class=ipc_kernel_manager(),
        )
    except PapermillExecutionError as err:
        if err.ename == "KeyboardInterrupt":
            raise KeyboardInterrupt from None
        line = explain(notebook.stem, params, err.ename, err.evalue)
        raise PipelineError(
            (line + "\n" if line else "")
            + f"{notebook.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"executed copy with the traceback: {out}"
        ) from None
    return NotebookRun(notebook.stem, out, time.perf_counter() - start, KERNEL_PEAKS[-1] if KERNEL_PEAKS else None)


def run_overrides(input_dir: Path, run_dir: Path, dry_run: bool) -> dict:
    """What ``covidkit pipeline`` sets over the profile: the folders, and in a dry run the switch and a
    submission inside the run folder."""
    overrides = {"input_dir": str(Path(input_dir).resolve()), "run_dir": str(run_dir)}
    if dry_run:
        overrides |= {"dry_run": True, "submission": str(RunLayout(run_dir).submission.dry_run_csv)}
    return overrides


def notebook_overrides(notebook: str, settings: dict) -> dict:
    """The ``settings`` (``covidkit pipeline --set``) that apply to ``notebook``: a plain ``key`` to every notebook
    that declares it, ``NOTEBOOK.key`` (``07.key``, ``07_make_submission.key``) to that notebook only."""
    from covidkit.stages import notebook_of

    out = {}
    for key, value in settings.items():
        scope, dot, name = key.rpartition(".")
        if not dot:
            if not _old_name_of_another_setting(notebook, key):
                out[key] = value
        elif notebook_of(scope) == notebook:
            out[name] = value
    return out


def _old_name_of_another_setting(notebook: str, key: str) -> bool:
    """A plain ``--set key`` that is only a deprecated name in ``notebook`` but a current setting of another stage
    (``folds``: 00's number of folds, 03's and 04's old name of ``train_folds``) goes to the current one only."""
    if notebook not in STAGES or key not in getattr(stage_module(notebook).Config, "RENAMED", {}):
        return False
    return any(key in field_names(stage_module(other).Config) for other in STAGES if other != notebook)


def setting_names(notebook: str) -> set[str]:
    """A stage's settings, with the old names of renamed ones (none for a notebook that is no stage)."""
    if notebook not in STAGES:
        return set()
    config = stage_module(notebook).Config
    return set(field_names(config)) | set(getattr(config, "RENAMED", {}))


def check_settings(books: list[Path], settings: dict) -> None:
    """Every ``--set`` key is a parameter of a notebook that runs (a typo must not pass silently)."""
    import papermill

    declared = {b.stem: set(papermill.inspect_notebook(str(b))) | setting_names(b.stem) for b in books}
    for key in settings:
        if not any(notebook_overrides(stem, {key: None}).keys() & names for stem, names in declared.items()):
            raise PipelineError(f"--set {key}: no notebook that runs ({', '.join(declared)}) has this parameter")


def run_pipeline(profile: str = "smoke", input_dir: Path = Path("input"), run_dir: Path | None = None,
                 only: list[str] | None = None, dry_run: bool = False,
                 settings: dict | None = None, start_from: str | None = None,
                 force: bool = False, rounds: int = 0) -> list[NotebookRun]:
    """Run the numbered notebooks (all, or ``only``) with ``profile``; stop at the first failure.

    ``settings``: values over the profile's (``covidkit pipeline --set``, see ``notebook_overrides``).

    A stage whose completion record matches (``covidkit.records``) is skipped, one line saying so; one whose
    settings or inputs changed runs again from scratch, one that was interrupted resumes. ``start_from``
    (``--from 05``): the stages before it are kept as they are, it and the ones after run again from scratch;
    ``force``: every stage runs again from scratch.

    ``dry_run``: every stage with the profile's settings on a few items and one or two steps per model
    (``covidkit.stages.StageConfig``). Each notebook's wall time and its kernel's peak memory go to
    ``<run_dir>/dry_run.json`` (a dry run) or ``stages.json``, and to the report.

    ``rounds``: pseudo-label rounds after the run (see the module docstring).
    """
    from tqdm.auto import tqdm

    params = load_profile(profile)
    run_dir = Path(run_dir or REPO_ROOT / "runs" / profile).resolve()
    overrides = run_overrides(input_dir, run_dir, dry_run)
    books = list_notebooks(only)
    check_settings(books, settings or {})
    first = _start_index(books, start_from)
    if rounds:
        check_rounds(books, params, settings or {}, overrides)
    runs = []
    with tqdm(books, desc=f"pipeline [{profile}]", unit="notebook") as bar:
        for i, book in enumerate(bar):
            bar.set_postfix_str(book.stem)
            book_overrides = notebook_overrides(book.stem, settings or {}) | overrides | round_overrides(
                book.stem, RunLayout(run_dir), 0, rounds)
            forced = "--force" if force else f"--from {start_from}" if first is not None and i >= first else None
            if first is not None and i < first:
                runs.append(_kept(book, run_dir, start_from))
                tqdm.write(f"{book.stem}: kept as it is (before --from {start_from})")
            else:
                runs.append(run_stage_once(book, params, run_dir, Path(input_dir), book_overrides, forced,
                                           echo=tqdm.write))
            write_stage_record(RunLayout(run_dir), runs, dry_run)
    for r in range(1, rounds + 1):
        layout = RunLayout(run_dir).start_round(r)
        for book in [b for b in books if b.stem in ROUND_STAGES and (b.stem != PSEUDO_NOTEBOOK or r < rounds)]:
            book_overrides = (notebook_overrides(book.stem, settings or {}) | overrides
                              | round_overrides(book.stem, layout, r, rounds))
            run = run_stage_once(book, params, layout.root, Path(input_dir), book_overrides,
                                 "--force" if force else None, echo=tqdm.write)
            runs.append(NotebookRun(f"{layout.root.name}/{run.name}", run.output, run.seconds, run.peak_rss_mib,
                                    run.skipped))
            write_stage_record(RunLayout(run_dir), runs, dry_run)
    print(f"run folder: {run_dir}")
    print(f"executed notebooks: {RunLayout(run_dir).notebooks}")
    print_outputs(params, run_dir, Path(input_dir), notebook_overrides(SUBMISSION_NOTEBOOK, settings or {}) | overrides,
                  [b.stem for b in books], last_round=rounds)
    return runs


PSEUDO_NOTEBOOK = "08_pseudo_label"
PSEUDO_TRAINED = ("03_train_siim_fasterrcnn", "04_train_siim_yolo", "06_study_level")  # take ``pseudo_labels``


def round_overrides(notebook: str, layout: RunLayout, r: int, rounds: int) -> dict:
    """What round ``r`` of ``rounds`` sets over a stage's settings: its folder; 03, 04 and 06 the previous round's
    pseudo-label table; 07 of a round before the last, a submission in the round's folder (the last writes the
    run's). Nothing without rounds."""
    if not rounds:
        return {}
    out = {"run_dir": str(layout.root)} if r else {}
    if r and notebook in PSEUDO_TRAINED:
        out["pseudo_labels"] = str(RunLayout(layout.round_dir(r - 1)).pseudo_label.table)
    if notebook == SUBMISSION_NOTEBOOK and r < rounds:
        out["submission"] = str(layout.submission.round_csv)
    return out


def check_rounds(books: list[Path], profile: dict, settings: dict, overrides: dict) -> None:
    """``--rounds`` needs 03-08 among the notebooks that run, and 08 switched on (``external`` or
    ``include_test``)."""
    stems = {b.stem for b in books}
    missing = [s for s in ROUND_STAGES if s not in stems]
    if missing:
        raise PipelineError(f"--rounds needs the notebooks {', '.join(missing)} (--only leaves them out)")
    section = merge_section(profile, PSEUDO_NOTEBOOK, notebook_overrides(PSEUDO_NOTEBOOK, settings) | overrides)
    if not section.get("external") and not section.get("include_test"):
        raise PipelineError("--rounds: 08 is off (external: [], include_test: false), so a round has nothing to "
                            "learn from; e.g. --set 08.external=[synthetic] (docs/pseudo-labels.md)")


def _start_index(books: list[Path], start_from: str | None) -> int | None:
    if start_from is None:
        return None
    from covidkit.stages import notebook_of

    name = notebook_of(start_from)
    stems = [b.stem for b in books]
    if name not in stems:
        raise PipelineError(f"--from {start_from}: {name} is not among the notebooks that run ({', '.join(stems)})")
    return stems.index(name)


def _kept(book: Path, run_dir: Path, start_from: str | None) -> NotebookRun:
    """A stage before ``--from``: not run; its earlier timing when it has a record."""
    from covidkit.records import read_record

    record = read_record(run_dir, book.stem) or {}
    return NotebookRun(book.stem, RunLayout(run_dir).notebooks / book.name, record.get("seconds", 0.0),
                       record.get("peak_rss_mib"), skipped=True)


def run_stage_once(book: Path, profile: dict, run_dir: Path, input_dir: Path, overrides: dict,
                   forced: str | None = None, echo=print) -> NotebookRun:
    """One stage: skipped when its completion record matches, else run (resuming, or afresh) and recorded.

    Ctrl-C marks it interrupted and raises ``PipelineInterrupted``; a failure marks it failed.
    """
    from covidkit import records
    from covidkit.faults import check_input

    stage = book.stem
    params = notebook_parameters(book, profile, overrides)
    inputs = records.input_fingerprint(stage, input_dir.resolve(), run_dir, params)
    saved = records.read_record(run_dir, stage)
    decision = records.decide(saved, params, inputs, run_dir, forced)
    if not decision.run:
        echo(f"{stage}: skipped, complete ({records.record_path(run_dir, stage)}; --force or --from {stage[:2]} "
             f"runs it again)")
        return NotebookRun(stage, RunLayout(run_dir).notebooks / book.name, saved.get("seconds", 0.0),
                           saved.get("peak_rss_mib"), skipped=True)
    echo(f"{stage}: runs{' afresh' if decision.clean else ''}: {decision.reason}")
    check_input(stage, input_dir)
    if decision.clean:
        _remove_outputs(records.stage_outputs(stage, run_dir, params), run_dir)
    record = records.StageRecord(run_dir, stage, params, inputs)
    record.running()
    try:
        result = run_notebook(book, profile, run_dir, overrides, params)
    except KeyboardInterrupt:
        record.stopped("interrupted")
        raise PipelineInterrupted(
            f"interrupted during {stage}: it is marked incomplete (its finished folds and last checkpoints are "
            f"kept). Run the same command again to continue: finished stages are skipped and {stage} resumes"
        ) from None
    except BaseException as err:
        record.stopped("failed", str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise
    record.complete(result.seconds, result.peak_rss_mib)
    echo(f"{stage}: done in {result.seconds:.0f} s")
    return result


def _remove_outputs(paths: list[Path], run_dir: Path) -> None:
    """A stage's earlier outputs inside the run folder (never a file outside it, e.g. the submission)."""
    for path in paths:
        if not path.is_relative_to(run_dir):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_stage_record(layout: RunLayout, runs: list[NotebookRun], dry_run: bool) -> None:
    """Each notebook's wall time and peak memory so far: ``dry_run.json`` or ``stages.json``."""
    import json

    from covidkit.atomic import atomic_write_text

    rows = [{"stage": r.name, "seconds": round(r.seconds, 1), "peak_rss_mib": r.peak_rss_mib,
             **({"skipped": True} if r.skipped else {})} for r in runs]
    atomic_write_text(layout.dry_run_record if dry_run else layout.stage_record, json.dumps(rows, indent=2) + "\n")
    # the folder now holds this kind of run (RunLayout.is_dry_run): the other kind's record would mislabel it
    (layout.stage_record if dry_run else layout.dry_run_record).unlink(missing_ok=True)


def print_learning(checks: list, ran: list[str]) -> None:
    """The last lines of a run: which of the stages that ran did not learn (``covidkit.learning``)."""
    checks = [c for c in checks if c.stage in ran]
    failed = [c for c in checks if c.failed]
    ties = [c for c in checks if not c.failed and not c.learned]
    if not checks:
        return
    if not failed:
        print(f"every model learned ({len(checks)} checks against untrained, trivial or rival baselines"
              + (f"; {len(ties)} ties with a rival model)" if ties else ")"))
    else:
        print(f"DID NOT LEARN ({len(failed)} of {len(checks)} checks):")
        for check in failed:
            print(f"  {check.line()}")
    for check in ties:
        print(f"  {check.line()}")


SUBMISSION_NOTEBOOK = "07_make_submission"


def print_outputs(profile: dict, run_dir: Path, input_dir: Path, overrides: dict, ran: list[str],
                  last_round: int = 0) -> None:
    """The stages that did not learn; after a run that made a submission, where it, the models (the last round's)
    and the report are."""
    from covidkit.learning import check_run
    from covidkit.report import DRY_RUN_CHECKS

    dry_run = RunLayout(run_dir).is_dry_run
    checks = [] if dry_run else check_run(run_dir, input_dir.resolve())
    if SUBMISSION_NOTEBOOK in ran:
        from covidkit.report import write_report

        section = merge_section(profile, SUBMISSION_NOTEBOOK, overrides)
        submission = REPO_ROOT / section.get("submission", "submissions/submission.csv")
        models = REPO_ROOT / (section.get("models_dir")
                              or RunLayout(RunLayout(run_dir).round_dir(last_round)).submission.models)
        report = write_report(run_dir, submission_csv=submission, input_dir=input_dir.resolve(), checks=checks)
        print(f"submission: {submission}")
        print(f"models: {models}")
        print(f"report: {report}")
    if dry_run:
        print(DRY_RUN_CHECKS)
    else:
        print_learning(checks, ran)
