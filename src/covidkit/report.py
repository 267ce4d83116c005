"""The run report: one self-contained HTML page of what a pipeline run produced.

``write_report(run_dir)`` reads the files the notebooks wrote in a run folder and writes
``<run_dir>/report.html``: the learning checks (``covidkit.learning``), each notebook's time and memory, each
stage's settings (its ``config.yaml``, collapsed), then each stage's own sections, which the stage module
declares (``REPORT_SECTIONS``, built with this module's helpers): the detectors' out-of-fold (OOF) opacity AP
and PR curves and OOF examples (05), the study model's OOF APs, PR curves, ``none`` comparison and confusion
matrix (06), the submission's score, the fresh test sets and test examples (07). Figures are embedded as base64 PNG; the page loads nothing
from anywhere. A section whose inputs are missing says "not run" and the rest of the report is unaffected.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from covidkit.boxes import scale_boxes
from covidkit.data.siim import COMPETITION, SOLUTION, read_image_labels
from covidkit.deprecated import moved
from covidkit.layout import RunLayout
from covidkit.oof import OofPredictions, read_oof

EXAMPLES = 8

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}.missing{color:#a00}pre{background:#f6f6f6;padding:.5em}
.banner{background:#b00;color:#fff;padding:.5em .8em;margin:.3em 0;font-weight:bold}
.ok{color:#070}.tie{color:#a60;font-weight:bold}.failed{color:#b00;font-weight:bold}"""


class Missing(Exception):
    """A section's inputs are not in the run folder (the notebook was not run)."""


def figure_html(fig) -> str:
    """A matplotlib figure as an inline PNG ``<img>``; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png_html(buffer.getvalue())


def png_html(data: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def table_html(frame: pd.DataFrame, digits: int = 4) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.{digits}f}", na_rep="n/a", border=0)


def require(*paths: Path) -> None:
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise Missing(f"not run: {', '.join(absent)} missing")


def find_input_dir(layout: RunLayout) -> Path | None:
    """The ``input_dir`` the run's notebooks were given (papermill records it in each executed notebook)."""
    for book in sorted(layout.notebooks.glob("*.ipynb")):
        try:
            params = json.loads(book.read_text())["metadata"]["papermill"]["parameters"]
        except (KeyError, ValueError):
            continue
        if params.get("input_dir"):
            return Path(params["input_dir"])
    return None


def label_boxes(input_dir: Path | None) -> dict[str, np.ndarray]:
    """``{image_id: true boxes}`` of the training labels under ``input_dir``; ``Missing`` when there are none."""
    if input_dir is None:
        raise Missing("not run: the training labels were not found (no input_dir)")
    path = input_dir / COMPETITION / "train_image_level.csv"
    require(path)
    labels = read_image_labels(path)
    return dict(zip(labels["image_id"], labels["boxes"]))


def detector_oofs(layout: RunLayout) -> dict[str, OofPredictions]:
    files = {"Faster R-CNN (03)": layout.siim_fasterrcnn.oof, "YOLO (04)": layout.siim_yolo.oof,
             "WBF ensemble (05)": layout.ensemble_wbf.fused_oof}
    return {name: read_oof(path) for name, path in files.items() if path.is_file()}


