"""``covidkit bench seeds``: the default pipeline on several synthetic seeds, its figures as a range over seeds.

One synthetic dataset per seed (``covidkit synth --seed S``), the whole pipeline on it, then every held-out
figure of the run beside its baseline (``covidkit.learning.check_run``). Each run scores fresh test sets whose
seeds are drawn anew (``FRESH_SEEDS``: they cannot be a run seed, and nothing was tuned on them) instead of the
profile's fixed ones. Before each run the machine's speed is measured with the shared workload script, so a
run's time is also given in workload units (run seconds / workload seconds), comparable across machines.

Synth and the pipeline run as subprocesses of the CLI (``python -m covidkit.cli``): each seed gets a fresh
interpreter (no memory, torch threads or imported state carried from one seed to the next), a crash of one
seed (a killed kernel, an out-of-memory kill) is recorded as that seed's failure while the others still run,
and each command's whole output goes to a log file beside its run.

``<out>/`` holds ``seed<S>/input`` (the data), ``seed<S>/run`` (the run folder), ``seed<S>/seed.json`` (timings,
fresh test seeds, status), ``seed<S>/*.log``, and the tables: ``seeds.csv`` (one row per seed and figure),
``timings.csv`` (one row per seed) and ``seeds.md``.
"""
from __future__ import annotations

import json
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from covidkit.layout import RunLayout
from covidkit.profiles import REPO_ROOT

FRESH_SEEDS = range(10_000, 1_000_000)  # fresh test seeds: far above any run or dev seed
DEFAULT_SPEED_SCRIPT = REPO_ROOT.parent / "shared" / "tools" / "machine_speed.py"
SUBMISSION_STAGE = "07_make_submission"
VERDICTS = ("learned", "tie", "failed")  # verdict_class
FIGURE_COLUMNS = ["seed", "stage", "model", "figure", "value", "baseline_name", "baseline", "verdict"]


@dataclass
class SeedsConfig:
    seeds: list[int]
    out: Path
    profile: str = "smoke"
    fresh_tests: int = 3  # fresh test sets per run
    speed_script: Path | None = DEFAULT_SPEED_SCRIPT
    dry_run: bool = False  # covidkit pipeline --dry-run: the whole path in minutes, figures meaningless
    synth_args: list[str] = field(default_factory=list)  # more options of covidkit synth (sizes)
    only: list[str] | None = None  # covidkit pipeline --only: these notebooks (prefixes, e.g. ["11"]); None: all


@dataclass
class SeedRun:
    """One seed's run: what ``seed<S>/seed.json`` holds."""

    seed: int
    status: str = "not run"  # "done", "failed", "not run"
    fresh_test_seeds: list[int] = field(default_factory=list)
    workload_s: float | None = None  # the machine-speed workload, just before the run
    synth_s: float | None = None
    pipeline_s: float | None = None
    dry_run: bool = False
    error: str | None = None
    only: list[str] | None = None  # the notebooks run (covidkit pipeline --only); None: all

    @property
    def total_s(self) -> float | None:
        return None if self.synth_s is None or self.pipeline_s is None else self.synth_s + self.pipeline_s

    @property
    def total_units(self) -> float | None:
        """The run's time in machine-speed units (total seconds / workload seconds)."""
        return None if self.total_s is None or not self.workload_s else self.total_s / self.workload_s


class SeedFolder:
    """``<out>/seed<S>/``: its input, run folder, record and logs."""

    def __init__(self, out: Path, seed: int) -> None:
        self.root = Path(out) / f"seed{seed}"
        self.input = self.root / "input"
        self.run = self.root / "run"
        self.record = self.root / "seed.json"

    def log(self, step: str) -> Path:
        return self.root / f"{step}.log"

    def read(self) -> SeedRun | None:
        return SeedRun(**json.loads(self.record.read_text())) if self.record.is_file() else None

    def write(self, run: SeedRun) -> None:
        from covidkit.atomic import atomic_write_text

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record, json.dumps(asdict(run), indent=2) + "\n")


