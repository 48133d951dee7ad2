"""Training curves: the metrics read from a log history, PNG files that decode, the pipeline's one figure."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from matplotlib.image import imread

import pipeline_summary
from medtrain.plotting import CURVES_FILE, PIPELINE_FILE, curves, plot_curves, save_training_curves

SFT_HISTORY = [
    {"epoch": 0.5, "step": 1, "loss": 2.5, "learning_rate": 1e-4},
    {"epoch": 1.0, "step": 2, "loss": 2.0, "learning_rate": 5e-5},
    {"epoch": 1.0, "step": 2, "eval_loss": 2.2, "eval_runtime": 0.1},
    {"epoch": 1.0, "step": 2, "train_loss": 2.25, "train_runtime": 1.0, "total_flos": 10.0},
]
PPO_HISTORY = [{"step": s, "epoch": s / 4, "objective/score_mean": 0.1 * s, "objective/kl": 0.01 * s,
                "loss/policy": -0.02, "loss/value": 0.5 / s} for s in range(1, 5)]


def decoded(path):
    """The PNG's pixels; a picture with more than one colour (something was drawn)."""
    assert path.is_file() and path.stat().st_size > 0
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels[..., :3]) > 0.5
    return pixels


def test_curves_pair_train_and_eval_series_and_skip_summary_entries():
    assert curves(SFT_HISTORY) == {"loss": {"train": [(1.0, 2.5), (2.0, 2.0)], "eval": [(2.0, 2.2)]}}
    ppo = curves(PPO_HISTORY)
    assert list(ppo) == ["objective/score_mean", "objective/kl", "loss/policy", "loss/value"]
    assert ppo["objective/kl"]["train"][-1] == (4.0, 0.04)
    assert curves([{"step": 1, "loss": float("nan")}, {"loss": 1.0}]) == {}


def test_png_is_written_and_decodes(tmp_path):
    small = decoded(plot_curves(SFT_HISTORY, tmp_path / "one.png"))
    wide = decoded(plot_curves(PPO_HISTORY, tmp_path / "four.png", title="PPO"))
    assert wide.shape[1] > small.shape[1]  # four panels side by side (3 columns) vs one
    assert plot_curves([{"step": 1, "learning_rate": 1e-4}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists() and not list(tmp_path.glob(".*tmp"))


def test_a_drawing_error_never_fails_the_finished_stage(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert save_training_curves(blocked, SFT_HISTORY) is None
    assert f"could not draw {CURVES_FILE}" in caplog.text


def test_pipeline_summary_draws_every_stage_in_one_figure(tmp_path, monkeypatch, capsys):
    for stage, history in (("sft", SFT_HISTORY), ("ppo", PPO_HISTORY)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp_path / "sft" / "eval_results.json").write_text(json.dumps({"eval_loss": 2.2}))
    path = pipeline_summary.write_figure(str(tmp_path), pipeline_summary.stage_metrics(str(tmp_path)))
    assert path == str(tmp_path / PIPELINE_FILE)
    pixels = decoded(tmp_path / PIPELINE_FILE)
    assert pixels.shape[0] > pixels.shape[1] / 3  # two stage rows plus the table
    # the script prints the figure's path (no questions file: it stops after the tables and the figure)
    monkeypatch.setattr("sys.argv", ["pipeline_summary.py", "--pipeline_dir", str(tmp_path), "--base_model", "m",
                                     "--questions", str(tmp_path / "missing.jsonl")])
    with pytest.raises(OSError, match="missing.jsonl"):  # no questions file: it stops after the figure
        pipeline_summary.main()
    assert f"training curves of every stage: {tmp_path / PIPELINE_FILE}" in capsys.readouterr().out
