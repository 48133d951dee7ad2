"""kill -9 after a checkpoint, then --resume_from_checkpoint auto: the losses after resuming equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT
from test_sft import write_data

# Runs a stage script with one extra callback that SIGKILLs the process right after checkpoint N is complete
# (callbacks passed to Trainer run after its defaults, so the COMPLETE marker is already written).
KILLER = r"""
import os, runpy, signal, sys
import transformers
from transformers import TrainerCallback

KILL_AT = int(os.environ["KILL_AT_STEP"])

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

original = transformers.Trainer.__init__
def patched(self, *a, **k):
    original(self, *a, **k)
    self.add_callback(Kill())
transformers.Trainer.__init__ = patched
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run(args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=600, cwd=ROOT)


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def sft_args(model, data, out):
    # LoRA dropout on: resuming must also restore the RNG state, not just weights and data order
    return [str(ROOT / "supervised_finetuning.py"), "--model_name_or_path", str(model), "--train_file_dir", str(data),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "8", "--logging_steps", "1",
            "--save_steps", "2", "--learning_rate", "1e-2", "--lora_dropout", "0.1", "--template_name", "chatml",
            "--report_to", "none", "--seed", "3", "--do_eval", "False"]


def test_sft_kill9_then_auto_resume_reproduces_the_losses(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    full = tmp_path / "full"
    proc = run(sft_args(tiny_model_dir, data, full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = logged_losses(full)
    assert sorted(expected) == list(range(1, 9))

    crashed = tmp_path / "crashed"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = run([str(killer), *sft_args(tiny_model_dir, data, crashed)], env={"KILL_AT_STEP": "4"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (crashed / "checkpoint-4" / "COMPLETE").is_file() and not (crashed / "checkpoint-6").exists()

    # a checkpoint the job died while writing: newer, but without the COMPLETE marker
    half = crashed / "checkpoint-6"
    shutil.copytree(crashed / "checkpoint-4", half)
    (half / "COMPLETE").unlink()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    # a plain restart refuses to overwrite the crashed run
    proc = run(sft_args(tiny_model_dir, data, crashed))
    assert proc.returncode == 2 and "--resume_from_checkpoint auto" in proc.stderr

    proc = run([*sft_args(tiny_model_dir, data, crashed), "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" in proc.stdout + proc.stderr and "checkpoint-6" in proc.stdout + proc.stderr
    resumed = logged_losses(crashed)
    for step in range(5, 9):
        assert abs(resumed[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), (step, resumed, expected)


def test_explicit_incomplete_checkpoint_is_refused(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    proc = run([*sft_args(tiny_model_dir, data, out), "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert proc.returncode == 2 and "checkpoint is incomplete" in proc.stderr and "Traceback" not in proc.stderr
