"""DeCoVNet: volume I/O (DICOM, NIfTI, HU, window, resampling), lung masks, the network, localization, metrics."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from covidkit.ct.decovnet import volumes as V
from covidkit.ct.decovnet.model import DeCoVNet, scaled_pools
from covidkit.ct.decovnet.method import (AugmentConfig, augment_volume, classification_metrics, classifier_arrays,
                                        lung_box, to_input)
from covidkit.ct.decovnet.localize import (LocalizationConfig, class_activation_map, hit_rate, hu_to_level, is_hit,
                                           localize, localize_lesion)
from covidkit.ct.decovnet.lungmask import LungUNet, choose_lung_mask, dice, predict_lung_mask, unsupervised_lung_mask
from covidkit.synth.ct_volumes import CTVolumeSynthConfig, synth_volume, write_ct_volumes


def _hu_volume(seed: int = 0, shape=(6, 20, 24)) -> np.ndarray:
    """Integer HU with an asymmetric pattern, so that any flip or slice reordering shows."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 1500, size=shape).astype(np.float32)
    hu[:, :3, :5] = 2000.0  # anterior, patient-right corner of every slice
    hu[0] = -1000.0  # the most inferior slice is air
    return hu


# ---------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("slices", [1, 4, 19])
def test_decovnet_maps_any_number_of_slices_to_two_logits(slices):
    model = DeCoVNet(input_size=(48, 72))
    x = torch.rand(2, 2, slices, 48, 72)
    logits = model(x)
    assert logits.shape == (2, 2)
    logits.sum().backward()  # trainable end to end, whatever T is
    assert model.stem[0].weight.grad is not None and torch.isfinite(model.stem[0].weight.grad).all()


def test_default_decovnet_is_the_paper_configuration():
    model = DeCoVNet().eval()
    stem = model.stem[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (2, 16, (5, 7, 7), (1, 2, 2))
    assert scaled_pools((224, 336)) == ((16, 24, 36), (4, 12, 18), (1, 6, 9))
    convs = [m for m in model.classifier.features if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 64), (64, 32), (32, 32)]
    with torch.no_grad():
        for slices in (1, 3):
            assert model(torch.rand(1, 2, slices, 224, 336)).shape == (1, 2)


def test_decovnet_rejects_a_4d_input():
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        DeCoVNet(input_size=(32, 48))(torch.rand(2, 5, 32, 48))


# ---------------------------------------------------------------------------------------------- volumes


def test_dicom_series_gives_hu_from_the_rescale_tags_in_slice_order(tmp_path):
    hu = _hu_volume()
    V.write_dicom_series(tmp_path / "a", hu, (2.5, 0.7, 0.8), intercept=-1024, slope=1)
    hu2 = np.round(hu / 2) * 2
    V.write_dicom_series(tmp_path / "b", hu2, (2.5, 0.7, 0.8), intercept=-2048, slope=2)
    import pydicom

    stored = pydicom.dcmread(next((tmp_path / "b").iterdir()))
    assert stored.pixel_array.min() >= 0 and float(stored.RescaleSlope) == 2.0  # raw values are not HU
    for folder, expected in (("a", hu), ("b", hu2)):
        volume = V.read_volume(tmp_path / folder)
        assert volume.spacing == pytest.approx((2.5, 0.7, 0.8))
        np.testing.assert_array_equal(volume.hu, expected)


def test_window_maps_the_decovnet_range_to_8_bits():
    hu = np.array([-3000.0, -1200.0, -300.0, 600.0, 2000.0])
    np.testing.assert_array_equal(V.window(hu), [0, 0, 128, 255, 255])
    assert V.window(hu).dtype == np.uint8
    assert V.window(np.array([-50.0, 50.0]), -100, 100).tolist() == [64, 191]
    with pytest.raises(ValueError):
        V.window(hu, 10, 10)


def test_nifti_and_dicom_of_one_volume_read_the_same(tmp_path):
    hu = _hu_volume(seed=3)
    spacing = (3.0, 0.75, 0.75)
    V.write_dicom_series(tmp_path / "case", hu, spacing)
    V.write_nifti(tmp_path / "case.nii.gz", hu, spacing)
    dicom, nifti = V.read_volume(tmp_path / "case"), V.read_volume(tmp_path / "case.nii.gz")
    np.testing.assert_array_equal(dicom.hu, nifti.hu)
    assert dicom.spacing == pytest.approx(spacing) and nifti.spacing == pytest.approx(spacing)


