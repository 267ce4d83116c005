"""``covidkit bench seeds`` without the real pipeline (25 minutes a seed): the runner with a fake command step that
writes run folders in the stages' formats, the tables, resuming, the fresh test seeds, the CLI, and the pipeline's
``--set``."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from covidkit.bench.seeds import (FRESH_SEEDS, SeedFolder, SeedsConfig, draw_fresh_test_seeds, figure_table,
                                  run_seeds, verdict_class, write_readme_block, write_tables)
from covidkit.cli import build_parser, main
from covidkit.layout import RunLayout
from covidkit.pipeline import PipelineError, check_settings, list_notebooks, notebook_overrides


def write_run(run_dir: Path, seed: int, fresh_seeds: list[int], nih: float) -> None:
    """A finished run folder with what stages 01, 07 and 11 write (the figures of ``check_run``)."""
    layout = RunLayout(run_dir)
    layout.nih_pretrain.dir.mkdir(parents=True)
    layout.nih_pretrain.summary.write_text(json.dumps({"mean_auroc": nih, "untrained_mean_auroc": 0.5,
                                              "counted_positives": {"a": 3, "b": 4}}))
    layout.ct_decovnet.dir.mkdir(parents=True)
    layout.ct_decovnet.metrics.write_text(json.dumps({"roc_auc": 0.52 + seed / 1000, "n": 42}))
    pd.DataFrame({"prob": [0.1, 0.6, 0.4, 0.9]}).to_csv(layout.ct_decovnet.predictions, index=False)
    fresh = layout.submission.fresh_tests
    fresh.mkdir(parents=True)
    pd.DataFrame({"seed": fresh_seeds, "mAP": [0.30 + seed / 100] * len(fresh_seeds), "study_mAP": 0.4,
                  "image_mAP": 0.2, "prior_mAP": 0.15}).to_csv(fresh / "scores.csv", index=False)
    layout.stage_record.write_text(json.dumps([{"stage": b.stem, "seconds": 1.0, "peak_rss_mib": None}
                                               for b in list_notebooks()]))


class FakeStep:
    """Stands for ``run_logged``: synth makes the input folder, the pipeline a run folder; ``fail`` seeds' pipeline
    exits 1 halfway, ``crash`` seeds' raises."""

    def __init__(self, fail: set[int] = frozenset(), crash: set[int] = frozenset()):
        self.fail, self.crash, self.calls = fail, crash, []

    def __call__(self, cmd, log, echo):
        self.calls.append(cmd)
        args = cmd[cmd.index("covidkit.cli") + 1:]
        if args[0] == "synth":
            Path(args[args.index("--out") + 1]).mkdir(parents=True)
            return 0, 2.0
        run_dir, seed = Path(args[args.index("--run-dir") + 1]), int(run_dir_seed(args))
        sets = [a.split("=", 1) for i, a in enumerate(args) if i and args[i - 1] == "--set"]
        fresh = json.loads(dict(sets)["07_make_submission.fresh_test_seeds"])
        if seed in self.crash:
            raise OSError("no space left on device")
        if seed in self.fail:
            (run_dir / "notebooks").mkdir(parents=True)
            return 1, 5.0
        write_run(run_dir, seed, fresh, nih=0.7 + seed / 100)
        echo("00_prepare_data: done in 1 s")
        return 0, 40.0


def run_dir_seed(args: list[str]) -> str:
    return Path(args[args.index("--run-dir") + 1]).parent.name.removeprefix("seed")


