"""``covidkit bench predict``: per-image latency of each prediction stage with a models folder.

Decode, resize, each detector's folds, the fusion, the study model and the bookkeeping around them, on the first
N test DICOMs of a competition folder; target: fusion plus bookkeeping under ``PREDICT_OVERHEAD_TARGET`` of the
whole (the models should be what costs).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from covidkit.bench.prepare import verdict
from covidkit.data.siim import dicom_paths

PREDICT_OVERHEAD_TARGET = 0.05


@dataclass(frozen=True)
class PredictBench:
    """Mean seconds per image of each stage of ``covidkit predict`` (``Predictor.predict`` + decoding)."""

    images: int
    device: str
    hflip_tta: bool
    stages: dict[str, float]  # decode, resize, fasterrcnn, yolo, fusion, study, bookkeeping

    @property
    def whole(self) -> float:
        return sum(self.stages.values())

    @property
    def overhead(self) -> float:
        """Fusion and bookkeeping (everything outside decoding, resizing and the models) over the whole."""
        return (self.stages["fusion"] + self.stages["bookkeeping"]) / self.whole

    def table(self) -> str:
        lines = [
            f"predict benchmark: {self.images} test images, device {self.device}, "
            f"hflip TTA {'on' if self.hflip_tta else 'off'}, {os.cpu_count()} CPUs, one image at a time",
            f"{'stage':<14}{'ms/image':>10}{'share':>8}",
            *(f"{name:<14}{sec * 1000:>10.1f}{sec / self.whole:>8.1%}" for name, sec in self.stages.items()),
            f"{'whole':<14}{self.whole * 1000:>10.1f}{1:>8.0%}",
            verdict(f"fusion + bookkeeping share: {self.overhead:.1%}", self.overhead < PREDICT_OVERHEAD_TARGET,
                     f"< {PREDICT_OVERHEAD_TARGET:.0%}"),
        ]
        return "\n".join(lines)


def bench_predict(models_dir: str | Path, competition_dir: str | Path, n: int = 16, device: str = "cpu",
                  hflip_tta: bool = False) -> PredictBench:
    """Per-image latency of each prediction stage on the first ``n`` test DICOMs of ``competition_dir``.

    Decoding is timed in this process (``covidkit predict`` overlaps it with the models in a
    pool); the first image is predicted once untimed (lazy initialisation of the models).
    """
    from covidkit.dicom import read_dicom
    from covidkit.predict import Predictor

    paths = list(dicom_paths(competition_dir, "test").values())[:n]
    if not paths:
        raise FileNotFoundError(f"no test DICOM under {Path(competition_dir) / 'test'}")
    predictor = Predictor.load(models_dir, device=device, hflip_tta=hflip_tta)
    predictor.predict(read_dicom(paths[0]).pixels)
    totals: dict[str, float] = {}
    for path in paths:
        start = time.perf_counter()
        pixels = read_dicom(path).pixels
        decode_s = time.perf_counter() - start
        timings = predictor.predict(pixels).timings
        stages = {"decode": decode_s, **{k: v for k, v in timings.items() if k != "total"}}
        stages["bookkeeping"] = timings["total"] - sum(v for k, v in timings.items() if k != "total")
        for name, sec in stages.items():
            totals[name] = totals.get(name, 0.0) + sec
    result = PredictBench(images=len(paths), device=device, hflip_tta=hflip_tta,
                          stages={k: v / len(paths) for k, v in totals.items()})
    print(result.table())
    return result
