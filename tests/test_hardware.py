"""The precision default and the per-device training paths, decided from (mocked) CPU flags and CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medtrain.errors import ConfigError
from medtrain.hardware import (Precision, choose_precision, cpu_bf16_fast, cpu_flags, cpu_paths_enabled,
                               given_precision_flags)

AMX = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"avx512f", "avx512_bf16"}
NO_BF16 = {"avx2", "avx512f"}


@pytest.fixture(autouse=True)
def detect(monkeypatch):
    """These tests decide from mocked flags, not from the suite's MEDTRAIN_CPU_BF16=0."""
    monkeypatch.delenv("MEDTRAIN_CPU_BF16", raising=False)


def test_amx_and_avx512_bf16_are_fast_and_no_bf16_instructions_are_not():
    assert cpu_bf16_fast(AMX) == (True, "the CPU has AMX-BF16")
    fast, why = cpu_bf16_fast(AVX512_BF16)
    assert fast and "AVX512-BF16 (no AMX)" in why and "1.49x" in why
    fast, why = cpu_bf16_fast(NO_BF16)
    assert not fast and "emulated" in why


def test_the_environment_replaces_the_detection(monkeypatch):
    monkeypatch.setenv("MEDTRAIN_CPU_BF16", "0")
    assert cpu_bf16_fast(AMX) == (False, "MEDTRAIN_CPU_BF16=0")
    monkeypatch.setenv("MEDTRAIN_CPU_BF16", "1")
    assert cpu_bf16_fast(NO_BF16)[0]


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx512f", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_cpu_default_is_bf16_where_fast_and_fp32_elsewhere():
    fast = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=False,
                            fast=lambda: cpu_bf16_fast(AMX))
    assert (fast.torch_dtype, fast.bf16, fast.automatic) == ("bfloat16", True, True)
    assert "bf16 frozen weights + bf16 autocast" in fast.describe() and "AMX-BF16" in fast.describe()
    assert "--torch_dtype float32 --bf16 False" in fast.describe()
    slow = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=False,
                            fast=lambda: cpu_bf16_fast(NO_BF16))
    assert (slow.torch_dtype, slow.bf16, slow.automatic) == ("float32", False, True)
    avx512_only = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=False,
                                   fast=lambda: cpu_bf16_fast(AVX512_BF16))
    assert (avx512_only.torch_dtype, avx512_only.bf16) == ("bfloat16", True)


def test_full_fine_tuning_keeps_its_trained_weights_fp32_under_autocast():
    full = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=True,
                            fast=lambda: cpu_bf16_fast(AMX))
    assert (full.torch_dtype, full.bf16, full.automatic) == ("float32", True, True)
    assert full.describe().startswith("precision bf16 autocast over fp32 weights (trained weights and optimizer "
                                      "state fp32) (default: the CPU has AMX-BF16; full fine-tuning")
    slow = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=True,
                            fast=lambda: cpu_bf16_fast(NO_BF16))
    assert (slow.torch_dtype, slow.bf16) == ("float32", False)


def test_reference_ratio_stages_keep_fp32_by_default_even_where_bf16_is_fast():
    """DPO, KTO, PPO, GRPO: their loss is a small policy/reference log-prob difference, which bf16 rounding swamps
    (bench: docs/efficiency.md); fp32 stays their CPU default, with the reason in the log, and flags still win."""
    for full_weights in (False, True):
        choice = choose_precision("auto", False, False, flags_given=False, cuda=False, full_weights=full_weights,
                                  fast=lambda: cpu_bf16_fast(AMX), reference_ratio=True)
        assert (choice.torch_dtype, choice.bf16, choice.automatic) == ("float32", False, True)
        assert choice.describe().startswith("precision fp32 (default: the CPU has AMX-BF16, but this stage's loss "
                                            "rests on small log-prob differences")
        assert "--torch_dtype bfloat16 --bf16 True opts in" in choice.describe()
    given = choose_precision("bfloat16", True, False, flags_given=True, cuda=False, full_weights=False,
                             fast=never_decide, reference_ratio=True)
    assert (given.torch_dtype, given.bf16, given.automatic) == ("bfloat16", True, False)