def test_runs_every_seed_records_a_failure_and_resumes(tmp_path):
    speed = tmp_path / "speed.py"
    speed.write_text('import json; print(json.dumps({"workload_seconds": 0.5}))\n')
    cfg = SeedsConfig(seeds=[1, 2, 3], out=tmp_path / "out", speed_script=speed)
    step, lines = FakeStep(fail={2}), []
    md = run_seeds(cfg, step=step, say=lines.append)

    figures = pd.read_csv(tmp_path / "out" / "seeds.csv")
    assert list(figures.columns) == ["seed", "stage", "model", "figure", "value", "baseline_name", "baseline",
                                     "verdict"]
    assert sorted(figures["seed"].unique()) == [1, 3]  # seed 2 failed, seed 3 still ran
    nih = figures[figures["stage"] == "01_pretrain_nih_resnext"].set_index("seed")
    assert nih.loc[1, "value"] == pytest.approx(0.71) and nih.loc[3, "value"] == pytest.approx(0.73)
    assert set(nih["verdict"]) == {"learned"}

    timings = pd.read_csv(tmp_path / "out" / "timings.csv").set_index("seed")
    assert list(timings["status"]) == ["done", "failed", "done"]
    assert timings.loc[1, "total s"] == pytest.approx(42.0) and timings.loc[1, "total / workload"] == pytest.approx(84)
    for seed in (1, 3):  # the fresh test seeds passed to the pipeline are the recorded ones
        run = SeedFolder(cfg.out, seed).read()
        assert len(run.fresh_test_seeds) == 3 and not set(run.fresh_test_seeds) & {1, 2, 3}
        scores = pd.read_csv(RunLayout(SeedFolder(cfg.out, seed).run).submission.fresh_tests / "scores.csv")
        assert list(scores["seed"]) == run.fresh_test_seeds
        assert timings.loc[seed, "fresh test seeds"] == " ".join(map(str, run.fresh_test_seeds))

    text = md.read_text()
    nih_row = next(line for line in text.splitlines() if line.startswith("| 01_pretrain_nih_resnext"))
    assert "0.720 +- 0.014" in nih_row and "untrained 0.500 +- 0.000" in nih_row  # 0.71, 0.73
    assert nih_row.rstrip(" |").endswith("2 | 0 | 0")
    assert "seed 2: pipeline exit 1" in text
    assert any("00_prepare_data: done" in line for line in lines) and any("FAILED" in line for line in lines)

    # again: the finished seeds are not rerun, the failed one is
    step2, lines = FakeStep(), []
    run_seeds(cfg, step=step2, say=lines.append)
    assert [run_dir_seed(c[c.index("covidkit.cli") + 1:]) for c in step2.calls if "pipeline" in c] == ["2"]
    assert sum("not rerun" in line for line in lines) == 2
    assert sorted(pd.read_csv(tmp_path / "out" / "seeds.csv")["seed"].unique()) == [1, 2, 3]

    # --table-only rebuilds the same tables from the folders
    before = md.read_text()
    (tmp_path / "out" / "seeds.md").unlink()
    assert write_tables(cfg.out).read_text() == before


def test_missing_speed_script_records_null_and_warns_and_a_crash_fails_one_seed(tmp_path):
    cfg = SeedsConfig(seeds=[4, 5], out=tmp_path / "out", speed_script=tmp_path / "absent.py")
    lines = []
    run_seeds(cfg, step=FakeStep(crash={5}), say=lines.append)
    run = SeedFolder(cfg.out, 4).read()
    assert run.status == "done" and run.workload_s is None and run.total_units is None
    assert any("warning: no machine-speed script" in line for line in lines)
    crashed = SeedFolder(cfg.out, 5).read()
    assert crashed.status == "failed" and crashed.error == "OSError: no space left on device"
    assert set(pd.read_csv(cfg.out / "seeds.csv")["seed"]) == {4}