def draw_fresh_test_seeds(n: int, avoid: set[int] | list[int] = (), rng: random.Random | None = None) -> list[int]:
    """``n`` distinct seeds of ``FRESH_SEEDS``, none in ``avoid``; from the operating system's randomness unless
    ``rng`` is given, so that every run draws new ones."""
    rng = rng or random.SystemRandom()
    avoid = set(avoid)
    drawn: list[int] = []
    while len(drawn) < n:
        seed = rng.randrange(FRESH_SEEDS.start, FRESH_SEEDS.stop)
        if seed not in avoid and seed not in drawn:
            drawn.append(seed)
    return drawn


def reporting_stages() -> set[str]:
    """The stages whose figures the table holds: those that declare learning checks (``covidkit.learning``)."""
    from covidkit.stages import STAGES, stage_module

    return {notebook for notebook in STAGES if hasattr(stage_module(notebook), "learning_checks")}


def run_finished(run_dir: Path, dry_run: bool, only: list[str] | None = None) -> bool:
    """The run folder's stage record lists every stage that reports a figure (of the notebooks ``only`` names, as
    ``covidkit pipeline --only``): the pipeline went through them (a stage added later that reports none, such as
    08, does not unfinish an earlier run)."""
    from covidkit.pipeline import list_notebooks

    layout = RunLayout(run_dir)
    record = layout.dry_run_record if dry_run else layout.stage_record
    if not record.is_file() or (not dry_run and layout.is_dry_run):
        return False
    ran = {row["stage"] for row in json.loads(record.read_text())}
    return reporting_stages() & {b.stem for b in list_notebooks(only)} <= ran


def covidkit_command(*args: str) -> list[str]:
    """The CLI in a new interpreter of this Python."""
    return [sys.executable, "-m", "covidkit.cli", *args]


