"""covidkit.records: which stages a rerun of the pipeline skips, resumes or starts afresh, and why."""
import os

from covidkit import records


def _complete_stage(run_dir, stage="05_ensemble_wbf", settings=None):
    out = run_dir / stage
    out.mkdir(parents=True)
    (out / "fusion.json").write_text('{"iou_thr": 0.55}')
    settings = settings or {"iou_thr": 0.55, "workers": 2}
    inputs = {"data": {"siim-covid19-detection": "abc"}, "upstream": {"03_train_siim_fasterrcnn": "d1"}}
    record = records.StageRecord(run_dir, stage, settings, inputs)
    record.running()
    record.complete(1.0, None)
    return records.read_record(run_dir, stage), settings, inputs


def test_a_complete_stage_with_the_same_settings_and_inputs_is_skipped(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    assert record["status"] == "complete" and "05_ensemble_wbf/fusion.json" in record["outputs"]
    assert records.decide(record, settings, inputs, tmp_path) == records.Decision(False, "complete")
    # how it runs (workers, device ...) is not what it computes: still skipped
    assert not records.decide(record, settings | {"workers": 8}, inputs, tmp_path).run


def test_a_changed_setting_reruns_afresh_and_names_it(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    decision = records.decide(record, settings | {"iou_thr": 0.4}, inputs, tmp_path)
    assert decision.run and decision.clean and decision.reason == "settings changed: iou_thr 0.55 -> 0.4"


def test_a_stage_after_one_that_ran_again_reruns(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    upstream = {"data": inputs["data"], "upstream": {"03_train_siim_fasterrcnn": "d2"}}
    decision = records.decide(record, settings, upstream, tmp_path)
    assert decision.run and decision.clean and decision.reason == "03_train_siim_fasterrcnn ran again"
    changed_data = {"data": {"siim-covid19-detection": "xyz"}, "upstream": inputs["upstream"]}
    assert records.decide(record, settings, changed_data, tmp_path).reason == "input siim-covid19-detection changed"


def test_a_changed_or_missing_output_reruns(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    path = tmp_path / "05_ensemble_wbf" / "fusion.json"
    path.write_text('{"iou_thr": 0.99}')
    os.utime(path, ns=(1, 1))
    assert records.decide(record, settings, inputs, tmp_path).reason == f"output {path} changed"
    path.unlink()
    assert records.decide(record, settings, inputs, tmp_path).reason == f"output {path} is missing"


def test_an_interrupted_stage_resumes_unless_its_settings_changed(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    stopped = records.StageRecord(tmp_path, "05_ensemble_wbf", settings, inputs)
    stopped.stopped("interrupted")
    record = records.read_record(tmp_path, "05_ensemble_wbf")
    decision = records.decide(record, settings, inputs, tmp_path)
    assert decision.run and not decision.clean and decision.reason.startswith("interrupted before: resuming it")
    decision = records.decide(record, settings | {"iou_thr": 0.4}, inputs, tmp_path)
    assert decision.run and decision.clean and "starting it afresh" in decision.reason


def test_force_and_a_missing_record_run_the_stage(tmp_path):
    record, settings, inputs = _complete_stage(tmp_path)
    assert records.decide(record, settings, inputs, tmp_path, forced="--force") == records.Decision(True, "--force", True)
    assert records.decide(None, settings, inputs, tmp_path).reason == "no completion record"


def test_each_stage_declares_what_it_reads():
    from covidkit.stages import STAGES, stage_module

    for stage in STAGES:
        module = stage_module(stage)
        assert set(module.UPSTREAM) <= set(STAGES) and all(up < stage for up in module.UPSTREAM), stage
        assert module.DATASETS, stage


def test_a_renamed_setting_alone_does_not_rerun_a_finished_stage(tmp_path):
    """A record written under a setting's old name (03's ``splits`` and ``folds``, now ``train_folds``) matches
    the new name: in the notebook's ``overrides`` (what the runner records) and at the top (a notebook that
    declares it)."""
    for stage in ("03_train_siim_fasterrcnn", "04_train_siim_yolo"):
        run = tmp_path / stage
        old = {"run_dir": str(run), "profile": None, "overrides": {"splits": [0], "epochs": 3}}
        record, _, inputs = _complete_stage(run, stage, old)
        new = old | {"overrides": {"train_folds": [0], "epochs": 3}}
        assert records.decide(record, new, inputs, run) == records.Decision(False, "complete")
        decision = records.decide(record, old | {"overrides": {"train_folds": [1], "epochs": 3}}, inputs, run)
        assert decision.run and decision.reason.startswith("settings changed: overrides")
        record, _, inputs = _complete_stage(run / "flat", stage, {"splits": [0]})
        assert not records.decide(record, {"train_folds": [0]}, inputs, run / "flat").run
        record, _, inputs = _complete_stage(run / "older", stage, {"folds": [0]})
        assert not records.decide(record, {"train_folds": [0]}, inputs, run / "older").run


def test_a_stage_declares_what_it_writes_outside_its_folder(tmp_path):
    from covidkit.layout import RunLayout
    from covidkit.profiles import REPO_ROOT

    layout = RunLayout(tmp_path)
    assert records.stage_outputs("00_prepare_data", tmp_path, {}) == [layout.prepare.dir]
    submission = tmp_path / "out" / "submission.csv"
    assert records.stage_outputs("07_make_submission", tmp_path, {"submission": str(submission)}) == \
        [layout.submission.models, layout.submission.fresh_tests, submission]
    assert records.stage_outputs("07_make_submission", tmp_path, {"submission": "submissions/s.csv"})[-1] == \
        REPO_ROOT / "submissions" / "s.csv"
    assert records.stage_outputs("05_ensemble_wbf", tmp_path, {}) == [tmp_path / "05_ensemble_wbf"]
    assert records.stage_outputs("20_my_notebook", tmp_path, {}) == [tmp_path / "20_my_notebook"]  # no stage
