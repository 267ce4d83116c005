"""End to end: a live `covidkit serve` app driven in headless Chromium (Debian's) through Playwright."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from covidkit.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)"),
]


@pytest.fixture(scope="module")
def live_url(models_dir, real_radiograph):
    """The app served by uvicorn on a free loopback port, in a background thread.

    The models folder's display threshold is set to the median box score on the real radiograph, so that
    the page's default shows some boxes and hides others.
    """
    import numpy as np
    import uvicorn

    from covidkit.dicom import read_dicom
    from covidkit.predict import Predictor

    predictor = Predictor.load(models_dir)
    predictor.box_threshold = round(float(np.median(predictor.predict(read_dicom(real_radiograph).pixels).scores)), 2)
    app = create_app(predictor)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is ours before uvicorn starts: no race for it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before it started serving")
            thread.join(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_upload_radiograph_shows_boxes_and_bars(live_url, real_radiograph, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1366, "height": 768})
        try:
            page = browser.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(live_url)

            page.set_input_files("#file", files=[{"name": "note.dcm", "mimeType": "application/dicom",
                                                  "buffer": b"not an image at all"}])
            expect(page.locator("#status")).to_have_class("error", timeout=30_000)
            expect(page.locator("#status")).to_contain_text("Not a DICOM, PNG or JPEG file")

            with page.expect_response("**/api/predict", timeout=60_000) as answer:
                page.set_input_files("#file", str(real_radiograph))
            result = answer.value.json()
            expect(page.locator("#status")).to_contain_text("DICOM analysed in", timeout=30_000)

            assert result["boxes"], "the fixture's models predict boxes on this radiograph"
            boxes = page.locator("#boxes-layer")
            expect(boxes).to_be_visible()
            # by default the boxes at or above the models folder's operating point; the slider shows them all
            threshold = page.evaluate("() => fetch('/api/health').then((r) => r.json())")["box_threshold"]
            expect(page.locator("#threshold")).to_have_value(f"{threshold:.2f}")
            above = sum(b["score"] >= threshold for b in result["boxes"])
            assert 0 < above < len(result["boxes"])
            expect(boxes).to_have_attribute("data-count", str(above))
            expect(page.locator("#box-count")).to_have_text(f"{above} shown of {len(result['boxes'])}")
            page.locator("#threshold").fill("0")
            expect(boxes).to_have_attribute("data-count", str(len(result["boxes"])))
            bars = page.locator("#bars .bar")
            expect(bars).to_have_count(4)
            for name in ("negative", "typical", "indeterminate", "atypical"):
                expect(page.locator(f'#bars .bar[data-class="{name}"] .fill')).to_be_attached()
                percent = f"{100 * result['study_probs'][name]:.1f} %"
                expect(page.locator(f'#bars .bar[data-class="{name}"] .value')).to_have_text(percent)
            expect(page.locator("#none-prob")).to_have_text(f"{100 * result['none_prob']:.1f} %")

            # the main result fits a laptop screen: image and bars inside the 1366 x 768 viewport
            for selector in ("#image-layer", "#bars", "#none-prob"):
                box = page.locator(selector).bounding_box()
                assert box["y"] >= 0 and box["y"] + box["height"] <= 768, selector
                assert box["x"] >= 0 and box["x"] + box["width"] <= 1366, selector
            # both layers are really drawn: the image has contrast, the boxes layer has strokes
            image_spread, box_pixels = page.evaluate("""() => {
                const pixels = (id) => { const c = document.getElementById(id);
                                         return c.getContext('2d').getImageData(0, 0, c.width, c.height).data; };
                const image = pixels('image-layer'), boxes = pixels('boxes-layer');
                let lo = 255, hi = 0, drawn = 0;
                for (let i = 0; i < image.length; i += 4) { lo = Math.min(lo, image[i]); hi = Math.max(hi, image[i]); }
                for (let i = 3; i < boxes.length; i += 4) { drawn += boxes[i] > 0; }
                return [hi - lo, drawn];
            }""")
            assert image_spread > 100 and box_pixels > 1000
            page.screenshot(path=str(tmp_path / "result.png"))
        finally:
            browser.close()
    assert requests and all(url.startswith(live_url) or url.startswith("data:") for url in requests), requests
    assert (tmp_path / "result.png").stat().st_size > 10_000
