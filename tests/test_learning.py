"""Learning checks: a model that did not learn gets a red banner in the report and a line at the pipeline's end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from covidkit.prepare import train_table
from covidkit.data.siim import COMPETITION, STUDY_CLASSES
from covidkit.layout import RunLayout
from covidkit.baselines import prior_box_oof
from covidkit.learning import MIN_SPREAD, RIVAL_MARGIN, LearningCheck, check_run
from covidkit.oof import OofPredictions, box_rows, opacity_ap, write_oof
from covidkit.report import learning_banners, learning_section, write_report


@pytest.fixture(scope="module")
def prepared_run(tiny_input, tmp_path_factory):
    from covidkit.prepare import prepare

    run = tmp_path_factory.mktemp("run")
    prepare(tiny_input / COMPETITION, run / "prepared", size=64, workers=1, folds=2, progress=False)
    return run, train_table(run / "prepared", tiny_input / COMPETITION)


def _learned_boxes(table: pd.DataFrame) -> OofPredictions:
    """A detector that found every true box (moved a little), and one weak false box per image."""
    rng = np.random.default_rng(0)
    parts = []
    for image_id, fold, boxes, h, w in zip(table["image_id"], table["fold"], table["boxes"],
                                           table["orig_height"], table["orig_width"]):
        found = boxes + rng.normal(0, 2.0, boxes.shape) if len(boxes) else np.zeros((0, 4))
        scores = np.concatenate([rng.uniform(0.6, 1.0, len(found)), [0.1]])
        parts.append(box_rows(image_id, fold, np.vstack([found, [[0.1 * w, 0.1 * h, 0.3 * w, 0.3 * h]]]), scores))
    return OofPredictions.from_parts(parts, table[["image_id", "fold"]])


def test_a_detector_replaced_by_its_untrained_twin_gets_the_banner(prepared_run, tiny_input, tmp_path, capsys):
    from covidkit.models.fasterrcnn import DetectorSpec, build_fasterrcnn
    from covidkit.pipeline import print_learning
    from covidkit.stages.siim_fasterrcnn import predict_oof

    run, table = prepared_run
    torch.manual_seed(0)
    spec = DetectorSpec(input_size=64, fpn_layers=(3, 4), anchor_sizes=(8, 16, 32), proposals_train=64,
                        proposals_test=32, box_batch_size_per_image=32, representation_size=32)
    untrained = predict_oof(build_fasterrcnn(arch="resnet18", spec=spec).eval(), table, 64, 64, torch.device("cpu"), 4)
    out = RunLayout(tmp_path).siim_fasterrcnn
    write_oof(out.untrained_oof, untrained)
    (tmp_path / "prepared").symlink_to(run / "prepared")

    write_oof(out.oof, _learned_boxes(table))
    # without the prior-box figure in 03's summary the check is there, failed, and says what is missing
    untrained_check, prior_check = check_run(tmp_path, tiny_input)
    assert untrained_check.learned and prior_check.status == "missing" and prior_check.failed
    assert "no prior_box_ap50" in prior_check.verdict
    truth = dict(zip(table["image_id"], table["boxes"]))
    prior_ap = opacity_ap(prior_box_oof(table.assign(model_fold=table["fold"]), "model_fold"), truth)
    out.summary.write_text(json.dumps({"prior_box_ap50": prior_ap}))
    untrained_check, prior_check = check_run(tmp_path, tiny_input)
    assert untrained_check.stage == "03_train_siim_fasterrcnn" and untrained_check.baseline_name == "untrained"
    assert untrained_check.learned and untrained_check.value > 0.9
    assert prior_check.baseline_name == "prior boxes" and prior_check.baseline == prior_ap < 0.9
    assert prior_check.learned and prior_check.value == untrained_check.value
    page = write_report(tmp_path, input_dir=tiny_input).read_text()
    assert 'class="banner"' not in page and "Did every model learn?" in page
    assert f"<td>prior boxes</td><td>{prior_ap:.3f}</td>" in page
    print_learning(check_run(tmp_path, tiny_input), ran=["03_train_siim_fasterrcnn"])
    assert capsys.readouterr().out.startswith("every model learned")

    write_oof(out.oof, untrained)  # what 03 writes when its model is the untrained one
    untrained_check, prior_check = check_run(tmp_path, tiny_input)
    assert not untrained_check.learned and untrained_check.value == untrained_check.baseline
    assert prior_check.status == "not above" and untrained_check.status == "not above"
    page = write_report(tmp_path, input_dir=tiny_input).read_text()
    assert page.count('class="banner"') == 2
    assert "did not learn: 03_train_siim_fasterrcnn Faster R-CNN" in page
    print_learning(check_run(tmp_path, tiny_input), ran=["03_train_siim_fasterrcnn"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "DID NOT LEARN (2 of 2 checks):" and "03_train_siim_fasterrcnn Faster R-CNN" in lines[1]
    assert "(prior boxes): not above" in lines[2]


def test_a_constant_study_model_gets_the_banner_whatever_its_mean(prepared_run, tiny_input, tmp_path):
    from covidkit.stages.study_level import Config, write_tables
    from covidkit.study_scores import PROB_COLUMNS, none_comparison, study_probabilities, summarise

    _, table = prepared_run
    images = table[["image_id", "study_id", "fold", "label"]].assign(model_fold=table["fold"],
                                                                       has_box=table["boxes"].map(len) > 0)
    truth = np.eye(4)[[STUDY_CLASSES.index(c) for c in images["label"]]]
    for name, probs in {"learned": 0.7 * truth + 0.075, "constant": np.full_like(truth, 0.25)}.items():
        images[PROB_COLUMNS] = probs
        images["p_none_head"] = np.where(images["has_box"], 0.2, 0.8)
        studies = study_probabilities(images)
        run = tmp_path / name
        write_tables(Config(run_dir=str(run)), images, studies, summarise(images, studies), None,
                     none_comparison(images, studies))
        [check] = check_run(run, tiny_input)
        if name == "learned":
            assert check.learned and check.verdict == "learned"
        else:
            assert check.spread < MIN_SPREAD and check.constant and check.verdict.startswith("constant output")
            assert "did not learn: 06_study_level study model" in write_report(run).read_text()


def test_verdicts():
    above = LearningCheck("s", "m", "AP", 0.30, 0.10, "untrained", 0.05, spread=0.2)
    assert above.learned and above.verdict == "learned"
    assert not LearningCheck("s", "m", "AP", 0.14, 0.10, "untrained", 0.05).learned
    assert "needs > 0.150" in LearningCheck("s", "m", "AP", 0.14, 0.10, "untrained", 0.05).verdict
    assert not LearningCheck("s", "m", "AUC", 0.9, 0.5, "chance", 0.05, spread=0.0).learned
    assert not LearningCheck("s", "m", "AUC", float("nan"), 0.5, "chance", 0.05).learned
    assert "0.300 against 0.100 (untrained): learned" in above.line()
    assert LearningCheck("s", "m", "AP", 0.14, 0.10, "untrained", 0.05).verdict.startswith("not above")


def test_a_rival_within_the_seed_spread_is_a_tie_and_a_missing_figure_fails():
    """Against a rival trained model a difference within the margin is a tie (shown, not failed); beyond it
    either way, learned or not above. A check whose figure is absent fails and says missing."""
    def fused(value):
        return LearningCheck("05", "WBF", "AP", value, 0.40, "YOLO alone", RIVAL_MARGIN, rival=True)

    assert fused(0.43).learned and fused(0.43).status == "learned"
    for value in (0.41, 0.40, 0.385):
        assert fused(value).status == "tie" and not fused(value).learned and not fused(value).failed
        assert fused(value).verdict.startswith("tie")
    assert fused(0.37).status == "not above" and fused(0.37).failed
    # not a rival: a figure within the margin of a trivial baseline is not above it
    assert LearningCheck("03", "m", "AP", 0.41, 0.40, "prior boxes", 0.05).status == "not above"
    absent = LearningCheck.absent("05", "WBF", "AP", "prior boxes", "no row 'prior boxes'")
    assert absent.status == "missing" and absent.failed and not absent.learned
    assert absent.verdict == "missing: no row 'prior boxes'" and "against prior boxes: missing" in absent.line()
    page = learning_section([fused(0.41), absent])
    assert '<td class="tie">tie' in page and '<td class="failed">missing: no row' in page
    assert learning_banners([fused(0.41), absent]).count('class="banner"') == 1


def test_fresh_test_sets_give_mean_spread_and_the_priors_baseline(models_dir, tmp_path):
    from covidkit.fresh_tests import read_fresh_test_sets, score_fresh_test_sets
    from covidkit.submission import validate_files

    fresh = score_fresh_test_sets(models_dir, tmp_path / "fresh", seeds=[3, 4], test_studies=3, workers=0,
                                  progress=False)
    assert list(fresh.per_seed["seed"]) == [3, 4] and (fresh.per_seed["studies"] == 3).all()
    for seed in (3, 4):
        folder = tmp_path / "fresh" / f"seed{seed}"
        sample = folder / COMPETITION / "sample_submission.csv"
        assert not (folder / COMPETITION / "train_image_level.csv").exists()  # a test split alone
        assert validate_files(folder / "submission.csv", sample) == []
        assert validate_files(folder / "prior_submission.csv", sample) == []
    assert fresh.per_seed["mAP"].between(0, 1).all() and fresh.per_seed["prior_mAP"].between(0, 1).all()
    assert fresh.mean == pytest.approx(fresh.per_seed["mAP"].mean())
    assert fresh.std == pytest.approx(fresh.per_seed["mAP"].std())
    assert read_fresh_test_sets(tmp_path / "fresh").per_seed.equals(pd.read_csv(fresh.path))
    # a second call reuses the written test sets (same data, same scores)
    again = score_fresh_test_sets(models_dir, tmp_path / "fresh", seeds=[3, 4], test_studies=3, workers=0,
                                  progress=False)
    pd.testing.assert_frame_equal(again.per_seed, fresh.per_seed)
    summary = json.dumps(fresh.summary())
    assert "seeds 3, 4" in summary and "priors" in summary


def test_a_constant_segmenter_and_a_chance_ct_classifier_get_the_banner(tmp_path):
    """10: the untrained CogSeg (its head at the class prior: one class everywhere) as a variant is constant, a
    perfect map learned; 11: a constant probability is flagged whatever its AUC; 01: the mean against untrained."""
    from covidkit.ct.cogseg.ablation import UNTRAINED, AblationConfig, build_variant, evaluate_model, load_splits
    from covidkit.ct.cogseg.medseg import NUM_CLASSES, CTSegDataset
    from covidkit.ct.cogseg.metrics import ConfusionMatrix, summarize
    from covidkit.ct.cogseg.ablation import output_summary
    from covidkit.synth.ct_slices import CTSynthConfig, write_ct_slices

    write_ct_slices(tmp_path / "input", CTSynthConfig(seed=2, medseg_slices=20, medseg_size=64, rp_volumes=0))
    cfg = AblationConfig(input_dir=str(tmp_path / "input"), run_dir=str(tmp_path / "x"), output_size=64,
                         base_channels=4, augment=False, progress=False)
    train, test = (CTSegDataset(s) for s in load_splits(cfg))
    untrained = evaluate_model(build_variant("U-Net", cfg, train)[0].eval(), test)
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(test.masks, test.masks)
    perfect = {**summarize(cm), **output_summary(test.masks.numpy(), test.masks.numpy())}
    layout = RunLayout(tmp_path / "run")
    layout.ct_cogseg.dir.mkdir(parents=True)
    pd.DataFrame([{"dataset": "medseg", "variant": UNTRAINED, **untrained},
                  {"dataset": "medseg", "variant": "U-Net", **untrained},
                  {"dataset": "medseg", "variant": "+edge-guided RMI", **perfect}]).to_csv(layout.ct_cogseg.ablation)
    layout.ct_decovnet.dir.mkdir(parents=True)
    layout.ct_decovnet.metrics.write_text(json.dumps({"roc_auc": 0.8, "n": 6}))
    pd.DataFrame({"case_id": list("abcdef"), "label": [0, 1] * 3, "prob": [0.5] * 6}).to_csv(
        layout.ct_decovnet.predictions, index=False)
    layout.nih_pretrain.dir.mkdir(parents=True)
    layout.nih_pretrain.summary.write_text(json.dumps({"mean_auroc": 0.7, "untrained_mean_auroc": 0.5,
                                              "counted_positives": {"Effusion": 12, "Mass": 10}}))

    checks = {(c.model, c.baseline_name): c for c in check_run(layout.root)}
    assert checks["U-Net (medseg)", "untrained"].constant and not checks["U-Net (medseg)", "untrained"].learned
    full = checks["+edge-guided RMI (medseg)", "untrained"]
    assert full.learned and full.value == 1.0
    # the full method against the plain U-Net, its rival trained model
    against_unet = checks["+edge-guided RMI (medseg)", "U-Net"]
    assert against_unet.rival and against_unet.learned and against_unet.baseline == untrained["DSC"]
    assert checks["DeCoVNet", "chance"].constant and not checks["DeCoVNet", "chance"].learned  # an old run
    assert checks["NIH backbone", "untrained"].learned and "2 labels" in checks["NIH backbone", "untrained"].figure

    # CogSeg without its plain U-Net row: the rival check is missing, and fails
    pd.DataFrame([{"dataset": "medseg", "variant": UNTRAINED, **untrained},
                  {"dataset": "medseg", "variant": "+edge-guided RMI", **perfect}]).to_csv(layout.ct_cogseg.ablation)
    checks = {(c.model, c.baseline_name): c for c in check_run(layout.root)}
    assert checks["+edge-guided RMI (medseg)", "U-Net"].status == "missing"


def _decovnet_run(root, metrics: dict | None, probs=(0.1, 0.9, 0.2, 0.8, 0.3, 0.7)) -> RunLayout:
    layout = RunLayout(root)
    layout.ct_decovnet.dir.mkdir(parents=True)
    if metrics is not None:
        layout.ct_decovnet.metrics.write_text(json.dumps(metrics))
    pd.DataFrame({"case_id": list("abcdef"), "label": [0, 1] * 3, "prob": list(probs)}).to_csv(
        layout.ct_decovnet.predictions, index=False)
    return layout


def test_decovnet_is_checked_against_the_better_hu_histogram_classifier(tmp_path):
    """11's metrics.json: roc_auc against max(hist_auc, hu_share_auc), margin 0.05; chance without them; missing
    when 11 ran but wrote no AUC."""
    localization = {"hit_rate_cam": 0.5, "hit_rate_density": 0.4, "localization": "cam x density"}
    base = {"roc_auc": 0.9, "n": 6, **localization}
    cases = {"above": ({**base, "hist_auc": 0.7, "hu_share_auc": 0.8}, "learned", 0.8, "HU histogram"),
             "tied": ({**base, "hist_auc": 0.88, "hu_share_auc": 0.6}, "not above", 0.88, "HU histogram"),
             "one": ({**base, "hist_auc": None, "hu_share_auc": 0.7}, "learned", 0.7, "HU histogram"),
             "old": ({"roc_auc": 0.9, "n": 6}, "learned", 0.5, "chance")}
    for name, (metrics, status, baseline, baseline_name) in cases.items():
        [check] = check_run(_decovnet_run(tmp_path / name, metrics).root)
        assert (check.status, check.baseline, check.baseline_name) == (status, baseline, baseline_name), name
        assert check.value == 0.9 and check.margin == 0.05 and check.stage == "11_ct_decovnet"
    for name, metrics in {"no_metrics": None, "nan_auc": {"roc_auc": float("nan"), "n": 6}}.items():
        [check] = check_run(_decovnet_run(tmp_path / name, metrics).root)
        assert check.status == "missing" and check.failed, name
    assert check_run(tmp_path / "nothing_ran") == []


def test_the_fusion_against_the_better_detector_and_the_prior_boxes(tmp_path):
    """05's AP table: the fusion ties with the better detector within RIVAL_MARGIN, must beat the prior boxes by
    AP_MARGIN; a table without the prior-box row (an old run) fails as missing."""
    from covidkit.stages.ensemble_wbf import ENSEMBLE, PRIOR_BOXES

    layout = RunLayout(tmp_path)
    layout.ensemble_wbf.dir.mkdir(parents=True)
    for fused, prior, expected in [(0.55, 0.20, ("learned", "learned")), (0.51, 0.20, ("tie", "learned")),
                                   (0.45, 0.42, ("not above", "not above"))]:
        pd.DataFrame({"model": ["Faster R-CNN", "YOLO", ENSEMBLE, PRIOR_BOXES], "images": 10, "predicted_boxes": 9,
                      "ap50": [0.40, 0.50, fused, prior]}).to_csv(layout.ensemble_wbf.ap_table, index=False)
        rival, baseline = check_run(tmp_path)
        assert (rival.status, baseline.status) == expected
        assert (rival.baseline, rival.baseline_name, rival.rival) == (0.50, "YOLO alone", True)
        assert (baseline.baseline, baseline.baseline_name, baseline.rival) == (prior, "prior boxes", False)
    pd.DataFrame({"model": ["Faster R-CNN", "YOLO", ENSEMBLE], "images": 10, "predicted_boxes": 9,
                  "ap50": [0.40, 0.50, 0.6]}).to_csv(layout.ensemble_wbf.ap_table, index=False)
    rival, baseline = check_run(tmp_path)
    assert rival.learned and baseline.status == "missing" and "prior boxes" in baseline.verdict


def test_the_fusion_tuned_per_fold_is_compared_by_the_mean_of_its_folds(tmp_path):
    """With the honest row (parameters tuned on the other folds), 05's checks read the ``ap50_fold_mean`` column
    of every row: here a tie with Faster R-CNN there, where the AP over all folds would say "not above"."""
    from covidkit.stages.ensemble_wbf import ENSEMBLE, FOLD_MEAN_FIGURE, PRIOR_BOXES, TUNED_OOF

    layout = RunLayout(tmp_path)
    layout.ensemble_wbf.dir.mkdir(parents=True)
    pd.DataFrame({"model": ["Faster R-CNN", "YOLO", ENSEMBLE, TUNED_OOF, PRIOR_BOXES], "images": 10,
                  "predicted_boxes": 9, "ap50": [0.656, 0.573, 0.638, 0.596, 0.116],
                  "ap50_fold_mean": [0.661, 0.580, 0.650, 0.650, 0.120]}).to_csv(layout.ensemble_wbf.ap_table,
                                                                                 index=False)
    rival, baseline = check_run(tmp_path)
    assert (rival.model, rival.figure, rival.value, rival.baseline) == (TUNED_OOF, FOLD_MEAN_FIGURE, 0.650, 0.661)
    assert rival.status == "tie" and baseline.learned and baseline.baseline == 0.120


def test_the_stacker_is_checked_against_the_box_count_rule(tmp_path):
    """06: the study model against the priors only; the stacker against the priors and the box-count rule, which
    fails as missing when the summary lacks it."""
    from covidkit.study_scores import PROB_COLUMNS

    layout = RunLayout(tmp_path)
    layout.study_level.dir.mkdir(parents=True)
    pd.DataFrame(np.random.default_rng(0).dirichlet(np.ones(4), 8), columns=PROB_COLUMNS).to_csv(
        layout.study_level.oof_studies, index=False)
    prior = {"negative": 0.3, "typical": 0.4, "indeterminate": 0.2, "atypical": 0.1, "mAP": 0.25, "none": 0.3}
    summary = {"study_ap": {"mAP": 0.5}, "study_ap_stacked": {"mAP": 0.6}, "prior": prior,
               "box_count_rule": {"mAP": 0.52, "threshold": 0.4}}
    layout.study_level.summary.write_text(json.dumps(summary))
    checks = {(c.model, c.baseline_name): c for c in check_run(tmp_path)}
    assert list(checks) == [("study model", "class priors"), ("study model + boxes (stacker)", "class priors"),
                            ("study model + boxes (stacker)", "box-count rule")]
    assert checks["study model + boxes (stacker)", "box-count rule"].learned
    layout.study_level.summary.write_text(json.dumps({**summary, "box_count_rule": {"mAP": 0.58}}))
    assert check_run(tmp_path)[2].status == "not above"
    del summary["box_count_rule"]
    layout.study_level.summary.write_text(json.dumps(summary))
    assert check_run(tmp_path)[2].status == "missing"
    layout.study_level.summary.unlink()  # 06 ran (its folder exists) but wrote no summary
    [check] = check_run(tmp_path)
    assert check.status == "missing" and check.model == "study model"
