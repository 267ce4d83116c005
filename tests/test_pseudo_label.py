"""Stage 08 and the pseudo-label rows of 03, 04 and 06: off by default, copies of test images never pseudo-labelled,
soft labels that are distributions, and no pseudo-labelled image ever held out or scored out of fold."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidkit.data.external import external_id
from covidkit.data.siim import COMPETITION
from covidkit.engine.kfold import fold_table
from covidkit.layout import RunLayout
from covidkit.prepare import prepare
from covidkit.pseudo import (
    PSEUDO_COLUMNS, SOFT_COLUMNS, WEIGHT, add_pseudo_rows, read_pseudo_labels, sampled, training_rows, with_soft_labels,
)
from covidkit.stages import pseudo_label
from covidkit.synth import SynthConfig, write_external, write_siim
from covidkit.synth.external import duplicates_csv

# half of the external images are near-duplicates of SIIM train and test images
CFG = SynthConfig(seed=11, train_studies=12, test_studies=8, max_size=320, min_size=256, workers=1, ct=False,
                  external_images=16, external_duplicates=0.5)


def test_off_writes_an_empty_table_quickly(tmp_path):
    cfg = pseudo_label.Config(input_dir=str(tmp_path / "input"), run_dir=str(tmp_path / "run"))
    result = pseudo_label.run(cfg)
    layout = RunLayout(tmp_path / "run")
    assert result.table.empty and list(pd.read_csv(layout.pseudo_label.table).columns) == PSEUDO_COLUMNS
    assert read_pseudo_labels(layout.pseudo_label.table).empty
    assert json.loads(layout.pseudo_label.summary.read_text()) == {"enabled": False, "images": 0}
    assert pseudo_label.describe(result).count("\n") == 0 and "off" in pseudo_label.describe(result)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, models_dir) -> tuple[Path, pseudo_label.Result]:
    """08 on a synthetic external set: its input folder and the result."""
    out = tmp_path_factory.mktemp("pseudo")
    input_dir, run_dir = out / "input", out / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        write_siim(input_dir, CFG)
        write_external(input_dir, CFG)
        prepare(input_dir / COMPETITION, RunLayout(run_dir).prepare.dir, size=256, workers=1, folds=2, progress=False)
    point = RunLayout(run_dir).ensemble_wbf.operating_point
    point.parent.mkdir(parents=True)
    point.write_text('{"threshold": 0.02}')  # what 05 chose out of fold (the tiny models score low)
    cfg = pseudo_label.Config(input_dir=str(input_dir), run_dir=str(run_dir), external=["synthetic"],
                              include_test=True, models_dir=str(models_dir), device="cpu", workers=1, progress=False)
    return input_dir, pseudo_label.run(cfg)


def test_copies_of_test_images_are_dropped_and_soft_labels_are_distributions(labelled):
    input_dir, result = labelled
    table = read_pseudo_labels(RunLayout(result.out_dir.parent).pseudo_label.table)
    truth = pd.read_csv(duplicates_csv(input_dir), dtype=str)
    test_copies = {external_id(p) for p in truth.loc[truth["siim_split"] == "test", "path"]}
    assert test_copies  # the set plants some
    external = table[table["source"] == "external"]
    assert not test_copies & set(external["image_id"])
    assert len(external) + result.summary["dropped_as_duplicates"] == CFG.external_images
    # the competition's test images, each once
    test = table[table["source"] == "test"]
    prepared = pd.read_csv(RunLayout(result.out_dir.parent).prepare.meta_csv, dtype={"image_id": str})
    assert sorted(test["image_id"]) == sorted(prepared.loc[prepared["split"] == "test", "image_id"])
    np.testing.assert_allclose(table[SOFT_COLUMNS].sum(axis=1), 1.0, atol=1e-4)
    assert table[SOFT_COLUMNS + ["p_none"]].stack().between(0, 1).all()
    # pseudo-boxes: 05's operating point, inside the original image
    assert result.summary["box_threshold"] == 0.02 and "05" in result.summary["box_threshold_from"]
    for boxes, scores, h, w in zip(table["boxes"], table["scores"], table["orig_height"], table["orig_width"]):
        assert len(boxes) == len(scores) and (scores >= 0.02).all()
        assert (boxes[:, [0, 2]] <= w + 1e-3).all() and (boxes[:, [1, 3]] <= h + 1e-3).all()
    assert result.summary["with_pseudo_boxes"] == sum(len(b) > 0 for b in table["boxes"])
    assert RunLayout(result.out_dir.parent).pseudo_label.figure.is_file()


def test_pseudo_rows_are_training_rows_the_datasets_read(labelled):
    """A split's training rows with the pseudo-labelled ones (what 03, 04 and 06 train on): 03's and 06's datasets
    read them, with the pseudo-boxes and the soft labels; labelled rows keep their one-hot labels at weight 1."""
    from covidkit.data.detection import OpacityDataset
    from covidkit.data.study import StudyImageDataset
    from covidkit.models.study import StudySpec, train_transform
    from covidkit.transforms import DetectionAugment, detection_transform

    input_dir, result = labelled
    layout = RunLayout(result.out_dir.parent)
    table = fold_table(layout.prepare.train_table(input_dir / COMPETITION), 2)
    pseudo = sampled(training_rows(layout.pseudo_label.table), 1.0, seed=0)
    rows = add_pseudo_rows(table[table["model_fold"] != 0], pseudo)
    assert rows["pseudo"].sum() == len(pseudo) and (rows.loc[rows["pseudo"], "model_fold"] == -1).all()
    detection = OpacityDataset(rows, detection_transform(DetectionAugment(), train=False))
    for i in np.flatnonzero(rows["pseudo"].to_numpy())[:3]:
        assert len(detection[i][1]["boxes"]) == len(rows["boxes"].iloc[i])
    soft = with_soft_labels(rows, 0.5)
    assert soft.loc[soft["pseudo"], WEIGHT].eq(0.5).all() and soft.loc[~soft["pseudo"], WEIGHT].eq(1.0).all()
    one_hot = soft.loc[~soft["pseudo"], SOFT_COLUMNS].to_numpy()
    assert (one_hot.sum(1) == 1).all() and set(np.unique(one_hot)) == {0.0, 1.0}
    spec = StudySpec(encoder="plain", width=4, input_size=64, prepared_size=256)
    first = int(np.flatnonzero(soft["pseudo"].to_numpy())[0])
    _, target = StudyImageDataset(soft, train_transform(spec))[first]
    np.testing.assert_allclose(target["soft"].numpy(), soft[SOFT_COLUMNS].iloc[first].to_numpy(float), rtol=1e-6)
    assert target["weight"] == 0.5


def test_a_sampling_weight_draws_each_image_that_often_on_average():
    rows = pd.DataFrame({"image_id": [f"x{i}" for i in range(400)]})
    assert len(sampled(rows, 2.0, 0)) == 800 and sampled(rows, 0.0, 0).empty
    half = sampled(rows, 0.5, 0)
    assert 160 < len(half) < 240 and half["image_id"].is_unique
    assert len(sampled(rows, 1.5, 0)) == pytest.approx(600, abs=40)


def test_the_study_loss_on_soft_labels_and_weights():
    """One-hot soft labels at weight 1 give the ordinary loss; an image at weight 0 does not count."""
    import torch

    from covidkit.models.study import study_loss

    torch.manual_seed(0)
    out = {"study": torch.randn(3, 4), "none": torch.randn(3), "mask": torch.randn(3, 1, 8, 8)}
    hard = {"label": torch.tensor([0, 2, 1]), "none": torch.tensor([1.0, 0.0, 0.0]),
            "mask": (torch.rand(3, 1, 16, 16) > 0.7).float()}
    soft = {**hard, "soft": torch.eye(4)[hard["label"]], "weight": torch.ones(3)}
    total, parts = study_loss(out, hard, none_weight=0.5)
    soft_total, soft_parts = study_loss(out, soft, none_weight=0.5)
    assert soft_total.item() == pytest.approx(total.item(), rel=1e-5)
    # weight 0 on the last image: the loss of the first two alone
    dropped = study_loss(out, {**soft, "weight": torch.tensor([1.0, 1.0, 0.0])}, none_weight=0.5)[0]
    first_two = study_loss({k: v[:2] for k, v in out.items()}, {k: v[:2] for k, v in hard.items()}, none_weight=0.5)[0]
    assert dropped.item() == pytest.approx(first_two.item(), rel=1e-5)
    # a soft label pulls towards a mixture: the uniform label's loss is lowest at equal logits
    uniform = {**soft, "soft": torch.full((3, 4), 0.25)}
    flat = {**out, "study": torch.zeros(3, 4)}
    assert study_loss(flat, uniform)[1]["ce"] < study_loss(out, uniform)[1]["ce"]


def test_rounds_refuse_to_start_with_nothing_to_pseudo_label(tmp_path):
    from covidkit.pipeline import PipelineError, run_pipeline

    with pytest.raises(PipelineError, match="08 is off"):
        run_pipeline("smoke", input_dir=tmp_path, run_dir=tmp_path / "run", rounds=1)
    with pytest.raises(PipelineError, match="needs the notebooks"):
        run_pipeline("smoke", input_dir=tmp_path, run_dir=tmp_path / "run", only=["00", "03"], rounds=1)
    assert not (tmp_path / "run").exists()
