"""The README's two screenshots: a run's report and the web page on the real radiograph RG1.

    python docs/figures/screenshots.py runs/smoke docs/figures

Needs Debian's chromium (`/usr/bin/chromium`, as the browser test). Writes `report.png` (the top of
`<run_dir>/report.html`) and `serve.png` (`covidkit serve <run_dir>/models` after RG1 is uploaded), both
reduced to 960 px wide and a 64-colour palette to keep the repository small.
"""
import socket
import sys
import threading
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright
from pydicom.data import get_testdata_file

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1366, "height": 768}


def _small_png(path: Path, width: int = 960) -> None:
    image = Image.open(path).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(64).save(path, optimize=True)


def _serve(models_dir: Path):
    """The app on a free loopback port in a thread; returns (url, server, thread)."""
    import uvicorn

    from covidkit.app import create_app
    from covidkit.predict import Predictor

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(Predictor.load(models_dir)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main(run_dir: str, out_dir: str) -> None:
    run, out = Path(run_dir), Path(out_dir)
    url, server, thread = _serve(run / "models")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport=VIEWPORT)
            page.goto((run / "report.html").resolve().as_uri())
            page.screenshot(path=out / "report.png")
            page.goto(url)
            with page.expect_response("**/api/predict", timeout=120_000):
                page.set_input_files("#file", get_testdata_file("RG1_UNCR.dcm", download=False))
            page.wait_for_selector("#status:has-text('analysed in')", timeout=60_000)
            page.screenshot(path=out / "serve.png")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    for name in ("report.png", "serve.png"):
        _small_png(out / name)
        print(out / name)


if __name__ == "__main__":
    main(*sys.argv[1:3])
