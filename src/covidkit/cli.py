"""The ``covidkit`` command line: thin wrappers around the same functions the notebooks call.

Heavy imports (torch, pydicom, pandas) happen inside each command so that ``covidkit --help``
answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


SYNTH_SIZES = ("seed", "train_studies", "test_studies", "nih_images", "rsna_images", "max_size", "min_size", "ct_volumes",
               "external_images", "external_duplicates")


def _cmd_synth(args: argparse.Namespace) -> int:
    from covidkit.synth import SynthConfig, write_all

    # unset options keep SynthConfig's defaults (one place for them; importing it here keeps --help fast)
    sizes = {name: getattr(args, name) for name in SYNTH_SIZES if getattr(args, name) is not None}
    cfg = SynthConfig(**sizes, ct=not args.no_ct, test_only=args.test_only)
    write_all(Path(args.out), cfg)
    if args.weights:
        from covidkit.models.pretrained import fabricate

        for path in fabricate(args.out):
            print(f"fabricated weights (random values, real shapes): {path}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Stage 00's settings (``covidkit.stages.prepare.Config``): the options given, its defaults for the rest."""
    from covidkit.stages.prepare import Config, prepare_folder

    given = {"prepared_size": args.prepared_size, "workers": args.workers, "folds": args.folds, "seed": args.seed}
    cfg = Config(**{k: v for k, v in given.items() if v is not None})
    summary = prepare_folder(cfg, Path(args.input_dir), Path(args.output_dir), split=args.split)
    return 1 if args.strict and summary.failed else 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from covidkit.dedup import DedupConfig, run_dedup

    settings = {k: getattr(args, k) for k in ("threshold", "candidates", "train_duplicates") if getattr(args, k) is not None}
    cfg = DedupConfig(**settings)  # unset options keep DedupConfig's defaults
    print(run_dedup(args.external_dir, args.prepared_dir, args.out, cfg, workers=args.workers).line())
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from covidkit.metrics import format_scores, score_files

    scores = score_files(args.image_level, args.study_level, args.submission)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from covidkit.submission import validate_files

    problems = validate_files(args.submission, args.sample)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{args.submission}: INVALID ({len(problems)} problems)", file=sys.stderr)
        return 1
    print(f"{args.submission}: valid")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "prepare":
        from covidkit.bench.prepare import bench_prepare

        bench_prepare(images=args.images, size=args.prepared_size, workers=args.workers,
                      input_dir=Path(args.input) if args.input else None, json_path=args.json)
    elif args.what == "predict":
        from covidkit.bench.predict import bench_predict

        bench_predict(args.models_dir, args.competition_dir, n=args.n, device=args.device, hflip_tta=args.tta)
    elif args.what == "scale":
        from covidkit.bench.scale import bench_scale

        bench_scale(n_train=args.train_images, n_test=args.test_images, boxes=args.boxes)
    elif args.what == "models":
        from covidkit.bench.models import bench_models

        bench_models(batches=tuple(args.batch_sizes), json_path=args.json, device=args.device,
                     amp=None if args.amp == "none" else args.amp)
    elif args.what == "estimate":
        from covidkit.bench.estimate import estimate

        print(estimate(args.models, args.prepare, gpu_factor=args.gpu_factor, dry_run=args.dry_run))
    elif args.what == "cogseg":
        from covidkit.ct.cogseg.bench import bench_cogseg

        bench_cogseg(size=args.size, batch_size=args.batch_size, steps=args.steps)
    elif args.what == "decovnet":
        from covidkit.ct.decovnet.bench import bench_decovnet

        bench_decovnet(volumes=args.volumes, slices=args.slices, size=args.size, device=args.device,
                       input_dir=Path(args.input) if args.input else None)
    elif args.what == "seeds":
        import shlex

        from covidkit.bench.seeds import (DEFAULT_SPEED_SCRIPT, SeedsConfig, run_seeds, write_readme_block,
                                           write_tables)

        if args.table_only:
            path = write_tables(Path(args.out), args.seeds)
            print(path.read_text())
        elif not args.seeds:
            raise ValueError("--seeds is required (except with --table-only)")
        else:
            cfg = SeedsConfig(seeds=args.seeds, out=Path(args.out), profile=args.profile, fresh_tests=args.fresh_tests,
                              speed_script=Path(args.speed_script or DEFAULT_SPEED_SCRIPT),
                              dry_run=args.dry_run, synth_args=shlex.split(args.synth_args), only=args.only)
            path = run_seeds(cfg)
            print(path.read_text())
        if args.readme:
            write_readme_block(Path(args.readme), path.read_text())
            print(f"{args.readme}: results block rewritten from {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from covidkit.faults import explain
    from covidkit.stages import notebook_of, overrides_of, run_stage, section_parameters

    try:
        module, result = run_stage(args.stage, args.profile, overrides_of(args))
    except Exception as err:  # a known fault (out of memory, disk full, ...): its one line first
        stage = notebook_of(args.stage)
        line = explain(stage, section_parameters(args.profile, stage, overrides_of(args)), type(err).__name__, str(err))
        if line is None:
            raise
        print(f"covidkit run: error: {line}", file=sys.stderr)
        return 1
    print(module.describe(result))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from covidkit.predict import predict_competition

    result = predict_competition(args.competition_dir, args.models_dir, args.out, device=args.device,
                                 hflip_tta=args.tta, workers=args.workers, progress=not args.quiet)
    print(result.summary())
    return 1 if args.strict and result.failed else 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from covidkit.pipeline import run_pipeline
    from covidkit.profiles import parse_overrides

    run_pipeline(
        profile=args.profile, input_dir=Path(args.input),
        run_dir=Path(args.run_dir) if args.run_dir else None, only=args.only, dry_run=args.dry_run,
        settings=parse_overrides(args.set), start_from=args.start_from, force=args.force, rounds=args.rounds,
    )
    return 0


def _cmd_kaggle(args: argparse.Namespace) -> int:
    from covidkit import kaggle

    if args.action == "bundle":
        kaggle.make_bundle(args.models_dir, args.out_dir, python=args.python, title=args.title,
                           wheel_cache=args.wheel_cache, offline=args.offline)
    else:
        wheels = kaggle.fetch_wheels(kaggle.prediction_requirements(args.python), Path(args.out), args.python)
        print(f"{len(wheels)} wheels for Python {args.python} in {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from covidkit.app import ServeConfig, serve

    config = ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    serve(args.models_dir, host=args.host, port=args.port, config=config, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the Kaggle layouts")
    p.add_argument("--out", required=True, help="folder to write the dataset folders into (e.g. input)")
    p.add_argument("--seed", type=int, help="default 0; the counts and sizes default to covidkit.synth.SynthConfig's")
    p.add_argument("--train-studies", type=int)
    p.add_argument("--test-studies", type=int)
    p.add_argument("--nih-images", type=int)
    p.add_argument("--rsna-images", type=int)
    p.add_argument("--max-size", type=int,
                   help="largest side of a synthetic SIIM DICOM, in pixels (real data: up to ~4000)")
    p.add_argument("--min-size", type=int, help="smallest side of a synthetic SIIM DICOM, in pixels")
    p.add_argument("--no-ct", action="store_true", help="skip the synthetic CT sets")
    p.add_argument("--ct-volumes", type=int,
                   help="CT volumes for DeCoVNet, half positive (default 140: 98 to train, 42 held out)")
    p.add_argument("--test-only", action="store_true",
                   help="only a SIIM test split (--test-studies) and its solution folder: a fresh test set")
    p.add_argument("--external", type=int, dest="external_images", metavar="N",
                   help="also N unlabelled radiographs in external/synthetic/, a share of them near-duplicates of SIIM "
                        "train and test images (ground truth: external/synthetic_duplicates.csv); default 0")
    p.add_argument("--external-duplicates", type=float, metavar="SHARE",
                   help="share of the external images that copy SIIM images (default 0.15)")
    p.add_argument("--weights", action="store_true",
                   help="also pretrained-weight files of the full profile's shapes, random values, in weights/ "
                        "(ResNeXt-101 ImageNet, YOLO11-L): what a dry run loads to test the loading paths")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="convert a competition folder's DICOMs to PNG, with meta.csv and folds.csv")
    p.add_argument("input_dir", help="competition folder in the Kaggle layout (train/, test/, the CSVs)")
    p.add_argument("output_dir")
    # left out: stage 00's defaults (covidkit.stages.prepare.Config), not repeated here
    p.add_argument("--prepared-size", type=int, default=None, help="side of the square output PNGs (default: stage 00's)")
    p.add_argument("--split", choices=["train", "test", "all"], default="all")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--folds", type=int, default=None, help="K of the grouped, stratified folds (default: stage 00's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fold assignment (default: stage 00's)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any image failed")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("dedup", help="find the copies of competition images in a folder of external radiographs")
    p.add_argument("external_dir", help="a folder of DICOM/PNG radiographs, nested any way (input/external/<name>)")
    p.add_argument("prepared_dir", help="stage 00's prepared competition folder (a run's prepared/)")
    p.add_argument("--out", required=True, help="folder for prepared/, matches.csv, pairs.png (and scores.json)")
    p.add_argument("--threshold", type=float, help="NCC at or above which a pair is a copy (default: DedupConfig's)")
    p.add_argument("--candidates", type=int, help="competition images checked per external image, nearest by hash")
    p.add_argument("--train-duplicates", choices=["drop", "map"],
                   help="a copy of a training image: drop it (default), or map it to that image (a copy of a test "
                        "image is always dropped)")
    p.add_argument("--workers", type=int, default=None, help="processes preparing the images (default: all cores)")
    p.set_defaults(func=_cmd_dedup)

    p = sub.add_parser("score", help="the competition metric of a submission")
    p.add_argument("--image-level", required=True, help="image-level labels CSV (train_image_level.csv format)")
    p.add_argument("--study-level", required=True, help="study-level labels CSV (train_study_level.csv format)")
    p.add_argument("--submission", required=True)
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("validate", help="check a submission against sample_submission.csv")
    p.add_argument("submission")
    p.add_argument("--sample", required=True, help="the competition's sample_submission.csv")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("bench", help="benchmarks (throughput, ratios against baselines)")
    benches = p.add_subparsers(dest="what", required=True, metavar="BENCH")
    b = benches.add_parser("prepare", help="covidkit prepare against a naive loop and decoding alone")
    b.add_argument("--images", type=int, default=48, help="number of DICOMs to time")
    b.add_argument("--prepared-size", type=int, default=512, help="side of the prepared PNGs")
    b.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    b.add_argument("--input", default=None, help="a competition folder to take the DICOMs from (default: copies "
                                                  "of the real radiograph RG1)")
    b.add_argument("--json", default=None, help="also write the figures there (for bench estimate)")
    b = benches.add_parser("predict", help="per-image latency of each prediction stage of a models folder")
    b.add_argument("models_dir")
    b.add_argument("competition_dir")
    b.add_argument("--n", type=int, default=16, help="test images to time")
    b.add_argument("--device", default="cpu")
    b.add_argument("--tta", action="store_true", help="horizontal-flip test-time augmentation")
    b = benches.add_parser("scale", help="the cheap stages on competition-sized fabricated tables")
    b.add_argument("--train-images", type=int, default=6334, help="training images (the competition's)")
    b.add_argument("--test-images", type=int, default=1263, help="test images (the competition's)")
    b.add_argument("--boxes", type=int, default=100, help="boxes per image, model and fold")
    b = benches.add_parser("models", help="a training step of each full-size model on this machine")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    b.add_argument("--json", default=None, help="also write the figures there (for bench estimate)")
    b.add_argument("--device", default="cpu", help="torch device, e.g. cuda: seconds and peak memory on the GPU")
    b.add_argument("--amp", default="bfloat16", choices=["bfloat16", "float16", "none"],
                   help="autocast dtype on CUDA, as the training engine runs it (the CPU measures float32)")
    b = benches.add_parser("estimate", help="the full run on the real data, estimated from bench models / prepare")
    b.add_argument("--models", required=True, help="the JSON of covidkit bench models --json")
    b.add_argument("--prepare", required=True, help="the JSON of covidkit bench prepare --json (real-size DICOMs)")
    b.add_argument("--dry-run", default=None, help="a full-profile dry run's dry_run.json (host memory per stage)")
    b.add_argument("--gpu-factor", type=float, default=None, help="a training step on one modern GPU is this many "
                                                                  "times faster than here (default: see README)")
    b = benches.add_parser("cogseg", help="CogSeg slices per second, inference and training")
    b.add_argument("--size", type=int, default=512, help="output side (the input is half)")
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--steps", type=int, default=5, help="timed steps")
    b = benches.add_parser("decovnet", help="DeCoVNet seconds per volume of the whole inference")
    b.add_argument("--volumes", type=int, default=4)
    b.add_argument("--slices", type=int, default=120, help="slices of a synthetic volume")
    b.add_argument("--size", type=int, default=512, help="side of a synthetic slice")
    b.add_argument("--device", default="cpu")
    b.add_argument("--input", default=None, help="a folder holding ct-covid-volumes/ (default: synthetic volumes)")
    b = benches.add_parser("seeds", help="synth + the pipeline on several seeds: each figure as mean +- sd over seeds")
    b.add_argument("--seeds", type=int, nargs="+", default=None, help="synthetic data seeds, one run each")
    b.add_argument("--profile", default="smoke", help="the pipeline's profile")
    b.add_argument("--out", default="runs/seeds", help="folder of the seed<S>/ runs and the tables (seeds.md, "
                                                       "seeds.csv, timings.csv)")
    b.add_argument("--fresh-tests", type=int, default=3,
                   help="fresh test sets per run, their seeds drawn anew (never a run seed)")
    b.add_argument("--speed-script", default=None,
                   help="the machine-speed workload, timed before each run (default: ../shared/tools/machine_speed.py "
                        "from the repository root; missing: no workload units, a warning)")
    b.add_argument("--synth-args", default="", help='more options of covidkit synth, e.g. "--train-studies 40"')
    b.add_argument("--dry-run", action="store_true", help="covidkit pipeline --dry-run: the whole path in minutes")
    b.add_argument("--only", nargs="+", default=None,
                   help="only these notebooks (covidkit pipeline --only, e.g. 11): one method over the seeds")
    b.add_argument("--table-only", action="store_true",
                   help="only rebuild the tables from the run folders in --out (all seed<S>/ without --seeds)")
    b.add_argument("--readme", default=None,
                   help="also write seeds.md between the results markers of this file (README.md's results table)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("run", help="one stage of the pipeline, as its notebook runs it (00 ... 07, 10, 11)")
    p.add_argument("stage", help="the stage: 06, 06_study_level or study_level")
    from covidkit.stages import stage_arguments

    stage_arguments(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("predict", help="a validated submission from a competition folder and a models folder")
    p.add_argument("competition_dir", help="competition folder (test/<study>/<series>/*.dcm, sample_submission.csv)")
    p.add_argument("models_dir", help="a models folder written by export_models (notebook 07: runs/<profile>/models)")
    p.add_argument("--out", required=True, help="submission CSV to write (a .log of unreadable images beside it)")
    p.add_argument("--device", default="cpu", help="torch device of the models, e.g. cuda")
    p.add_argument("--tta", action="store_true", help="also predict every image flipped horizontally")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one core less than all)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any image could not be read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("pipeline", help="run the numbered notebooks in order with papermill")
    p.add_argument("--profile", default="smoke", help="parameter profile in notebooks/profiles/ (smoke, full)")
    p.add_argument("--input", default="input", help="folder holding the dataset folders")
    p.add_argument("--run-dir", "--out", dest="run_dir", default=None, help="run folder (default: runs/<profile>)")
    p.add_argument("--only", nargs="*", default=None, help="run only these notebooks (name prefixes, e.g. 00)")
    p.add_argument("--dry-run", action="store_true",
                   help="the profile's settings on a few items per split and 1-2 steps per model (dry_run.json)")
    p.add_argument("--set", action="append", default=[], metavar="[NOTEBOOK.]KEY=VALUE",
                   help="override a setting (value in YAML) of every notebook that has it, or of one notebook: "
                        "--set 07.fresh_test_seeds=[5,6]")
    p.add_argument("--from", dest="start_from", default=None, metavar="STAGE",
                   help="run this stage and the ones after it again from scratch (e.g. 05); the earlier ones are "
                        "kept as they are. Without it, a stage whose completion record matches is skipped")
    p.add_argument("--force", action="store_true", help="run every stage again from scratch, finished or not")
    p.add_argument("--rounds", type=int, default=0, metavar="K",
                   help="then K pseudo-label rounds: 03-07 again on the previous round's 08 table, each round in "
                        "<run_dir>/round<r>/ (needs 08's external or include_test; docs/pseudo-labels.md)")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("kaggle", help="a Kaggle dataset (wheels, models, notebook) that submits offline")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = actions.add_parser("bundle", help="write the dataset folder for a models folder")
    b.add_argument("models_dir", help="a models folder written by export_models (notebook 07: runs/<profile>/models)")
    b.add_argument("out_dir", help="the folder to upload as a Kaggle dataset (replaced)")
    b.add_argument("--python", default="3.11", help="Python of the Kaggle image the wheels are for (default 3.11)")
    b.add_argument("--title", default=None, help="the dataset's title (default: covidkit bundle)")
    b.add_argument("--wheel-cache", default=None,
                   help="a folder of wheels already downloaded (what `covidkit kaggle wheels` writes); missing ones "
                        "are downloaded into it")
    b.add_argument("--offline", action="store_true", help="download nothing: --wheel-cache must hold every wheel")
    b.set_defaults(func=_cmd_kaggle)
    w = actions.add_parser("wheels", help="download the wheels a bundle needs into a folder (a cache for bundle)")
    w.add_argument("--out", required=True)
    w.add_argument("--python", default="3.11")
    w.set_defaults(func=_cmd_kaggle)

    p = sub.add_parser("serve", help="web page and JSON API: upload a radiograph, see its opacities and study class")
    p.add_argument("models_dir", help="a models folder written by export_models (what `covidkit predict` takes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=64, help="largest accepted file in MiB (413 above)")
    p.add_argument("--device", default="cpu", help="torch device of the models, e.g. cuda:0")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from covidkit.atomic import DiskFullError
    from covidkit.deprecated import show_deprecations
    from covidkit.pipeline import PipelineError, PipelineInterrupted

    show_deprecations()
    try:
        return args.func(args)
    except PipelineInterrupted as stop:
        print(f"covidkit {args.command}: {stop}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PipelineError, DiskFullError) as err:  # BundleError is a ValueError  # user errors: one line, no traceback
        print(f"covidkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