def test_nifti_is_shown_in_the_radiological_view(tmp_path):
    import nibabel as nib

    data = np.zeros((8, 6, 4), np.int16)  # (i, j, k) with an identity affine: RAS+
    data[0, :, :] = 100  # i = 0: the patient's left side
    data[:, -1, :] += 10  # j max: anterior
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "x.nii.gz")
    hu = V.read_nifti(tmp_path / "x.nii.gz").hu
    assert hu.shape == (4, 6, 8)
    assert (hu[:, :, -1] >= 100).all() and (hu[:, :, :-1] < 100).all()  # patient left on the image right
    assert (hu[:, 0, :] % 100 == 10).all()  # anterior at the top


def test_resample_reaches_the_target_spacing():
    image = np.random.default_rng(0).random((10, 40, 30)).astype(np.float32)
    out, spacing = V.resample(image, (5.0, 1.0, 1.0), (2.5, 2.0, None))
    assert out.shape == (20, 20, 30) and spacing == pytest.approx((2.5, 2.0, 1.0))
    mask = np.zeros((10, 40, 30), np.uint8)
    mask[2:5] = 1
    out_mask, _ = V.resample(mask, (5.0, 1.0, 1.0), (2.5, 2.0, None), order=0)
    assert set(np.unique(out_mask)) == {0, 1} and out_mask.sum() == 6 * 20 * 30


def test_read_cases_finds_both_formats_and_reports_bad_input(tmp_path):
    root = write_ct_volumes(tmp_path, CTVolumeSynthConfig(seed=1, cases=4, min_slices=8, max_slices=10, size=48))
    cases = V.read_cases(root)
    assert len(cases) == 4 and {c.volume.is_dir() for c in cases} == {True, False}
    assert all((c.lesions is not None) == (c.label == 1) for c in cases)
    table = pd.read_csv(root / V.LABELS_CSV)
    table.loc[0, "label"] = "maybe"
    table.to_csv(root / V.LABELS_CSV, index=False)
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        V.read_cases(root)
    pd.DataFrame({"case_id": ["nope"], "label": [1]}).to_csv(root / V.LABELS_CSV, index=False)
    with pytest.raises(FileNotFoundError, match="no volume for case 'nope'"):
        V.read_cases(root)


# ---------------------------------------------------------------------------------------------- lung masks


def test_unsupervised_lung_mask_overlaps_the_true_lungs():
    rng = np.random.default_rng(5)
    for positive in (True, False):
        phantom = synth_volume(rng, slices=24, size=96, positive=positive)
        mask = unsupervised_lung_mask(phantom.hu.astype(np.float32), phantom.spacing)
        assert dice(mask, phantom.lungs) > 0.9
        assert not mask[:, :, :3].any()  # the air around the body is not lung


def test_a_lung_mask_over_the_air_around_the_body_is_replaced_by_the_unsupervised_one():
    phantom = synth_volume(np.random.default_rng(2), slices=16, size=64, positive=True)
    hu = phantom.hu.astype(np.float32)
    unsupervised = unsupervised_lung_mask(hu, phantom.spacing)
    all_air = hu < -320  # what an undertrained U-Net marks: every dark voxel, the air around the body too
    assert all_air[:, :, 0].all() and dice(all_air, unsupervised) < 0.5
    mask, fell_back = choose_lung_mask(all_air, unsupervised)
    assert fell_back and not mask[:, :, 0].any() and dice(mask, phantom.lungs) > 0.9
    slightly_off = np.roll(unsupervised, 1, axis=2)  # a good U-Net mask differs a little: it is kept
    mask, fell_back = choose_lung_mask(slightly_off, unsupervised)
    assert not fell_back and mask is slightly_off
    mask, fell_back = choose_lung_mask(all_air, np.zeros_like(unsupervised))  # nothing better to fall back to
    assert not fell_back and mask is all_air


def test_lung_unet_is_applied_slice_by_slice_at_any_volume_size():
    torch.manual_seed(0)
    model = LungUNet(width=4, depth=3)
    assert model(torch.rand(2, 1, 32, 48)).shape == (2, 1, 32, 48)
    image = np.random.default_rng(0).integers(0, 255, (5, 40, 52), dtype=np.uint8)
    mask = predict_lung_mask(model, image, size=32)
    assert mask.shape == image.shape and mask.dtype == bool
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 1, 30, 32))


