"""ppo_training.py end to end on tiny models: PPO/RLOO/GRPO run against a trained RM; mismatches are clear errors."""

from __future__ import annotations

import json

import pytest

from conftest import CHATML_TEMPLATE, build_model, build_tokenizer, run_script


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    """A tiny ChatML policy, preference/prompt data and a reward model trained on it by reward_modeling.py."""
    root = tmp_path_factory.mktemp("rl")
    policy = root / "policy"
    build_model(policy, build_tokenizer(policy, chat_template=CHATML_TEMPLATE))
    (root / "pref").mkdir()
    rows = [{"prompt": f"Question {i}: I have a fever, what should I do?", "chosen": "Rest and drink water.",
             "rejected": "No."} for i in range(8)]
    (root / "pref" / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_script("reward_modeling.py", "--model_name_or_path", str(policy), "--train_file_dir", str(root / "pref"),
                      "--output_dir", str(root / "rm"), "--max_steps", "3", "--per_device_train_batch_size", "4",
                      "--report_to", "none", "--save_strategy", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def ppo(root, out, *extra):
    return run_script("ppo_training.py", "--model_name_or_path", str(root / "policy"), "--reward_model_name_or_path",
                      str(root / "rm"), "--train_file_dir", str(root / "pref"), "--output_dir", str(out),
                      "--report_to", "none", *extra)


def test_ppo_runs_logs_and_saves(rl_setup, tmp_path):
    out = tmp_path / "ppo"
    proc = ppo(rl_setup, out, "--max_steps", "2", "--rollout_batch_size", "4", "--num_mini_batches", "2",
               "--num_ppo_epochs", "1", "--max_new_tokens", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "objective/score_mean" in e]
    assert len(logged) == 2 and all("objective/kl" in e and "loss/value" in e for e in logged)
    assert (out / "adapter_model.safetensors").is_file() and (out / "medtrain_chat_format.json").is_file()
    assert "objective/kl" in (out / "train_results.txt").read_text()
    # the stage's curves (medtrain.plotting): score, KL and losses per update, a PNG that decodes
    from matplotlib.image import imread

    assert imread(out / "training_curves.png").shape[0] > 100


@pytest.mark.parametrize("algo, extra", [("rloo", ["--num_generations", "2"]), ("grpo", ["--num_generations", "2"])])
def test_trl_rloo_and_grpo_modes_run(rl_setup, tmp_path, algo, extra):
    out = tmp_path / algo
    proc = ppo(rl_setup, out, "--rl_algo", algo, "--max_steps", "1", "--per_device_train_batch_size", "2",
               "--max_completion_length", "6", "--save_strategy", "no", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "medtrain_chat_format.json").is_file()
    # saved like every Trainer stage: the log history pipeline_summary.py draws, results as JSON and text
    assert any("reward" in e for e in json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 8
    assert "train_samples = 8" in (out / "train_results.txt").read_text()


def test_trl_rloo_kill9_at_an_epoch_boundary_then_resume_trains_the_next_epochs_prompts(rl_setup, tmp_path):
    """TRL's RLOO shuffles prompts with one generator seeded once; a run resumed at an epoch boundary must get the
    second epoch's order (epoch_seeded_sampler), not a replay of the first's: same rewards and losses as uninterrupted."""
    from test_resume import crash_then_resume

    def rloo_args(out):  # 8 prompts, 4 per step (8 completions, 2 per prompt): an epoch is 2 steps
        return ["ppo_training.py", "--model_name_or_path", str(rl_setup / "policy"), "--reward_model_name_or_path",
                str(rl_setup / "rm"), "--train_file_dir", str(rl_setup / "pref"), "--output_dir", str(out),
                "--rl_algo", "rloo", "--num_generations", "2", "--per_device_train_batch_size", "8",
                "--max_completion_length", "6", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "3e-3",
                "--logging_steps", "1", "--report_to", "none", "--seed", "3", "--disable_tqdm", "True"]

    crashed = tmp_path / "crashed"
    crash_then_resume(rloo_args, tmp_path, crashed, 2, "reward")

    def logged(out):
        return {e["step"]: e for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
                if "reward" in e}

    full, resumed = logged(tmp_path / "full"), logged(crashed)
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed)[-2:] == [3, 4]
    assert len({full[s]["reward"] for s in full}) > 1  # the prompts (and so the rewards) differ between steps
    for step in (3, 4):  # the second epoch's prompts, completions, rewards and update, as if never interrupted
        for key in ("reward", "num_tokens", "loss"):
            assert abs(resumed[step][key] - full[step][key]) <= 1e-5 * max(1.0, abs(full[step][key])), (step, key)


def test_reward_model_with_another_vocabulary_is_refused(rl_setup, tmp_path):
    other = tmp_path / "other"
    build_model(other, build_tokenizer(other, chat_template=CHATML_TEMPLATE, vocab_size=300))
    proc = run_script("ppo_training.py", "--model_name_or_path", str(other), "--reward_model_name_or_path",
                      str(rl_setup / "rm"), "--train_file_dir", str(rl_setup / "pref"), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "reward model's tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_reward_model_with_another_template_is_refused(rl_setup, tmp_path):
    proc = ppo(rl_setup, tmp_path / "o", "--template_name", "vicuna")
    assert proc.returncode == 2 and "chat format" in proc.stderr and "Traceback" not in proc.stderr


def test_causal_lm_is_not_a_reward_model(rl_setup, tmp_path):
    proc = run_script("ppo_training.py", "--model_name_or_path", str(rl_setup / "policy"), "--reward_model_name_or_path",
                      str(rl_setup / "policy"), "--train_file_dir", str(rl_setup / "pref"), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_prompts_longer_than_the_limit_and_empty_prompt_sets(rl_setup, tmp_path):
    proc = ppo(rl_setup, tmp_path / "o", "--max_prompt_length", "3")
    assert proc.returncode == 2 and "longer than --max_prompt_length 3" in proc.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    proc = run_script("ppo_training.py", "--model_name_or_path", str(rl_setup / "policy"), "--reward_model_name_or_path",
                      str(rl_setup / "rm"), "--train_file_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "file is empty" in proc.stderr and "Traceback" not in proc.stderr
