"""The MedSeg and Radiopaedia loaders, the paper's augmentation, and the synthetic CT writer."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covidkit.ct.cogseg.medseg import (
    MEDSEG_DIR, MEDSEG_MASKS, RADIOPAEDIA_DIR, RP_IMAGES, RP_MASKS, CTSegDataset, CTSlices, augment_paper,
    load_ct_dataset, lung_window, nifti_to_slices, slice_to_nifti,
)
from covidkit.synth.ct_slices import CTSynthConfig, ct_phantom, write_ct_slices

SMALL = CTSynthConfig(seed=3, medseg_slices=20, medseg_size=128, rp_volumes=4, rp_depth=3, rp_size=96)


@pytest.fixture(scope="module")
def ct_input(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct_input")
    write_ct_slices(out, SMALL)
    return out


def test_writer_uses_the_published_layouts(ct_input):
    image = nib.load(ct_input / MEDSEG_DIR / "tr_im.nii.gz")
    assert image.shape == (128, 128, 20)  # slices on the last axis, as tr_im.nii.gz
    assert sorted(p.name for p in (ct_input / RADIOPAEDIA_DIR / RP_IMAGES).iterdir()) == \
        [f"{i}.nii.gz" for i in range(1, 5)]
    assert nib.load(ct_input / RADIOPAEDIA_DIR / RP_MASKS / "4.nii.gz").shape == (96, 96, 3)


def test_medseg_loads_and_splits_70_30(ct_input):
    train, test = load_ct_dataset(ct_input, "medseg", size=64)
    assert (len(train), len(test)) == (14, 6)
    assert train.images.shape == (14, 64, 64) and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert set(np.unique(np.concatenate([train.masks, test.masks])).tolist()) == {0, 1, 2, 3}
    assert train.ids[0] == "medseg_000" and test.ids[0] == "medseg_014"


def test_radiopaedia_splits_by_volume(ct_input):
    with pytest.raises(ValueError, match="more than the 6 training"):
        load_ct_dataset(ct_input, "radiopaedia", size=64)  # only 4 volumes here
    from covidkit.ct.cogseg.medseg import load_radiopaedia

    train, test = load_radiopaedia(ct_input / RADIOPAEDIA_DIR, size=64, train_volumes=3)
    assert len(train) == 9 and len(test) == 3
    assert {i.split("_")[0] for i in test.ids} == {"rp4"}
    assert train.images.shape[1:] == (64, 64)  # resized from 96


def test_loaders_report_missing_and_bad_files(tmp_path, ct_input):
    with pytest.raises(FileNotFoundError, match="tr_im.nii.gz"):
        load_ct_dataset(tmp_path, "medseg")
    with pytest.raises(ValueError, match="unknown CT dataset"):
        load_ct_dataset(tmp_path, "mosmed")
    bad = tmp_path / MEDSEG_DIR
    bad.mkdir()
    (bad / "tr_im.nii.gz").write_bytes((ct_input / MEDSEG_DIR / "tr_im.nii.gz").read_bytes())
    mask = np.asarray(nib.load(ct_input / MEDSEG_DIR / MEDSEG_MASKS).dataobj).copy()
    mask[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(mask, np.eye(4)), bad / MEDSEG_MASKS)
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        load_ct_dataset(tmp_path, "medseg")


def test_nifti_orientation_round_trips():
    slices = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    volume = slice_to_nifti(slices)
    assert volume.shape == (4, 3, 2)
    assert np.array_equal(nifti_to_slices(volume), slices)


def test_lung_window():
    assert lung_window(np.array([-2000, -1350, -600, 150, 500])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_paper_augmentation_rotates_and_scales_image_and_mask():
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32)).astype(np.float32)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[:, 10:18, 8:20] = 2
    out = augment_paper(CTSlices(images, masks))
    assert len(out) == 2 * 10  # originals + 5 rotations + 4 scales
    assert out.ids[2] == "0_rot45" and out.ids[-1] == "1_scale1.5"
    by_id = dict(zip(out.ids, range(len(out))))
    assert np.array_equal(out.masks[by_id["0_rot180"]], masks[0, ::-1, ::-1])
    assert np.allclose(out.images[by_id["0_rot180"]], images[0, ::-1, ::-1], atol=1e-5)
    area = (masks[0] > 0).sum()
    assert (out.masks[by_id["0_scale0.5"]] > 0).sum() == pytest.approx(area / 4, rel=0.15)
    assert (out.masks[by_id["0_scale1.5"]] > 0).sum() == pytest.approx(area * 2.25, rel=0.15)
    assert set(np.unique(out.masks).tolist()) == {0, 2}  # nearest interpolation: no new labels


def test_dataset_gives_half_resolution_input_and_full_resolution_targets():
    images = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    ds = CTSegDataset(CTSlices(images, np.zeros((3, 32, 32), np.uint8)))
    low, image, mask = ds[1]
    assert low.shape == (1, 16, 16) and image.shape == (1, 32, 32) and mask.dtype == torch.int64
    assert low[0, 0, 0].item() == pytest.approx(images[1, :2, :2].mean(), abs=1e-6)  # area downsampling
    with pytest.raises(ValueError, match="downsampling"):
        CTSegDataset(CTSlices(images[:, :31, :31], np.zeros((3, 31, 31), np.uint8)))


def test_phantom_lesions_look_like_their_kinds():
    rng = np.random.default_rng(1)
    hu_by_class = {k: [] for k in range(4)}
    effusion_rows = []
    for _ in range(12):
        hu, mask = ct_phantom(rng, 256)
        for k in range(4):
            hu_by_class[k].append(hu[mask == k])
        if (mask == 3).any():
            effusion_rows.append(np.nonzero(mask == 3)[0].mean())
    mean = {k: np.concatenate(v).mean() for k, v in hu_by_class.items()}
    assert all(len(np.concatenate(v)) for v in hu_by_class.values())  # every kind occurs
    ggo = np.concatenate(hu_by_class[1])
    assert -800 < np.median(ggo) < -450  # faint: above aerated lung, far below soft tissue
    assert np.median(np.concatenate(hu_by_class[2])) > -150  # dense
    assert effusion_rows and np.mean(effusion_rows) > 256 * 0.55  # dependent: the posterior (lower) part
    assert mean[2] > mean[1]


def test_phantom_vessels_are_bright_thin_and_not_lesions():
    import cv2

    hu, mask = ct_phantom(np.random.default_rng(5), 256)
    bright_background = (hu > -300) & (mask == 0)
    in_aerated_lung = cv2.blur((hu < -700).astype(np.float32), (9, 9)) > 0.6
    assert (bright_background & in_aerated_lung).sum() > 30
