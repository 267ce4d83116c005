"""Near-duplicates of the competition's images among external radiographs: found, then dropped or mapped.

Public chest X-ray sets hold copies of the SIIM images (BIMCV and RICORD are its sources): resized,
re-encoded, re-windowed, flipped, cropped. A copy of a test image in a training set is a leak; a copy of
a training image is a second, unlabelled view of a labelled one. Two steps, both on prepared folders
(stage 00's square PNGs, their original aspect restored from ``meta.csv``):

1. **Candidates by perceptual hash.** Each image becomes a thumbnail with its histogram equalised (so that
   windowing and gamma change little), hashed by ``imagehash.phash``; an external image is hashed as it
   is and mirrored. Its ``DedupConfig.candidates`` nearest competition images (Hamming distance, the
   better orientation) go on to step 2. Radiographs look alike, so the hash ranks; it does not decide.
2. **Pixel check.** The external thumbnail is matched (``cv2.matchTemplate``, normalised cross-correlation)
   inside each candidate over a grid of crops (up to ``max_crop`` of each axis) and both orientations, on
   small thumbnails; the best candidates again, finer, around the alignment found. The best NCC is the
   pair's score; a pair scoring ``threshold`` or more is a duplicate.

A duplicate of a test image is dropped; of a training image, dropped or mapped to it (``train_duplicates``).
``find_duplicates`` writes nothing; ``write_matches`` and ``save_pairs`` (the pairs nearest the threshold,
side by side, to check by eye) do. ``precision_recall`` scores a table against the synthetic ground truth
(``covidkit.synth.external``). On real data ``threshold`` is the user's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from covidkit.data.external import read_external_meta
from covidkit.prepare import META_CSV, png_path

ACTIONS = ("drop", "map")
MATCH_COLUMNS = ["external_id", "external_path", "siim_image_id", "siim_split", "hash_distance", "flipped",
                 "crop_x", "crop_y", "ncc", "duplicate", "action", "mapped_to"]


@dataclass
class DedupConfig:
    threshold: float = 0.9      # NCC of the pixel check at or above which a pair is a duplicate
    candidates: int = 8         # competition images per external image checked pixel by pixel (nearest by hash)
    hash_size: int = 8          # phash of hash_size**2 bits
    side: int = 128             # long side of the thumbnails of the fine pixel check (and of the hash's)
    coarse_side: int = 48       # long side of the thumbnails of the coarse one
    refine: int = 2             # candidates (best by the coarse check) that get the fine check
    max_crop: float = 0.2       # the most of an axis a copy may have lost to cropping (both sides together)
    crop_steps: int = 6         # grid of crops per axis in the pixel check, refined once around the best
    blur: float = 1.5           # Gaussian sigma (thumbnail pixels) before the check: tolerance to misalignment
    train_duplicates: str = "drop"  # a copy of a training image: "drop", or "map" it to that image

    def __post_init__(self) -> None:
        if self.train_duplicates not in ACTIONS:
            raise ValueError(f"train_duplicates must be one of {ACTIONS}, got {self.train_duplicates!r}")
        if not 0 <= self.max_crop < 1:
            raise ValueError(f"max_crop must be in [0, 1), got {self.max_crop}")


@dataclass(frozen=True)
class Signature:
    """``hashes``: bool ``[2, bits]`` (as is, mirrored); ``image``: the equalised, blurred float32 thumbnail of
    the fine check, ``coarse``: the same at ``DedupConfig.coarse_side``."""

    hashes: np.ndarray
    image: np.ndarray
    coarse: np.ndarray


def thumbnail(image: np.ndarray, side: int, orig_hw: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 grey -> long side ``side`` at the original aspect (``orig_hw``: of a square-stretched PNG),
    histogram equalised."""
    h, w = orig_hw or image.shape[:2]
    scale = side / max(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.equalizeHist(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def phash_bits(thumb: np.ndarray, hash_size: int) -> np.ndarray:
    return imagehash.phash(Image.fromarray(thumb), hash_size=hash_size).hash.reshape(-1)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    image = image.astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma else image


def signature(image: np.ndarray, cfg: DedupConfig, orig_hw: tuple[int, int] | None = None) -> Signature:
    thumb = thumbnail(image, cfg.side, orig_hw)
    hashes = np.stack([phash_bits(thumb, cfg.hash_size), phash_bits(np.ascontiguousarray(thumb[:, ::-1]),
                                                                      cfg.hash_size)])
    scale = cfg.coarse_side / cfg.side
    coarse = cv2.resize(thumb, (max(8, round(thumb.shape[1] * scale)), max(8, round(thumb.shape[0] * scale))),
                        interpolation=cv2.INTER_AREA)
    return Signature(hashes=hashes, image=_smooth(thumb, cfg.blur), coarse=_smooth(coarse, cfg.blur * scale))


def hamming(external: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """bool ``[N, 2, B]`` and ``[M, B]`` -> ``[N, 2, M]`` numbers of differing bits."""
    a = external.astype(np.int32) * 2 - 1
    b = reference.astype(np.int32) * 2 - 1
    return (external.shape[-1] - a @ b.T) // 2


def ncc_at(reference: np.ndarray, moving: np.ndarray, cx: float, cy: float) -> float:
    """Best NCC of ``moving`` scaled to cover ``(1 - cx, 1 - cy)`` of ``reference``, over its positions."""
    h, w = reference.shape
    size = (min(w, max(4, round((1 - cx) * w))), min(h, max(4, round((1 - cy) * h))))
    template = cv2.resize(moving, size, interpolation=cv2.INTER_AREA)
    return float(cv2.minMaxLoc(cv2.matchTemplate(reference, template, cv2.TM_CCOEFF_NORMED))[1])


@dataclass(frozen=True)
class Alignment:
    ncc: float
    flipped: bool
    crop_x: float               # share of the reference's width missing from the external image
    crop_y: float


def _best(reference: np.ndarray, moving: np.ndarray, flipped: bool, trials) -> Alignment:
    moving = np.ascontiguousarray(moving[:, ::-1]) if flipped else moving
    return max((Alignment(ncc_at(reference, moving, cx, cy), flipped, cx, cy) for cx, cy in trials),
               key=lambda a: a.ncc)


def coarse_check(external: Signature, reference: Signature, cfg: DedupConfig) -> Alignment:
    """The grid of crops (``crop_steps`` per axis, up to ``max_crop``) in both orientations, on the small thumbnails."""
    grid = np.linspace(0, cfg.max_crop, cfg.crop_steps)
    trials = [(cx, cy) for cy in grid for cx in grid]
    return max((_best(reference.coarse, external.coarse, f, trials) for f in (False, True)), key=lambda a: a.ncc)


def fine_check(external: Signature, reference: Signature, start: Alignment, cfg: DedupConfig) -> Alignment:
    """Around a coarse alignment, on the large thumbnails: the crop refined by half a grid step."""
    half = cfg.max_crop / max(cfg.crop_steps - 1, 1) / 2
    steps = (-half, -half / 2, 0.0, half / 2, half)
    clip = lambda c: min(max(c, 0.0), cfg.max_crop)  # noqa: E731
    trials = [(clip(start.crop_x + dx), clip(start.crop_y + dy)) for dy in steps for dx in steps]
    return _best(reference.image, external.image, start.flipped, trials)


def pixel_check(external: Signature, reference: Signature, cfg: DedupConfig) -> Alignment:
    """The best alignment of ``external`` inside ``reference``: coarse grid, then refined."""
    return fine_check(external, reference, coarse_check(external, reference, cfg), cfg)


def match(external: list[Signature], reference: list[Signature], cfg: DedupConfig, chunk: int = 512) -> pd.DataFrame:
    """For each external signature, its best competition image among the hash candidates.

    Every candidate gets the coarse check; the ``refine`` best of them the fine one, whose NCC is the score.
    Columns: ``external, reference`` (indices), ``hash_distance``, ``flipped``, ``crop_x``, ``crop_y``, ``ncc``.
    """
    ref_hashes = np.stack([s.hashes[0] for s in reference])
    rows = []
    k = min(cfg.candidates, len(reference))
    for start in range(0, len(external), chunk):
        block = external[start:start + chunk]
        dist = hamming(np.stack([s.hashes for s in block]), ref_hashes).min(axis=1)  # [n, M]
        nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
        for i, (sig, cands) in enumerate(zip(block, nearest)):
            coarse = sorted(((coarse_check(sig, reference[j], cfg), j) for j in cands), key=lambda c: -c[0].ncc)
            fine = [(fine_check(sig, reference[j], a, cfg), j) for a, j in coarse[:cfg.refine]]
            best, j = max(fine, key=lambda c: c[0].ncc)
            rows.append({"external": start + i, "reference": int(j), "hash_distance": int(dist[i, j]),
                         "flipped": best.flipped, "crop_x": best.crop_x, "crop_y": best.crop_y, "ncc": best.ncc})
    return pd.DataFrame(rows, columns=["external", "reference", "hash_distance", "flipped", "crop_x", "crop_y",
                                       "ncc"])


# ------------------------------------------------------------------------------------------ prepared folders

def competition_images(prepared_dir: str | Path) -> pd.DataFrame:
    """Prepared competition images of both splits: ``image_id, split, orig_height, orig_width, png``."""
    meta = pd.read_csv(Path(prepared_dir) / META_CSV, dtype={"image_id": str}, keep_default_na=False)
    meta = meta[meta["status"] != "failed"].sort_values(["split", "image_id"], ignore_index=True)
    meta = meta.astype({"orig_height": int, "orig_width": int})
    meta["png"] = [str(png_path(prepared_dir, s, i)) for s, i in zip(meta["split"], meta["image_id"])]
    return meta[["image_id", "split", "orig_height", "orig_width", "png"]]


def read_prepared(png: str | Path) -> np.ndarray:
    image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot read {png}")
    return image


def signatures(table: pd.DataFrame, cfg: DedupConfig) -> list[Signature]:
    """Signatures of the PNGs of a table with ``png, orig_height, orig_width`` columns."""
    return [signature(read_prepared(p), cfg, (int(h), int(w)))
            for p, h, w in zip(table["png"], table["orig_height"], table["orig_width"])]


def decide(matches: pd.DataFrame, cfg: DedupConfig) -> pd.DataFrame:
    """``duplicate`` (NCC >= threshold), ``action`` (keep, drop or map) and ``mapped_to`` from the scores."""
    matches = matches.copy()
    matches["duplicate"] = matches["ncc"] >= cfg.threshold
    of_test = matches["duplicate"] & (matches["siim_split"] == "test")
    of_train = matches["duplicate"] & ~of_test
    matches["action"] = np.where(of_test, "drop", np.where(of_train, cfg.train_duplicates, "keep"))
    matches["mapped_to"] = np.where(matches["action"] == "map", matches["siim_image_id"], "")
    return matches


def find_duplicates(prepared_dir: str | Path, external_prepared_dir: str | Path,
                    cfg: DedupConfig = DedupConfig()) -> pd.DataFrame:
    """One row per external image (``MATCH_COLUMNS``): its best competition match, the scores, the decision.

    ``prepared_dir``: stage 00's folder (``meta.csv``, ``train/``, ``test/``); ``external_prepared_dir``:
    ``covidkit.data.external.prepare_external``'s.
    """
    reference = competition_images(prepared_dir)
    external = read_external_meta(external_prepared_dir)
    if reference.empty or external.empty:
        raise ValueError(f"nothing to compare: {len(reference)} competition and {len(external)} external images")
    found = match(signatures(external, cfg), signatures(reference, cfg), cfg)
    table = pd.DataFrame({
        "external_id": external["image_id"].to_numpy()[found["external"]],
        "external_path": external["path"].to_numpy()[found["external"]],
        "siim_image_id": reference["image_id"].to_numpy()[found["reference"]],
        "siim_split": reference["split"].to_numpy()[found["reference"]],
    })
    for col in ("hash_distance", "flipped", "crop_x", "crop_y", "ncc"):
        table[col] = found[col].to_numpy()
    return decide(table, cfg)[MATCH_COLUMNS]


def kept_images(matches: pd.DataFrame) -> pd.DataFrame:
    """The external images left to learn from: ``keep`` rows, and ``map`` rows (with ``mapped_to``)."""
    return matches[matches["action"].isin(["keep", "map"])].reset_index(drop=True)


def write_matches(matches: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matches.to_csv(path, index=False, float_format="%.4f")
    return path


def precision_recall(matches: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Pairs found against the planted ones (``truth``: ``path, siim_image_id``, as ``synthetic_duplicates.csv``).

    A found pair is right when it names the right external file and the right competition image.
    """
    found = {(p, s) for p, s, d in zip(matches["external_path"], matches["siim_image_id"], matches["duplicate"]) if d}
    planted = set(zip(truth["path"], truth["siim_image_id"]))
    tp = len(found & planted)
    return {"planted": len(planted), "found": len(found), "true_positives": tp,
            "precision": tp / len(found) if found else 1.0, "recall": tp / len(planted) if planted else 1.0}


# ----------------------------------------------------------------------------------------------- by eye

def _restored(png: str, h: int, w: int, side: int = 256) -> np.ndarray:
    return thumbnail(read_prepared(png), side, (h, w))


def save_pairs(matches: pd.DataFrame, prepared_dir: str | Path, external_prepared_dir: str | Path,
               path: str | Path, n: int = 6) -> Path | None:
    """A PNG of the pairs nearest the threshold, external image beside its match (mirrored as matched).

    Up to ``n // 2`` duplicates with the lowest scores and the non-duplicates with the highest: the
    pairs where the threshold decided, the ones to look at. ``None`` when there is no pair.
    """
    from covidkit.plots import plt, save

    dups = matches[matches["duplicate"]].nsmallest(n // 2, "ncc")
    rest = matches[~matches["duplicate"]].nlargest(n - len(dups), "ncc")
    pairs = pd.concat([dups, rest])
    if pairs.empty:
        return None
    reference = competition_images(prepared_dir).set_index("image_id")
    external = read_external_meta(external_prepared_dir).set_index("image_id")
    fig, axes = plt.subplots(len(pairs), 2, figsize=(6, 3 * len(pairs)), squeeze=False)
    for row, m in zip(axes, pairs.itertuples()):
        e, r = external.loc[m.external_id], reference.loc[m.siim_image_id]
        left = _restored(e["png"], e["orig_height"], e["orig_width"])
        right = _restored(r["png"], r["orig_height"], r["orig_width"])
        if m.flipped:
            right = right[:, ::-1]
        row[0].imshow(left, cmap="gray")
        row[0].set_title(f"external {m.external_id[-24:]}", fontsize=7)
        row[1].imshow(right, cmap="gray")
        verdict = "duplicate" if m.duplicate else "distinct"
        row[1].set_title(f"{m.siim_split} {m.siim_image_id}{' mirrored' if m.flipped else ''}\n"
                         f"NCC {m.ncc:.3f}, hash {m.hash_distance}: {verdict}", fontsize=7)
        for ax in row:
            ax.axis("off")
    save(fig, path)
    return Path(path)


# ------------------------------------------------------------------------------------------- one folder

MATCHES_CSV = "matches.csv"
PAIRS_PNG = "pairs.png"
SCORES_JSON = "scores.json"
PREPARED = "prepared"


def ground_truth_csv(external_dir: str | Path) -> Path:
    """Where ``covidkit synth --external`` puts a folder's planted copies: ``<folder>_duplicates.csv`` beside it."""
    external_dir = Path(external_dir)
    return external_dir.parent / f"{external_dir.name}_duplicates.csv"


@dataclass
class DedupResult:
    matches: pd.DataFrame
    scores: dict | None         # precision and recall, when the folder has a ground truth
    out_dir: Path

    def line(self) -> str:
        counts = self.matches["action"].value_counts()
        text = (f"{len(self.matches)} external images: {counts.get('keep', 0)} kept, {counts.get('map', 0)} mapped "
                f"to a training image, {counts.get('drop', 0)} dropped (table: {self.out_dir / MATCHES_CSV})")
        if self.scores is not None:
            s = self.scores
            text += (f"; against the {s['planted']} planted copies: precision {s['precision']:.3f}, "
                     f"recall {s['recall']:.3f}")
        return text


def run_dedup(external_dir: str | Path, prepared_dir: str | Path, out_dir: str | Path,
              cfg: DedupConfig = DedupConfig(), workers: int | None = None, progress: bool = True) -> DedupResult:
    """Prepare ``external_dir`` at the size of stage 00's ``prepared_dir``, match it, write the results.

    ``out_dir`` gets ``prepared/`` (the external PNGs), ``matches.csv``, ``pairs.png`` (the pairs nearest
    the threshold) and, when a ground truth lies beside the folder (synthetic data), ``scores.json``.
    """
    import json

    from covidkit.atomic import atomic_write_text
    from covidkit.data.external import prepare_external
    from covidkit.prepare import prepared_size

    out_dir = Path(out_dir)
    prepare_external(external_dir, out_dir / PREPARED, size=prepared_size(prepared_dir), workers=workers,
                     progress=progress)
    matches = find_duplicates(prepared_dir, out_dir / PREPARED, cfg)
    write_matches(matches, out_dir / MATCHES_CSV)
    save_pairs(matches, prepared_dir, out_dir / PREPARED, out_dir / PAIRS_PNG)
    scores = None
    if ground_truth_csv(external_dir).is_file():
        scores = precision_recall(matches, pd.read_csv(ground_truth_csv(external_dir), dtype=str))
        atomic_write_text(out_dir / SCORES_JSON, json.dumps(scores, indent=2) + "\n")
    return DedupResult(matches, scores, out_dir)
