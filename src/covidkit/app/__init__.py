"""``covidkit serve``: a web page and JSON API that show a radiograph's opacity boxes and study assessment."""
from covidkit.app.decode import DecodedImage, decode_upload, sniff
from covidkit.app.server import ServeConfig, create_app, serve

__all__ = ["DecodedImage", "ServeConfig", "create_app", "decode_upload", "serve", "sniff"]