def test_classifier_input_is_cropped_to_the_lungs_and_resized():
    image = np.zeros((12, 50, 60), np.uint8)
    lungs = np.zeros_like(image, bool)
    lungs[3:9, 10:30, 20:50] = True
    image[lungs] = 200
    assert lung_box(lungs, margin=(0, 0, 0)) == (slice(3, 9), slice(10, 30), slice(20, 50))
    arrays = classifier_arrays(image, lungs, lungs, input_size=(16, 24))
    assert arrays["image"].shape == arrays["lungs"].shape == arrays["lesions"].shape == (8, 16, 24)
    per_slice = arrays["lungs"].any(axis=(1, 2))
    assert per_slice[1:-1].all() and not per_slice[0] and not per_slice[-1]  # one slice of margin in z
    assert arrays["lungs"][4, 8, 12] and not arrays["lungs"][4, 0, 0]  # a few pixels of margin in-plane


def test_the_input_window_maps_hu_to_0_1_inside_the_lungs_and_clips():
    """Aerated lung (-850 HU) and the masked-out body read 0, ground glass (-500) about half, consolidation and
    vessels (above -200) 1; without a window, the 8-bit image over 255."""
    hu = np.array([[[-850.0, -500.0, -200.0, 40.0]]])
    arrays = {"image": V.window(hu), "lungs": np.array([[[1, 1, 1, 0]]], np.uint8)}
    image, lungs = to_input(arrays, input_window=(-800.0, -200.0))
    np.testing.assert_allclose(image[0, 0].numpy(), [0.0, 0.5, 1.0, 0.0], atol=0.02)
    assert lungs[0, 0].tolist() == [1, 1, 1, 0]
    paper = to_input(arrays)[0, 0, 0].numpy()
    np.testing.assert_allclose(paper, arrays["image"][0, 0] * np.array([1, 1, 1, 0]) / 255.0, atol=1e-6)
    assert to_input(arrays, mask_outside_lungs=False, input_window=(-800.0, -200.0))[0, 0, 0, 3] == 1.0
    with pytest.raises(ValueError, match="must rise"):
        to_input(arrays, input_window=(-200.0, -800.0))


def test_augmentation_moves_both_channels_together_and_keeps_the_image_range():
    x = torch.zeros(2, 6, 32, 48)
    x[0, :, 8:24, 4:20] = 0.6
    x[1, :, 8:24, 4:20] = 1.0
    shift_only = AugmentConfig(rotation=0.0, translate=0.0, scale=(1.0, 1.0), shear=0.0, brightness=(1.0, 1.0),
                               contrast=(1.0, 1.0))
    torch.testing.assert_close(augment_volume(x, shift_only), x)  # the identity map changes nothing
    g = torch.Generator().manual_seed(0)
    y = augment_volume(x, AugmentConfig(), generator=g)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.equal(y[1], x[1])  # moved
    moved = y[1] > 0.5
    assert (y[0][moved] > 0).all() and (y[0][y[1] < 0.01] < 0.05).all()  # the image moved with the mask
    assert torch.equal(y[:, 0], y[:, 3])  # one map for every slice


# ---------------------------------------------------------------------------------------------- localization


def _hand_made_case():
    """A lung block with a dense lesion (labelled), an as large dense patch (not labelled), a thin bright vessel
    and a small nodule."""
    shape = (10, 40, 40)
    image = np.full(shape, round(hu_to_level(-850)), np.uint8)
    lungs = np.zeros(shape, bool)
    lungs[1:9, 4:36, 4:36] = True
    lesions = np.zeros(shape, bool)
    lesions[3:7, 8:18, 22:32] = True
    image[lesions] = round(hu_to_level(-400))
    image[3:7, 24:34, 22:32] = round(hu_to_level(-400))  # dense, as large, but not where the network looks
    image[:, 20, 6:34] = round(hu_to_level(40))  # a vessel: one pixel wide, removed by the opening
    image[5:7, 28:32, 6:10] = round(hu_to_level(40))  # a small dense nodule
    image[~lungs] = round(hu_to_level(40))
    return image, lungs, lesions


