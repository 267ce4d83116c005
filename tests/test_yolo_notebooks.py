"""Notebooks 02 (RSNA pretraining) and 04 (SIIM K-fold fine-tuning) under papermill, smoke profile, tiny data."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from covidkit.prepare import train_table
from covidkit.data import rsna, siim
from covidkit.oof import opacity_ap, read_oof
from covidkit.pipeline import load_profile, run_pipeline
from covidkit.layout import RunLayout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_input, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("yolo_run")
    run_pipeline("smoke", input_dir=tiny_input, run_dir=out, only=["00", "02", "04"])
    return out


def notebook_text(run_dir: Path, name: str) -> str:
    """Every output of an executed notebook, as text."""
    nb = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{name}: {out.get('ename')}: {out.get('evalue')}"
            parts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_02_converts_rsna_and_pretrains(run_dir, tiny_input):
    params = load_profile("smoke")["02_pretrain_rsna_yolo"]
    notebook_text(run_dir, "02_pretrain_rsna_yolo")
    labels = rsna.read_labels(tiny_input / rsna.COMPETITION / rsna.LABELS_CSV)
    out = run_dir / "02_pretrain_rsna_yolo"
    meta = pd.read_csv(out / "data" / "meta.csv")
    assert sorted(meta["image_id"]) == sorted(labels["image_id"]) and (meta["status"] == "ok").all()
    for row in labels.itertuples():
        label_file = out / "data" / "labels" / f"{row.image_id}.txt"
        assert len(label_file.read_text().splitlines()) == len(row.boxes)

    train = out / "train"
    args = yaml.safe_load((train / "args.yaml").read_text())
    assert args["seed"] == 42 and args["deterministic"] is True and args["model"] == params["model"]
    assert len(pd.read_csv(train / "results.csv")) == params["epochs"]
    assert (train / "results.png").is_file() and (train / "weights" / "best.pt").is_file()


def test_04_writes_out_of_fold_predictions_in_original_pixels(run_dir, tiny_input):
    text = notebook_text(run_dir, "04_train_siim_yolo")
    table = train_table(run_dir / "prepared", tiny_input / siim.COMPETITION)
    out = run_dir / "04_train_siim_yolo"
    oof = read_oof(out / "oof.csv")

    evaluated = oof.images.set_index("image_id")["fold"].sort_index()
    expected = table.set_index("image_id")["fold"].sort_index()
    pd.testing.assert_series_equal(evaluated, expected, check_dtype=False)  # every image once, in its own fold
    groups = load_profile("smoke")["04_train_siim_yolo"]["fold_groups"]
    folds = sorted(set(table["fold"] % groups))
    assert sorted(p.name for p in out.glob("fold*") if p.is_dir()) == [f"fold{k}" for k in folds]
    for fold in folds:  # one model per fold, trained on the other folds' images only
        args = yaml.safe_load((out / f"fold{fold}" / "args.yaml").read_text())
        assert Path(args["model"]) == run_dir / "02_pretrain_rsna_yolo" / "train" / "weights" / "best.pt"
        assert Path(args["data"]).name == f"fold{fold}.yaml"
        trained_on = {Path(line).stem for line in (out / "data" / f"fold{fold}_train.txt").read_text().split()}
        assert trained_on == set(table.loc[table["fold"] % groups != fold, "image_id"])
    assert RunLayout(run_dir).siim_yolo.folds("results.csv") == [out / f"fold{k}" for k in folds]

    boxes = oof.boxes.merge(table[["image_id", "orig_height", "orig_width"]], on="image_id")
    assert len(boxes) > 0 and (boxes["score"].between(0, 1)).all()
    assert (boxes["x1"] >= 0).all() and (boxes["x2"] <= boxes["orig_width"] + 1e-6).all()
    assert (boxes["y1"] >= 0).all() and (boxes["y2"] <= boxes["orig_height"] + 1e-6).all()
    prepared_size = load_profile("smoke")["00_prepare_data"]["prepared_size"]
    assert (boxes[["x2", "y2"]].to_numpy() > prepared_size).any()  # scaled back from the prepared PNGs

    summary = json.loads((out / "summary.json").read_text())
    truth = dict(zip(table["image_id"], table["boxes"]))
    assert summary["oof_ap50"] == pytest.approx(opacity_ap(oof, truth))
    assert summary["untrained_ap50"] == pytest.approx(opacity_ap(read_oof(out / "oof_untrained.csv"), truth))
    assert f"OOF opacity AP@0.5: {summary['oof_ap50']:.4f}" in text
    assert np.isfinite(summary["oof_ap50"])
    # the prior-box detector on the same images and folds (covidkit.baselines)
    from covidkit.baselines import prior_box_oof

    prior = prior_box_oof(table.assign(model_fold=table["fold"] % groups), "model_fold")
    assert summary["prior_box_ap50"] == pytest.approx(opacity_ap(prior, truth))
