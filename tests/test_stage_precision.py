"""The CPU precision default of every training stage (medtrain.hardware.choose_precision, one rule): on a CPU with
fast bf16 matmul (mocked: MEDTRAIN_CPU_BF16=1) a run without precision flags logs its choice, loads the frozen base
in bf16, keeps what trains in fp32 (LoRA weights, a reward score head, full fine-tuning's weights) and trains under
bf16 autocast; one step's numbers stay within a small tolerance of the fp32 run (MEDTRAIN_CPU_BF16=0, the suite's
default) and differ from them (the bf16 path really ran)."""

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
# bf16 keeps 8 mantissa bits (relative rounding 2**-9 per op); through 2 tiny layers and the LM head a loss or a
# mean log-probability moves by well under 1% (measured below 0.3% on these runs)
REL = 0.01
# per stage: the flags of one small step, and the logged numbers that compare (policy log-probs where the first
# step's loss is fixed by construction: DPO/KTO start with policy == reference)
STAGE_RUNS = {
    "pt": ([], ["loss"]),
    "sft": ([], ["loss"]),
    "rm": ([], ["loss"]),
    "dpo": ([], ["loss", "logps/chosen", "logps/rejected"]),
    "orpo": ([], ["loss", "logps/chosen", "logps/rejected"]),
    "kto": ([], ["loss", "logps/chosen", "logps/rejected"]),
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


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_lora_stage_trains_in_bf16_by_default_on_a_fast_bf16_cpu(stage, tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                  capsys):
    extra, keys = STAGE_RUNS[stage]
    data = write_data(stage if stage in ("pt", "sft", "grpo") else "dpo", tmp_path / "data")
    common = ["--max_steps", 1, "--per_device_train_batch_size", 4, *extra]
    fp32 = run_stage(stage, monkeypatch, False, *stage_args(stage, tiny_dir, data, tmp_path / "fp32", *common))
    assert FP32_LINE in capsys.readouterr().out
    assert dtypes(fp32.model) == ({torch.float32}, {torch.float32})
    bf16 = run_stage(stage, monkeypatch, True, *stage_args(stage, tiny_dir, data, tmp_path / "bf16", *common))
    assert BF16_LINE + "MEDTRAIN_CPU_BF16=1" in capsys.readouterr().out
    assert bf16.args.bf16 and not fp32.args.bf16
    trainable, frozen = dtypes(bf16.model)
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    assert_close_not_equal(first_step(bf16), first_step(fp32), keys)
