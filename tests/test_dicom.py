"""covidkit.dicom on real files: the RG1 chest radiograph and pydicom's test files."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from covidkit.dicom import DicomError, read_dicom, read_info, to_uint8

UNCOMPRESSED = "1.2.840.10008.1.2.1"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"


def sample(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def region(image: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """A box of ``image`` given in fractions of its height and width."""
    h, w = image.shape
    return image[int(h * y0):int(h * y1), int(w * x0):int(w * x1)]


@pytest.fixture(scope="module")
def rg1() -> dict[str, object]:
    return {name: read_dicom(sample(f"RG1_{name}.dcm")) for name in ("UNCR", "J2KR", "J2KI")}


def test_chest_radiograph_header(rg1):
    info = rg1["UNCR"].info
    assert (info.height, info.width) == (1955, 1841)
    assert (info.photometric, info.bits_stored, info.patient_id, info.frames) == ("MONOCHROME1", 15, "9RG1", 1)
    assert info.transfer_syntax == UNCOMPRESSED
    assert rg1["J2KR"].info.transfer_syntax == J2K_LOSSLESS
    assert rg1["J2KI"].info.transfer_syntax == J2K
    image = rg1["UNCR"].pixels
    assert image.dtype == np.uint8 and image.shape == (1955, 1841)
    assert image.min() == 0 and image.max() == 255


def test_lossless_jpeg2000_identical_to_uncompressed(rg1):
    np.testing.assert_array_equal(rg1["J2KR"].pixels, rg1["UNCR"].pixels)


def test_lossy_jpeg2000_close_to_uncompressed(rg1):
    # Measured: max 5 grey levels, mean 0.64 at full size.
    diff = np.abs(rg1["J2KI"].pixels.astype(np.int16) - rg1["UNCR"].pixels)
    assert diff.max() <= 8
    assert diff.mean() <= 1.0
    assert diff.any()  # lossy: if equal, the lossy file was not what was decoded


def test_lungs_dark_mediastinum_bright(rg1):
    # MONOCHROME1: air has the highest stored values; displayed, the lungs must be dark.
    image = rg1["UNCR"].pixels
    right_lung = region(image, 0.10, 0.30, 0.20, 0.40).mean()  # measured ~140
    left_lung = region(image, 0.10, 0.30, 0.60, 0.80).mean()   # ~131
    mediastinum = region(image, 0.30, 0.70, 0.45, 0.55).mean()  # ~227
    assert max(right_lung, left_lung) + 50 < mediastinum


def reference_uint8(path: Path) -> np.ndarray:
    """The per-pixel DICOM pipeline in float64: modality LUT, VOI LUT, invert, min-max, round."""
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    values -= values.min()
    return np.rint(values / values.max() * 255).astype(np.uint8)


@pytest.mark.parametrize("name", [
    "RG1_UNCR.dcm",   # windowing, MONOCHROME1
    "MR2_UNCR.dcm",   # rescale slope 3.77 then windowing
    "CT_small.dcm",   # signed, rescale intercept -1024, no VOI: min-max
    "mlut_18.dcm",    # Modality LUT Sequence
    "vlut_04.dcm",    # VOI LUT Sequence
])
def test_lookup_table_equals_per_pixel_pipeline(name):
    ours = read_dicom(sample(name)).pixels
    expected = reference_uint8(sample(name))
    assert np.abs(ours.astype(np.int16) - expected).max() <= 1  # rounding of the float64 table only


def test_window_follows_the_rescale():
    # MR2: window 1000 +- 1000 in rescaled units (slope 3.77): in stored units it ends near 530,
    # so stored values above it saturate; the raw stored maximum is far above.
    ds = pydicom.dcmread(sample("MR2_UNCR.dcm"))
    stored = ds.pixel_array
    image = read_dicom(sample("MR2_UNCR.dcm")).pixels
    top = 2000 / float(ds.RescaleSlope)
    assert stored.max() > top
    assert (image[stored >= top] == 255).all()
    assert (image[stored < top * 0.9] < 255).all()


@pytest.mark.parametrize("compressed, uncompressed, syntax", [
    ("MR_small_RLE.dcm", "MR_small.dcm", RLE),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", JPEG_LS),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", J2K_LOSSLESS),
    ("emri_small_RLE.dcm", "emri_small.dcm", RLE),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", JPEG_LS),
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm", J2K_LOSSLESS),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm", J2K_LOSSLESS),
])
def test_compressed_identical_to_uncompressed_twin(compressed, uncompressed, syntax):
    a, b = read_dicom(sample(compressed)), read_dicom(sample(uncompressed))
    assert a.info.transfer_syntax == syntax and b.info.transfer_syntax == UNCOMPRESSED
    assert a.pixels.std() > 10  # a real image, not a constant
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_jpeg_lossless_matches_an_independent_decoder():
    # No uncompressed twin ships for JPEG Lossless: OpenCV's libjpeg-turbo decodes the frame instead.
    path = sample("JPGLosslessP14SV1_1s_1f_8b.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    stored = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
    image = read_dicom(path)
    assert (image.info.bits_stored, image.info.patient_id) == (8, "")
    np.testing.assert_array_equal(image.pixels, to_uint8(stored, ds))


def test_jpeg_lossless_16_bit_shows_the_same_scene():
    # JPEG-LL.dcm is NEMA's NM1 image; JPEG2000_UNC.dcm is NM1 after lossy JPEG 2000.
    lossless = read_dicom(sample("JPEG-LL.dcm"))
    lossy = read_dicom(sample("JPEG2000_UNC.dcm"))
    assert lossless.info.transfer_syntax == JPEG_LOSSLESS
    corr = np.corrcoef(lossless.pixels.ravel(), lossy.pixels.ravel())[0, 1]
    assert corr > 0.9  # measured 0.946


def test_multi_frame_gives_the_first_frame():
    path = sample("emri_small.dcm")
    image = read_dicom(path)
    ds = pydicom.dcmread(path)
    assert image.info.frames == 10 and image.pixels.shape == (64, 64)
    np.testing.assert_array_equal(image.pixels, to_uint8(ds.pixel_array[0], ds))


def test_path_bytes_and_file_object_give_the_same_image():
    path = sample("CT_small.dcm")
    data = path.read_bytes()
    images = [read_dicom(path).pixels, read_dicom(str(path)).pixels, read_dicom(data).pixels,
              read_dicom(io.BytesIO(data)).pixels]
    with path.open("rb") as f:
        images.append(read_dicom(f).pixels)
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_read_info_reads_the_header_only(tmp_path):
    # The header of a file cut in its pixel data still reads: the pixels are never touched.
    data = sample("RG1_UNCR.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    assert read_info(cut) == read_dicom(data).info


# --- errors -------------------------------------------------------------------------------------

def _without_pixels(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    return tmp_path / "nopixels.dcm"


def _unsupported_syntax(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg2.dcm", enforce_file_format=True)
    return tmp_path / "mpeg2.dcm"


def _truncated(tmp_path: Path, name: str) -> Path:
    data = sample(name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


def _text(tmp_path: Path) -> Path:
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n" * 20)
    return tmp_path / "notes.dcm"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.dcm").write_bytes(b"")
    return tmp_path / "empty.dcm"


@pytest.mark.parametrize("make, reason", [
    (lambda d: _truncated(d, "RG1_UNCR.dcm"), "truncated pixel data: 3598420 of 7198310 bytes"),
    (lambda d: _truncated(d, "RG1_J2KR.dcm"), "truncated file"),
    (_text, "not a DICOM file"),
    (_empty, "not a DICOM file"),
    (_without_pixels, "no pixel data"),
    (lambda d: sample("rtplan.dcm"), "no pixel data"),
    (_unsupported_syntax, "unsupported transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2"),
    (lambda d: sample("SC_rgb.dcm"), "unsupported photometric interpretation 'RGB'"),
])
def test_bad_files_raise_a_one_line_dicom_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(reason)
    assert "\n" not in message


def test_missing_path_is_not_a_dicom_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "absent.dcm")
