"""The CPU precision default of every training stage (medtrain.hardware.choose_precision, one rule): on a CPU with
fast bf16 matmul (mocked: MEDTRAIN_CPU_BF16=1) a run without precision flags logs its choice, loads the frozen base
in bf16, keeps what trains in fp32 (LoRA weights, a reward score head, full fine-tuning's weights) and trains under
bf16 autocast; one step's numbers stay within 0.2% of the fp32 run (MEDTRAIN_CPU_BF16=0, the suite's
default) and differ from them (the bf16 path really ran). The stages whose loss rests on policy/reference log-prob
differences (DPO, KTO, PPO/RLOO, GRPO) keep fp32 as their default on such a CPU (their fp32 runs below are that
default, logged with the reason); their bf16 path, one flag pair away, is checked the same way."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from test_distributed import STAGES, stage_args, tiny_dir, write_data  # noqa: F401  (tiny_dir: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_LINE = "precision bf16 (bf16 frozen weights + bf16 autocast; fp32 adapter and optimizer state) (default: "
FULL_LINE = "precision bf16 autocast over fp32 weights (trained weights and optimizer state fp32) (default: "
FP32_LINE = "precision fp32 (default: MEDTRAIN_CPU_BF16=0)"
# DPO, KTO, PPO/RLOO, GRPO on a fast-bf16 CPU without flags: fp32, and why
RATIO_LINE = "precision fp32 (default: MEDTRAIN_CPU_BF16=1, but this stage's loss rests on small log-prob differences"
GIVEN_BF16 = "precision bf16 (bf16 frozen weights + bf16 autocast; fp32 adapter and optimizer state) (as given: "
BF16_FLAGS = ["--torch_dtype", "bfloat16", "--bf16", "True"]
RATIO_STAGES = {"dpo", "kto", "ppo", "grpo"}
# bf16 keeps 8 significant bits (relative rounding up to 2**-8 per op). Measured on these runs (AMD EPYC with
# AVX512-BF16): the first-step numbers differ from fp32 by 1e-6 .. 2.2e-4 relative (RM loss the most); 2e-3 leaves
# 10x for other CPUs' bf16 kernels (AMX, emulation)
REL = 2e-3
# per stage: the logged numbers that compare (policy log-probs too where the first step's loss is fixed by
# construction: DPO/KTO start with policy == reference, loss log 2 / 0.5 in both precisions)
STAGE_KEYS = {
    "pt": ["loss"],
    "sft": ["loss"],
    "rm": ["loss"],
    "dpo": ["loss", "logps/chosen", "logps/rejected"],
    "orpo": ["loss", "logps/chosen", "logps/rejected"],
    "kto": ["loss", "logps/chosen", "logps/rejected"],
}


def run_stage(stage: str, monkeypatch, fast_bf16: bool, *args):
    monkeypatch.setenv("MEDTRAIN_CPU_BF16", "1" if fast_bf16 else "0")
    return importlib.import_module(STAGES[stage]).main([str(a) for a in args])


def first_step(trainer) -> dict:
    return next(e for e in trainer.state.log_history if "loss" in e)


def dtypes(model) -> tuple[set, set]:
    """(dtypes of the trainable parameters, dtypes of the frozen floating-point ones)."""
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    return trainable, frozen


def assert_close_not_equal(low: dict, high: dict, keys: list[str]) -> None:
    for key in keys:
        assert math.isfinite(low[key]), (key, low[key])
        assert abs(low[key] - high[key]) <= REL * abs(high[key]), (key, low[key], high[key])
    # the bf16 run computed something else than the fp32 run (a test of the same numbers twice could not fail)
    assert any(low[key] != high[key] for key in keys), (low, high)


@pytest.mark.parametrize("stage", list(STAGE_KEYS))
def test_lora_stage_trains_in_bf16_by_default_on_a_fast_bf16_cpu(stage, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                  capsys):
    data = write_data(stage, tmp_path / "data")
    common = ["--max_steps", 1, "--per_device_train_batch_size", 4]
    ratio = stage in RATIO_STAGES  # fp32 is the default there on a fast-bf16 CPU too; bf16 needs the flags
    fp32 = run_stage(stage, monkeypatch, ratio, *stage_args(stage, tiny_dir, data, tmp_path / "fp32", *common))
    assert (RATIO_LINE if ratio else FP32_LINE) in capsys.readouterr().out
    assert dtypes(fp32.model) == ({torch.float32}, {torch.float32})
    bf16 = run_stage(stage, monkeypatch, True, *stage_args(stage, tiny_dir, data, tmp_path / "bf16", *common,
                                                            *(BF16_FLAGS if ratio else [])))
    assert (GIVEN_BF16 if ratio else BF16_LINE + "MEDTRAIN_CPU_BF16=1") in capsys.readouterr().out
    assert bf16.args.bf16 and not fp32.args.bf16
    trainable, frozen = dtypes(bf16.model)
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    assert_close_not_equal(first_step(bf16), first_step(fp32), STAGE_KEYS[stage])
    if stage == "sft":  # fp32 stays one flag away on a fast-bf16 CPU: exactly the fp32 run
        flags = run_stage(stage, monkeypatch, True, *stage_args(stage, tiny_dir, data, tmp_path / "flags", *common,
                                                                 "--torch_dtype", "float32", "--bf16", "False"))
        assert "hardware: precision fp32 (as given: precision flags given)" in capsys.readouterr().out
        assert dtypes(flags.model) == ({torch.float32}, {torch.float32})
        assert first_step(flags)["loss"] == first_step(fp32)["loss"]
    if stage in ("dpo", "kto"):  # reference log-probs: the same bf16 base with the adapter off, under the same autocast,
        # so at the first step (lora_B = 0) they equal the policy's exactly: DPO's loss is log 2, KTO's 0.5
        assert first_step(bf16)["loss"] == pytest.approx(math.log(2) if stage == "dpo" else 0.5, abs=1e-6)


def test_full_fine_tuning_keeps_fp32_weights_under_bf16_autocast(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--use_peft False: the weights are what trains, so they (and AdamW's state) stay fp32; only the step is bf16.
    DPO, whose frozen reference copy of the policy is fp32 too (the rule itself: tests/test_hardware.py)."""
    stage = "dpo"
    data = write_data(stage, tmp_path / "data")
    common = ["--max_steps", 1, "--per_device_train_batch_size", 4, "--use_peft", "False"]
    fp32 = run_stage(stage, monkeypatch, False, *stage_args(stage, tiny_dir, data, tmp_path / "fp32", *common))
    capsys.readouterr()
    bf16 = run_stage(stage, monkeypatch, True, *stage_args(stage, tiny_dir, data, tmp_path / "bf16", *common,
                                                            "--bf16", "True"))  # DPO's default is fp32 (see above)
    assert FULL_LINE.replace("(default: ", "(as given: precision flags given)") in capsys.readouterr().out
    assert bf16.args.bf16 and bf16.accelerator.mixed_precision == "bf16"
    assert dtypes(bf16.model) == ({torch.float32}, set())
    state = [s for group in bf16.optimizer.state.values() for s in group.values() if torch.is_tensor(s) and s.ndim]
    assert state and {s.dtype for s in state} == {torch.float32}
    assert {p.dtype for p in bf16.ref_model.parameters()} == {torch.float32}
    assert_close_not_equal(first_step(bf16), first_step(fp32), ["logps/chosen", "logps/rejected"])


