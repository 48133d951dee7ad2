"""Training curves as PNG pictures, from a trainer's log history (the ``log_history`` of ``trainer_state.json``).

Every stage ends with one call, :func:`save_training_curves` (``output_dir/training_curves.png``: one panel per
metric, train and eval series together), like LLaMA-Factory's ``plot_loss``; TensorBoard logs stay as they are.
``pipeline_summary.py`` draws every stage of a pipeline in one figure with :func:`plot_pipeline`.

matplotlib draws through its Agg canvas on a :class:`~matplotlib.figure.Figure` of its own: no pyplot, no global
backend choice, no display needed, nothing changed at import.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

CURVES_FILE = "training_curves.png"
PIPELINE_FILE = "pipeline_curves.png"
# Panels in this order, each with the metric as trained ("loss") and as evaluated ("eval_loss") where logged:
# SFT/PT/DPO/RM losses, RM pairwise accuracy and margin, DPO's implicit-reward accuracy and margin, our PPO's
# reward-model score, KL and losses, TRL RLOO/GRPO's reward and KL.
PANELS = ("loss", "accuracy", "reward_margin", "rewards/accuracies", "rewards/margins", "objective/score_mean",
          "objective/kl", "loss/policy", "loss/value", "reward", "kl")
SMOOTH_FROM = 20  # series with at least this many points also get an exponential moving average line


def curves(log_history: Iterable[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{panel: {"train"|"eval": [(step, value), ...]}}`` for every panel of :data:`PANELS` that was logged.

    Entries without a ``step`` (or with a non-finite value) are skipped; the final summary entry of a
    transformers run (``train_loss``, ``train_runtime``) is not a curve point and is ignored.
    """
    found: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, (int, float)):
            continue
        for panel in PANELS:
            for split, key in (("train", panel), ("eval", f"eval_{panel}")):
                value = entry.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    found.setdefault(panel, {}).setdefault(split, []).append((float(step), float(value)))
    return {panel: found[panel] for panel in PANELS if panel in found}


def _ema(values: Sequence[float], weight: float = 0.9) -> list[float]:
    out, last = [], values[0]
    for value in values:
        last = weight * last + (1 - weight) * value
        out.append(last)
    return out


def _draw(ax, panel: str, series: dict[str, list[tuple[float, float]]]) -> None:
    for split, style in (("train", {"color": "tab:blue", "linewidth": 1.2}),
                         ("eval", {"color": "tab:orange", "marker": "o", "markersize": 3, "linewidth": 1.2})):
        points = series.get(split)
        if not points:
            continue
        steps, values = zip(*points)
        if len(points) >= SMOOTH_FROM:
            ax.plot(steps, values, alpha=0.3, **style)
            ax.plot(steps, _ema(values), label=f"{split} (smoothed)", **style)
        else:
            ax.plot(steps, values, label=split, **style)
    ax.set_title(panel, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG under a temporary name and rename it into place: a crash never leaves half a picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def plot_curves(log_history: Iterable[dict], path: str | os.PathLike, title: str | None = None) -> Path | None:
    """One figure with a panel per logged metric; returns its path, or None when nothing was logged."""
    panels = curves(log_history)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (panel, series) in zip(axes, panels.items()):
        _draw(ax, panel, series)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


def save_training_curves(output_dir: str | os.PathLike, log_history: Iterable[dict], title: str | None = None) -> Path | None:
    """The call every stage makes at its end (main process): ``output_dir/training_curves.png``.

    A finished training is never lost to a picture: a drawing error is logged as a warning, not raised.
    """
    try:
        path = plot_curves(list(log_history), Path(output_dir) / CURVES_FILE, title=title)
    except Exception as err:  # noqa: BLE001 - the model is saved already; the picture is a convenience
        logger.warning("could not draw %s in %s: %s", CURVES_FILE, output_dir, err)
        return None
    if path is not None:
        logger.info("training curves: %s", path)
    return path


def read_log_history(stage_dir: str | os.PathLike) -> list[dict]:
    """``log_history`` of ``stage_dir/trainer_state.json`` ([] when the stage has none)."""
    path = Path(stage_dir) / "trainer_state.json"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get("log_history", [])


def plot_pipeline(stages: dict[str, list[dict]], path: str | os.PathLike,
                  table: tuple[Sequence[str], Sequence[Sequence[str]]] | None = None) -> Path | None:
    """Every stage's curves in one figure (a row per stage), with an optional table below them.

    ``stages``: ``{stage name: log_history}`` in pipeline order; ``table``: ``(header, rows)`` of strings, e.g. the
    key metric per stage or an evaluation table. Returns the path, or None when there is nothing to draw.
    """
    drawn = {name: panels for name, panels in ((n, curves(h)) for n, h in stages.items()) if panels}
    if not drawn and not table:
        return None
    cols = max([len(p) for p in drawn.values()] + [1])
    table_rows = len(table[1]) if table else 0
    table_height = (0.6 + 0.3 * table_rows) if table else 0
    fig = Figure(figsize=(3.8 * cols, 2.8 * len(drawn) + table_height + 0.4), layout="constrained")
    grid = fig.add_gridspec(len(drawn) + (1 if table else 0), cols,
                            height_ratios=[2.8] * len(drawn) + ([table_height] if table else []))
    for row, (name, panels) in enumerate(drawn.items()):
        for col, (panel, series) in enumerate(panels.items()):
            ax = fig.add_subplot(grid[row, col])
            _draw(ax, f"{name}: {panel}", series)
    if table:
        header, rows = table
        ax = fig.add_subplot(grid[len(drawn), :])
        ax.axis("off")
        cells = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="center", cellLoc="left")
        cells.auto_set_font_size(False)
        cells.set_fontsize(8)
        cells.auto_set_column_width(list(range(len(header))))
    fig.suptitle("pipeline training curves", fontsize=11)
    return _save(fig, Path(path))
