"""The metrics history of a run: ``metrics.csv`` / ``metrics.json`` (one row per epoch) and
per-epoch plots (``plots/loss.png`` and one PNG per other metric)."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from covidkit.atomic import atomic_path, atomic_write_text

METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PLOTS_DIR = "plots"
NOT_PLOTTED = ("epoch", "time_s")

Row = dict[str, float]


def write_metrics(rows: Sequence[Row], run_dir: str | Path) -> None:
    """Rewrite both metrics files from the full history (atomically)."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / METRICS_CSV) as tmp:
        pd.DataFrame(list(rows)).to_csv(tmp, index=False)
    finite = [{k: v if math.isfinite(v) else None for k, v in row.items()} for row in rows]
    atomic_write_text(run_dir / METRICS_JSON, json.dumps(finite, indent=1))


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / METRICS_CSV)


def plot_metrics(rows: Sequence[Row], run_dir: str | Path) -> list[Path]:
    """Loss curves on one plot, every other metric on its own; x axis: epoch."""
    if not rows:
        return []
    df = pd.DataFrame(list(rows)).set_index("epoch")
    metrics = [c for c in df.columns if c not in NOT_PLOTTED]
    losses = [c for c in metrics if "loss" in c]
    out = Path(run_dir) / PLOTS_DIR
    written = []
    if losses:
        written.append(_plot(df[losses], "loss", out / "loss.png"))
    for name in metrics:
        if name not in losses:
            written.append(_plot(df[[name]], name, out / f"{_file_stem(name)}.png"))
    return written


def _file_stem(metric: str) -> str:
    return re.sub(r"[^\w.-]", "_", metric)


def _plot(df: pd.DataFrame, ylabel: str, path: Path) -> Path:
    # Imported here: only runs with plots need matplotlib. A bare Figure on an Agg canvas keeps
    # pyplot's global state (and a notebook's backend) untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, series in df.items():
        series = series.dropna()
        ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if df.shape[1] > 1:
        ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def best_row(rows: Sequence[Row], metric: str, mode: str) -> Row | None:
    """The row with the best finite value of ``metric`` (first one on ties)."""
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])