def never_decide():
    raise AssertionError("explicit flags and GPU runs must not be decided from the CPU")


@pytest.mark.parametrize("dtype,bf16,fp16", [("float32", False, False), ("auto", True, False),
                                             ("bfloat16", False, False), ("auto", False, True)])
def test_explicit_precision_flags_are_used_as_given(dtype, bf16, fp16):
    choice = choose_precision(dtype, bf16, fp16, flags_given=True, cuda=False, full_weights=False,
                              fast=never_decide)
    assert choice == Precision(dtype, bf16, False, "precision flags given")


def test_gpu_runs_keep_the_transformers_defaults():
    choice = choose_precision("auto", True, False, flags_given=False, cuda=True, full_weights=False,
                              fast=never_decide)
    assert (choice.torch_dtype, choice.bf16, choice.automatic) == ("auto", True, False)


def test_given_precision_flags_from_flags_or_file():
    assert given_precision_flags(["--model_name_or_path", "m", "--output_dir", "o"]) == set()
    assert given_precision_flags(["--bf16", "False"]) == {"bf16"}
    assert given_precision_flags(["--torch_dtype=float32", "--bf16", "False"]) == {"torch_dtype", "bf16"}
    assert given_precision_flags(["--torch-dtype", "float32"]) == {"torch_dtype"}
    assert given_precision_flags(["--fp16"]) == {"fp16"}
    assert given_precision_flags(["--bf16_full_eval"]) == set()
    assert given_precision_flags([], {"bf16": False}) == {"bf16"}


def test_cpu_paths_are_on_for_cpu_off_for_cuda_unless_asked():
    assert cpu_paths_enabled("auto", cuda=False)
    assert not cpu_paths_enabled("auto", cuda=True)
    assert cpu_paths_enabled("on", cuda=True)
    assert not cpu_paths_enabled("off", cuda=False)
    with pytest.raises(ConfigError, match="--cpu_paths 'maybe'"):
        cpu_paths_enabled("maybe", cuda=False)


# --- applied to parsed arguments ---------------------------------------------------------------------------------------


def sft_args(*flags: str):
    from trl import SFTConfig

    from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, parse_args

    return parse_args([ModelArguments, LoraArguments, DataArguments, SFTConfig],
                      ["--model_name_or_path", "m", "--train_file_dir", "d", "--output_dir", "o", "--report_to", "none",
                       "--packing", "True", *flags])


@pytest.mark.parametrize("flags,dtype,bf16", [
    ((), "bfloat16", True),  # no precision flag on a fast-bf16 CPU: the fast mode
    (("--use_peft", "False"), "float32", True),  # full fine-tuning: fp32 weights (they train) under autocast
    (("--torch_dtype", "float32", "--bf16", "False"), "float32", False),  # exactly the fp32 run
    (("--bf16", "False"), "float32", False),
    (("--bf16", "True"), "float32", True),  # autocast over fp32 weights, as before
    (("--torch_dtype", "bfloat16"), "bfloat16", False),
    (("--deepspeed", "deepspeed_zero_stage2_config.json"), "auto", False),  # DeepSpeed decides: counts as given
])
def test_finalize_sets_precision_and_the_mixed_precision_the_trainer_reads(flags, dtype, bf16):
    from medtrain.hardware import finalize_hardware

    model_args, lora_args, _, training_args = sft_args(*flags)
    plan = finalize_hardware(model_args, lora_args, training_args, cuda=False, fast=lambda: (True, "AMX"))
    assert (model_args.torch_dtype, training_args.bf16) == (dtype, bf16)
    assert training_args.mixed_precision == ("bf16" if bf16 else "no")
    assert plan.precision.automatic is (flags in ((), ("--use_peft", "False")))
    assert model_args.cpu_paths == "on" and lora_args.fused_lora