def test_figure_table_groups_seed_dependent_names_and_counts_verdicts():
    rows = [
        (1, "06_study_level", "none (max box)", "OOF none AP", 0.50, "share", 0.40, "learned"),
        (2, "06_study_level", "none (head)", "OOF none AP", 0.41, "share", 0.40, "tie (within 0.02, the seed-to-seed spread)"),
        (1, "11_ct_decovnet", "DeCoVNet", "held-out ROC AUC (42 volumes)", 0.9, "chance", 0.5, "learned"),
        (2, "11_ct_decovnet", "DeCoVNet", "held-out ROC AUC (41 volumes)", 0.5, "chance", 0.5, "constant output"),
        (1, "05_ensemble_wbf", "WBF", "OOF opacity AP@0.5", 0.4, "YOLO alone", 0.35, "learned"),
        (1, "05_ensemble_wbf", "WBF", "OOF opacity AP@0.5", 0.4, "prior boxes", 0.1, "learned"),
        (2, "05_ensemble_wbf", "WBF", "OOF opacity AP@0.5", 0.3, "Faster R-CNN alone", 0.32, "below the baseline"),
        (1, "10_ct_cogseg", "+SR (1 L1) (medseg)", "test lesion DSC", 0.6, "untrained", 0.0, "learned"),
        (1, "10_ct_cogseg", "+SR (4 L1) (medseg)", "test lesion DSC", 0.0, "untrained", 0.1,
         "not above the baseline (needs > 0.150)"),
    ]
    table = figure_table(pd.DataFrame(rows, columns=["seed", "stage", "model", "figure", "value", "baseline_name",
                                                     "baseline", "verdict"])).set_index("stage")
    assert len(table) == 5 and list(table["seeds"]) == [2, 2, 1, 1, 2]  # the two variants stay apart
    assert table.loc["06_study_level", ["learned", "tie", "failed"]].tolist() == [1, 1, 0]
    assert table.loc["11_ct_decovnet", ["learned", "tie", "failed"]].tolist() == [1, 0, 1]
    assert table.loc["11_ct_decovnet", "value"] == "0.700 +- 0.283"
    assert table.loc["05_ensemble_wbf", "baselines"] == ("YOLO alone 0.350 (1 seeds); prior boxes 0.100 (1 seeds); "
                                                         "Faster R-CNN alone 0.320 (1 seeds)")
    assert table["failed"].tolist() == [1, 0, 0, 1, 1]  # below its baseline: failed, not a tie
    assert table.loc["05_ensemble_wbf", "value"] == "0.350 +- 0.071"  # one value per seed, however many baselines
    assert verdict_class("tie (within 0.02, the seed-to-seed spread)") == "tie"
    assert verdict_class("missing: no summary.json") == "failed"


def test_fresh_test_seeds_differ_between_calls_and_avoid_the_run_seeds():
    first, second = draw_fresh_test_seeds(3), draw_fresh_test_seeds(3)
    assert first != second and len(set(first)) == 3
    assert all(s in FRESH_SEEDS for s in first + second)
    # the draws a seeded generator would make first are skipped when they are run seeds
    taken = draw_fresh_test_seeds(2, rng=random.Random(0))
    drawn = draw_fresh_test_seeds(2, avoid=taken, rng=random.Random(0))
    assert not set(drawn) & set(taken) and len(drawn) == 2


def test_cli_parses_the_seeds_flags():
    args = build_parser().parse_args(["bench", "seeds", "--seeds", "5", "6", "7", "--profile", "full", "--out", "o",
                                      "--fresh-tests", "4", "--speed-script", "s.py", "--dry-run",
                                      "--synth-args", "--train-studies 8"])
    assert (args.what, args.seeds, args.profile, args.out, args.fresh_tests, args.speed_script, args.dry_run,
            args.synth_args, args.table_only) == ("seeds", [5, 6, 7], "full", "o", 4, "s.py", True,
                                                  "--train-studies 8", False)
    assert build_parser().parse_args(["bench", "seeds", "--table-only"]).seeds is None


def test_cli_needs_seeds_or_table_only(tmp_path, capsys):
    assert main(["bench", "seeds", "--out", str(tmp_path)]) == 2
    assert "--seeds is required" in capsys.readouterr().err
    assert main(["bench", "seeds", "--table-only", "--out", str(tmp_path)]) == 2  # no seed<S>/ there
    assert "no seed<S> folder" in capsys.readouterr().err


def test_pipeline_set_scopes_settings_to_a_notebook():
    settings = {"07.fresh_test_seeds": [5, 6], "seed": 3}
    assert notebook_overrides("07_make_submission", settings) == {"fresh_test_seeds": [5, 6], "seed": 3}
    assert notebook_overrides("00_prepare_data", settings) == {"seed": 3}
    books = list_notebooks()
    check_settings(books, {"07_make_submission.fresh_test_seeds": [1]})
    with pytest.raises(PipelineError, match="fresh_test_sets"):
        check_settings(books, {"07.fresh_test_sets": [1]})
    with pytest.raises(PipelineError, match="fresh_test_seeds"):  # 00 does not have it
        check_settings(list_notebooks(["00"]), {"fresh_test_seeds": [1]})