def run_logged(cmd: list[str], log: Path, echo: Callable[[str], None] | None = None) -> tuple[int, float]:
    """Run ``cmd`` in the repository root, its output (stdout and stderr) into ``log``; each line that ends a
    notebook goes to ``echo``. Returns the exit status and the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", buffering=1) as f:  # line by line: a killed run leaves its log
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            for line in proc.stdout:
                f.write(line)
                if echo is not None and re.match(r"\d\d_\w+: done in", line):
                    echo(line.strip())
        rc = proc.returncode
    return rc, time.perf_counter() - start


def machine_speed(script: Path | None, log: Path, warn: Callable[[str], None] = warnings.warn) -> float | None:
    """The workload's seconds (``machine_speed.py``'s ``workload_seconds``), or None (and ``warn``) without it."""
    if script is None or not Path(script).is_file():
        warn(f"no machine-speed script at {script}: the runs are not timed in workload units")
        return None
    rc, _ = run_logged([sys.executable, str(script)], log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        warn(f"{script} failed (exit {rc}, see {log}): the run is not timed in workload units")
        return None
    return float(json.loads(lines[-1])["workload_seconds"])


Step = Callable[[list[str], Path, Callable[[str], None] | None], tuple[int, float]]


def run_seed(cfg: SeedsConfig, seed: int, say: Callable[[str], None], step: Step = run_logged) -> SeedRun:
    """Synth and the pipeline for one seed, timed, with freshly drawn fresh test seeds; never raises on a
    failing command (the seed is recorded as failed)."""
    import shutil

    folder = SeedFolder(cfg.out, seed)
    for path in (folder.input, folder.run):  # an unfinished attempt: start clean
        shutil.rmtree(path, ignore_errors=True)
    from covidkit.pipeline import list_notebooks

    submits = SUBMISSION_STAGE in {b.stem for b in list_notebooks(cfg.only)}
    run = SeedRun(seed, fresh_test_seeds=draw_fresh_test_seeds(cfg.fresh_tests, avoid=cfg.seeds) if submits else [],
                  dry_run=cfg.dry_run, only=cfg.only)
    run.workload_s = machine_speed(cfg.speed_script, folder.log("machine_speed"), lambda m: say(f"warning: {m}"))
    if run.workload_s is not None:
        say(f"machine speed: workload {run.workload_s:.2f} s")
    folder.write(run)

    say(f"synth --seed {seed} -> {folder.input}")
    rc, run.synth_s = step(covidkit_command("synth", "--out", str(folder.input), "--seed", str(seed),
                                            *cfg.synth_args), folder.log("synth"), None)
    if rc != 0:
        return _failed(folder, run, f"synth exit {rc} (see {folder.log('synth')})", say)
    say(f"synth done in {run.synth_s:.0f} s")

    only = f" --only {' '.join(cfg.only)}" if cfg.only else ""
    say(f"pipeline --profile {cfg.profile}{' --dry-run' if cfg.dry_run else ''}{only}, fresh test seeds "
        f"{run.fresh_test_seeds} -> {folder.run}")
    args = ["pipeline", "--profile", cfg.profile, "--input", str(folder.input), "--run-dir", str(folder.run)]
    if submits:
        args += ["--set", f"{SUBMISSION_STAGE}.fresh_test_seeds={json.dumps(run.fresh_test_seeds)}",
                 # not the profile's submissions/submission.csv: each seed's submission stays in its run folder
                 "--set", f"{SUBMISSION_STAGE}.submission={RunLayout(folder.run).submission.dry_run_csv}"]
    args += ["--only", *cfg.only] if cfg.only else []
    rc, run.pipeline_s = step(covidkit_command(*args, *(["--dry-run"] if cfg.dry_run else [])),
                              folder.log("pipeline"), lambda line: say(f"  {line}"))
    if rc != 0 or not run_finished(folder.run, cfg.dry_run, cfg.only):
        why = f"exit {rc}" if rc != 0 else "not every notebook in the run's stage record"
        return _failed(folder, run, f"pipeline {why} (see {folder.log('pipeline')})", say)
    run.status = "done"
    folder.write(run)
    units = f", {run.total_units:.0f} workload units" if run.total_units is not None else ""
    say(f"pipeline done in {run.pipeline_s:.0f} s (synth + pipeline {run.total_s:.0f} s{units})")
    return run


def _failed(folder: SeedFolder, run: SeedRun, error: str, say: Callable[[str], None]) -> SeedRun:
    run.status, run.error = "failed", error
    folder.write(run)
    say(f"FAILED: {error}")
    return run


def run_seeds(cfg: SeedsConfig, step: Step = run_logged, say: Callable[[str], None] | None = None) -> Path:
    """Every seed of ``cfg`` not finished yet, then the tables (``write_tables``); returns ``seeds.md``."""
    say = say or (lambda line: print(line, flush=True))
    cfg.out = Path(cfg.out).resolve()
    for i, seed in enumerate(cfg.seeds, 1):
        tell = lambda line, i=i, seed=seed: say(f"[seed {seed}, {i}/{len(cfg.seeds)}] {line}")  # noqa: E731
        folder = SeedFolder(cfg.out, seed)
        done = folder.read()
        if (run_finished(folder.run, cfg.dry_run, cfg.only) and (done is None or done.status == "done")
                and (done is None or done.only == cfg.only)):
            tell(f"finished run in {folder.run}: not rerun")
            continue
        try:
            run_seed(cfg, seed, tell, step)
        except Exception as err:  # noqa: BLE001  (an unforeseen error of one seed: the others still run)
            run = folder.read() or SeedRun(seed, dry_run=cfg.dry_run)
            _failed(folder, run, f"{type(err).__name__}: {err}", tell)
    path = write_tables(cfg.out, cfg.seeds)
    say(f"tables: {cfg.out / 'seeds.csv'}, {cfg.out / 'timings.csv'}, {path}")
    return path


def figure_rows(seed: int, run_dir: Path, input_dir: Path) -> list[dict]:
    """The run's held-out figures beside their baselines (``check_run``), and the fresh test sets' study and image
    parts of the score (no baseline)."""
    from covidkit.fresh_tests import read_fresh_test_sets
    from covidkit.learning import check_run

    rows = [{"seed": seed, "stage": c.stage, "model": c.model, "figure": c.figure, "value": c.value,
             "baseline_name": c.baseline_name, "baseline": c.baseline, "verdict": c.verdict}
            for c in check_run(run_dir, input_dir)]
    fresh = read_fresh_test_sets(RunLayout(run_dir).submission.fresh_tests)
    if fresh is not None and not fresh.per_seed.empty:
        for part in ("study_mAP", "image_mAP"):
            rows.append({"seed": seed, "stage": SUBMISSION_STAGE, "model": "submission",
                         "figure": f"fresh test {part.replace('_', ' ')}, mean of {len(fresh.per_seed)} sets",
                         "value": float(fresh.per_seed[part].mean()), "baseline_name": "", "baseline": None,
                         "verdict": ""})
    return rows


def collect(out: Path, seeds: list[int]) -> tuple[pd.DataFrame, list[SeedRun]]:
    """The figures of every finished run (``FIGURE_COLUMNS``) and every seed's record. A finished run folder
    without a record (made by hand) counts as done, untimed."""
    rows, runs = [], []
    for seed in seeds:
        folder = SeedFolder(out, seed)
        run = folder.read()
        only = run.only if run is not None else None
        finished = any(run_finished(folder.run, dry_run, only) for dry_run in (False, True))
        if run is None:
            run = SeedRun(seed, status="done" if finished else "not run",
                          dry_run=finished and RunLayout(folder.run).is_dry_run)
        elif run.status == "done" and not finished:
            run.status, run.error = "failed", "the run folder is not finished"
        runs.append(run)
        if run.status == "done":
            rows += figure_rows(seed, folder.run, folder.input)
    return pd.DataFrame(rows, columns=FIGURE_COLUMNS), runs


def verdict_class(verdict: str) -> str:
    """``learned``; ``tie`` (within a rival's margin); ``failed`` (not above the baseline, constant, missing)."""
    verdict = verdict.lower()
    if verdict.startswith("learned"):
        return "learned"
    if verdict.startswith("tie"):
        return "tie"
    return "failed"


def seed_verdicts(group: pd.DataFrame) -> pd.Series:
    """Each seed's verdict on one figure: the worst of its checks (a figure has one check per baseline)."""
    rank = {"learned": 0, "tie": 1, "failed": 2}
    kinds = group.assign(kind=[verdict_class(v) if isinstance(v, str) and v else "" for v in group["verdict"]])
    kinds = kinds[kinds["kind"] != ""]
    return kinds.groupby("seed")["kind"].agg(lambda k: max(k, key=rank.__getitem__))


def figure_key(figure: str) -> str:
    """A figure's name without the counts that change with the seed ("held-out ROC AUC (42 volumes)")."""
    return re.sub(r"\s*\(\d+ [a-z]+\)", "", figure)


def model_key(model: str) -> str:
    """A model's name without the rule a stage chose on the seed's data ("none (max box)")."""
    return re.sub(r"^none \(.*\)$", "none rule", model)


def mean_sd(values, digits: int = 3) -> str:
    """``mean +- sd`` (ddof 1) of the values that are not NaN; the value alone when there is one."""
    values = pd.Series(values, dtype=float).dropna()
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} +- {values.std(ddof=1):.{digits}f}"


