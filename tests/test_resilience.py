"""Cluster faults (docs/reliability.md): preemption by SIGTERM/SIGINT, damaged checkpoints, NaN losses, full disks.

Signals are sent at a chosen optimizer step by a callback (or a wrapper around PPO's rollout) inside the run, so the
tests never race the trainer with wall-clock sleeps. Stage runs are in-process where the exit status is not what is
tested (faster), in subprocesses / under torchrun where it is.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_sft import write_data
from transformers import TrainerCallback

from medtrain import checkpoints, resilience
from medtrain.entrypoint import run_main


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; the same thread count keeps runs and their resumes bit-comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    resilience.STOP.reset()
    yield
    resilience.STOP.uninstall()
    resilience.STOP.reset()
    torch.set_num_threads(threads)


def sft_args(model, data, out, *extra):
    # LoRA dropout on: a resume must restore the RNG state, not just weights and data order
    return ["--model_name_or_path", str(model), "--train_file_dir", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "6", "--logging_steps", "1", "--save_steps", "100",
            "--learning_rate", "1e-2", "--lora_dropout", "0.1", "--template_name", "chatml", "--report_to", "none",
            "--seed", "3", "--do_eval", "False", "--disable_tqdm", "True", *map(str, extra)]


def logged(output_dir: Path, key: str = "loss") -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


class AtStep(TrainerCallback):
    """Runs ``action(trainer_args, state, kwargs)`` in ``event`` of optimizer step ``step`` (1-based)."""

    def __init__(self, step: int, action, event: str = "on_step_begin"):
        self.step, self.action, self.event = step, action, event
        setattr(self, event, self._fire)

    def _fire(self, args, state, control, **kwargs):
        # on_step_begin/on_pre_optimizer_step run before global_step counts the step, on_step_end after
        current = state.global_step if self.event == "on_step_end" else state.global_step + 1
        if current == self.step:
            self.action(args, state, kwargs)
        return control


def run_sft(monkeypatch, args, *extra_callbacks):
    import supervised_finetuning

    original = resilience.resilience_callbacks
    # the test's callbacks run first: a NaN injected in on_pre_optimizer_step is there when the check runs
    monkeypatch.setattr(supervised_finetuning, "resilience_callbacks",
                        lambda run_args: [*extra_callbacks, *original(run_args)])
    return supervised_finetuning.main(args)


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


# ----------------------------------------------------------------------------------------------------------------
# Preemption


def test_sft_sigterm_finishes_the_step_saves_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    full = run_sft(monkeypatch, sft_args(tiny_model_dir, data, tmp_path / "full"))
    expected = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    assert sorted(expected) == list(range(1, 7)) and len(set(expected.values())) > 3

    out = tmp_path / "preempted"
    sigterm = AtStep(3, lambda *_: os.kill(os.getpid(), signal.SIGTERM))  # arrives during step 3's forward
    with pytest.raises(resilience.Preempted) as caught:
        run_sft(monkeypatch, sft_args(tiny_model_dir, data, out), sigterm)
    message = str(caught.value)
    assert caught.value.exit_status == 75
    assert f"checkpoint {out / 'checkpoint-3'}" in message and "--resume_from_checkpoint auto" in message
    # step 3 was finished (not dropped), its checkpoint is complete and verifies, nothing later ran
    assert checkpoints.verify_checkpoint(str(out / "checkpoint-3")) == []
    assert sorted(logged(out / "checkpoint-3")) == [1, 2, 3]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists()  # no "final" model from a run cut short

    resumed = run_sft(monkeypatch, sft_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "auto"))
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    for step in (4, 5, 6):
        assert close(got[step], expected[step]), (step, got, expected)


# A stage script run with a hook: rank RANK_TO_SIGNAL (default every rank) sends itself SIGTERM during optimizer step
# SIGTERM_AT; with SECOND_SIGNAL_IN_SAVE it sends SIGINT while Trainer writes that step's checkpoint.
HOOK = r"""
import os, runpy, signal, sys
import transformers
from transformers import TrainerCallback

AT = int(os.environ["SIGTERM_AT"])
RANK = os.environ.get("RANK_TO_SIGNAL")

