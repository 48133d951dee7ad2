"""kill -9 after a checkpoint, then --resume_from_checkpoint auto: the losses after resuming equal an uninterrupted run
(SFT, DPO and PPO, each in its own subprocess)."""

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
# Runs a stage script with a hook that SIGKILLs the process right after checkpoint N is complete: a Trainer callback
# (callbacks passed to Trainer run after its defaults, so the COMPLETE marker is already written), or, for our PPO
# trainer, a wrapper around its checkpoint writer (which renames the finished checkpoint into place).
KILLER = r"""
import os, runpy, signal, sys
import transformers
from transformers import TrainerCallback
from medtrain.ppo import trainer as ppo_trainer

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

save_checkpoint = ppo_trainer.PPOTrainer._save_checkpoint
def save_then_kill(self):
    path = save_checkpoint(self)
    if self.state.global_step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
ppo_trainer.PPOTrainer._save_checkpoint = save_then_kill

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run(args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=600, cwd=ROOT)


def logged_losses(output_dir, key="loss"):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


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


def crash_then_resume(script_args, tmp_path, out, kill_at, key):
    """Run to the end in ``full``; run again in ``out`` killed after checkpoint ``kill_at``; resume with auto.
    Returns (uninterrupted, resumed) logged values of ``key`` per step."""
    full = tmp_path / "full"
    proc = run(script_args(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = logged_losses(full, key)

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = run([str(killer), *script_args(out)], env={"KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / f"checkpoint-{kill_at}" / "COMPLETE").is_file()
    assert not (out / "trainer_state.json").exists() or max(logged_losses(out, key)) <= kill_at

    proc = run([*script_args(out), "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint-{kill_at}" in proc.stdout + proc.stderr
    return expected, logged_losses(out, key)


def test_dpo_kill9_then_auto_resume_reproduces_the_losses(tiny_chat_model_dir, tmp_path):
    data = tmp_path / "pref"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": f"Question {i}: I have a fever."}],
             "chosen": "Rest and drink water.", "rejected": "Take salt." if i % 2 else "No."} for i in range(12)]
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dpo_args(out):
        return [str(ROOT / "dpo_training.py"), "--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir",
                str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "6",
                "--logging_steps", "1", "--save_steps", "2", "--learning_rate", "1e-2", "--report_to", "none",
                "--seed", "5", "--do_eval", "False", "--disable_tqdm", "True"]

    expected, resumed = crash_then_resume(dpo_args, tmp_path, tmp_path / "crashed", 4, "loss")
    assert sorted(expected) == list(range(1, 7)) and len(set(expected.values())) > 2  # the losses do move
    for step in (5, 6):
        assert abs(resumed[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), (step, resumed, expected)


def test_ppo_kill9_then_auto_resume_reproduces_the_updates(tiny_chat_model_dir, tmp_path):
    data = tmp_path / "pref"
    data.mkdir()
    rows = [{"prompt": f"Question {i}: I have a fever, what should I do?", "chosen": "Rest and drink water.",
             "rejected": "No."} for i in range(8)]
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run([str(ROOT / "reward_modeling.py"), "--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir",
                str(data), "--output_dir", str(tmp_path / "rm"), "--max_steps", "2", "--per_device_train_batch_size",
                "4", "--report_to", "none", "--save_strategy", "no"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    def ppo_args(out):
        # sampling, adaptive KL and LoRA dropout all consume RNG: a resume must restore it, not just the weights
        return [str(ROOT / "ppo_training.py"), "--model_name_or_path", str(tiny_chat_model_dir),
                "--reward_model_name_or_path", str(tmp_path / "rm"), "--train_file_dir", str(data),
                "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", "--rollout_batch_size", "2",
                "--num_mini_batches", "1", "--max_new_tokens", "6", "--learning_rate", "1e-3",
                "--adaptive_kl", "True", "--lora_dropout", "0.1", "--report_to", "none", "--seed", "5"]

    crashed = tmp_path / "crashed"
    expected, resumed = crash_then_resume(ppo_args, tmp_path, crashed, 4, "loss/policy")
    assert sorted(expected) == list(range(1, 7))
    full_log = {e["step"]: e for e in json.loads((tmp_path / "full" / "trainer_state.json").read_text())["log_history"]}
    resumed_log = {e["step"]: e for e in json.loads((crashed / "trainer_state.json").read_text())["log_history"]}
    assert sorted(resumed_log) == list(range(1, 7))
    assert full_log[5]["objective/kl_coef"] != full_log[1]["objective/kl_coef"]  # the adaptive controller moved
    for step in (5, 6):  # every metric of the updates after the crash: rollouts, scores, KL, losses
        assert resumed_log[step].keys() == full_log[step].keys()
        for key, value in full_log[step].items():
            assert abs(resumed_log[step][key] - value) <= 1e-5 * max(1.0, abs(value)), (step, key)
