"""Synthetic datasets in the real Kaggle layouts: SIIM-FISABIO-RSNA COVID-19, NIH ChestX-ray14, RSNA Pneumonia.

Every test and the default pipeline run on these. Images are chest radiograph phantoms
(``phantom``) with opacities that follow the radiological patterns of each label
(``lesions``), written with the file formats and quirks of each real dataset.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from covidkit.synth.config import SynthConfig
from covidkit.synth.ct_slices import write_ct_slice_sets
from covidkit.synth.ct_volumes import write_ct_volume_set
from covidkit.synth.external import write_external
from covidkit.synth.nih import write_nih
from covidkit.synth.rsna import write_rsna
from covidkit.synth.siim import write_siim

__all__ = ["SynthConfig", "WRITERS", "write_all", "write_external", "write_nih", "write_rsna", "write_siim"]

# Each writer makes its dataset folder(s) in ``out`` and returns a short summary.
# A new synthetic dataset is one more line here.
WRITERS: list[Callable[[Path, SynthConfig], str]] = [
    write_siim,
    write_external,  # after write_siim: it copies some of its images
    write_nih,
    write_rsna,
    write_ct_slice_sets,
    write_ct_volume_set,
]


def write_all(out: Path, cfg: SynthConfig) -> None:
    """Write every synthetic dataset (``cfg.test_only``: a SIIM test split alone) into ``out``; print a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries = [writer(out, cfg) for writer in ([write_siim] if cfg.test_only else WRITERS)]
    print("\n".join(s for s in summaries if s))
    print(f"synthetic data (seed {cfg.seed}) written to {out} in {time.perf_counter() - start:.0f} s")
