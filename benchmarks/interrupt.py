"""One real interruption of a pipeline run (issue 32): kill -9 during 03, start again, compare with a reference.

    python benchmarks/interrupt.py --reference runs/smoke --out runs/cut --kill-after-epochs 8

Starts ``covidkit pipeline --profile P --input I --run-dir OUT --set 07.submission=OUT/submission.csv``, SIGKILLs
the runner (as ``kill -9`` of ``make pipeline`` would; its notebook kernel exits by itself) once 03's split runs
have completed ``--kill-after-epochs`` epochs in all, runs the same command again, and prints: the seconds until
the kill, the seconds of the restarted run, the reference's uninterrupted seconds (its ``stages.json``), which
stages the restart skipped, the epoch 03 resumed at, and whether the figures (every stage's summary and OOF files,
07's fresh-test scores, the submission) equal the reference's. The reference is an uninterrupted run of the same
profile, input and code (its submission: pass ``--reference-submission``, by default submissions/submission.csv).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

FIGURES = ["03_train_siim_fasterrcnn/summary.json", "03_train_siim_fasterrcnn/oof.csv",
           "04_train_siim_yolo/summary.json", "04_train_siim_yolo/oof.csv", "05_ensemble_wbf/ap_table.csv",
           "05_ensemble_wbf/fusion.json", "06_study_level/summary.json", "06_study_level/oof_studies.csv",
           "fresh_tests/scores.csv"]


def epochs_done(stage: Path) -> int:
    return sum(max(0, len(p.read_text().splitlines()) - 1) for p in stage.glob("*/metrics.csv"))


def same(a: Path, b: Path) -> str:
    if not a.is_file() or not b.is_file():
        return f"missing ({a if not a.is_file() else b})"
    if a.read_bytes() == b.read_bytes():
        return "identical"
    if a.suffix == ".csv":
        x, y = pd.read_csv(a), pd.read_csv(b)
        if x.shape == y.shape and list(x.columns) == list(y.columns):
            num = x.select_dtypes("number").columns
            diff = (x[num] - y[num]).abs().max().max() if len(num) else 0.0
            if x.drop(columns=num).equals(y.drop(columns=num)):
                return f"numbers differ by at most {diff:.3g}"
    if a.suffix == ".json":
        x, y = json.loads(a.read_text()), json.loads(b.read_text())
        return "differs: " + ", ".join(f"{k}: {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y))
                                       if x.get(k) != y.get(k))[:300]
    return "differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="an uninterrupted run folder of the same profile and input")
    parser.add_argument("--reference-submission", default="submissions/submission.csv")
    parser.add_argument("--out", required=True, help="the run folder to interrupt (a new one)")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--input", default="input")
    parser.add_argument("--dry-run", action="store_true", help="both runs with the pipeline's --dry-run sizes")
    parser.add_argument("--kill-after-epochs", type=int, default=8, help="03's completed epochs, all splits together")
    parser.add_argument("--set", action="append", default=[], metavar="[NOTEBOOK.]KEY=VALUE",
                        help="the reference's own --set (e.g. its fresh test seeds), passed to both runs")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    cmd = [sys.executable, "-m", "covidkit.cli", "pipeline", "--profile", args.profile, "--input", args.input,
           "--run-dir", str(out), "--set", f"07.submission={out / 'submission.csv'}"]
    cmd += [arg for setting in args.set for arg in ("--set", setting)] + (["--dry-run"] if args.dry_run else [])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        stage = out / "03_train_siim_fasterrcnn"
        while epochs_done(stage) < args.kill_after_epochs:
            if proc.poll() is not None:
                sys.exit(f"the run ended before 03 reached {args.kill_after_epochs} epochs (see {log.name})")
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_s = time.perf_counter() - start
    print(f"killed after {killed_s:.0f} s, 03 at {epochs_done(stage)} completed epochs")
    time.sleep(2)  # the orphaned kernel notices its runner is gone (ipykernel polls every second)

    start = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True)
    rerun_s = time.perf_counter() - start
    (out.parent / f"{out.name}.rerun.log").write_text(again.stdout + again.stderr)
    if again.returncode != 0:
        sys.exit(f"the restarted run failed: see {out.parent / (out.name + '.rerun.log')}")
    lines = [line for line in (again.stdout + again.stderr).splitlines() if ": skipped" in line or ": runs" in line]
    print("\n".join(lines))
    reference = Path(args.reference)
    record = reference / ("dry_run.json" if args.dry_run else "stages.json")  # covidkit.layout.RunLayout's records
    ref_s = sum(r["seconds"] for r in json.loads(record.read_text()))
    print(f"uninterrupted (reference stages.json): {ref_s:.0f} s; interrupted: {killed_s:.0f} s until the kill + "
          f"{rerun_s:.0f} s restarted = {killed_s + rerun_s:.0f} s")
    for rel in FIGURES:
        print(f"{rel}: {same(reference / rel, out / rel)}")
    print(f"submission: {same(Path(args.reference_submission), out / 'submission.csv')}")


if __name__ == "__main__":
    main()