def test_grpo_generates_and_trains_in_bf16_by_default(tmp_path, monkeypatch, capsys):
    """GRPO samples its completions from the bf16 policy and trains the fp32 adapter under autocast. Completions are
    sampled, so the comparison with fp32 is on the policy's mean token entropy over them, not on the loss (0 at the
    first step by construction: ratio 1, group-centred advantages)."""
    from test_grpo import stops_early_model

    model = stops_early_model(tmp_path / "model")  # varying reply lengths: the length reward has a signal
    data = write_data("grpo", tmp_path / "data")
    common = ["--reward_funcs", "length", "--length_target_tokens", 2, "--num_generations", 4,
              "--max_completion_length", 8, "--per_device_train_batch_size", 8, "--learning_rate", 3e-3,
              "--max_steps", 3, "--seed", 1]
    fp32 = run_stage("grpo", monkeypatch, True, *stage_args("grpo", model, data, tmp_path / "fp32", *common))
    assert RATIO_LINE in capsys.readouterr().out
    bf16 = run_stage("grpo", monkeypatch, True, *stage_args("grpo", model, data, tmp_path / "bf16", *common,
                                                             *BF16_FLAGS))
    assert GIVEN_BF16 in capsys.readouterr().out
    trainable, frozen = dtypes(bf16.model)
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    steps = [e for e in bf16.state.log_history if "loss" in e]
    assert all(math.isfinite(e["loss"]) for e in steps) and any(e["rewards/length/mean"] > 0 for e in steps)
    # the adapter learned (every lora_B starts at zero)
    assert all(p.detach().abs().sum() > 0 for n, p in bf16.model.named_parameters() if "lora_B" in n)
    assert_close_not_equal(steps[0], first_step(fp32), ["entropy"])


