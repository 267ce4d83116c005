"""The web application's API (`covidkit serve`): real models, the real radiograph, good and bad uploads."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import tempfile
import threading

import cv2
import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from covidkit.app import ServeConfig, create_app, decode_upload, sniff
from covidkit.app.decode import ImageTooLargeError, UndecodableImageError, UnsupportedMediaError
from covidkit.app.server import is_loopback
from covidkit.cli import build_parser
from covidkit.data.siim import STUDY_CLASSES
from covidkit.dicom import read_dicom

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-7731-XQ", "PatientBirthDate": "19450102"}
FILENAME = "Doe_Jane_PID-7731-XQ.dcm"


@pytest.fixture(scope="module")
def predictor(models_dir):
    from covidkit.predict import Predictor

    return Predictor.load(models_dir)


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor))


@pytest.fixture(scope="module")
def radiograph_bytes(real_radiograph) -> bytes:
    return real_radiograph.read_bytes()


@pytest.fixture(scope="module")
def radiograph_pixels(radiograph_bytes) -> np.ndarray:
    return read_dicom(radiograph_bytes).pixels


def encode(pixels: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, pixels)
    assert ok
    return data.tobytes()


def post(client: TestClient, data: bytes, name: str = "upload.bin", **params) -> httpx.Response:
    return client.post("/api/predict", files={"file": (name, data)}, params=params)


def dicom_with_patient(pixels: np.ndarray) -> bytes:
    """A small uncompressed MONOCHROME2 DICOM carrying a patient's name, ID and birth date."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def assert_matches_predictor(body: dict, predictor, pixels: np.ndarray) -> None:
    """The response holds exactly what the predictor says about these pixels, in original pixels."""
    assert_matches_result(body, predictor.predict(pixels), pixels.shape)


def assert_matches_result(body: dict, expected, shape: tuple[int, int]) -> None:
    assert (body["height"], body["width"]) == shape
    boxes = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in body["boxes"]]).reshape(-1, 4)
    np.testing.assert_allclose(boxes, np.asarray(expected.boxes).reshape(-1, 4), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose([b["score"] for b in body["boxes"]], np.asarray(expected.scores), atol=1e-6)
    assert list(body["study_probs"]) == STUDY_CLASSES
    np.testing.assert_allclose([body["study_probs"][c] for c in STUDY_CLASSES],
                               [expected.study_probs[c] for c in STUDY_CLASSES], atol=1e-6)
    assert body["none_prob"] == pytest.approx(expected.none_prob, abs=1e-6)


def test_health_reports_ready_and_model_versions(client, predictor):
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "versions": predictor.versions,
                               "max_upload_bytes": ServeConfig().max_upload_bytes,
                               "box_threshold": predictor.box_threshold}


