"""The CogSeg network's shapes and branches, and the paper's segmentation metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covidkit.ct.cogseg.model import CogSeg, CogSegConfig
from covidkit.ct.cogseg.metrics import ConfusionMatrix, summarize


def test_cogseg_outputs_at_twice_the_input_resolution():
    torch.manual_seed(0)
    model = CogSeg(CogSegConfig(base_channels=4))
    out = model(torch.rand(2, 1, 32, 32))  # training mode: both decoders
    assert out["seg"].shape == (2, 4, 64, 64)
    assert out["sr"].shape == (2, 1, 64, 64)
    assert [f.shape[-1] for f in out["seg_features"]] == [4, 8, 16, 32]
    assert [f.shape for f in out["seg_features"]] == [f.shape for f in out["sr_features"]]


def test_cogseg_inference_runs_the_segmentation_path_alone():
    torch.manual_seed(0)
    model = CogSeg(CogSegConfig(base_channels=4)).eval()
    x = torch.rand(1, 1, 32, 32)
    out = model(x)
    assert "sr" not in out
    probs = model.predict_proba(x)
    assert probs.shape == (1, 4, 64, 64)
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 64, 64), atol=1e-5)
    # the SR decoder does not influence the segmentation
    with torch.no_grad():
        for p in model.sr_decoder.parameters():
            p.add_(1.0)
    assert torch.allclose(model.predict_proba(x), probs)


def test_baseline_has_no_sr_decoder_and_checks_the_input_side():
    model = CogSeg(CogSegConfig(base_channels=4, sr=False))
    assert model.sr_decoder is None
    assert "sr" not in model(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.rand(1, 1, 24, 20))


def test_metrics_on_a_hand_counted_example():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(torch.as_tensor(target), torch.as_tensor(pred))
    m = summarize(cm)
    # ground-glass (1): TP 2, FP 1, FN 1, TN 4
    assert m["IoU/ground-glass"] == pytest.approx(2 / 4)
    assert m["DSC/ground-glass"] == pytest.approx(4 / 6)
    assert m["sensitivity/ground-glass"] == pytest.approx(2 / 3)
    assert m["specificity/ground-glass"] == pytest.approx(4 / 5)
    # consolidation (2): TP 1, FP 0, FN 1, TN 6
    assert m["DSC/consolidation"] == pytest.approx(2 / 3)
    assert m["specificity/consolidation"] == pytest.approx(1.0)
    # effusion (3) absent from both: undefined, left out of the lesion means
    assert math.isnan(m["DSC/pleural effusion"])
    assert m["DSC"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert m["mIoU"] == pytest.approx((2 / 4 + 1 / 2) / 2)


def test_metrics_accumulate_and_skip_ignored_pixels():
    cm = ConfusionMatrix(4)
    target = torch.tensor([[1, 1, 255], [2, 3, 0]])
    cm.update(target, torch.tensor([[1, 1, 3], [2, 3, 0]]))
    cm.update(target[:1], torch.tensor([[1, 1, 2]]))
    assert int(cm.matrix.sum()) == 7
    per_class = cm.per_class()
    assert np.allclose(per_class["DSC"], 1.0)
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(target, torch.zeros(3))
