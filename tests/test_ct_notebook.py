"""notebooks/10_ct_cogseg.ipynb runs with the smoke profile on synthetic CT and writes its table and figures."""
from __future__ import annotations

import pandas as pd
import pytest

from covidkit.synth.ct_slices import CTSynthConfig, write_ct_slices


@pytest.mark.slow
def test_cogseg_notebook_smoke(tmp_path):
    from covidkit.pipeline import list_notebooks, load_profile, run_notebook

    write_ct_slices(tmp_path, CTSynthConfig(seed=2, medseg_slices=40, medseg_size=128, rp_volumes=0))
    run = run_notebook(list_notebooks(["10"])[0], load_profile("smoke"), run_dir=tmp_path / "run",
                       overrides={"input_dir": str(tmp_path), "run_dir": str(tmp_path / "run"),
                                  "epochs": 2})  # the plumbing; test_ct_train checks that the variants learn
    assert run.output.is_file()
    out = tmp_path / "run" / "10_ct_cogseg"
    table = pd.read_csv(out / "ablation.csv")
    assert table["variant"].tolist() == ["untrained", "U-Net", "+SR (1 L1)", "+SR (4 L1)", "+RMI", "+edge-guided RMI"]
    assert table[["mIoU", "DSC", "sensitivity", "specificity"]].notna().all().all()
    assert (out / "predictions_medseg.png").stat().st_size > 0
    assert (out / "training_curves_medseg.png").stat().st_size > 0
