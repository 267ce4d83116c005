"""Writing synthetic radiographs as DICOM files with the variety of the real SIIM data.

The SIIM-FISABIO-RSNA images come from many machines: MONOCHROME1 (stored values inverted:
high = dark) and MONOCHROME2, 8 to 16 stored bits, values spanning part of the range, window
tags present, absent or multi-valued, sometimes a rescale, and files either uncompressed or
compressed (RLE Lossless, JPEG 2000 Lossless). ``sample_style`` draws one such style, with no
dependence on the image content; ``write_dicom`` writes the pixels in it.

The RSNA Pneumonia Detection Challenge images are uniform: 8-bit MONOCHROME2 secondary
captures, JPEG baseline (``write_rsna_dicom``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.config import disable_value_validation
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    UID,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}
# Detector matrices (rows, columns) of real chest radiographs with their share of the SIIM files, scaled
# down to the configured maximum: mostly landscape, width / height 0.99-1.23 (median 1.21), as in the
# real training set (median 3,028 x 2,544 px).
DETECTOR_SIZES = [
    ((2544, 3056), 0.2), ((2336, 2836), 0.17), ((3480, 4240), 0.1), ((2320, 2828), 0.1),
    ((1760, 2140), 0.06), ((2048, 2500), 0.07), ((2500, 3000), 0.05), ((2828, 3200), 0.12),
    ((3000, 3408), 0.08), ((2992, 2991), 0.05), ((2021, 2021), 0.04),
]


@dataclass(frozen=True)
class DicomStyle:
    """How one file stores its pixels; independent of what the image shows."""

    photometric: str                      # MONOCHROME1 or MONOCHROME2
    bits_allocated: int                   # 8 or 16
    bits_stored: int
    low: int                              # stored value of the least dense pixel (MONOCHROME2 sense)
    high: int                             # stored value of the densest pixel
    transfer_syntax: str                  # a key of TRANSFER_SYNTAXES
    windows: tuple[tuple[float, float], ...]  # (center, width) pairs, in rescaled units; may be empty
    rescale: tuple[float, float] | None   # (slope, intercept) or None: no Modality LUT tags
    modality: str                         # CR or DX
    pixel_spacing: float | None


# Styles that every dataset should contain at least once (see ``sample_style(..., recipe=)``).
RECIPES = [
    {"photometric": "MONOCHROME1", "transfer_syntax": "rle"},
    {"photometric": "MONOCHROME2", "transfer_syntax": "j2k"},
    {"photometric": "MONOCHROME1", "transfer_syntax": "j2k", "bits_stored": 16},
    {"bits_stored": 8, "transfer_syntax": "explicit"},
    {"bits_stored": 10, "photometric": "MONOCHROME2"},
    {"bits_stored": 12, "transfer_syntax": "implicit", "windows": 2},
    {"bits_stored": 14, "rescale": True, "photometric": "MONOCHROME1"},
    {"bits_stored": 12, "windows": 0, "transfer_syntax": "rle"},
]


def sample_style(rng: np.random.Generator, recipe: dict | None = None) -> DicomStyle:
    """Draw a storage style like those of the SIIM files; ``recipe`` pins some choices."""
    recipe = recipe or {}
    photometric = recipe.get("photometric", "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2")
    bits = recipe.get("bits_stored", int(rng.choice([8, 10, 12, 14, 15, 16], p=[0.05, 0.1, 0.55, 0.12, 0.08, 0.1])))
    syntax = recipe.get("transfer_syntax",
                        str(rng.choice(list(TRANSFER_SYNTAXES), p=[0.74, 0.04, 0.12, 0.1])))
    top = 2 ** bits - 1
    low = int(top * rng.uniform(0, 0.12)) if rng.random() < 0.6 else 0
    high = int(top * rng.uniform(0.6, 1.0)) if rng.random() < 0.6 else top
    rescale = None
    if recipe.get("rescale", rng.random() < 0.12):
        rescale = (1.0, float(rng.choice([0.0, -1024.0, -float(low)])))
    slope, intercept = rescale or (1.0, 0.0)
    n_windows = recipe.get("windows", int(rng.choice([0, 1, 2], p=[0.3, 0.55, 0.15])))
    windows = []
    for k in range(n_windows):  # the first window shows the whole image, a second one is narrower
        width = (high - low) * rng.uniform(0.8, 1.1) * (1.0 if k == 0 else 0.6)
        center = low + (high - low) * rng.uniform(0.45, 0.55)
        windows.append((round(center * slope + intercept, 1), round(width * slope, 1)))
    return DicomStyle(
        photometric=photometric,
        bits_allocated=8 if bits == 8 else 16,
        bits_stored=bits,
        low=low,
        high=high,
        transfer_syntax=syntax,
        windows=tuple(windows),
        rescale=rescale,
        modality=str(rng.choice(["CR", "DX"])),
        pixel_spacing=round(float(rng.uniform(0.1, 0.2)), 3) if rng.random() < 0.7 else None,
    )


def sample_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """``(rows, columns)`` of a real detector, jittered, scaled down (same aspect) to fit ``max_size``."""
    sizes, weights = zip(*DETECTOR_SIZES)
    rows, cols = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
    jitter = rng.uniform(0.95, 1.05)
    rows, cols = rows * jitter, cols * jitter * rng.uniform(0.995, 1.005)
    scale = min(1.0, max_size / max(rows, cols))
    lo = min(min_size, max_size)
    return (int(np.clip(round(rows * scale), lo, max_size)), int(np.clip(round(cols * scale), lo, max_size)))


def to_stored(img: np.ndarray, style: DicomStyle) -> np.ndarray:
    """Float image in 0..1 (bright = dense) -> the stored integer pixels of ``style``."""
    shown = img if style.photometric == "MONOCHROME2" else 1.0 - img
    values = np.rint(style.low + shown * (style.high - style.low))
    return values.astype(np.uint8 if style.bits_allocated == 8 else np.uint16)


def _file_dataset(sop_class: UID, sop_uid: str, syntax: UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def write_dicom(path: Path, pixels: np.ndarray, style: DicomStyle, *, study_uid: str, series_uid: str,
                sop_uid: str, patient_id: str, patient_sex: str, instance: int = 1) -> None:
    """Write stored ``pixels`` (from ``to_stored``) as a SIIM-like DICOM file."""
    sop_class = CR_STORAGE if style.modality == "CR" else DX_STORAGE
    syntax = TRANSFER_SYNTAXES[style.transfer_syntax]
    # The SIIM files carry their anonymised hex ids in the UID tags, which is not valid UI syntax.
    with disable_value_validation():
        ds = _file_dataset(sop_class, sop_uid, ExplicitVRLittleEndian)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.Modality = style.modality
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientSex = patient_sex
        ds.BodyPartExamined = "CHEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = instance
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = style.photometric
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = style.bits_allocated
        ds.BitsStored = style.bits_stored
        ds.HighBit = style.bits_stored - 1
        ds.PixelRepresentation = 0
        if style.pixel_spacing is not None:
            ds.PixelSpacing = [style.pixel_spacing, style.pixel_spacing]
        if style.rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = style.rescale
            ds.RescaleType = "US"
        if style.windows:
            centers = [c for c, _ in style.windows]
            widths = [w for _, w in style.windows]
            ds.WindowCenter = centers if len(centers) > 1 else centers[0]
            ds.WindowWidth = widths if len(widths) > 1 else widths[0]
        ds.PixelData = pixels.tobytes()
        if syntax.is_compressed:
            ds.compress(syntax, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def write_rsna_dicom(path: Path, img8: np.ndarray, *, patient_id: str, uids: tuple[str, str, str],
                     sex: str, age: int, view: str, spacing: float) -> None:
    """Write an 8-bit image as the RSNA challenge did: a JPEG baseline secondary capture."""
    ok, jpeg = cv2.imencode(".jpg", img8, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    study_uid, series_uid, sop_uid = uids
    with disable_value_validation():  # the RSNA files carry the age as a bare number, not AS syntax
        ds = _rsna_dataset(img8.shape, patient_id, study_uid, series_uid, sop_uid, sex, age, view, spacing)
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _rsna_dataset(shape: tuple[int, int], patient_id: str, study_uid: str, series_uid: str, sop_uid: str,
                  sex: str, age: int, view: str, spacing: float) -> Dataset:
    ds = _file_dataset(SECONDARY_CAPTURE, sop_uid, JPEGBaseline8Bit)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.PatientAge = str(age)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.SeriesDescription = f"view: {view}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    return ds