@pytest.fixture(scope="module")
def rl_data(tiny_dir, tmp_path_factory) -> tuple:  # noqa: F811
    """Preference pairs (their prompts for RL) and an fp32 LoRA reward model trained one step on them (the suite's
    MEDTRAIN_CPU_BF16=0, tests/conftest.py)."""
    root = tmp_path_factory.mktemp("rl-precision")
    data = write_data("rm", root / "data")
    rm = importlib.import_module("reward_modeling").main([str(a) for a in stage_args("rm", tiny_dir, data, root / "rm",
                                                                                     "--max_steps", 1)])
    assert not rm.args.bf16
    return data, root / "rm"


def test_ppo_trains_fp32_adapters_over_bf16_bases_by_default(tiny_dir, rl_data, tmp_path, monkeypatch,  # noqa: F811
                                                             capsys):
    """Our PPO: the policy's and the value model's frozen bases load in bf16, their adapters and the value model's
    score head train in fp32 under autocast. Responses are sampled, so the comparison with fp32 is on the policy's
    mean token entropy over them, and on the first rollout's KL (policy == reference: exactly 0)."""
    import json

    data, rm = rl_data

    def ppo(name: str, *flags):
        trainer = run_stage("ppo", monkeypatch, True, *stage_args(
            "ppo", tiny_dir, data, tmp_path / name, "--reward_model_name_or_path", rm, "--max_steps", 1,
            "--rollout_batch_size", 4, "--num_mini_batches", 1, "--num_ppo_epochs", 1, "--max_new_tokens", 6, *flags))
        return trainer, json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"][0]

    _, fp32 = ppo("fp32")
    assert RATIO_LINE in capsys.readouterr().out
    trainer, bf16 = ppo("bf16", *BF16_FLAGS)
    assert GIVEN_BF16 in capsys.readouterr().out
    assert trainer.accelerator.mixed_precision == "bf16"
    model = trainer.accelerator.unwrap_model(trainer.model)
    for part in (model.policy, model.value_model):
        trainable, frozen = dtypes(part)
        assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    score = [p for n, p in model.value_model.named_parameters() if "score" in n and p.requires_grad]
    assert score and all(p.dtype == torch.float32 for p in score)
    assert all(math.isfinite(bf16[k]) for k in ("loss/policy", "loss/value"))
    # the first rollout's policy is the reference (lora_B = 0): their log-probs agree exactly in bf16 too (a bf16
    # division by the temperature once gave a KL of -1.6e-4 here)
    assert bf16["objective/kl"] == fp32["objective/kl"] == 0.0
    assert_close_not_equal(bf16, fp32, ["policy/entropy"])


