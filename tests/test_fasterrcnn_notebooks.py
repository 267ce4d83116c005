"""Notebooks 01 and 03 end to end under papermill, in the smoke profile, on the tiny synthetic competition."""
from __future__ import annotations

import json
import math

import nbformat
import pandas as pd
import pytest

from covidkit.prepare import train_table
from covidkit.data.detection import truth_boxes
from covidkit.data.siim import COMPETITION
from covidkit.layout import RunLayout
from covidkit.layout import DETECTOR_FILE
from covidkit.models import load_backbone
from covidkit.oof import BOX_COLUMNS, opacity_ap, read_oof


def _outputs_text(path) -> str:
    book = nbformat.read(path, as_version=4)
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream" else
                         json.dumps(out.get("data", {})))
    return "\n".join(parts)


@pytest.mark.slow
def test_notebooks_01_and_03_in_the_smoke_profile(tiny_input, tmp_path):
    from covidkit.pipeline import list_notebooks, load_profile, run_notebook, run_pipeline

    run_dir = tmp_path / "run"
    runs = run_pipeline("smoke", input_dir=tiny_input, run_dir=run_dir, only=["00", "01"])
    epochs = 2  # the smoke profile's detector, fewer epochs: the plumbing (test_fasterrcnn checks that it learns)
    runs.append(run_notebook(list_notebooks(["03"])[0], load_profile("smoke"), run_dir,
                             {"input_dir": str(tiny_input), "run_dir": str(run_dir), "epochs": epochs,
                              "eval_every": 1}))
    assert [r.name for r in runs] == ["00_prepare_data", "01_pretrain_nih_resnext", "03_train_siim_fasterrcnn"]

    # 01: the backbone 03 loads, per-label AUROC, curves
    nih = run_dir / "01_pretrain_nih_resnext"
    arch, _ = load_backbone(nih / "backbone.pt")
    assert arch == load_profile("smoke")["01_pretrain_nih_resnext"]["arch"]
    assert len(pd.read_csv(nih / "auroc.csv")) == 15 + 1  # the labels, then the mean over the counted ones
    assert (nih / "train" / "plots" / "loss.png").is_file()
    assert "mean held-out AUROC over them" in _outputs_text(runs[1].output)

    # 03: every prepared training image has an out-of-fold prediction, in original pixels
    det = run_dir / "03_train_siim_fasterrcnn"
    table = train_table(run_dir / "prepared", tiny_input / COMPETITION)
    oof = read_oof(det / "oof.csv")
    assert (det / "oof.csv").read_text().splitlines()[0] == ",".join(BOX_COLUMNS)
    assert sorted(oof.images["image_id"]) == sorted(table["image_id"])
    folds = table.set_index("image_id")["fold"]
    assert (oof.images.set_index("image_id")["fold"] == folds.loc[oof.images["image_id"]]).all()
    sizes = table.set_index("image_id").loc[oof.boxes["image_id"]]
    assert (oof.boxes["x2"].to_numpy() <= sizes["orig_width"].to_numpy() + 1e-3).all()
    assert (oof.boxes["y2"].to_numpy() <= sizes["orig_height"].to_numpy() + 1e-3).all()
    assert read_oof(det / "oof_untrained.csv").images.shape == oof.images.shape
    summary = json.loads((det / "summary.json").read_text())  # the OOF AP beside its two baselines
    assert summary["oof_ap50"] == pytest.approx(opacity_ap(oof, truth_boxes(table)))
    assert 0 <= summary["prior_box_ap50"] <= 1 and 0 <= summary["untrained_ap50"] <= 1

    # per-epoch validation AP of each fold's model, logged and plotted
    for fold in (0, 1):
        metrics = pd.read_csv(det / f"fold{fold}" / "metrics.csv")
        assert list(metrics["epoch"]) == list(range(1, epochs + 1)) and "val_ap50" in metrics
        assert (det / f"fold{fold}" / "plots" / "val_ap50.png").is_file()
    assert RunLayout(run_dir).siim_fasterrcnn.folds(DETECTOR_FILE) == [det / "fold0", det / "fold1"]

    # the notebook reports the AP it wrote
    ap = opacity_ap(oof, truth_boxes(table))
    assert math.isfinite(ap)
    assert f"out-of-fold opacity AP@0.5: {ap:.3f}" in _outputs_text(runs[2].output)