def precision_recall_labels(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of one-box-per-row classes (study classes, ``none``) by descending score."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    hits = np.cumsum(np.asarray(positive, dtype=bool)[order])
    return hits / max(hits[-1] if len(hits) else 0, 1), hits / np.arange(1, len(hits) + 1)


def prior_box_aps(layout: RunLayout) -> dict[str, float]:
    """The prior-box detector's OOF AP on each model's images, as its stage wrote it (``covidkit.baselines``)."""
    aps = {}
    for name, path in {"Faster R-CNN (03)": layout.siim_fasterrcnn.summary, "YOLO (04)": layout.siim_yolo.summary}.items():
        value = json.loads(path.read_text()).get("prior_box_ap50") if path.is_file() else None
        aps[name] = np.nan if value is None else value
    if layout.ensemble_wbf.ap_table.is_file():
        table = pd.read_csv(layout.ensemble_wbf.ap_table, index_col=0)["ap50"]
        aps["WBF ensemble (05)"] = float(table.get("prior boxes", np.nan))
    return aps


def examples_figure(paths: list[Path], truths: list[np.ndarray], preds: list[np.ndarray], scores: list[np.ndarray],
                     sizes: list[tuple[int, int]], titles: list[str]):
    """Prepared PNGs with the boxes (original pixels) scaled to them."""
    from covidkit.images import read_grey
    from covidkit.plots import image_grid

    images = [read_grey(p) for p in paths]
    scale = [lambda b, img=img, hw=hw: scale_boxes(b, hw, img.shape) for img, hw in zip(images, sizes)]
    return image_grid(images, [f(t) for f, t in zip(scale, truths)], titles=titles,
                      predicted=[f(p) for f, p in zip(scale, preds)], predicted_scores=scores)


def image_meta(layout: RunLayout) -> dict[str, tuple[int, int]]:
    from covidkit.prepare import image_sizes

    require(layout.prepare.meta_csv)
    return image_sizes(layout.prepare.dir)


def pick_examples(ids: list[str], truth: dict[str, np.ndarray]) -> list[str]:
    """Up to EXAMPLES ids, images with boxes first (they show more), deterministic."""
    with_box = [i for i in sorted(ids) if len(truth.get(i, ())) > 0]
    without = [i for i in sorted(ids) if len(truth.get(i, ())) == 0]
    return (with_box[: EXAMPLES * 3 // 4] + without)[:EXAMPLES]


def study_titles(layout: RunLayout) -> dict[str, str]:
    """``{image_id: "label · p(label)"}`` from 06's OOF images, when it ran."""
    path = layout.study_level.oof_images
    if not path.is_file():
        return {}
    images = pd.read_csv(path, dtype={"image_id": str})
    return {i: f"{label} · p={p:.2f}" for i, label, p in
            zip(images["image_id"], images["label"], images.apply(lambda r: r[f"p_{r['label']}"], axis=1))}


DRY_RUN_CHECKS = "a dry run: one or two optimizer steps per model, so the learning checks do not apply"


def learning_banners(checks) -> str:
    """One red banner per failed check: not above its baseline, constant, or missing (``covidkit.learning``)."""
    return "\n".join(f'<div class="banner">did not learn: {html.escape(c.line())}</div>'
                     for c in checks if c.failed)


def _number(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def learning_section(checks, dry_run: bool = False) -> str:
    """Every model's held-out figure beside each of its baselines (name and value), and the verdict."""
    if dry_run:
        raise Missing(DRY_RUN_CHECKS)
    if not checks:
        raise Missing("not run: no stage has left a held-out figure yet")
    css = {"learned": "ok", "tie": "tie"}
    rows = "".join(
        f"<tr><td>{html.escape(c.stage)}</td><td>{html.escape(c.model)}</td><td>{html.escape(c.figure)}</td>"
        f"<td>{_number(c.value)}</td><td>{html.escape(c.baseline_name)}</td><td>{_number(c.baseline)}</td>"
        f"<td>{_number(c.margin)}</td><td>{'n/a' if c.spread is None else f'{c.spread:.3g}'}</td>"
        f'<td class="{css.get(c.status, "failed")}">{html.escape(c.verdict)}</td></tr>' for c in checks)
    return ("<p>Each trained model's held-out figure beside each of its baselines: untrained (the same network "
            "before training), trivial (rules that look at no pixel: class priors, prior boxes, the box-count rule, "
            "HU histograms, chance) or a rival trained model. <i>learned</i>: above the baseline by more than the "
            "margin; <i>tie</i>: within the margin (the seed-to-seed spread) of a rival model; <i>not above</i>, "
            "<i>constant</i> (its outputs do not vary over the held-out items: <i>spread</i> is their standard "
            "deviation) and <i>missing</i> (the stage ran but did not write the figure or its baseline) fail.</p>"
            "<table><tr><th>stage</th><th>model</th><th>figure</th><th>value</th><th>baseline</th>"
            "<th>baseline value</th><th>margin</th><th>spread</th>"
            f"<th>verdict</th></tr>{rows}</table>")


def _section(title: str, build: Callable[[], str]) -> str:
    try:
        body = build()
    except Missing as missing:
        body = f'<p class="missing">{html.escape(str(missing))}</p>'
    return f"<h2>{html.escape(title)}</h2>\n{body}"


def stages_section(layout: RunLayout) -> str:
    """Each notebook's wall time and its kernel's peak resident memory (``covidkit pipeline`` records them)."""
    record = next((p for p in (layout.dry_run_record, layout.stage_record) if p.is_file()), None)
    if record is None:
        raise Missing("not run through covidkit pipeline: no stages.json or dry_run.json")
    rows = pd.DataFrame(json.loads(record.read_text())).set_index("stage")
    kind = "a dry run: the profile's settings on a few items, 1-2 steps per model" if record == layout.dry_run_record \
        else "the run"
    return f"<p>{html.escape(kind)} ({html.escape(record.name)})</p>" + table_html(rows, digits=1)


def settings_section(layout: RunLayout) -> str:
    """Each stage's resolved settings (its ``config.yaml``), one collapsible block per stage."""
    from covidkit.stages import STAGES

    blocks = [f"<details><summary>{html.escape(notebook)}</summary><pre>{html.escape(path.read_text())}</pre></details>"
              for notebook in STAGES if (path := layout.settings(notebook)).is_file()]
    if not blocks:
        raise Missing("not recorded: no stage folder holds a config.yaml")
    return "\n".join(blocks)


@dataclass(frozen=True)
class ReportInputs:
    """What a stage's report section reads: the run folder, the training labels' folder, the submission and the
    test labels (``solution_dir``), when there are any."""

    layout: RunLayout
    input_dir: Path | None = None
    submission_csv: Path | None = None
    solution_dir: Path | None = None


def stage_sections(inputs: ReportInputs) -> list[str]:
    """Each stage's own sections, in stage order: a stage module declares ``REPORT_SECTIONS``, a list of
    ``(title, build(inputs) -> html)``; a build that raises ``Missing`` shows its reason instead."""
    from covidkit.stages import STAGES, stage_module

    return [_section(title, lambda build=build: build(inputs))
            for notebook in STAGES for title, build in getattr(stage_module(notebook), "REPORT_SECTIONS", ())]


def write_report(run_dir: str | Path, submission_csv: str | Path | None = None, solution_dir: str | Path | None = None,
                 input_dir: str | Path | None = None, checks: list | None = None) -> Path:
    """Write ``<run_dir>/report.html`` and return its path.

    ``input_dir`` (the folder holding ``siim-covid19-detection/``, for the OOF truth boxes) defaults to
    the one recorded in the run's executed notebooks; ``solution_dir`` defaults to
    ``<input_dir>/siim-covid19-detection-solution`` when that exists. ``checks``: the run's
    ``covidkit.learning`` checks, when the caller has them already.
    """
    layout = RunLayout(run_dir)
    input_dir = Path(input_dir) if input_dir is not None else find_input_dir(layout)
    if solution_dir is None and input_dir is not None and (input_dir / SOLUTION).is_dir():
        solution_dir = input_dir / SOLUTION
    from covidkit.learning import check_run

    if layout.is_dry_run:
        checks = []
    elif checks is None:
        checks = check_run(layout.root, input_dir)
    inputs = ReportInputs(layout, input_dir, Path(submission_csv) if submission_csv is not None else None,
                          Path(solution_dir) if solution_dir is not None else None)
    sections = [
        _section("Did every model learn?", lambda: learning_section(checks, layout.is_dry_run)),
        _section("Stages: wall time and peak memory", lambda: stages_section(layout)),
        _section("Settings each stage ran with", lambda: settings_section(layout)),
        *stage_sections(inputs),
    ]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>covidkit report</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>covidkit run report</h1>\n"
            f"<p>Run folder <code>{html.escape(str(layout.root.resolve()))}</code>, written {stamp}.</p>\n"
            + learning_banners(checks) + "\n" + "\n".join(sections) + "\n</body></html>\n")
    path = layout.report
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


__getattr__ = moved(__name__, {"study_section": "covidkit.stages.study_level.study_section"})