def test_the_readme_block_is_rewritten_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- results:begin (written by a command) -->\nold table\n<!-- results:end -->\n\nrest\n")
    write_readme_block(readme, "# Results\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert readme.read_text() == ("# title\n\n<!-- results:begin (written by a command) -->\n#### Results\n| a | b |\n"
                                  "|---|---|\n| 1 | 2 |\n<!-- results:end -->\n\nrest\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        write_readme_block(readme, "x")


def test_a_run_is_finished_when_every_stage_that_reports_a_figure_ran(tmp_path):
    """A run of an earlier version that lacks a later stage reporting no figure (08) is finished; one that lacks a
    stage reporting a figure (03) is not."""
    from covidkit.bench.seeds import reporting_stages, run_finished

    assert "03_train_siim_fasterrcnn" in reporting_stages() and "08_pseudo_label" not in reporting_stages()
    layout = RunLayout(tmp_path)
    for absent, finished in (("08_pseudo_label", True), ("03_train_siim_fasterrcnn", False)):
        layout.stage_record.write_text(json.dumps([{"stage": b.stem, "seconds": 1.0, "peak_rss_mib": None}
                                                   for b in list_notebooks() if b.stem != absent]))
        assert run_finished(tmp_path, dry_run=False) is finished


def test_only_runs_the_named_notebooks_on_every_seed_and_tables_their_figures(tmp_path):
    """``--only 11``: the pipeline gets ``--only 11`` and no submission settings (07 does not run, and a ``--set``
    for a notebook that does not run is an error); the run is finished with 11 alone and the table holds 11's
    figures; the same seed asked for the whole pipeline later is run again, not taken for finished."""
    from covidkit.bench.seeds import run_finished

    calls = []

    def step(cmd, log, echo):
        calls.append(cmd)
        args = cmd[cmd.index("covidkit.cli") + 1:]
        if args[0] == "synth":
            Path(args[args.index("--out") + 1]).mkdir(parents=True)
            return 0, 2.0
        run_dir = Path(args[args.index("--run-dir") + 1])
        notebooks = list_notebooks(args[args.index("--only") + 1:] if "--only" in args else None)
        check_settings(notebooks, dict(a.split("=", 1) for i, a in enumerate(args) if i and args[i - 1] == "--set"))
        layout = RunLayout(run_dir)
        layout.ct_decovnet.dir.mkdir(parents=True)
        layout.ct_decovnet.metrics.write_text(json.dumps({"roc_auc": 0.81, "hist_auc": 0.62, "n": 42}))
        pd.DataFrame({"prob": [0.1, 0.6, 0.4, 0.9]}).to_csv(layout.ct_decovnet.predictions, index=False)
        layout.stage_record.write_text(json.dumps([{"stage": b.stem, "seconds": 1.0, "peak_rss_mib": None}
                                                   for b in notebooks]))
        return 0, 30.0

    cfg = SeedsConfig(seeds=[4, 5], out=tmp_path / "out", speed_script=None, only=["11"])
    md = run_seeds(cfg, step=step, say=lambda line: None).read_text()
    pipelines = [c for c in calls if "pipeline" in c]
    assert len(pipelines) == 2 and all(c[-2:] == ["--only", "11"] and "--set" not in c for c in pipelines)
    figures = pd.read_csv(tmp_path / "out" / "seeds.csv")
    assert set(figures["stage"]) == {"11_ct_decovnet"} and sorted(figures["seed"]) == [4, 5]
    assert figures["value"].tolist() == [0.81, 0.81] and set(figures["verdict"].str.split().str[0]) == {"learned"}
    assert "Only notebooks 11 ran" in md and SeedFolder(cfg.out, 4).read().only == ["11"]
    assert run_finished(SeedFolder(cfg.out, 4).run, False, ["11"]) and not run_finished(SeedFolder(cfg.out, 4).run, False)
    calls.clear()
    run_seeds(SeedsConfig(seeds=[4], out=tmp_path / "out", speed_script=None, only=["10", "11"]), step=step,
              say=lambda line: None)
    assert [c for c in calls if "pipeline" in c][0][-3:] == ["--only", "10", "11"]  # asked for more: run again