def test_finalize_keeps_fp32_where_bf16_is_slow_and_low_memory_turns_on_bf16_and_checkpointing():
    from medtrain.hardware import finalize_hardware

    model_args, lora_args, _, training_args = sft_args()
    finalize_hardware(model_args, lora_args, training_args, cuda=False, fast=lambda: (False, "no bf16"))
    assert (model_args.torch_dtype, training_args.bf16, training_args.mixed_precision) == ("float32", False, "no")
    model_args, lora_args, _, training_args = sft_args("--low_memory")
    plan = finalize_hardware(model_args, lora_args, training_args, cuda=False, fast=lambda: (False, "no bf16"))
    assert (model_args.torch_dtype, training_args.bf16, training_args.mixed_precision) == ("bfloat16", True, "bf16")
    assert training_args.gradient_checkpointing and training_args.activation_checkpointing
    assert "--low_memory" in plan.describe()
    # full fine-tuning in the memory mode: the weights that train stay fp32 (autocast and checkpointing still on)
    model_args, lora_args, _, training_args = sft_args("--low_memory", "--use_peft", "False")
    finalize_hardware(model_args, lora_args, training_args, cuda=False, fast=lambda: (False, "no bf16"))
    assert (model_args.torch_dtype, training_args.bf16, training_args.gradient_checkpointing) == ("float32", True, True)


def test_a_cuda_run_takes_the_standard_paths(tiny_chat_model_dir, monkeypatch):
    """CUDA mocked: the fused LoRA branch and the per-sequence attention are off, packed rows keep plain sdpa (its block
    mask from position_ids), the log names the choice; --cpu_paths on brings our paths back."""
    import torch
    from transformers import AutoModelForCausalLM

    from medtrain.efficiency import plan_batches
    from medtrain.fused_lora import FusedLoraLinear
    from medtrain.hardware import cuda_run, finalize_hardware
    from medtrain.modeling import apply_lora

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_run(SimpleNamespace(use_cpu=False)) and not cuda_run(SimpleNamespace(use_cpu=True))
    for flags, ours in (((), False), (("--cpu_paths", "on"), True)):
        with monkeypatch.context() as patch:  # TrainingArguments would look for the (mocked) GPU
            patch.setattr(torch.cuda, "is_available", lambda: False)
            model_args, lora_args, _, training_args = sft_args("--bf16", "False", *flags)
        plan = finalize_hardware(model_args, lora_args, training_args, cuda=True, fast=never_decide)
        assert model_args.torch_dtype == "float32"  # given --bf16 False: as given
        assert (model_args.cpu_paths == "on") is ours and lora_args.fused_lora is ours
        assert ("NOT yet validated on a GPU" in plan.describe()) is ours
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation="sdpa")
        batches = plan_batches(model, training_args, 0, per_sequence_attention=model_args.cpu_paths == "on")
        assert batches.packed and batches.attention == ("varlen_sdpa" if ours else "sdpa")
        model = apply_lora(model, lora_args)
        assert any(isinstance(m, FusedLoraLinear) for m in model.modules()) is ours


def test_cuda_runs_keep_the_default_allocators(monkeypatch):
    import medtrain.runtime as runtime

    called = []
    monkeypatch.setattr(runtime, "apply_allocator_settings", lambda: called.append(1) or {"huge_pages": True})
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unchanged")  # restored after the test
    _, _, _, training_args = sft_args()
    monkeypatch.setattr(runtime, "cuda_run", lambda args: True)
    assert runtime.apply_process_settings(training_args)["huge_pages"] is False and not called
    monkeypatch.setattr(runtime, "cuda_run", lambda args: False)
    assert runtime.apply_process_settings(training_args)["huge_pages"] is True and called
