"""Image files: reading the grey PNGs every stage, the report and the plots use."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_grey(path: str | Path) -> np.ndarray:
    """A grey uint8 image (RGBA and 16-bit PNGs, e.g. NIH's, are converted); raises on unreadable files."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot read image {path}")
    return image
