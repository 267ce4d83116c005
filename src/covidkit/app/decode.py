"""Upload bytes -> a uint8 grey image, recognising the format from the content, not the file name.

DICOM (every transfer syntax :func:`covidkit.dicom.read_dicom` reads) decodes exactly as ``prepare``
does; PNG and JPEG decode through opencv. The pixel count is checked from the header before any
pixels are decoded, so a small file that claims a huge image costs nothing.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from PIL import JpegImagePlugin, PngImagePlugin

from covidkit.dicom import DicomError, read_dicom, read_info

# The DICOM marker follows a 128-byte preamble; PNG and JPEG open with fixed signatures.
DICOM_MARKER = (128, b"DICM")
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
# Pillow's plugins read only the header. Not through Image.open: ultralytics (which the predictor
# imports) patches it to try installing pi-heif whenever a file is not recognised.
HEADER_READERS = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile}
PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate")


class UnsupportedMediaError(ValueError):
    """The bytes are neither DICOM nor PNG nor JPEG."""


class UndecodableImageError(ValueError):
    """A recognised format whose pixels cannot be decoded; the message is a one-line reason."""


class ImageTooLargeError(ValueError):
    """The header announces more pixels than allowed."""


@dataclass(frozen=True)
class DecodedImage:
    """``pixels``: uint8 ``[height, width]``, 0 = black; ``kind``: dicom, png or jpeg."""

    pixels: np.ndarray
    kind: str


def sniff(data: bytes) -> str | None:
    """The format of ``data`` from its first bytes: ``dicom``, ``png``, ``jpeg`` or None."""
    offset, marker = DICOM_MARKER
    if data[offset:offset + len(marker)] == marker:
        return "dicom"
    return next((kind for kind, sig in SIGNATURES.items() if data.startswith(sig)), None)


def decode_upload(data: bytes, max_pixels: int) -> DecodedImage:
    """Upload bytes -> :class:`DecodedImage`; raises the three errors above for bad input."""
    kind = sniff(data)
    if kind is None:
        raise UnsupportedMediaError("not a DICOM, PNG or JPEG file (recognised from the content)")
    height, width = _header_size(data, kind)
    if height * width > max_pixels:
        raise ImageTooLargeError(f"image of {width} x {height} pixels is over the limit of {max_pixels} pixels")
    pixels = _decode_dicom(data) if kind == "dicom" else _decode_raster(data)
    return DecodedImage(pixels=pixels, kind=kind)


def _header_size(data: bytes, kind: str) -> tuple[int, int]:
    try:
        if kind == "dicom":
            info = read_info(data)
            return info.height, info.width
        with HEADER_READERS[kind](io.BytesIO(data)) as im:
            return im.height, im.width
    except DicomError as e:
        raise UndecodableImageError(_redact(str(e), data)) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise UndecodableImageError(f"unreadable {kind.upper()} header: {e}") from e


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        return read_dicom(data).pixels
    except DicomError as e:
        raise UndecodableImageError(_redact(str(e), data)) from e


def _decode_raster(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UndecodableImageError("opencv cannot decode the image (corrupt or truncated file)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:  # 16-bit PNG: stretch its range, as a DICOM without window tags
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_8U)
    return np.ascontiguousarray(image)


def _redact(message: str, data: bytes) -> str:
    """``message`` without the patient's name, ID or birth date, should a decoder quote them."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
    except Exception:  # a header pydicom cannot parse gave no values to quote
        return message
    for tag in PATIENT_TAGS:
        value = str(ds.get(tag, "") or "")
        if value:
            message = message.replace(value, "[redacted]")
    return message