def test_trl_rloo_mode_trains_fp32_adapters_over_a_bf16_base_by_default(tiny_dir, rl_data, tmp_path,  # noqa: F811
                                                                        monkeypatch, capsys):
    """ppo_training.py --rl_algo rloo (TRL's RLOOTrainer): the reference is a frozen fp32 copy of the adapter ('ref')
    over the same bf16 base; at the first step policy and reference agree exactly, in bf16 too."""
    data, rm = rl_data
    common = ["--reward_model_name_or_path", rm, "--rl_algo", "rloo", "--max_steps", 1,
              "--per_device_train_batch_size", 4, "--num_generations", 2, "--max_completion_length", 6]
    fp32 = run_stage("ppo", monkeypatch, True, *stage_args("ppo", tiny_dir, data, tmp_path / "fp32", *common))
    assert RATIO_LINE in capsys.readouterr().out
    bf16 = run_stage("ppo", monkeypatch, True, *stage_args("ppo", tiny_dir, data, tmp_path / "bf16", *common,
                                                            *BF16_FLAGS))
    assert GIVEN_BF16 in capsys.readouterr().out
    assert bf16.args.bf16
    trainable = {p.dtype for p in bf16.model.parameters() if p.requires_grad}
    base = {p.dtype for n, p in bf16.model.named_parameters() if not p.requires_grad and "lora_" not in n}
    assert trainable == {torch.float32} and base == {torch.bfloat16}
    assert first_step(bf16)["kl"] == first_step(fp32)["kl"] == 0.0
    assert_close_not_equal(first_step(bf16), first_step(fp32), ["entropy"])


def test_qlora_reward_model_computes_in_bf16_and_trains_its_score_head_in_fp32(tiny_dir, tmp_path,  # noqa: F811
                                                                               monkeypatch, capsys):
    """QLoRA under the default: bitsandbytes dequantizes to bf16 for its matmuls (the compute dtype follows the
    precision); TRL casts a quantized model's trainable parameters to bf16 (QLoRA paper), and the reward trainer
    takes them back to fp32: the score head starts random and trains in full."""
    import bitsandbytes as bnb

    data = write_data("rm", tmp_path / "data")
    common = ["--max_steps", 1, "--per_device_train_batch_size", 4, "--load_in_4bit", "--qlora"]
    fp32 = run_stage("rm", monkeypatch, False, *stage_args("rm", tiny_dir, data, tmp_path / "fp32", *common))
    capsys.readouterr()
    bf16 = run_stage("rm", monkeypatch, True, *stage_args("rm", tiny_dir, data, tmp_path / "bf16", *common))
    assert BF16_LINE + "MEDTRAIN_CPU_BF16=1" in capsys.readouterr().out
    layers = [m for m in bf16.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and {m.compute_dtype for m in layers} == {torch.bfloat16}
    trainable = {n: p.dtype for n, p in bf16.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert_close_not_equal(first_step(bf16), first_step(fp32), ["loss"])


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_packed_pt_and_sft_run_attention_as_bf16_matmuls_on_a_fast_bf16_cpu(stage, tiny_dir, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """The bf16 default sends packed rows' attention through the matmul path (torch's CPU flash kernel is slow in
    bf16); fp32 and ``--cpu_paths off`` keep sdpa."""
    import medtrain.attention as attention

    calls = []
    matmul = attention._matmul_attention
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a, **k: calls.append(a[0].shape) or matmul(*a, **k))
    data = write_data(stage, tmp_path / "data")
    common = ["--max_steps", 1, "--per_device_train_batch_size", 2, "--packing", "True"]
    runs = {}
    for name, fast_bf16, extra in (("fp32", False, []), ("bf16", True, []), ("off", True, ["--cpu_paths", "off"])):
        calls.clear()
        trainer = run_stage(stage, monkeypatch, fast_bf16, *stage_args(stage, tiny_dir, data, tmp_path / name,
                                                                      *common, *extra))
        runs[name] = (trainer.model.config._attn_implementation, len(calls))
    assert runs["fp32"] == ("varlen_sdpa", 0)
    assert runs["bf16"][0] == "varlen_sdpa" and runs["bf16"][1] > 0
    assert runs["off"] == ("sdpa", 0)