def test_localization_weighs_the_cam_by_the_density_of_the_candidates():
    image, lungs, lesions = _hand_made_case()
    cfg = LocalizationConfig(opening_radius=1, density_sigma=(0.7, 2.0, 2.0))
    cam = np.full(image.shape, 0.2, np.float32)
    cam[2:8, 6:20, 20:34] = 1.0  # on the labelled lesion and around it
    cam[:, 19:22, :] = 1.0  # on the vessel: gone with the opening
    result = localize_lesion(cam, image, lungs, cfg)
    assert result.candidates == 3  # the lesion, the unlabelled patch and the nodule; not the vessel
    assert is_hit(result.centre, lesions)
    assert result.lesion[tuple(int(c) for c in result.centre)] and (result.lesion <= lesions).all()
    # a CAM that looks as much at the lesion as at the nodule: the denser cluster, the lesion, wins
    flat = np.where(lungs, 1.0, 0.0).astype(np.float32)
    flat[:, 22:36, 20:34] = 0.0  # not at the unlabelled patch (a tie with the lesion)
    assert is_hit(localize_lesion(flat, image, lungs, cfg).centre, lesions)
    # a CAM on the unlabelled patch alone misses, though the patch is as dense as the lesion
    wrong = np.zeros_like(cam)
    wrong[3:7, 24:34, 22:32] = 1.0
    missed = localize_lesion(wrong, image, lungs, cfg)
    assert not is_hit(missed.centre, lesions) and missed.lesion.any()
    # no candidate under the CAM: its peak inside the lungs
    peak_only = np.zeros_like(cam)
    peak_only[2, 6, 6] = 1.0
    assert localize_lesion(peak_only, image, lungs, cfg).centre == (2.0, 6.0, 6.0)
    assert localize_lesion(np.zeros_like(cam), image, lungs, cfg).centre is None
    assert hit_rate([result.centre, missed.centre, None], [lesions] * 3) == pytest.approx(1 / 3)


def test_the_density_rule_ignores_the_cam_and_the_cam_rule_follows_it():
    image, lungs, lesions = _hand_made_case()
    wrong = np.zeros(image.shape, np.float32)
    wrong[3:7, 24:34, 22:32] = 1.0  # the CAM on the unlabelled patch only
    cam_rule = LocalizationConfig(rule="cam", opening_radius=1)
    density_rule = LocalizationConfig(rule="density", opening_radius=1)
    assert localize(wrong, image, lungs, cam_rule).centre == localize_lesion(wrong, image, lungs, cam_rule).centre
    assert not is_hit(localize(wrong, image, lungs, cam_rule).centre, lesions)
    # without the CAM: the densest candidate cluster; the lesion and the patch are equally dense, so one of them
    found = localize(wrong, image, lungs, density_rule)
    assert found.centre == localize(np.zeros_like(wrong), image, lungs, density_rule).centre
    assert is_hit(found.centre, lesions | (image == round(hu_to_level(-400))))
    with pytest.raises(ValueError, match="unknown localization rule"):
        localize(wrong, image, lungs, LocalizationConfig(rule="peak"))


def test_class_activation_map_has_the_input_shape():
    model = DeCoVNet(input_size=(32, 48))
    x = torch.rand(1, 2, 7, 32, 48)
    cam = class_activation_map(model, x)
    assert cam.shape == (7, 32, 48) and cam.min() >= 0 and cam.max() <= 1
    with torch.no_grad():  # predict_volume passes the features it computed for the probability
        features = model.forward_features(x)
    np.testing.assert_allclose(class_activation_map(model, x, features=features), cam, atol=1e-6)


def test_hit_needs_the_centre_inside_a_lesion():
    lesions = np.zeros((4, 10, 10), bool)
    lesions[1:3, 2:5, 2:5] = True
    assert is_hit((1.6, 3.0, 4.4), lesions)
    assert not is_hit((1.0, 6.0, 3.0), lesions) and not is_hit(None, lesions) and not is_hit((9, 9, 9), lesions)
    with pytest.raises(ValueError):
        hit_rate([None], [])


# ---------------------------------------------------------------------------------------------- metrics


def test_classification_metrics_at_one_half():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    probs = np.array([0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.3])
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(3 / 4)
    assert m["roc_auc"] == pytest.approx(10 / 12)  # 10 of the 12 positive-negative pairs are ordered right
    assert 0 < m["pr_auc"] <= 1
