"""QLoRA (``--load_in_4bit --qlora``, bitsandbytes on CPU) for ORPO, SimPO, KTO and GRPO: a few steps each on a tiny
model; the base really is NF4 4-bit, the adapter learns through it (lora_B starts at zero), the loss is finite, and
the saved adapter reloaded on a freshly quantized base scores exactly like the model in memory.

GRPO generates before every step with no gradient; TRL 1.16 keeps the model in training mode while it generates, so
bitsandbytes' CPU repacking of 4-bit weights (STACK-NOTES trap 6: eval mode only) does not happen there (checked on an
AMD EPYC where bitsandbytes reports AVX512-BF16: this test still passes with medtrain.modeling.fix_bnb_cpu_training
disabled). Evaluation passes are what trigger it; tests/test_distributed.py covers that for SFT and DPO.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from test_deepspeed import reloaded_logits
from test_distributed import _logits, stage_args, tiny_dir, write_data  # noqa: F401  (tiny_dir: fixture)
from test_grpo import stops_early_model

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = {"orpo": "orpo_training", "simpo": "orpo_training", "kto": "kto_training", "grpo": "grpo_training"}
QLORA = ["--load_in_4bit", "--qlora"]


def qlora_run(method: str, tiny_dir, tmp_path):
    """Three QLoRA steps of ``method``; returns (trainer, the base model directory, the output directory)."""
    out = tmp_path / "out"
    if method == "grpo":
        # a random model's completions all score 0 on accuracy: no advantage, no gradient. This model ends some replies
        # after 1-2 tokens, so the length reward varies within a group (see tests/test_grpo.py).
        model = stops_early_model(tmp_path / "model")
        data = write_data("grpo", tmp_path / "data")
        extra = ["--reward_funcs", "length", "--length_target_tokens", 2, "--num_generations", 4,
                 "--max_completion_length", 8, "--per_device_train_batch_size", 8, "--learning_rate", 3e-3,
                 "--seed", 1]
    else:
        model = tiny_dir
        data = write_data("kto" if method == "kto" else "orpo", tmp_path / "data")
        extra = ["--per_device_train_batch_size", 4] + (["--loss_type", "simpo"] if method == "simpo" else [])
    args = stage_args(method, model, data, out, *QLORA, "--max_steps", 3, *extra)
    trainer = importlib.import_module(SCRIPTS[method]).main(args)
    return trainer, model, out


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto", "grpo"])
def test_qlora_trains_through_a_4bit_base_and_the_adapter_reloads(tiny_dir, tmp_path, method):  # noqa: F811
    import bitsandbytes as bnb

    trainer, model_dir, out = qlora_run(method, tiny_dir, tmp_path)
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    # every projection of the 2 decoder layers is an NF4, double-quantized Linear4bit; lm_head stays full precision
    quantized = {name: m for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 2 * 7 and not any("lm_head" in name for name in quantized)
    for layer in quantized.values():
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # --qlora: double quantization
    steps = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(steps) == 3 and all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in steps)
    if method == "grpo":
        assert any(e["loss"] != 0 for e in steps) and any(e["rewards/length/mean"] > 0 for e in steps)
    # the adapter learned through the 4-bit weights (every lora_B starts at zero)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 7 and all(p.detach().abs().sum() > 0 for p in lora_b)
    # saved adapter + a freshly quantized base == the trained model in memory
    in_memory = torch.tensor(_logits(trainer.model))
    reloaded = reloaded_logits(method, out, model_dir, load_in_4bit=True, qlora=True)
    assert torch.allclose(reloaded, in_memory, atol=1e-5)
    if method == "kto":  # a bf16 QLoRA adapter (TRL casts it) merges into the unquantized base like any other
        import merge_peft_adapter
        from transformers import AutoModelForCausalLM

        merge_peft_adapter.main(["--base_model", str(model_dir), "--lora_model", str(out),
                                 "--output_dir", str(tmp_path / "merged")])
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        assert merged.dtype == torch.float32 and not getattr(merged, "is_loaded_in_4bit", False)


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto", "grpo"])
def test_qlora_with_zero3_is_refused_before_loading(tiny_dir, tmp_path, method):  # noqa: F811
    # ZeRO-3 would shard the packed 4-bit weights; ZeRO-2 (optimizer state only) works with QLoRA (docs/alignment.md)
    from conftest import ROOT

    from medtrain.errors import ConfigError

    data = write_data("grpo" if method == "grpo" else "orpo", tmp_path / "data")
    extra = {"simpo": ["--loss_type", "simpo"], "grpo": ["--num_generations", 2]}.get(method, [])
    args = stage_args(method, tiny_dir, data, tmp_path / "out", *QLORA, *extra, "--per_device_train_batch_size", 2,
                      "--deepspeed", ROOT / "deepspeed_zero_stage3_config.json")
    with pytest.raises(ConfigError, match="quantized weights .* cannot be sharded by DeepSpeed ZeRO-3"):
        importlib.import_module(SCRIPTS[method]).main(args)
    assert not (tmp_path / "out").exists()