class Signal(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == AT and (RANK is None or int(RANK) == args.process_index):
            os.kill(os.getpid(), signal.SIGTERM)

original = transformers.Trainer.__init__
def patched(self, *a, **k):
    original(self, *a, **k)
    self.add_callback(Signal())
transformers.Trainer.__init__ = patched

if os.environ.get("SECOND_SIGNAL_IN_SAVE"):
    save = transformers.Trainer._save_optimizer_and_scheduler   # test-only hook: the middle of a checkpoint save
    def save_then_interrupt(self, output_dir):
        if self.state.global_step == AT:
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, output_dir)
    transformers.Trainer._save_optimizer_and_scheduler = save_then_interrupt

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_second_signal_exits_at_once_and_the_last_complete_checkpoint_survives(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    args = sft_args(tiny_model_dir, data, out, "--save_steps", "2")
    proc = subprocess.run([sys.executable, str(hook), str(ROOT / "supervised_finetuning.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                                   SIGTERM_AT="3", SECOND_SIGNAL_IN_SAVE="1"))
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]  # killed by the second signal, not exit 75
    assert "received SIGTERM" in proc.stderr and "received SIGINT again: exiting now" in proc.stderr
    # checkpoint-3 was being written: unmarked, skipped; checkpoint-2 is intact and is what auto resumes
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-3" / "COMPLETE").exists()
    assert checkpoints.verify_checkpoint(str(out / "checkpoint-2")) == []
    assert checkpoints.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


def test_ppo_sigterm_finishes_the_update_saves_and_resumes_exactly(tiny_chat_model_dir, tmp_path, monkeypatch):
    import ppo_training
    import reward_modeling

    from medtrain.ppo import trainer as ppo_trainer

    data = tmp_path / "pref"
    data.mkdir()
    rows = [{"prompt": f"Question {i}: I have a fever, what should I do?", "chosen": "Rest and drink water.",
             "rejected": "No."} for i in range(8)]
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward_modeling.main(["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data),
                          "--output_dir", str(tmp_path / "rm"), "--max_steps", "1", "--per_device_train_batch_size",
                          "4", "--report_to", "none", "--save_strategy", "no", "--do_eval", "False",
                          "--disable_tqdm", "True"])

    def ppo_args(out, *extra):
        return ["--model_name_or_path", str(tiny_chat_model_dir), "--reward_model_name_or_path", str(tmp_path / "rm"),
                "--train_file_dir", str(data), "--output_dir", str(out), "--max_steps", "4", "--save_steps", "100",
                "--rollout_batch_size", "2", "--num_mini_batches", "1", "--max_new_tokens", "6",
                "--learning_rate", "1e-3", "--adaptive_kl", "True", "--lora_dropout", "0.1", "--report_to", "none",
                "--seed", "5", *extra]

    ppo_training.main(ppo_args(tmp_path / "full"))
    expected = {e["step"]: e for e in json.loads((tmp_path / "full" / "trainer_state.json").read_text())["log_history"]}

    rollout = ppo_trainer.PPOTrainer._rollout
    def rollout_then_signal(self, prompts):  # SIGTERM while update 2 generates
        if self.state.global_step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rollout(self, prompts)
    monkeypatch.setattr(ppo_trainer.PPOTrainer, "_rollout", rollout_then_signal)
    out = tmp_path / "preempted"
    with pytest.raises(resilience.Preempted) as caught:
        ppo_training.main(ppo_args(out))
    assert str(out / "checkpoint-2") in str(caught.value)
    assert checkpoints.verify_checkpoint(str(out / "checkpoint-2")) == []
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "_rollout", rollout)
    ppo_training.main(ppo_args(out, "--resume_from_checkpoint", "auto"))
    got = {e["step"]: e for e in json.loads((out / "trainer_state.json").read_text())["log_history"]}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):  # every metric of the updates after the preemption: rollouts, scores, KL, losses
        for key, value in expected[step].items():
            assert close(got[step][key], value, 1e-5), (step, key, got[step][key], value)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_ranks_stop_together_when_only_rank_1_gets_sigterm(tiny_model_dir, tmp_path):
    """Rank 1 alone is signalled (during step 2); rank 0 learns it from the all_reduce at the step's end, both save
    checkpoint-2 together (each its RNG state, rank 0 the marker) and exit 75; nobody hangs in a collective."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(hook), str(ROOT / "supervised_finetuning.py"),
           *sft_args(tiny_model_dir, data, out, "--per_device_train_batch_size", "1", "--max_steps", "4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                                   TOKENIZERS_PARALLELISM="false", SIGTERM_AT="2", RANK_TO_SIGNAL="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]  # torchrun reports its workers' non-zero status as a failure
    # both ranks exited 75 (torchrun lists each failed rank with its exit code), none was killed or timed out
    assert output.count("exitcode  : 75") == 2 or output.count("exitcode: 75") == 2, output[-4000:]
    assert output.count("preempted: stopped by") == 2, output[-4000:]
    assert "stopped by SIGTERM after optimizer step 2" in output  # rank 1's own message
    assert "stopped by a signal on another rank after optimizer step 2" in output  # rank 0 agreed
    manifest = checkpoints.read_marker(str(out / "checkpoint-2"))
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(manifest["files"])
    assert checkpoints.verify_checkpoint(str(out / "checkpoint-2")) == []
    assert not (out / "checkpoint-3").exists()


def test_stop_request_counts_a_forwarded_repeat_once_and_agrees_without_a_group():
    stop = resilience.StopRequest(dedup_s=60)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwarding the same stop: not a second request
        assert stop.requested and stop.signal_name() == "SIGTERM" and stop.agreed() is True
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_run_main_maps_stops_to_their_exit_status_and_message(capsys):
    def preempted():
        raise resilience.Preempted("stopped by SIGTERM after optimizer step 3; resume with --resume_from_checkpoint auto")

    def diverged():
        raise resilience.Diverged("training diverged at optimizer step 4")

    for main, status, prefix in ((preempted, 75, "preempted: stopped by SIGTERM"), (diverged, 3, "error: training")):
        with pytest.raises(SystemExit) as caught:
            run_main(main)
        assert caught.value.code == status
        assert capsys.readouterr().err.startswith(prefix)


def test_every_trainer_stage_is_wired_through_resilience_callbacks():
    """New stages get the same protection by passing resilience_callbacks(run_args) to their trainer."""
    scripts = [p for p in ROOT.glob("*.py") if "trainer.train(" in p.read_text() or "train_and_save(" in p.read_text()]
    assert {p.name for p in scripts} >= {"pretraining.py", "supervised_finetuning.py", "reward_modeling.py",
                                         "dpo_training.py", "ppo_training.py"}
    for script in scripts:
        assert "resilience_callbacks(run_args)" in script.read_text(), f"{script.name} is not protected"
    names = [type(c).__name__ for c in resilience.resilience_callbacks(type("R", (), {"on_nonfinite": "skip"})())]
    # the marker's on_save runs before preemption's (which exits); write tracking sees preemption's save request
    assert names == ["CompleteCheckpointCallback", "NonFiniteCallback", "PreemptionCallback", "WriteTargetCallback"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint integrity


def make_checkpoint(path: Path, step: int, old_style: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (path / "sub").mkdir()
    (path / "sub" / "optimizer.pt").write_bytes(b"o" * 1000)
    if old_style:
        (path / "COMPLETE").write_text(f"global_step={step}\n")
    else:
        checkpoints.write_marker(str(path), step)
    return path


def test_marker_records_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    ckpt = make_checkpoint(tmp_path / "checkpoint-2", 2)
    manifest = checkpoints.read_marker(str(ckpt))
    assert manifest["global_step"] == 2 and manifest["format"] == 1
    assert sorted(manifest["files"]) == ["adapter_model.safetensors", "sub/optimizer.pt", "trainer_state.json"]
    entry = manifest["files"]["adapter_model.safetensors"]
    data = (ckpt / "adapter_model.safetensors").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not (ckpt / "COMPLETE.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated", "altered", "deleted"])
def test_auto_resume_skips_and_reports_a_checkpoint_damaged_after_its_marker(tmp_path, caplog, damage):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    newer = make_checkpoint(tmp_path / "checkpoint-4", 4)
    weights = newer / "adapter_model.safetensors"
    if damage == "truncated":  # a copy cut short
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "altered":  # same size, one byte flipped
        data = bytearray(weights.read_bytes())
        data[5000] ^= 1
        weights.write_bytes(bytes(data))
    else:
        (newer / "sub" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    reason = {"truncated": "adapter_model.safetensors has 1000 bytes, the marker recorded 16384",
              "altered": "adapter_model.safetensors was altered after the checkpoint was written",
              "deleted": "sub/optimizer.pt is missing"}[damage]
    assert f"skipping {newer}: {reason}" in caplog.text
    with pytest.raises(checkpoints.ConfigError, match="the checkpoint is damaged: " + reason.split(" (")[0][:30]):
        checkpoints.resolve_resume(str(newer), str(tmp_path))


def test_old_style_marker_is_accepted_with_a_note(tmp_path, caplog):
    make_checkpoint(tmp_path / "checkpoint-3", 3, old_style=True)
    with caplog.at_level(logging.INFO):
        assert checkpoints.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-3")
    assert "old-style COMPLETE marker without a file manifest" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Divergence


def poison_gradients(args, state, kwargs):
    """What a diverging step looks like after backward: NaN in the gradients (a NaN loss gives exactly this)."""
    for p in kwargs["model"].parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_nan_stops_before_the_update_naming_step_last_loss_and_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    seen = {}

    def remember(args, state, kwargs):
        seen["before"] = {n: p.detach().clone() for n, p in kwargs["model"].named_parameters() if p.requires_grad}
        seen["model"] = kwargs["model"]

    with pytest.raises(resilience.Diverged) as caught:
        run_sft(monkeypatch, sft_args(tiny_model_dir, data, out, "--save_steps", "2"),
                AtStep(4, remember), AtStep(4, poison_gradients, "on_pre_optimizer_step"))
    message = str(caught.value)
    assert caught.value.exit_status == 3
    assert message.startswith("training diverged at optimizer step 4: non-finite loss or gradient norm")
    assert "last finite logged loss" in message and "at step 3;" in message  # logging_steps 1: step 3's loss
    assert f"last good checkpoint {out / 'checkpoint-2'}" in message
    after = {n: p.detach() for n, p in seen["model"].named_parameters() if p.requires_grad}
    assert all(torch.equal(after[n], seen["before"][n]) for n in after)  # the garbage step changed nothing
    assert all(torch.isfinite(p).all() for p in after.values())


def test_nan_skip_leaves_weights_and_optimizer_state_unchanged_and_training_goes_on(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    data = write_data(tmp_path / "data")
    snapshots = {}

    def snapshot(name):
        def take(args, state, kwargs):
            model, optimizer = kwargs["model"], kwargs["optimizer"]
            snapshots[name] = ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                               {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                                for g in optimizer.param_groups for p in g["params"]})
        return take

    trainer = run_sft(monkeypatch, sft_args(tiny_model_dir, data, tmp_path / "out", "--on_nonfinite", "skip"),
                      AtStep(3, poison_gradients, "on_pre_optimizer_step"),
                      AtStep(3, snapshot("before"), "on_pre_optimizer_step"), AtStep(3, snapshot("after"), "on_step_end"))
    weights_before, state_before = snapshots["before"]
    weights_after, state_after = snapshots["after"]
    assert all(torch.equal(weights_after[n], weights_before[n]) for n in weights_before)
    assert all(torch.equal(state_after[k][s], state_before[k][s]) for k in state_before for s in state_before[k])
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(losses) == list(range(1, 7)) and all(map(lambda v: v == v and abs(v) < 1e6, losses.values()))
    final = trainable(trainer)
    assert any(not torch.equal(final[n], weights_before[n]) for n in final)  # steps 4-6 trained again


def test_where_gradients_are_not_visible_the_logged_values_are_checked(tmp_path):
    """DeepSpeed ZeRO keeps gradients in its own buffers: a NaN grad_norm in the logs stops (even with skip, which
    cannot act there); under fp16 an inf grad_norm is the loss scaler's routine skipped step and is left alone."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    param = torch.nn.Parameter(torch.zeros(2))  # no .grad, as under ZeRO
    optimizer = torch.optim.AdamW([param])
    state, control = TrainerState(global_step=7), TrainerControl()
    fp16 = SimpleNamespace(fp16=True, output_dir=str(tmp_path))
    fp32 = SimpleNamespace(fp16=False, output_dir=str(tmp_path))
    callback = resilience.NonFiniteCallback("skip")
    callback.on_pre_optimizer_step(fp16, state, control, optimizer=optimizer)
    callback.on_log(fp16, state, control, logs={"loss": 1.5, "grad_norm": float("inf")})
    callback.on_pre_optimizer_step(fp32, state, control, optimizer=optimizer)
    assert callback.blind
    with pytest.raises(resilience.Diverged, match="training diverged at optimizer step 7: logged grad_norm non-finite"):
        callback.on_log(fp32, state, control, logs={"loss": 1.5, "grad_norm": float("nan")})


# ----------------------------------------------------------------------------------------------------------------
# Failed writes


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_names_path_and_space(tiny_model_dir, tmp_path,
                                                                                            monkeypatch, capsys):
    import transformers

    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    save = transformers.Trainer._save_optimizer_and_scheduler

    def fill_disk_at_step_4(self, output_dir):  # the model is written, then the disk is full
        if self.state.global_step == 4:
            enospc()
        return save(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", fill_disk_at_step_4)
    with pytest.raises(SystemExit) as caught:
        run_main(lambda: run_sft(monkeypatch, sft_args(tiny_model_dir, data, out, "--save_steps", "2")))
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line
    assert caught.value.code == 74
    size = resilience.checkpoint_size(str(out / "checkpoint-2"))
    assert err.startswith(f"error: could not write the checkpoint {out / 'checkpoint-4'}: [Errno 28] No space left")
    assert "Free space there: " in err and f"it needs about {resilience.human(size)}" in err
    assert f"The last complete checkpoint {out / 'checkpoint-2'} is intact" in err and "removed" in err
    assert checkpoints.verify_checkpoint(str(out / "checkpoint-2")) == []
    assert not (out / "checkpoint-4").exists()  # the half-written one gave its space back
    assert checkpoints.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


def test_disk_full_while_saving_the_final_model_names_it_and_the_checkpoints_survive(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    import transformers

    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    save = transformers.Trainer._save

    def full_for_the_final_model(self, output_dir=None, state_dict=None):
        if Path(output_dir) == out:  # checkpoints go to out/checkpoint-N; the final model to out itself
            enospc()
        return save(self, output_dir, state_dict)

    monkeypatch.setattr(transformers.Trainer, "_save", full_for_the_final_model)
    with pytest.raises(SystemExit) as caught:
        run_main(lambda: run_sft(monkeypatch, sft_args(tiny_model_dir, data, out, "--save_steps", "2",
                                                       "--max_steps", "4")))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert caught.value.code == 74
    assert err.startswith(f"error: could not write the final model {out}: [Errno 28] No space left on device.")
    assert "it needs about" in err and f"The last complete checkpoint {out / 'checkpoint-4'} is intact" in err
    assert all(checkpoints.verify_checkpoint(str(out / f"checkpoint-{n}")) == [] for n in (2, 4))


def test_disk_full_while_merging_keeps_the_existing_output_and_leaves_no_temporary_dir(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    import merge_peft_adapter
    import transformers

    data = write_data(tmp_path / "data")
    adapter = tmp_path / "sft"
    run_sft(monkeypatch, sft_args(tiny_model_dir, data, adapter, "--max_steps", "1"))
    merged = tmp_path / "merged"
    merge_args = ["--base_model", str(tiny_model_dir), "--lora_model", str(adapter), "--output_dir", str(merged)]
    merge_peft_adapter.main(merge_args)
    before = {p.name: p.read_bytes() for p in merged.iterdir()}

    original = transformers.PreTrainedModel.save_pretrained

    def half_then_full(self, save_directory, *a, **k):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 100)  # part of the weights, then ENOSPC
        enospc()

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", half_then_full)
    with pytest.raises(SystemExit) as caught:
        run_main(lambda: merge_peft_adapter.main([*merge_args, "--overwrite_output_dir"]))
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", original)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line
    assert caught.value.code == 74
    assert err.startswith(f"error: could not write the merged model {merged}: [Errno 28] No space left on device")
    assert "it needs about" in err and "Free space there" in err
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before  # the earlier merge is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


# ----------------------------------------------------------------------------------------------------------------
# The pipeline continues from a failed stage

STUB_LAUNCHER = """#!/usr/bin/env bash
name=$(basename "$0" .sh)
echo "$name $*" >> calls.log
mkdir -p "$OUTPUT_DIR" && echo "$name" > "$OUTPUT_DIR/out.txt"
if [ -f "fail_$name" ]; then rm "fail_$name"; echo "$name: simulated failure" >&2; exit 1; fi
"""
STUB_PYTHON = """import sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
open("calls.log", "a").write(sys.argv[0] + " " + " ".join(sys.argv[1:]) + "\\n")
out = args.get("--output_dir")
if out:
    import os
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "config.json"), "w").write("{}")
"""


@pytest.fixture
def stub_pipeline(tmp_path) -> Path:
    """run_pipeline.sh beside stub launchers/scripts that record their calls and write a marker output."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "run_pipeline.sh", root)
    for stage in ("pt", "sft", "rm", "ppo", "dpo"):
        (root / f"run_{stage}.sh").write_text(STUB_LAUNCHER)
    for script in ("merge_peft_adapter.py", "eval_benchmarks.py", "pipeline_summary.py"):
        (root / script).write_text(STUB_PYTHON)
    return root


def pipeline(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "run_pipeline.sh", *args], cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MODEL="base-model", PIPELINE_DIR="out"))


def calls(root: Path) -> list[str]:
    lines = (root / "calls.log").read_text().splitlines() if (root / "calls.log").exists() else []
    (root / "calls.log").unlink(missing_ok=True)
    return [line.split()[0] for line in lines]


def test_pipeline_continues_from_the_failed_stage_keeping_earlier_outputs(stub_pipeline):
    root, out = stub_pipeline, stub_pipeline / "out"
    (root / "fail_run_rm").touch()
    proc = pipeline(root)
    assert proc.returncode == 1
    assert "pipeline stopped in stage rm (status 1)" in proc.stderr
    assert "Continue with: bash run_pipeline.sh --from rm" in proc.stderr
    assert calls(root) == ["run_pt", "merge_peft_adapter.py", "run_sft", "merge_peft_adapter.py", "run_rm"]
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_relative_to(out / "rm")}

    proc = pipeline(root, "--from", "rm")
    assert proc.returncode == 0, proc.stderr
    assert calls(root) == ["run_rm", "run_ppo", "merge_peft_adapter.py", "run_dpo", "merge_peft_adapter.py",
                           *["eval_benchmarks.py"] * 4, "pipeline_summary.py"]  # base, SFT, DPO, PPO evaluated
    assert all(p.read_bytes() == data for p, data in kept.items())  # PT and SFT outputs reused as they were
    assert [p.name.split("-")[0] for p in out.glob("rm.failed-*")] == ["rm.failed"]  # the failed attempt, aside
    assert not list(root.glob("out.prev-*"))  # --from never moves the pipeline dir aside


def test_pipeline_from_a_preempted_stage_resumes_its_checkpoint(stub_pipeline):
    root, out = stub_pipeline, stub_pipeline / "out"
    assert pipeline(root).returncode == 0
    calls(root)
    (out / "dpo" / "checkpoint-4").mkdir(parents=True)
    (out / "dpo" / "checkpoint-4" / "COMPLETE").write_text("{}")
    assert pipeline(root, "--from", "dpo").returncode == 0
    dpo_call = (root / "calls.log").read_text().splitlines()[0]
    assert dpo_call.startswith("run_dpo ") and dpo_call.endswith("--resume_from_checkpoint auto")
    assert calls(root) == ["run_dpo", "merge_peft_adapter.py", *["eval_benchmarks.py"] * 4, "pipeline_summary.py"]
    assert (out / "dpo" / "checkpoint-4").is_dir() and list(out.glob("dpo-merged.failed-*"))


def test_pipeline_from_refuses_an_unknown_stage_or_missing_inputs(stub_pipeline):
    proc = pipeline(stub_pipeline, "--from", "sfr")
    assert proc.returncode == 2 and "--from sfr: unknown stage; choose one of: pt sft rm ppo dpo eval summary" in proc.stderr
    proc = pipeline(stub_pipeline, "--from", "rm")
    assert proc.returncode == 2 and "--from rm needs out/sft-merged from an earlier run, which is missing" in proc.stderr
    assert calls(stub_pipeline) == []
