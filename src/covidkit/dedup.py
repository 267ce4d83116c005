"""Near-duplicates of the competition's images among external radiographs: found, then dropped or mapped.

Public chest X-ray sets hold copies of the SIIM images (BIMCV and RICORD are its sources): resized,
re-encoded, re-windowed, flipped, cropped. A copy of a test image in a training set is a leak; a copy of
a training image is a second, unlabelled view of a labelled one. Two steps, both on prepared folders
(stage 00's square PNGs, their original aspect restored from ``meta.csv``):

1. **Candidates by perceptual hash.** Each image becomes a thumbnail with its histogram equalised (so that
   windowing and gamma change little), hashed by ``imagehash.phash``: an external image as it is and mirrored,
   a competition image under every combination of small crops of its sides (``hash_crops``), so that a
   cropped copy finds a hash near its own. The ``candidates`` nearest competition images go on to step 2.
   Radiographs look alike, so the hash ranks; it does not decide.
2. **Pixel check.** Coarse: the external thumbnail is matched (``cv2.matchTemplate``) inside each candidate
   over a grid of crops (up to ``max_crop`` of each axis) and both orientations, on small blurred thumbnails.
   Fine, for the ``refine`` best: the alignment refined (an affine warp, ``cv2.findTransformECC``) on larger
   thumbnails, then the normalised cross-correlation of their detail (a band of a difference of Gaussians)
   is the pair's score: distinct films share an outline, a copy also its source's texture, vessels and
   devices. A pair scoring ``threshold`` or more is a duplicate.

A duplicate of a test image is dropped; of a training image, dropped or mapped to it (``train_duplicates``).
``find_duplicates`` writes nothing; ``write_matches`` and ``save_pairs`` (the pairs nearest the threshold,
side by side, to check by eye) do. ``precision_recall`` scores a table against the synthetic ground truth
(``covidkit.synth.external``). On real data ``threshold`` is the user's.
"""
from __future__ import annotations

import itertools
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
    threshold: float = 0.78     # fine NCC at or above which a pair is a duplicate (dev seed 1: copies >= 0.85, others <= 0.71)
    candidates: int = 8         # competition images per external image checked pixel by pixel (nearest by hash)
    hash_size: int = 8          # phash of hash_size**2 bits
    hash_crops: tuple[float, ...] = (0.0, 0.05, 0.1)  # crops of each side of a competition image hashed (all combinations)
    side: int = 256             # long side of the thumbnails of the fine check (and of the hashes)
    coarse_side: int = 48       # long side of the thumbnails of the coarse check
    refine: int = 2             # candidates (best by the coarse check) that get the fine check
    max_crop: float = 0.2       # the most of an axis a copy may have lost to cropping (both sides together)
    crop_steps: int = 6         # grid of crops per axis in the coarse check
    blur: float = 1.5           # Gaussian sigma (coarse pixels, scaled) of the coarse check
    band: tuple[float, float] = (0.7, 4.0)  # difference of Gaussians (fine pixels) the fine NCC compares
    train_duplicates: str = "drop"  # a copy of a training image: "drop", or "map" it to that image

    def __post_init__(self) -> None:
        if self.train_duplicates not in ACTIONS:
            raise ValueError(f"train_duplicates must be one of {ACTIONS}, got {self.train_duplicates!r}")
        if not 0 <= self.max_crop < 1:
            raise ValueError(f"max_crop must be in [0, 1), got {self.max_crop}")


@dataclass(frozen=True)
class Signature:
    """``hashes``: bool ``[K, bits]`` (an external image: as is and mirrored; a competition image: its crops);
    ``image``: the equalised float32 thumbnail of the fine check; ``coarse``: the blurred one of the coarse check."""

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
    return imagehash.phash(Image.fromarray(np.ascontiguousarray(thumb)), hash_size=hash_size).hash.reshape(-1)