def figure_table(figures: pd.DataFrame) -> pd.DataFrame:
    """One row per figure: its mean +- sd over the seeds, each baseline's, and the verdicts counted."""
    rows = []
    figures = figures.assign(_model=figures["model"].map(model_key), _figure=figures["figure"].map(figure_key))
    figures = figures.sort_values("stage", kind="stable")  # the notebooks' order, each stage's checks in theirs
    for (stage, _, _), group in figures.groupby(["stage", "_model", "_figure"], sort=False):
        baselines = "; ".join(
            f"{name} {mean_sd(g['baseline'])}" + (f" ({g['seed'].nunique()} seeds)" if len(g) < len(group) else "")
            for name, g in group.groupby("baseline_name", sort=False) if name)
        kinds = seed_verdicts(group)
        rows.append({"stage": stage, "model": " / ".join(group["model"].unique()),
                     "figure": " / ".join(group["figure"].unique()), "seeds": group["seed"].nunique(),
                     "value": mean_sd(group.drop_duplicates("seed")["value"]), "baselines": baselines,
                     **{k: int((kinds == k).sum()) if len(kinds) else "" for k in VERDICTS}})
    return pd.DataFrame(rows, columns=["stage", "model", "figure", "seeds", "value", "baselines", *VERDICTS])


