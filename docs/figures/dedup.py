"""Deduplication measured on a synthetic set: SIIM train/test, external images with planted copies.

    python docs/figures/dedup.py SEED OUT_DIR [--train-studies 120 --test-studies 40 --external 300]

Writes the data, stage 00's prepared folder and ``covidkit dedup``'s outputs under OUT_DIR, prints precision,
recall and the score margins (lowest NCC of a planted copy, highest of a distinct image). Choose settings on
one seed, report them on another.
"""
import argparse
import contextlib
import io
import time
from pathlib import Path

import pandas as pd

from covidkit.data.siim import COMPETITION
from covidkit.dedup import DedupConfig, run_dedup
from covidkit.prepare import prepare
from covidkit.synth import SynthConfig, write_external, write_siim
from covidkit.synth.external import duplicates_csv, external_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("seed", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-studies", type=int, default=120)
    parser.add_argument("--test-studies", type=int, default=40)
    parser.add_argument("--external", type=int, default=300)
    parser.add_argument("--share", type=float, default=0.15)
    parser.add_argument("--max-size", type=int, default=1024)
    parser.add_argument("--threshold", type=float, default=DedupConfig.threshold)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = SynthConfig(seed=args.seed, train_studies=args.train_studies, test_studies=args.test_studies,
                      max_size=args.max_size, workers=args.workers, ct=False, external_images=args.external,
                      external_duplicates=args.share)
    start = time.perf_counter()
    if not external_folder(args.out).exists():
        with contextlib.redirect_stderr(io.StringIO()):
            write_siim(args.out, cfg)
            print(write_external(args.out, cfg))
        prepare(args.out / COMPETITION, args.out / "prepared", workers=args.workers, progress=False)
    made = time.perf_counter()
    result = run_dedup(external_folder(args.out), args.out / "prepared", args.out / "dedup",
                       DedupConfig(threshold=args.threshold), workers=args.workers, progress=False)
    print(result.line())
    matches, truth = result.matches, pd.read_csv(duplicates_csv(args.out), dtype=str)
    copies = matches["external_path"].isin(truth["path"])
    print(f"NCC of the planted copies: min {matches.loc[copies, 'ncc'].min():.3f}; of the other images: "
          f"max {matches.loc[~copies, 'ncc'].max():.3f}; {len(matches)} external x "
          f"{len(pd.read_csv(args.out / 'prepared' / 'meta.csv'))} competition images; "
          f"data {made - start:.0f} s, dedup {time.perf_counter() - made:.0f} s")


if __name__ == "__main__":
    main()