def crop_hashes(thumb: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """The hashes of ``thumb`` cropped by every combination of ``hash_crops`` on its four sides."""
    h, w = thumb.shape
    return np.stack([phash_bits(thumb[int(top * h): h - int(bottom * h), int(left * w): w - int(right * w)],
                                cfg.hash_size)
                     for left, top, right, bottom in itertools.product(cfg.hash_crops, repeat=4)])


def signature(image: np.ndarray, cfg: DedupConfig, orig_hw: tuple[int, int] | None = None,
              reference: bool = False) -> Signature:
    """An image's hashes and thumbnails; ``reference``: a competition image (its crops hashed)."""
    thumb = thumbnail(image, cfg.side, orig_hw)
    if reference:
        hashes = crop_hashes(thumb, cfg)
    else:
        hashes = np.stack([phash_bits(thumb, cfg.hash_size), phash_bits(thumb[:, ::-1], cfg.hash_size)])
    scale = cfg.coarse_side / cfg.side
    coarse = cv2.resize(thumb, (max(8, round(thumb.shape[1] * scale)), max(8, round(thumb.shape[0] * scale))),
                        interpolation=cv2.INTER_AREA).astype(np.float32)
    if cfg.blur:
        coarse = cv2.GaussianBlur(coarse, (0, 0), cfg.blur * scale * cfg.side / 128)
    return Signature(hashes=hashes, image=thumb.astype(np.float32), coarse=coarse)


def hash_distances(external: np.ndarray, reference: np.ndarray, budget: int = 2 ** 26) -> np.ndarray:
    """bool ``[N, 2, B]`` and ``[M, C, B]`` -> ``[N, M]``: the fewest differing bits over orientations and crops."""
    n, k, bits = external.shape
    m, c, _ = reference.shape
    b = reference.reshape(m * c, bits).astype(np.float32) * 2 - 1
    out = np.empty((n, m), np.int32)
    step = max(1, budget // (k * m * c))  # external images per block, for a bounded block of float32
    for start in range(0, n, step):
        a = external[start:start + step].reshape(-1, bits).astype(np.float32) * 2 - 1
        agree = (a @ b.T).reshape(-1, k, m, c).max(axis=(1, 3))
        out[start:start + step] = np.rint((bits - agree) / 2).astype(np.int32)
    return out


@dataclass(frozen=True)
class Alignment:
    """``warp``: external thumbnail pixels -> reference thumbnail pixels (``[2, 3]``, after the mirroring)."""

    ncc: float
    flipped: bool
    warp: np.ndarray

    def crops(self, external_shape: tuple[int, int], reference_shape: tuple[int, int]) -> tuple[float, float]:
        """Shares of the reference's width and height the external image does not show."""
        (h, w), (rh, rw) = external_shape, reference_shape
        return 1 - self.warp[0, 0] * w / rw, 1 - self.warp[1, 1] * h / rh


def _oriented(image: np.ndarray, flipped: bool) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1]) if flipped else image


def coarse_check(external: Signature, reference: Signature, cfg: DedupConfig) -> Alignment:
    """A grid of crops (``crop_steps`` per axis, up to ``max_crop``) in both orientations, every position
    (``cv2.matchTemplate``), on the small blurred thumbnails; the warp is returned in fine pixels."""
    grid = np.linspace(0, cfg.max_crop, cfg.crop_steps)
    ref = reference.coarse
    h, w = ref.shape
    best = (-2.0, False, (w, h), (0, 0))
    for flipped in (False, True):
        moving = _oriented(external.coarse, flipped)
        for cx, cy in itertools.product(grid, grid):
            size = (min(w, max(4, round((1 - cx) * w))), min(h, max(4, round((1 - cy) * h))))
            template = cv2.resize(moving, size, interpolation=cv2.INTER_AREA)
            _, score, _, loc = cv2.minMaxLoc(cv2.matchTemplate(ref, template, cv2.TM_CCOEFF_NORMED))
            if score > best[0]:
                best = (score, flipped, size, loc)
    score, flipped, size, loc = best
    (eh, ew), (rh, rw) = external.image.shape, reference.image.shape
    fx, fy = rw / w, rh / h  # coarse -> fine reference pixels
    warp = np.array([[size[0] * fx / ew, 0, loc[0] * fx], [0, size[1] * fy / eh, loc[1] * fy]], np.float32)
    return Alignment(float(score), flipped, warp)