def timing_table(runs: list[SeedRun]) -> pd.DataFrame:
    rows = [{"seed": r.seed, "status": r.status, "synth s": r.synth_s, "pipeline s": r.pipeline_s,
             "total s": r.total_s, "workload s": r.workload_s, "total / workload": r.total_units,
             "fresh test seeds": " ".join(map(str, r.fresh_test_seeds))} for r in runs]
    return pd.DataFrame(rows)


def _markdown(table: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    cells = table.astype(object).map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v))
                                     else float_format.format(v) if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def summary_markdown(figures: pd.DataFrame, runs: list[SeedRun]) -> str:
    done = [r for r in runs if r.status == "done"]
    lines = [f"# Results over seeds {', '.join(str(r.seed) for r in runs)}", ""]
    only = sorted({" ".join(r.only) for r in done if r.only})
    if only:
        lines += [f"Only notebooks {', '.join(only)} ran (`covidkit bench seeds --only`); the synth and pipeline "
                  "times are those of that part.", ""]
    if any(r.dry_run for r in done):
        lines += ["Dry runs (a few items per split, 1-2 steps per model): the figures say nothing about the "
                  "methods.", ""]
    lines += [f"Value and baselines: mean +- sd (ddof 1) over the {len(done)} finished seeds; learned / tie / failed: "
              "how many seeds' verdicts (covidkit.learning) say so.", ""]
    lines += [_markdown(figure_table(figures)) if not figures.empty else "No finished run.", ""]
    timings = timing_table(runs)
    if done:
        numeric = ["synth s", "pipeline s", "total s", "workload s", "total / workload"]
        mean = {"seed": "mean +- sd", "status": f"{len(done)} done",
                **{c: mean_sd(timings.loc[timings["status"] == "done", c], 2) for c in numeric}}
        timings = pd.concat([timings, pd.DataFrame([mean])], ignore_index=True)
    lines += ["## Timing", "", "Seconds of wall time; total / workload: the run in units of the machine-speed "
              "workload measured just before it (comparable across machines). The fresh test seeds are drawn anew "
              "for each run.", "", _markdown(timings, "{:.2f}"), ""]
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["Failed: " + "; ".join(f"seed {r.seed}: {r.error}" for r in failed), ""]
    return "\n".join(lines)


def discover_seeds(out: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in Path(out).glob("seed*") if p.name[4:].isdigit())


README_BEGIN = "<!-- results:begin"  # the README's results block: the line that opens it starts so
README_END = "<!-- results:end -->"


def write_readme_block(readme: Path, table_md: str, demote: int = 3) -> None:
    """Replace what lies between the README's results markers with ``table_md`` (the markers stay), its headings
    ``demote`` levels down (the block sits under a README section)."""
    readme = Path(readme)
    lines = readme.read_text().splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.startswith(README_BEGIN)]
    end = [i for i, line in enumerate(lines) if line.startswith(README_END)]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise ValueError(f"{readme}: expected one '{README_BEGIN} ...' line and one '{README_END}' line after it")
    body = "".join("#" * demote + line if line.startswith("#") else line for line in table_md.splitlines(keepends=True))
    body = body if body.endswith("\n") else body + "\n"
    readme.write_text("".join(lines[: begin[0] + 1]) + body + "".join(lines[end[0]:]))


def write_tables(out: Path, seeds: list[int] | None = None) -> Path:
    """``seeds.csv``, ``timings.csv`` and ``seeds.md`` from the seed folders in ``out`` (all of them by default)."""
    out = Path(out)
    seeds = seeds or discover_seeds(out)
    if not seeds:
        raise FileNotFoundError(f"no seed<S> folder in {out}")
    figures, runs = collect(out, seeds)
    out.mkdir(parents=True, exist_ok=True)
    figures.to_csv(out / "seeds.csv", index=False)
    timing_table(runs).to_csv(out / "timings.csv", index=False)
    path = out / "seeds.md"
    path.write_text(summary_markdown(figures, runs))
    return path
