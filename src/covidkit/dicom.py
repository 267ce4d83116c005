"""Read a DICOM radiograph as an 8-bit grey image (0 = black), with the header fields we keep.

Every transfer syntax of the competition data decodes through pydicom 3 and the pylibjpeg
plugins: uncompressed, JPEG Lossless, JPEG 2000, JPEG-LS and RLE. Stored values go through the
modality LUT (rescale slope/intercept or LUT sequence), then the VOI LUT (LUT sequence or window
center/width, first view), then are stretched min-max to 0..255, MONOCHROME1 inverted; without
VOI tags this is the min-max of the modality values. This is the conversion of the public SIIM
solutions (``apply_voi_lut``, invert, min-max), done through a lookup table so that the
full-size arithmetic is one ``uint8`` table look-up per pixel.

Bad input raises :class:`DicomError` (a ``ValueError``) with a one-line reason.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length

Source = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

GREY = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A file that cannot be turned into an image; the message is a one-line reason."""

    def __init__(self, reason: str):
        super().__init__(" ".join(str(reason).split()))


@dataclass(frozen=True)
class DicomInfo:
    """Header fields kept downstream. ``height, width``: the original size (boxes are in it)."""

    height: int
    width: int
    photometric: str
    bits_stored: int
    transfer_syntax: str
    patient_id: str
    frames: int = 1


@dataclass(frozen=True)
class DicomImage:
    """``pixels``: uint8 ``[height, width]``, 0 = black (first frame of a multi-frame file)."""

    pixels: np.ndarray
    info: DicomInfo


def read_dicom(source: Source) -> DicomImage:
    """A path, bytes or binary file object -> the image as uint8 and its header fields."""
    ds = _read_dataset(source, header_only=False)
    info = _info(ds)
    _check_image(ds, info)
    stored = _decode_first_frame(ds)
    return DicomImage(pixels=to_uint8(stored, ds), info=info)


def read_info(source: Source) -> DicomInfo:
    """Header fields only: nothing after the pixel data tag is read or decoded."""
    return _info(_read_dataset(source, header_only=True))


def to_uint8(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> uint8 display values (modality LUT, VOI LUT, min-max, MONOCHROME1 inverted).

    The transforms run on one table entry per stored value between the image's minimum and
    maximum (at most 65536 entries, so float64 there costs nothing), then the table is applied
    to the image: the result is the same as transforming every pixel, at the cost of a look-up.
    """
    lo, hi = int(stored.min()), int(stored.max())
    start = min(lo, 0)  # non-negative images index the table directly, without a shifted copy
    values = _display_values(np.arange(start, hi + 1, dtype=np.int64), ds)
    present = values[lo - start:]
    vmin, vmax = present.min(), present.max()
    scaled = (values - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    # entries below the image's minimum (start..lo-1) are never looked up but may fall outside 0..1
    table = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    index = stored if start == 0 else stored.astype(np.int32) - start
    return table[index]


def _display_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality then VOI transform of ``stored``, as float64."""
    values = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence") and not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)  # a VOI LUT is indexed by integers
    try:
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    except (ValueError, NotImplementedError, IndexError) as e:
        raise DicomError(f"invalid VOI LUT or window: {e}") from e


def _read_dataset(source: Source, header_only: bool) -> Dataset:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # pydicom only warns when the file ends inside encapsulated pixel data, then drops it.
        warnings.filterwarnings("error", message="End of file reached", category=UserWarning)
        try:
            return pydicom.dcmread(source, stop_before_pixels=header_only)
        except InvalidDicomError as e:
            raise DicomError("not a DICOM file: no 'DICM' marker after the 128-byte preamble") from e
        except UserWarning as e:
            raise DicomError("truncated file: it ends inside the encapsulated pixel data") from e
        except OSError:
            raise
        except Exception as e:  # any parse failure of untrusted bytes is bad input
            raise DicomError(f"unreadable DICOM: {type(e).__name__}: {e}") from e


def _info(ds: Dataset) -> DicomInfo:
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        raise DicomError("no transfer syntax in the file meta header")
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomError("no pixel data: no Rows/Columns in the header (not an image, or truncated)")
    return DicomInfo(
        height=int(ds.Rows),
        width=int(ds.Columns),
        photometric=str(ds.get("PhotometricInterpretation", "")),
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        transfer_syntax=str(syntax),
        patient_id=str(ds.get("PatientID", "") or ""),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _check_image(ds: Dataset, info: DicomInfo) -> None:
    if "PixelData" not in ds:
        raise DicomError("no pixel data (the file holds no image, or is truncated before it)")
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as e:
        raise DicomError(f"unsupported transfer syntax {syntax} ({syntax.name})") from e
    if not decoder.is_available:
        raise DicomError(f"no decoder installed for transfer syntax {syntax} ({syntax.name})")
    if info.photometric not in GREY or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(f"unsupported photometric interpretation {info.photometric!r}: expected MONOCHROME1/2")
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    if bits_allocated not in (8, 16) or not 1 <= info.bits_stored <= bits_allocated:
        raise DicomError(f"unsupported bit depth: {info.bits_stored} stored in {bits_allocated} allocated")
    if not syntax.is_encapsulated:
        expected = get_expected_length(ds)
        if len(ds.PixelData) < expected:
            raise DicomError(f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes")


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    try:
        return pixel_array(ds, index=0)
    except Exception as e:  # decoder errors come as RuntimeError, ValueError, ... per plugin
        name = ds.file_meta.TransferSyntaxUID.name
        raise DicomError(f"cannot decode {name} pixel data: {type(e).__name__}: {e}") from e
