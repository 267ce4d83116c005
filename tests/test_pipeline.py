"""The notebook runner, the profiles, and notebook 00 run end to end on synthetic data."""
from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from covidkit.data import siim
from covidkit.layout import RunLayout
from covidkit.pipeline import (PipelineError, list_notebooks, load_profile, notebook_parameters,
                               notebooks_dir, run_pipeline)
from covidkit.profiles import ProfileError
from covidkit.report import DRY_RUN_CHECKS


def test_profiles_cover_the_notebooks_they_name():
    books = {b.stem: b for b in list_notebooks()}
    for name in ("smoke", "full"):
        profile = load_profile(name)
        assert {"input_dir", "run_dir", "seed"} <= set(profile["common"])
        for section in set(profile) - {"common"}:
            assert section in books, f"{name}.yaml has a section for a missing notebook {section}"
            notebook_parameters(books[section], profile, {})  # raises on keys the notebook does not declare


def test_every_notebook_has_a_profile_section_in_each_profile():
    for name in ("smoke", "full"):
        profile = load_profile(name)
        missing = [b.stem for b in list_notebooks() if b.stem not in profile]
        assert not missing, f"{name}.yaml lacks sections for {missing}"


def test_notebooks_are_committed_clean_with_a_parameters_cell():
    for book in list_notebooks():
        nb = nbformat.read(book, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{book.name} has outputs"
        assert "parameters" in code[0].metadata.get("tags", []), f"{book.name}: first code cell is not tagged"


def test_unknown_profile_and_unknown_keys_are_clear_errors(tmp_path):
    from covidkit.profiles import ProfileError

    with pytest.raises(ProfileError, match="unknown profile 'nope'.*smoke"):
        load_profile("nope")
    book = list_notebooks(["00"])[0]
    with pytest.raises(PipelineError, match="does not declare"):
        notebook_parameters(book, {"00_prepare_data": {"prepared_sise": 3}}, {})
    with pytest.raises(PipelineError, match="no notebook matches"):
        list_notebooks(["99"])


def test_notebook_parameters_merge_common_section_and_overrides():
    book = list_notebooks(["00"])[0]
    profile = {"common": {"seed": 1, "run_dir": "a", "not_declared_by_00": 5},
               "00_prepare_data": {"prepared_size": 64, "seed": 2}}
    params = notebook_parameters(book, profile, {"run_dir": "b"})
    assert params == {"run_dir": "b", "profile": None, "overrides": {"seed": 2, "prepared_size": 64}}


def test_each_notebook_is_the_front_of_one_stage_and_declares_its_config():
    """A notebook's parameters are the profile, the folders, the dry-run switch and an overrides dict, and its
    Config comes from them as from the profile: the stage's Config is the one source of its settings."""
    import ast

    import papermill

    from covidkit.stages import NOTEBOOK_PARAMETERS, STAGES, section_parameters, stage_module

    books = {b.stem: b for b in list_notebooks()}
    assert set(books) == set(STAGES)
    for name, book in books.items():
        declared = {k: ast.literal_eval(v["default"]) for k, v in papermill.inspect_notebook(str(book)).items()}
        assert tuple(declared) == NOTEBOOK_PARAMETERS, f"{book.name} declares {list(declared)}"
        config = stage_module(name).Config
        assert config.from_namespace(declared) == config.from_params(section_parameters(declared["profile"], name))
        assert config.from_namespace({**declared, "profile": None}) == config()
        with pytest.raises(ProfileError, match="no setting"):
            config.from_namespace({**declared, "overrides": {"not_a_setting": 1}})
        code = [c.source for c in nbformat.read(book, as_version=4).cells if c.cell_type == "code"]
        assert f"{STAGES[name]}.Config.from_namespace(globals())" in code[1] or \
            ".Config.from_namespace(globals())" in code[1], f"{book.name} does not build its stage's Config"


@pytest.mark.slow
def test_a_dry_run_writes_its_submission_in_its_run_folder(tmp_path):
    """Not over a real submission in submissions/; a normal run keeps the profile's path."""
    from covidkit.pipeline import notebook_parameters, run_overrides
    from covidkit.profiles import load_profile, notebooks_dir

    full = load_profile("full")
    book = notebooks_dir() / "07_make_submission.ipynb"
    dry = notebook_parameters(book, full, run_overrides(tmp_path / "in", tmp_path / "run", dry_run=True))
    assert dry["dry_run"] is True and dry["overrides"]["submission"] == str(tmp_path / "run" / "submission.csv")
    normal = notebook_parameters(book, full, run_overrides(tmp_path / "in", tmp_path / "run", dry_run=False))
    assert "dry_run" not in normal or normal["dry_run"] is False
    assert normal["overrides"]["submission"] == "submissions/submission.csv"
    assert "submission" not in notebook_parameters(notebooks_dir() / "00_prepare_data.ipynb", full,
                                                   run_overrides(tmp_path, tmp_path / "run", dry_run=True))["overrides"]


def test_a_dry_run_keeps_a_few_rows_of_each_fold_labels_taking_turns():
    """``max_items`` rows of each held-out fold and of each model's training rows, every label seen."""
    from covidkit.engine.kfold import limit_rows, training_rows

    table = pd.DataFrame({"model_fold": [0] * 6 + [1] * 6 + [2] * 6,
                          "label": ["negative"] * 4 + ["typical", "atypical"] + ["typical"] * 12})
    limited = limit_rows(table, 4)
    assert limited.groupby("model_fold").size().tolist() == [4, 4, 4]
    assert set(limited[limited["model_fold"] == 0]["label"]) == {"negative", "typical", "atypical"}
    train = training_rows(limited, 1, 3)
    assert len(train) == 3 and 1 not in set(train["model_fold"])
    assert set(train["label"]) == {"negative", "typical", "atypical"}
    assert len(training_rows(limited, 1, None)) == 8  # not a dry run: every other fold


def test_prepare_notebook_runs_on_synthetic_data(tiny_input, tmp_path):
    run_dir = tmp_path / "run"
    runs = run_pipeline("smoke", input_dir=tiny_input, run_dir=run_dir, only=["00"])
    assert [r.name for r in runs] == ["00_prepare_data"]
    assert runs[0].peak_rss_mib > 50  # the kernel's own peak memory, read before it shut down
    assert json.loads((run_dir / "stages.json").read_text())[0]["peak_rss_mib"] == runs[0].peak_rss_mib
    executed = nbformat.read(run_dir / "notebooks" / "00_prepare_data.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and '"prepared_size": 256' in injected[0].source  # in the overrides dict
    prepared = run_dir / "prepared"
    meta = pd.read_csv(prepared / "meta.csv")
    n_dicoms = sum(len(siim.dicom_paths(tiny_input / siim.COMPETITION, s)) for s in ("train", "test"))
    assert len(meta) == n_dicoms and (meta["status"] == "ok").all()
    assert len(list((prepared / "train").glob("*.png"))) == (meta["split"] == "train").sum()
    folds = pd.read_csv(prepared / "folds.csv")
    assert sorted(folds["fold"].unique()) == list(range(5))
    assert (prepared / "examples.png").stat().st_size > 10_000
    assert json.dumps(executed.metadata["papermill"]["parameters"])  # papermill recorded the run


def test_a_failing_notebook_names_itself_and_its_cell(tmp_path, monkeypatch):
    books = tmp_path / "notebooks"
    (books / "profiles").mkdir(parents=True)
    (books / "profiles" / "smoke.yaml").write_text("common: {}\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, books / "01_broken.ipynb")
    monkeypatch.setenv("COVIDKIT_NOTEBOOKS", str(books))
    assert notebooks_dir() == books
    with pytest.raises(PipelineError, match=r"01_broken.ipynb failed in cell 2: ValueError: boom"):
        run_pipeline("smoke", input_dir=tmp_path, run_dir=tmp_path / "run")


def test_a_run_that_made_a_submission_ends_with_where_things_are(tmp_path, tiny_input, capsys):
    from covidkit.pipeline import print_outputs

    run_dir, submission = tmp_path / "run", tmp_path / "sub" / "submission.csv"
    profile = {"07_make_submission": {"submission": str(submission)}}
    print_outputs(profile, run_dir, tiny_input, {}, ran=["05_ensemble_wbf"])
    assert capsys.readouterr().out == "" and not (run_dir / "report.html").exists()

    print_outputs(profile, run_dir, tiny_input, {}, ran=["06_study_level", "07_make_submission"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines == {"submission": str(submission), "models": str(run_dir / "models"),
                     "report": str(run_dir / "report.html")}
    assert "covidkit run report" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_full_profile_dry_run_of_the_stages_that_fit_the_suite(tmp_path, capsys):
    """`covidkit pipeline --profile full --dry-run`, for 00, 01 and 11: the full profile's models at their full
    sizes (ResNeXt-101 32x8d from fabricated ImageNet weights, DeCoVNet at 224 x 336) on a few items and two steps
    each; the whole dry run is in the README (too long for the suite)."""
    from covidkit.models.backbones import load_backbone
    from covidkit.models.pretrained import fabricate
    from covidkit.synth import SynthConfig, write_all
    from covidkit.synth.ct_volumes import CTVolumeSynthConfig, write_ct_volumes

    input_dir, run_dir = tmp_path / "input", tmp_path / "run"
    write_all(input_dir, SynthConfig(seed=9, train_studies=12, test_studies=4, nih_images=16, rsna_images=4,
                                     max_size=640, nih_size=256, rsna_size=256, workers=1, ct=False))
    write_ct_volumes(input_dir, CTVolumeSynthConfig(seed=3, cases=10, min_slices=10, max_slices=14, size=64))
    fabricate(input_dir, arch="resnext101_32x8d", yolo="yolo11n")
    runs = run_pipeline("full", input_dir=input_dir, run_dir=run_dir, only=["00", "01", "11"], dry_run=True)

    record = json.loads((run_dir / "dry_run.json").read_text())
    assert [r["stage"] for r in record] == ["00_prepare_data", "01_pretrain_nih_resnext", "11_ct_decovnet"]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 100 for r in record)
    assert not (run_dir / "stages.json").exists()
    layout = RunLayout(run_dir)
    assert layout.prepare.size == 1024
    arch, state = load_backbone(layout.nih_pretrain.backbone)
    assert arch == "resnext101_32x8d" and state["layer4.2.conv3.weight"].shape == (2048, 2048, 1, 1)
    history = pd.read_csv(layout.nih_pretrain.train / "metrics.csv")
    assert len(history) <= 2 and history["train_loss"].notna().all()  # two optimizer steps in all
    metrics = json.loads(layout.ct_decovnet.metrics.read_text())
    assert metrics["train_cases"] <= 4 and metrics["test_cases"] <= 4
    history = pd.read_csv(layout.ct_decovnet.classifier / "metrics.csv")
    assert len(history) <= 2 and history["train_loss"].notna().all()  # two optimizer steps in all
    assert runs[-1].output.is_file()
    out = capsys.readouterr().out  # two steps per model learn nothing: no verdicts, and it says why
    assert DRY_RUN_CHECKS in out and "DID NOT LEARN" not in out


@pytest.mark.slow
def test_a_dry_run_with_one_pseudo_label_round_goes_through_every_stage(tiny_input, tmp_path, capsys):
    """`covidkit pipeline --dry-run --rounds 1` through all eleven notebooks (the smoke profile's models: the full
    profile's whole dry run takes 29 minutes, README), then round 1 (03-07) on round 0's pseudo-labels of an
    external folder (issue 33) in its own folder: every stage leaves its outputs; out of fold, both rounds score
    the competition's labelled images only, the same ones; YOLO's lists hold the pseudo-labelled images in training
    only; each round exports a complete models folder and a valid submission (the run's is the last round's);
    dry_run.json has a row per notebook run; run again, every stage of both rounds is skipped."""
    import contextlib
    import io

    from conftest import TINY

    from covidkit.data.siim import COMPETITION
    from covidkit.kaggle import check_models
    from covidkit.oof import read_oof
    from covidkit.pseudo import read_pseudo_labels
    from covidkit.stages import pseudo_label
    from covidkit.submission import validate_files
    from covidkit.synth import SynthConfig, write_external
    from covidkit.synth.ct_slices import CTSynthConfig, write_ct_slices
    from covidkit.synth.ct_volumes import CTVolumeSynthConfig, write_ct_volumes

    input_dir, run_dir = tmp_path / "input", tmp_path / "run"
    input_dir.mkdir()
    for dataset in tiny_input.iterdir():  # the radiographs of the session's tiny set, and small CT sets beside
        (input_dir / dataset.name).symlink_to(dataset)
    write_ct_slices(input_dir, CTSynthConfig(seed=2, medseg_slices=20, medseg_size=64, rp_volumes=0))
    write_ct_volumes(input_dir, CTVolumeSynthConfig(seed=3, cases=10, min_slices=10, max_slices=14, size=64))
    with contextlib.redirect_stdout(io.StringIO()):
        write_external(input_dir, SynthConfig(**{**TINY, "external_images": 8, "external_duplicates": 0.25}))
    args = dict(input_dir=input_dir, run_dir=run_dir, dry_run=True, rounds=1,
                settings={"08.external": ["synthetic"], "08.include_test": True})
    runs = run_pipeline("smoke", **args)
    layout = RunLayout(run_dir)
    last = RunLayout(layout.round_dir(1))
    record = json.loads(layout.dry_run_record.read_text())
    assert [r["stage"] for r in record] == [r.name for r in runs] and len(runs) == 11 + 5
    assert [r.name for r in runs[11:]] == [f"round1/0{i}_{n}" for i, n in
                                           [(3, "train_siim_fasterrcnn"), (4, "train_siim_yolo"), (5, "ensemble_wbf"),
                                            (6, "study_level"), (7, "make_submission")]]
    for path in (layout.prepare.meta_csv, layout.prepare.folds_csv, layout.nih_pretrain.backbone, layout.rsna_yolo.weights,
                 layout.siim_fasterrcnn.oof, layout.siim_fasterrcnn.untrained_oof, layout.siim_yolo.oof, layout.ensemble_wbf.fusion,
                 layout.ensemble_wbf.fused_oof, layout.study_level.oof_images, layout.study_level.summary,
                 layout.submission.models / "manifest.json", layout.pseudo_label.table, layout.ct_cogseg.ablation,
                 layout.ct_decovnet.metrics, layout.report):
        assert path.is_file(), path
    for history in layout.siim_fasterrcnn.dir.glob("fold*/metrics.csv"):
        assert len(pd.read_csv(history)) <= 2  # two optimizer steps in all
    assert last.round == 1 and last.prepare.dir == layout.prepare.dir and [r.round for r in layout.rounds()] == [0, 1]

    pseudo = set(read_pseudo_labels(layout.pseudo_label.table)["image_id"])
    assert pseudo
    for stage in ("03_train_siim_fasterrcnn", "04_train_siim_yolo", "06_study_level"):
        assert f"pseudo_labels: {layout.pseudo_label.table}" in last.settings(stage).read_text()
    for fold in (0, 1):  # round 1's YOLO lists: the pseudo-labelled images train every split, validate none
        trained, held = ((last.siim_yolo.data / f"fold{fold}_{part}.txt").read_text() for part in ("train", "val"))
        assert any(f"/{i}.png" in trained for i in pseudo) and not any(f"/{i}.png" in held for i in pseudo)
    for r in (layout, last):  # out of fold: the competition's labelled images only, the same ones in both rounds
        scored = [set(read_oof(r.siim_fasterrcnn.oof).images["image_id"]), set(read_oof(r.siim_yolo.oof).images["image_id"]),
                  set(read_oof(r.ensemble_wbf.fused_oof).images["image_id"]),
                  set(pd.read_csv(r.study_level.oof_images, dtype={"image_id": str})["image_id"])]
        assert all(ids and not ids & pseudo for ids in scored)
    assert set(read_oof(last.siim_fasterrcnn.oof).images["image_id"]) == set(
        read_oof(layout.siim_fasterrcnn.oof).images["image_id"])

    manifest = check_models(last.submission.models)  # complete, every hash checked
    assert manifest["models"]["fasterrcnn"] and manifest["models"]["study"]
    sample = input_dir / COMPETITION / "sample_submission.csv"
    submission = layout.submission.dry_run_csv
    assert validate_files(submission, sample) == []  # the last round's
    assert validate_files(layout.submission.round_csv, sample) == []  # round 0's, beside its stage
    out = capsys.readouterr().out
    assert f"models: {last.submission.models}" in out
    assert f"submission: {submission}" in out and DRY_RUN_CHECKS in out

    rounds = pseudo_label.rounds_table(layout)  # the report's per-round table
    assert list(rounds.index) == [0, 1] and list(rounds["pseudo-labelled images"]) == [0, len(pseudo)]
    assert rounds["OOF opacity AP@0.5 (05)"].notna().all() and rounds["OOF study mAP (06)"].notna().all()
    assert "Pseudo-label rounds" in layout.report.read_text()

    again = run_pipeline("smoke", **args)
    assert all(r.skipped for r in again) and len(again) == len(runs)
