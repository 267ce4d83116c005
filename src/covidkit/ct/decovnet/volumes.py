"""Chest CT volumes: DICOM series folders and NIfTI files in, Hounsfield units, windowing, resampling.

Every reader returns a :class:`CTVolume`: ``hu`` is a float32 ``[T, H, W]`` array in Hounsfield units
in the DICOM axial convention (slices from feet to head, image rows from anterior to posterior,
columns from the patient's right to left, i.e. the usual radiological view), and ``spacing`` is
``(z, y, x)`` in millimetres. A DICOM series and a NIfTI file of the same scan give the same array.

The dataset folder (``ct-covid-volumes/`` under ``input_dir``)::

    ct-covid-volumes/
        labels.csv                 case_id,label[,split]   label: 1/0, positive/negative, covid/normal
        volumes/<case_id>.nii.gz   a NIfTI volume (.nii also read) ...
        volumes/<case_id>/         ... or a DICOM series: one slice per file, any file names
        lesions/<case_id>.nii.gz   optional lesion mask (same grid as the volume), for the hit rate
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DATASET_DIR = "ct-covid-volumes"
VOLUMES_DIR = "volumes"
LESIONS_DIR = "lesions"
LABELS_CSV = "labels.csv"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LUNG_WINDOW = (-1200.0, 600.0)  # the DeCoVNet window, in HU
POSITIVE_NAMES = {"1", "positive", "covid", "covid-19", "covid19", "true"}
NEGATIVE_NAMES = {"0", "negative", "normal", "non-covid", "noncovid", "false"}


@dataclass
class CTVolume:
    """A CT volume in HU, ``[T, H, W]``, with its ``(z, y, x)`` voxel spacing in mm."""

    hu: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)


@dataclass(frozen=True)
class CTCase:
    """One labelled case of the dataset folder."""

    case_id: str
    label: int
    volume: Path
    lesions: Path | None = None
    split: str | None = None


# ---------------------------------------------------------------------------------------------- readers


def read_volume(path: Path | str) -> CTVolume:
    """A DICOM series folder or a NIfTI file, in HU."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    raise ValueError(f"{path}: not a DICOM series folder nor a .nii/.nii.gz file")


def read_dicom_series(folder: Path | str) -> CTVolume:
    """The slices of one DICOM series, sorted along the slice normal, in HU (rescale slope/intercept)."""
    import pydicom
    from pydicom.pixels import apply_rescale

    folder = Path(folder)
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path))
        except pydicom.errors.InvalidDicomError:
            continue  # non-DICOM files (DICOMDIR readers, notes) are skipped
    datasets = [ds for ds in datasets if "PixelData" in ds]
    if not datasets:
        raise ValueError(f"{folder}: no DICOM slices with pixel data")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ValueError(f"{folder}: {len(series)} series mixed in one folder; give each its own folder")
    positions = np.array([_slice_position(ds) for ds in datasets])
    order = np.argsort(positions, kind="stable")
    datasets = [datasets[i] for i in order]
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: slices of different sizes {sorted(shapes)}")
    hu = np.stack([apply_rescale(ds.pixel_array, ds).astype(np.float32) for ds in datasets])
    row_mm, col_mm = (float(v) for v in datasets[0].get("PixelSpacing", (1.0, 1.0)))
    return CTVolume(hu, (_slice_spacing(datasets, positions[order]), row_mm, col_mm))


def _slice_position(ds) -> float:
    """Position along the slice normal (ImagePositionPatient . normal), else the instance number."""
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
    return float(ds.get("InstanceNumber", 0))


def _slice_spacing(datasets: list, positions: np.ndarray) -> float:
    if len(datasets) > 1 and "ImagePositionPatient" in datasets[0]:
        gaps = np.diff(positions)
        if np.all(gaps > 0):
            return float(np.median(gaps))
    return float(datasets[0].get("SpacingBetweenSlices", datasets[0].get("SliceThickness", 1.0)))


def read_nifti(path: Path | str) -> CTVolume:
    """A NIfTI volume (scaled by its ``scl_slope``/``scl_inter``), reoriented to the DICOM axial view."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))  # RAS+: i to the right, j anterior, k superior
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = image.header.get_zooms()[:3]
    # (i, j, k) RAS -> (slice, row, column) with rows anterior->posterior and columns right->left.
    hu = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    return CTVolume(hu, (float(zooms[2]), float(zooms[1]), float(zooms[0])))


# ---------------------------------------------------------------------------------------------- writers


def _nifti_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine of an array stored (column, row, slice) in the DICOM LPS frame, written as RAS+."""
    dz, dy, dx = spacing
    affine = np.diag([-dx, -dy, dz, 1.0])  # LPS -> RAS flips x and y
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine


def write_nifti(path: Path | str, array: np.ndarray, spacing: Sequence[float], dtype=np.int16) -> Path:
    """Write a ``[T, H, W]`` array (HU or a mask) as NIfTI; :func:`read_nifti` gives it back unchanged."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array).transpose(2, 1, 0).astype(dtype)
    image = nib.Nifti1Image(data, _nifti_affine(spacing))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path


def write_dicom_series(folder: Path | str, hu: np.ndarray, spacing: Sequence[float], patient_id: str = "anon",
                       intercept: float = -1024.0, slope: float = 1.0, seed: int = 0) -> Path:
    """Write a ``[T, H, W]`` HU volume as a CT DICOM series, one file per slice, stored as
    ``(HU - intercept) / slope`` in unsigned 16 bits. File names are shuffled so that readers must sort
    by position, as with real exports."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("HU values do not fit unsigned 16 bits with this slope and intercept")
    dz, dy, dx = (float(s) for s in spacing)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    names = np.random.default_rng(seed).permutation(len(hu))
    for k, pixels in enumerate(stored.astype(np.uint16)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * dz]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}.dcm", enforce_file_format=True)
    return folder


# --------------------------------------------------------------------------------------- intensity, grid


def window(hu: np.ndarray, low: float = LUNG_WINDOW[0], high: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU clipped to ``[low, high]`` and scaled to ``uint8`` 0-255."""
    if high <= low:
        raise ValueError(f"window high ({high}) must exceed low ({low})")
    scaled = (np.clip(hu, low, high) - low) / (high - low) * 255.0
    return np.round(scaled).astype(np.uint8)


def resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float | None],
             order: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``[T, H, W]`` from ``spacing`` to ``target`` (mm, ``(z, y, x)``; ``None`` keeps an axis).

    ``order`` 1 (linear) for images, 0 for masks. Returns the array and its exact new spacing.
    """
    from scipy import ndimage

    target = [s if t is None else float(t) for s, t in zip(spacing, target)]
    shape = np.asarray(array.shape)
    new_shape = np.maximum(1, np.round(shape * np.asarray(spacing) / np.asarray(target))).astype(int)
    if np.array_equal(new_shape, shape):
        return array, tuple(float(s) for s in spacing)
    zoom = new_shape / shape
    out = ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)
    return out, tuple(float(s) for s in np.asarray(spacing) * shape / new_shape)


# ---------------------------------------------------------------------------------------------- dataset


def parse_label(value) -> int:
    """1 for COVID positive, 0 for negative; accepts 1/0, positive/negative, covid/normal."""
    text = str(value).strip().lower()
    if text in POSITIVE_NAMES:
        return 1
    if text in NEGATIVE_NAMES:
        return 0
    raise ValueError(f"unknown label {value!r}; use 1/0, positive/negative or covid/normal")


def volume_path(volumes_dir: Path, case_id: str) -> Path:
    """``volumes/<case_id>/`` (DICOM) or ``volumes/<case_id>.nii[.gz]``."""
    candidates = [volumes_dir / case_id] + [volumes_dir / f"{case_id}{s}" for s in NIFTI_SUFFIXES]
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"no volume for case {case_id!r} in {volumes_dir} (a folder or a .nii/.nii.gz)")


def read_cases(dataset_dir: Path | str) -> list[CTCase]:
    """The labelled cases of a ``ct-covid-volumes/`` folder (see the module docstring)."""
    dataset_dir = Path(dataset_dir)
    labels_csv = dataset_dir / LABELS_CSV
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv} not found: expected a CSV with case_id,label")
    table = pd.read_csv(labels_csv, dtype={"case_id": str})
    missing = {"case_id", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{labels_csv} lacks the columns {sorted(missing)}")
    if table["case_id"].duplicated().any():
        raise ValueError(f"{labels_csv}: duplicated case ids {table['case_id'][table['case_id'].duplicated()].tolist()}")
    cases = []
    for row in table.itertuples(index=False):
        lesions = dataset_dir / LESIONS_DIR / f"{row.case_id}.nii.gz"
        cases.append(CTCase(
            case_id=row.case_id, label=parse_label(row.label),
            volume=volume_path(dataset_dir / VOLUMES_DIR, row.case_id),
            lesions=lesions if lesions.is_file() else None,
            split=str(row.split) if "split" in table.columns and pd.notna(row.split) else None,
        ))
    return cases
