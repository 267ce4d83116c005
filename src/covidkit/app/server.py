"""The web application: one HTML page and a JSON API around a loaded :class:`covidkit.predict.Predictor`.

Model inference is CPU-bound and holds the GIL only in part: requests run it in a bounded thread
pool (``ServeConfig.workers``, 1 by default) so any number of simultaneous uploads queue up and are
answered in turn while the event loop keeps serving the page and ``/api/health``. Uploads stay in
memory (Starlette spools a part over 1 MB to an anonymous temporary file, unlinked from the start and
closed after the request); no file name or patient field is ever logged or returned.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Protocol

import cv2
import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from covidkit.app.decode import (ImageTooLargeError, UndecodableImageError, UnsupportedMediaError,
                                 decode_upload)

log = logging.getLogger("covidkit.app")

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file, allowed on top of the limit
# The page loads nothing from elsewhere; the browser is told so.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")


@dataclass(frozen=True)
class ServeConfig:
    """``max_upload_bytes``: largest accepted file (413 above); ``max_pixels``: largest image, from its
    header (413 above); ``display_size``: longest side of the PNG sent back for display;
    ``workers``: inference threads (more than 1 only for a thread-safe predictor)."""

    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000
    display_size: int = 1024
    workers: int = 1


class PredictorLike(Protocol):
    """What the app needs of :class:`covidkit.predict.Predictor`."""

    versions: dict
    box_threshold: float  # the boxes shown by default score at least this

    def predict(self, image: np.ndarray) -> Any: ...


class Box(BaseModel):
    """An opacity box in original image pixels, with its confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float


class DisplayImage(BaseModel):
    """The decoded image, downscaled, as a PNG data URL (DICOMs included)."""

    width: int
    height: int
    data_url: str


class Prediction(BaseModel):
    width: int = Field(description="original image width in pixels; boxes are in these pixels")
    height: int
    kind: str = Field(description="format recognised from the content: dicom, png or jpeg")
    boxes: list[Box]
    study_probs: dict[str, float] = Field(description="negative, typical, indeterminate, atypical")
    none_prob: float = Field(description="probability that the image holds no opacity")
    versions: dict[str, Any]
    timings: dict[str, float] = Field(description="seconds per stage, model stages prefixed model_")
    display: DisplayImage | None = None


class Health(BaseModel):
    status: str
    versions: dict[str, Any]
    max_upload_bytes: int
    box_threshold: float = Field(description="the boxes shown by default score at least this: the best-F1 "
                                             "operating point of the out-of-fold boxes (0: every box)")


class Problem(BaseModel):
    detail: str


def create_app(predictor: PredictorLike, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app around an already loaded ``predictor`` (loaded once, shared by all requests)."""
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="covidkit-predict")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    # The schema is served at /openapi.json; the Swagger and ReDoc pages are off: they load from a CDN.
    app = FastAPI(title="covidkit", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Opacity boxes and study assessment of a chest radiograph (research use only).")
    app.add_middleware(BodyLimit, max_upload_bytes=config.max_upload_bytes)
    app.mount("/static", StaticFiles(packages=[("covidkit.app", "static")]), name="static")
    index_html = files("covidkit.app").joinpath("static/index.html").read_text(encoding="utf-8")
    problems = {code: {"model": Problem} for code in (413, 415, 422)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/api/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", versions=predictor.versions, max_upload_bytes=config.max_upload_bytes,
                      box_threshold=predictor.box_threshold)

    @app.post("/api/predict", response_model=Prediction, responses=problems)
    async def predict(
        file: UploadFile = File(description="a DICOM, PNG or JPEG chest radiograph"),
        display: bool = Query(True, description="include the downscaled image as a PNG data URL"),
    ) -> JSONResponse:
        received = time.perf_counter()
        data = await file.read(config.max_upload_bytes + 1)
        await file.close()
        if len(data) > config.max_upload_bytes:
            raise _rejected(413, f"file over the upload limit of {config.max_upload_bytes} bytes")
        job = functools.partial(_predict_bytes, predictor, data, config, display, received)
        try:
            prediction = await asyncio.get_running_loop().run_in_executor(executor, job)
        except UnsupportedMediaError as e:
            raise _rejected(415, str(e)) from None
        except ImageTooLargeError as e:
            raise _rejected(413, str(e)) from None
        except UndecodableImageError as e:
            raise _rejected(422, str(e)) from None
        return JSONResponse(prediction.model_dump(), headers={"Cache-Control": "no-store"})

    return app


def _rejected(status: int, reason: str) -> HTTPException:
    log.info("upload rejected (%d): %s", status, reason)
    return HTTPException(status_code=status, detail=reason)


def _predict_bytes(predictor: PredictorLike, data: bytes, config: ServeConfig, display: bool,
                   received: float) -> Prediction:
    """Decode, predict and encode the display image of one upload (runs in the inference thread)."""
    start = time.perf_counter()
    image = decode_upload(data, max_pixels=config.max_pixels)
    decoded = time.perf_counter()
    result = predictor.predict(image.pixels)
    predicted = time.perf_counter()
    shown = _display_image(image.pixels, config.display_size) if display else None
    done = time.perf_counter()
    height, width = image.pixels.shape
    boxes = [Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3], score=s)
             for b, s in zip(np.asarray(result.boxes, float).tolist(), np.asarray(result.scores, float).tolist())]
    timings = {"queue": start - received, "decode": decoded - start, "predict": predicted - decoded,
               **{f"model_{k}": float(v) for k, v in result.timings.items()},
               "display": done - predicted, "total": done - received}
    log.info("predicted: %s %d x %d, %d boxes, %.2f s", image.kind, width, height, len(boxes), timings["total"])
    return Prediction(width=width, height=height, kind=image.kind, boxes=boxes,
                      study_probs={k: float(v) for k, v in result.study_probs.items()},
                      none_prob=float(result.none_prob), versions=predictor.versions, timings=timings,
                      display=shown)


def _display_image(pixels: np.ndarray, size: int) -> DisplayImage:
    height, width = pixels.shape
    scale = min(1.0, size / max(height, width))
    if scale < 1.0:
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("opencv could not encode the display PNG")
    return DisplayImage(width=width, height=height,
                        data_url="data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii"))


class BodyLimit:
    """ASGI middleware: a request body over the upload limit gets 413 before it is read to the end.

    Starlette parses the whole multipart body before the endpoint runs, so the limit has to act
    on the byte stream: on the declared Content-Length at once, and on the bytes as they arrive.
    The body may exceed ``max_upload_bytes`` by the multipart boundaries and part headers.
    """

    def __init__(self, app, max_upload_bytes: int):
        self.app = app
        self.max_body = max_upload_bytes + MULTIPART_OVERHEAD
        self.reason = f"file over the upload limit of {max_upload_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            log.info("upload rejected (413): %s", self.reason)
            return await JSONResponse({"detail": self.reason}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # FastAPI lets an HTTPException out of body parsing as it is
                raise _rejected(413, self.reason)
            return message

        await self.app(scope, counted_receive, send)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(models_dir: str, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig(),
          device: str = "cpu") -> None:
    """Load the models once, then serve the app with uvicorn until interrupted."""
    import uvicorn

    from covidkit.predict import Predictor

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    predictor = Predictor.load(models_dir, device=device)
    if not is_loopback(host):
        log.warning("listening on %s: other machines can upload images; serve patient data only on a "
                    "trusted network", host)
    uvicorn.run(create_app(predictor, config), host=host, port=port, log_level="info")
