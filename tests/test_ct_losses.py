"""RMI against the reference implementation's value, edge-guided RMI, and the combined CogSeg loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covidkit.ct.cogseg.losses import (
    CogSegLoss, CogSegLossConfig, EdgeGuidedRMILoss, RMILoss, predicted_edges, region_vectors,
)


def reference_case() -> tuple[torch.Tensor, torch.Tensor]:
    """The case whose value was computed with ZJULearning/RMI (sigmoid path, max pooling 3, R = 3)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 225).long()
    box = torch.zeros(64, 64, dtype=torch.long)
    box[10:40, 20:50] = 1
    f0 = 2 * torch.sin(xx / 7) * torch.cos(yy / 5) + 0.05 * (xx - yy)
    f1 = 1.5 * torch.cos((xx + yy) / 9) - 0.03 * xx
    logits = torch.stack([torch.stack([f0, -f0]), torch.stack([f1, -f1 + 0.5])]).float()
    return logits, torch.stack([disk, box])


def test_rmi_reproduces_the_reference_value():
    logits, labels = reference_case()
    loss = RMILoss(2, radius=3, pool="max", pool_size=3, bce_weight=0.5)
    total = loss(logits, labels)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(2.45291090, abs=1e-5)
    assert loss.last_parts["bce"] == pytest.approx(2.36045861, abs=1e-5)
    assert loss.last_parts["rmi"] == pytest.approx(2.54536343, abs=1e-5)


def test_rmi_pooling_and_weight_change_the_value():
    logits, labels = reference_case()
    values = {pool: RMILoss(2, pool=pool)(logits, labels).item() for pool in ("max", "avg", "none")}
    assert len({round(v, 6) for v in values.values()}) == 3
    pure_bce = RMILoss(2, bce_weight=1.0)
    assert pure_bce(logits, labels).item() == pytest.approx(pure_bce.last_parts["bce"], abs=1e-6)


def test_rmi_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pool"):
        RMILoss(2, pool="median")


def test_region_vectors_shift_y_outer_x_inner():
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)
    vecs = region_vectors(maps, 2)  # [1, 1, 4, 9]
    assert vecs.shape == (1, 1, 4, 9)
    # the first point (top-left window) is [m00, m01, m10, m11]
    assert vecs[0, 0, :, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_rmi_is_lower_for_a_better_prediction():
    _, labels = reference_case()
    one_hot = F.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    good = (one_hot * 2 - 1) * 4
    bad = torch.randn(good.shape, generator=torch.Generator().manual_seed(0))
    loss = RMILoss(2)
    assert loss(good, labels).item() < loss(bad, labels).item()


def test_rmi_ignores_pixels_labelled_255():
    logits, labels = reference_case()
    labels = labels.clone()
    labels[:, :8] = 255
    logits.requires_grad_(True)
    RMILoss(2, pool="none")(logits, labels).backward()
    assert torch.all(logits.grad[:, :, :8] == 0)
    assert logits.grad[:, :, 8:].abs().sum() > 0


def test_predicted_edges_are_the_boundary_pixels():
    logits = torch.zeros(1, 2, 12, 12)
    logits[0, 1, 3:7, 3:7] = 5.0  # a predicted 4x4 square
    edges = predicted_edges(logits)[0]
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[2:8, 2:8] = True
    expected[4:6, 4:6] = False  # the square's interior
    assert torch.equal(edges, expected)


def test_edge_guided_rmi_adds_an_edge_term_only_where_there_are_edges():
    logits, labels = reference_case()
    loss = EdgeGuidedRMILoss(2)
    total = loss(logits, labels)
    region = RMILoss(2)(logits, labels)
    assert loss.last_parts["edge_rmi"] != 0
    assert total.item() == pytest.approx(region.item() + loss.last_parts["edge_rmi"], abs=1e-5)

    flat = torch.zeros_like(logits)
    flat[:, 0] = 1.0  # background everywhere: no predicted edge, no edge term
    loss(flat, labels)
    assert loss.last_parts["edge_rmi"] == 0.0


def test_edge_guided_rmi_backpropagates():
    logits, labels = reference_case()
    logits.requires_grad_(True)
    EdgeGuidedRMILoss(2, pool="none")(logits, labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def model_outputs(n=2, classes=4, side=32, sr=True, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    out = {"seg": torch.randn(n, classes, side, side, generator=g),
           "seg_features": [torch.randn(n, 8, side // 2 ** k, side // 2 ** k, generator=g) for k in (4, 3, 2, 1)]}
    if sr:
        out["sr"] = torch.rand(n, 1, side, side, generator=g)
        out["sr_features"] = [torch.randn_like(f) for f in out["seg_features"]]
    return out


def test_cogseg_loss_parts_follow_the_variant():
    out = model_outputs()
    mask = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    image = torch.rand(2, 1, 32, 32)

    baseline = CogSegLoss(4, CogSegLossConfig(sr=False, feature_scales=0, rmi="none"))
    total = baseline(out, mask, image)
    assert set(baseline.last_parts) == {"ce"}
    assert total.item() == pytest.approx(F.cross_entropy(out["seg"], mask).item(), rel=1e-6)

    one_scale = CogSegLoss(4, CogSegLossConfig(feature_scales=1, rmi="none"))
    one_scale(out, mask, image)
    finest = F.l1_loss(out["seg_features"][-1], out["sr_features"][-1]).item()
    assert one_scale.last_parts["feature_l1"] == pytest.approx(0.5 * finest, rel=1e-6)
    assert one_scale.last_parts["sr"] == pytest.approx(0.5 * F.mse_loss(out["sr"], image).item(), rel=1e-6)

    full = CogSegLoss(4)
    total = full(out, mask, image)
    assert set(full.last_parts) == {"ce", "sr", "feature_l1", "rmi"}
    all_scales = sum(F.l1_loss(a, b).item() for a, b in zip(out["seg_features"], out["sr_features"]))
    assert full.last_parts["feature_l1"] == pytest.approx(0.5 * all_scales, rel=1e-5)
    assert total.item() == pytest.approx(sum(full.last_parts.values()), rel=1e-5)


def test_cogseg_loss_needs_the_sr_output():
    with pytest.raises(ValueError, match="SR output"):
        CogSegLoss(4)(model_outputs(sr=False), torch.zeros(2, 32, 32, dtype=torch.long), torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="SR branch"):
        CogSegLoss(4, CogSegLossConfig(sr=False, feature_scales=4))
