"""The real radiograph RG1 (pydicom-data) with a models folder's fused boxes and study probabilities.

    python docs/figures/rg1.py runs/smoke/models docs/figures/rg1-after.png

A look at what the models carry onto a real film, never a way to choose a setting (RG1 has no label).
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from covidkit.dicom import read_dicom  # noqa: E402
from covidkit.plots import draw_boxes, save  # noqa: E402
from covidkit.predict import Predictor  # noqa: E402


def main(models_dir: str, out_png: str) -> None:
    image = read_dicom(get_testdata_file("RG1_UNCR.dcm", download=False)).pixels
    predictor = Predictor.load(models_dir)
    result = predictor.predict(image)
    shown = result.scores >= predictor.box_threshold
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image, cmap="gray")
    ax.axis("off")
    draw_boxes(ax, result.boxes[shown], scores=result.scores[shown])
    probs = ", ".join(f"{c} {100 * p:.1f} %" for c, p in result.study_probs.items())
    ax.set_title(f"{shown.sum()} of {len(result.scores)} boxes at or above the operating score "
                 f"{predictor.box_threshold:.2f}\n{probs}; none {100 * result.none_prob:.1f} %", fontsize=8)
    save(fig, out_png)
    print(f"{out_png}: {shown.sum()} boxes shown of {len(result.scores)}; {probs}; none {result.none_prob:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
