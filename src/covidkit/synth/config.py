"""Configuration of the synthetic datasets."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic datasets; every random choice derives from ``seed``."""

    seed: int = 0
    train_studies: int = 240          # SIIM train studies
    test_studies: int = 80            # SIIM test studies (labels in siim-covid19-detection-solution/)
    nih_images: int = 1000            # NIH ChestX-ray14 images (01's validation split: ~10 labels with 10 positives)
    rsna_images: int = 200            # RSNA pneumonia train images
    rsna_test_images: int | None = None  # RSNA stage 2 test images; None: a tenth of rsna_images, at least 2
    max_size: int = 2500              # largest side of a SIIM DICOM (real median 3,028 x 2,544; scaled, same aspect)
    min_size: int = 512               # smallest side of a SIIM DICOM
    nih_size: int = 1024              # side of the NIH PNGs
    rsna_size: int = 1024             # side of the RSNA DICOMs
    nih_per_folder: int = 100         # images per images_0NN/ folder
    workers: int | None = None        # processes; None: all cores, 0 or 1: in this process
    ct: bool = True                   # also the CT sets
    ct_volumes: int = 140             # CT volumes for DeCoVNet (half positive): 42 held out in smoke
    test_only: bool = False           # only a SIIM test split and its solution folder (a fresh test set)
    external_images: int = 0          # unlabelled radiographs in external/synthetic/ (covidkit.synth.external)
    external_duplicates: float = 0.15  # share of them that are near-duplicates of SIIM train and test images

    def __post_init__(self) -> None:
        counts = {k: getattr(self, k) for k in ("train_studies", "test_studies", "nih_images", "rsna_images")}
        counts["rsna_test_images"] = self.rsna_test_images or 0
        counts["ct_volumes"] = self.ct_volumes
        counts["external_images"] = self.external_images
        negative = [k for k, v in counts.items() if v < 0]
        if negative:
            raise ValueError(f"counts must be >= 0, got {', '.join(f'{k}={counts[k]}' for k in negative)}")
        if min(self.max_size, self.nih_size, self.rsna_size) < 64:
            raise ValueError("image sizes must be at least 64 pixels")
        if self.ct and self.ct_volumes < 2:
            raise ValueError(f"ct_volumes must be at least 2 (one per class), got {self.ct_volumes}")
        if not 0 <= self.external_duplicates <= 1:
            raise ValueError(f"external_duplicates is a share in [0, 1], got {self.external_duplicates}")
        if self.nih_per_folder < 1:
            raise ValueError(f"nih_per_folder must be >= 1, got {self.nih_per_folder}")

    @property
    def n_rsna_test(self) -> int:
        """Number of RSNA test images to write."""
        if self.rsna_test_images is not None:
            return self.rsna_test_images
        return max(2, self.rsna_images // 10)