def test_real_radiograph_dicom(client, predictor, radiograph_bytes, radiograph_pixels):
    response = post(client, radiograph_bytes, "RG1_UNCR.dcm")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["kind"] == "dicom" and (body["width"], body["height"]) == (1841, 1955)
    assert_matches_predictor(body, predictor, radiograph_pixels)
    assert sum(body["study_probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= body["none_prob"] <= 1.0
    for box in body["boxes"]:
        assert 0 <= box["x1"] < box["x2"] <= 1841 and 0 <= box["y1"] < box["y2"] <= 1955
        assert 0.0 <= box["score"] <= 1.0
    assert body["versions"] == predictor.versions
    assert {"queue", "decode", "predict", "display", "total"} <= set(body["timings"])
    assert all(v >= 0 for v in body["timings"].values())


def test_display_image_is_the_decoded_radiograph_downscaled(client, radiograph_bytes, radiograph_pixels):
    display = post(client, radiograph_bytes).json()["display"]
    assert display["data_url"].startswith("data:image/png;base64,")
    png = base64.b64decode(display["data_url"].split(",", 1)[1])
    shown = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert shown.shape == (display["height"], display["width"]) == (1024, 964)  # longest side 1024, aspect kept
    expected = cv2.resize(radiograph_pixels, (964, 1024), interpolation=cv2.INTER_AREA)
    assert np.abs(shown.astype(int) - expected).max() <= 1
    assert post(client, radiograph_bytes, display="false").json()["display"] is None


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_compressed_dicoms_decode_like_prepare(client, predictor, name):
    data = open(get_testdata_file(name, download=False), "rb").read()
    response = post(client, data)
    assert response.status_code == 200, response.text
    assert_matches_predictor(response.json(), predictor, read_dicom(data).pixels)


@pytest.mark.parametrize("ext,kind", [(".png", "png"), (".jpg", "jpeg")])
def test_png_and_jpeg_recognised_from_content_not_name(client, predictor, radiograph_pixels, ext, kind):
    small = cv2.resize(radiograph_pixels, (460, 489), interpolation=cv2.INTER_AREA)
    data = encode(small, ext)
    response = post(client, data, "misleading-name.dcm")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == kind
    assert_matches_predictor(body, predictor, decode_upload(data, max_pixels=10**8).pixels)


def test_decode_colour_and_16_bit_png_to_grey(radiograph_pixels):
    colour = cv2.cvtColor(radiograph_pixels, cv2.COLOR_GRAY2BGR)
    assert np.array_equal(decode_upload(encode(colour, ".png"), 10**8).pixels, radiograph_pixels)
    deep = radiograph_pixels.astype(np.uint16) * 16 + 100  # 16-bit PNG using part of its range
    decoded = decode_upload(encode(deep, ".png"), 10**8).pixels
    assert decoded.dtype == np.uint8 and decoded.min() == 0 and decoded.max() == 255
    assert np.abs(decoded.astype(int) - radiograph_pixels).max() <= 1


def test_sniff_formats(radiograph_bytes, radiograph_pixels):
    assert sniff(radiograph_bytes) == "dicom"
    assert sniff(encode(radiograph_pixels[:64, :64], ".png")) == "png"
    assert sniff(encode(radiograph_pixels[:64, :64], ".jpg")) == "jpeg"
    assert sniff(b"%PDF-1.7\n") is None and sniff(b"") is None
    with pytest.raises(UnsupportedMediaError):
        decode_upload(b"P5 64 64 255\n" + bytes(64 * 64), 10**8)  # a PGM: an image, not one we take


@pytest.mark.parametrize("data", [b"", b"hello, world", b"%PDF-1.7\n" + bytes(2000), b"GIF89a" + bytes(100)])
def test_not_an_image_is_415(client, data):
    response = post(client, data, "scan.dcm")
    assert response.status_code == 415
    assert response.json()["detail"] == "not a DICOM, PNG or JPEG file (recognised from the content)"


def test_undecodable_dicom_is_422_with_reason(client, radiograph_bytes):
    response = post(client, radiograph_bytes[:300_000])
    assert response.status_code == 422
    assert response.json()["detail"].startswith("truncated pixel data: ")
    header_only = radiograph_bytes[:1024]
    response = post(client, header_only)
    assert response.status_code == 422 and response.json()["detail"]


def test_corrupt_png_and_jpeg_are_422(client, radiograph_pixels):
    for ext in (".png", ".jpg"):
        data = encode(radiograph_pixels, ext)
        response = post(client, data[:200] + bytes(5000))
        assert response.status_code == 422, (ext, response.text)
        assert response.json()["detail"]
    with pytest.raises(UndecodableImageError):
        decode_upload(b"\x89PNG\r\n\x1a\n" + bytes(64), 10**8)


def test_upload_over_the_limit_is_413_declared_or_streamed(predictor, radiograph_pixels):
    client = TestClient(create_app(predictor, ServeConfig(max_upload_bytes=100_000)))
    data = encode(radiograph_pixels, ".png")
    assert len(data) > 200_000
    response = post(client, data)
    assert response.status_code == 413
    assert response.json()["detail"] == "file over the upload limit of 100000 bytes"

    def chunks():  # no Content-Length: the limit acts on the bytes as they arrive
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        yield from (data[i:i + 16384] for i in range(0, len(data), 16384))
        yield b"\r\n--b--\r\n"

    response = client.post("/api/predict", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    just_over = encode(np.zeros((400, 400), np.uint8), ".png") + bytes(100_001)
    assert post(client, just_over).status_code == 413  # under the body allowance, over the file limit
    small = cv2.resize(radiograph_pixels, (184, 196))
    assert post(client, encode(small, ".png")).status_code == 200


def test_image_over_the_pixel_limit_is_413_before_decoding(predictor):
    client = TestClient(create_app(predictor, ServeConfig(max_pixels=1_000_000)))
    data = encode(np.zeros((1200, 1000), np.uint8), ".png")
    response = post(client, data)
    assert response.status_code == 413
    assert "1000 x 1200 pixels" in response.json()["detail"]
    with pytest.raises(ImageTooLargeError):
        decode_upload(data, max_pixels=1_199_999)


def test_server_keeps_serving_after_bad_input(client, predictor, radiograph_pixels):
    small = cv2.resize(radiograph_pixels, (230, 244), interpolation=cv2.INTER_AREA)
    statuses = [post(client, data).status_code for data in
                (b"junk", encode(small, ".png")[:120], b"\xff\xd8\xff" + bytes(10))]
    assert statuses == [415, 422, 422]
    response = post(client, encode(small, ".png"))
    assert response.status_code == 200
    assert_matches_predictor(response.json(), predictor, small)
    assert client.get("/api/health").status_code == 200


def test_patient_fields_never_in_responses_or_logs(client, radiograph_pixels, caplog):
    small = cv2.resize(radiograph_pixels, (230, 244), interpolation=cv2.INTER_AREA)
    data = dicom_with_patient(small)
    assert pydicom.dcmread(io.BytesIO(data)).PatientName == "Doe^Jane"
    caplog.set_level(logging.DEBUG)
    good = post(client, data, FILENAME)
    bad = post(client, data[:-1000], FILENAME)
    assert (good.status_code, bad.status_code) == (200, 422)
    answer = good.json()
    assert answer["display"].pop("data_url").startswith("data:image/png;base64,")  # base64 may hold any word
    secrets = [*PATIENT.values(), "Doe", "Jane", FILENAME]
    for text in (json.dumps(answer), bad.text, caplog.text):
        assert not [s for s in secrets if s in text]
    assert "predicted: dicom 230 x 244" in caplog.text  # the log does say what happened


def test_uploads_leave_no_temporary_file(client, radiograph_bytes, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert len(radiograph_bytes) > 1024 * 1024  # over Starlette's in-memory spool: it goes to a temporary file
    assert post(client, radiograph_bytes, display="0").status_code == 200
    assert post(client, radiograph_bytes[:-5000]).status_code == 422
    assert list(tmp_path.iterdir()) == []


class CountingPredictor:
    """The real predictor, recording how many calls overlap."""

    def __init__(self, predictor):
        self.predictor, self.versions, self.box_threshold = predictor, predictor.versions, predictor.box_threshold
        self.lock, self.running, self.most, self.calls = threading.Lock(), 0, 0, 0

    def predict(self, image):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            return self.predictor.predict(image)
        finally:
            with self.lock:
                self.running -= 1


def test_16_simultaneous_requests_all_answered_correctly(predictor, radiograph_pixels):
    counting = CountingPredictor(predictor)
    app = create_app(counting)
    sizes = [(160 + 24 * i, 170 + 20 * i) for i in range(4)]
    images = [cv2.resize(radiograph_pixels, size, interpolation=cv2.INTER_AREA) for size in sizes]
    uploads = [encode(image, ext) for image, ext in zip(images, [".png", ".jpg", ".png", ".jpg"])] * 4

    async def post_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://covidkit") as http:
            return await asyncio.gather(*(http.post("/api/predict", files={"file": ("x", data)}, params={"display": "0"})
                                          for data in uploads))

    responses = asyncio.run(post_all())
    assert [r.status_code for r in responses] == [200] * 16
    decoded = [decode_upload(data, 10**8).pixels for data in uploads[:4]]  # the 4 distinct uploads
    expected = [predictor.predict(pixels) for pixels in decoded]
    for i, response in enumerate(responses):
        assert_matches_result(response.json(), expected[i % 4], decoded[i % 4].shape)
    assert counting.calls == 16 and counting.most == 1  # one inference at a time, none lost


def test_index_page_and_schema(client):
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the web
    for asset in ("/static/app.js", "/static/app.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "http" not in response.text
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/api/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(predict["responses"])
    assert "/api/health" in schema["paths"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_serve_command_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "models"])
    assert (args.models_dir, args.host, args.port, args.max_upload_mb) == ("models", "127.0.0.1", 8000, 64)
    assert is_loopback(args.host) and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