def band_pass(image: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    low, high = band
    return (cv2.GaussianBlur(image, (0, 0), low) if low else image) - cv2.GaussianBlur(image, (0, 0), high)


def fine_check(external: Signature, reference: Signature, start: Alignment, cfg: DedupConfig) -> Alignment:
    """From a coarse alignment: an affine warp refined by ECC (``cv2.findTransformECC``) on the fine
    thumbnails, then the NCC of their detail (``band``), a border trimmed, as the score.

    The detail, not the whole image, because distinct chest films share their outline; a copy shares its
    source's texture, vessels, devices and noise too."""
    moving = _oriented(external.image, start.flipped)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    try:
        _, warp = cv2.findTransformECC(cv2.GaussianBlur(moving, (0, 0), 1.0),
                                       cv2.GaussianBlur(reference.image, (0, 0), 1.0), start.warp.copy(),
                                       cv2.MOTION_AFFINE, criteria, None, 1)
    except cv2.error:  # no convergence: the coarse warp alone
        warp = start.warp
    # ECC can also converge away from a right coarse warp (strong gamma, JPEG): the better of the two
    return max((Alignment(detail_ncc(moving, reference.image, w, cfg.band), start.flipped, w)
                for w in (warp, start.warp)), key=lambda a: a.ncc)


def detail_ncc(moving: np.ndarray, reference: np.ndarray, warp: np.ndarray, band: tuple[float, float]) -> float:
    """NCC of the detail of ``moving`` and of ``reference`` warped onto it, a 3 % border left out."""
    h, w = moving.shape
    back = cv2.warpAffine(reference, warp, (w, h), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)
    margin = max(1, int(0.03 * max(h, w)))
    a = band_pass(moving, band)[margin:-margin, margin:-margin].ravel()
    b = band_pass(back, band)[margin:-margin, margin:-margin].ravel()
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


def pixel_check(external: Signature, reference: Signature, cfg: DedupConfig) -> Alignment:
    """The alignment of ``external`` inside ``reference`` and its score: coarse grid, then refined."""
    return fine_check(external, reference, coarse_check(external, reference, cfg), cfg)


def match(external: list[Signature], reference: list[Signature], cfg: DedupConfig) -> pd.DataFrame:
    """For each external signature, its best competition image among the hash candidates.

    Every candidate gets the coarse check; the ``refine`` best of them the fine one, whose NCC is the score.
    Columns: ``external, reference`` (indices), ``hash_distance``, ``flipped``, ``crop_x``, ``crop_y``, ``ncc``.
    """
    dist = hash_distances(np.stack([s.hashes for s in external]), np.stack([s.hashes for s in reference]))
    k = min(cfg.candidates, len(reference))
    rows = []
    for i, sig in enumerate(external):
        candidates = np.argsort(dist[i], kind="stable")[:k]
        coarse = sorted(((coarse_check(sig, reference[j], cfg), j) for j in candidates), key=lambda c: -c[0].ncc)
        fine = [(fine_check(sig, reference[j], a, cfg), j) for a, j in coarse[:cfg.refine]]
        best, j = max(fine, key=lambda c: c[0].ncc)
        crop_x, crop_y = best.crops(sig.image.shape, reference[j].image.shape)
        rows.append({"external": i, "reference": int(j), "hash_distance": int(dist[i, j]), "flipped": best.flipped,
                     "crop_x": round(crop_x, 4), "crop_y": round(crop_y, 4), "ncc": best.ncc})
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


def signatures(table: pd.DataFrame, cfg: DedupConfig, reference: bool = False) -> list[Signature]:
    """Signatures of the PNGs of a table with ``png, orig_height, orig_width`` columns."""
    return [signature(read_prepared(p), cfg, (int(h), int(w)), reference)
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
    found = match(signatures(external, cfg), signatures(reference, cfg, reference=True), cfg)
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
