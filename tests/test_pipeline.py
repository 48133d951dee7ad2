"""run_pipeline.sh end to end on a tiny model: every stage runs, every merge verifies, the summary prints."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_pipeline_runs_every_stage_on_a_tiny_model(tiny_chat_model_dir, tmp_path):
    out = tmp_path / "pipeline"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               MODEL=str(tiny_chat_model_dir), PIPELINE_DIR=str(out), MASTER_PORT="29561", MAX_LEN="256",
               PT_STEPS="2", SFT_STEPS="2", RM_STEPS="2", PPO_STEPS="1", DPO_STEPS="2", NUM_QUESTIONS="2",
               ANSWER_TOKENS="6", EVAL_LIMIT="2", EVAL_BENCH="data/eval")
    proc = subprocess.run(["bash", str(ROOT / "run_pipeline.sh")], capture_output=True, text=True, env=env,
                          timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("pt", "sft", "rm", "ppo", "dpo"):
        assert (out / stage / "adapter_model.safetensors").is_file(), stage
    for merged in ("pt-merged", "sft-merged", "ppo-merged", "dpo-merged"):
        assert (out / merged / "model.safetensors").is_file(), merged
    for merged in ("sft-merged", "ppo-merged", "dpo-merged"):  # chat stages record their format; PT has none
        assert (out / merged / "medtrain_chat_format.json").is_file(), merged
    summary = proc.stdout[proc.stdout.index("PIPELINE SUMMARY"):]
    for stage in ("PT", "SFT", "RM", "DPO", "PPO"):
        assert f"\n{stage:>4}  " in summary, summary
    assert "held-out perplexity" in summary and "reward-model score per update" in summary
    for name in ("base", "sft", "dpo", "ppo"):  # every model scored on the same questions
        assert (out / "eval" / name / "results.json").is_file(), name
    table = summary[summary.index("BENCHMARK ACCURACY"):]
    assert "medicine_en    4/2" not in table  # one n per subject: the same questions for every model
    for row in ("medicine_en", "medicine_zh", "macro average", "micro average"):
        line = next(l for l in table.splitlines() if l.startswith(row))
        assert line.split()[-5:-1] != [] and line.count(" ± ") == 4, line
    assert "contaminated (SFT/DPO/PPO)" in table
    assert summary.count("[base]") == 2 and summary.count("[ PPO]") == 2 and summary.count("[ DPO]") == 2
