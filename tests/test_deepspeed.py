"""DeepSpeed ZeRO-2 / ZeRO-3 (and their CPU-offload variants) on CPU over gloo, through the shipped configs.

Each run checks that DeepSpeed really shards (each of 2 ranks holds half of the optimizer state for ZeRO-2, half of
every parameter for ZeRO-3), that training matches one plain process with the same global batch, and that the
saved model (full weights or LoRA adapter) reloads without DeepSpeed and scores exactly like the model in memory.

DeepSpeed JIT-compiles its CPU ops on the first run (shared-memory comm; CPU Adam for the offload configs) into
~/.cache/torch_extensions: the first run of this file takes minutes longer than later ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_distributed import (
    PROBE_IDS,
    QA,
    ROOT,
    assert_same_training,
    finish,
    launch,
    probes,
    stage_args,
    tiny_dir,  # noqa: F401  (fixture)
    write_data,
    write_jsonl,
)

pytest.importorskip("deepspeed")

ZERO2 = str(ROOT / "deepspeed_zero_stage2_config.json")
ZERO3 = str(ROOT / "deepspeed_zero_stage3_config.json")
ZERO2_OFFLOAD = str(ROOT / "deepspeed_zero_stage2_offload_config.json")
ZERO3_OFFLOAD = str(ROOT / "deepspeed_zero_stage3_offload_config.json")


def reloaded_logits(stage: str, out: Path, base: Path, **model_flags) -> torch.Tensor:
    """Logits of PROBE_IDS from the saved output, loaded without DeepSpeed (``model_flags``: e.g. load_in_4bit)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medtrain.arguments import ModelArguments
    from medtrain.modeling import load_model

    if stage == "rm":
        from medtrain.reward import load_reward_model

        model = load_reward_model(str(out), base=str(base), model_args=ModelArguments(**model_flags))
    elif (out / "adapter_config.json").is_file():
        from safetensors.torch import load_file

        model = PeftModel.from_pretrained(load_model(ModelArguments(model_name_or_path=str(base), **model_flags)), out)
        # TRL trains QLoRA adapters in bf16 (and saves them so); PEFT loads them as fp32. Compute as training did.
        saved_dtype = next(iter(load_file(out / "adapter_model.safetensors").values())).dtype
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(saved_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def assert_saved_weights_complete(out: Path, expected: Path) -> None:
    """Every saved tensor has its full shape, as in ``expected`` (a save without DeepSpeed, or the base model).

    A ZeRO-3 save without gathering writes empty (0-element) tensors.
    """
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (out / "adapter_config.json").is_file() else "model.safetensors"
    saved = load_file(out / name)
    assert saved and all(t.numel() > 0 for t in saved.values())
    if (expected / name).is_file():
        reference = load_file(expected / name)
        assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    else:  # an adapter without a reference save: LoRA matrices carry the rank
        rank = json.loads((out / "adapter_config.json").read_text())["r"]
        assert all(rank in t.shape for key, t in saved.items() if "lora_" in key)


def assert_zero_sharded(ranks: list[dict], stage: int) -> None:
    """Each of 2 ranks holds half the elements (ZeRO-3: parameters; ZeRO-2: fp32 optimizer partition)."""
    assert [p["rank"] for p in ranks] == [0, 1]
    for probe in ranks:
        assert probe["deepspeed"] and probe["world_size"] == 2 and probe["backend"] == "gloo"
        part = probe["partition"]
        assert part["stage"] == stage
        assert part["full"] / 2 <= part["local"] <= part["full"] / 2 + 64  # + alignment padding


def run_zero(tmp_path: Path, model: Path, stage: str, configs: dict[str, str], *extra, reference: bool = True,
             batch: int = 1):
    """Launch one 2-rank run per DeepSpeed config with ``batch`` per rank (and a 1-process reference with twice that
    batch), all at once."""
    data = write_data(stage, tmp_path / "data")
    procs = {}
    if reference:
        procs["ref"] = launch(stage, tmp_path / "ref", stage_args(stage, model, data, tmp_path / "out-ref", *extra,
                                                                 "--per_device_train_batch_size", 2 * batch))
    for name, config in configs.items():
        procs[name] = launch(stage, tmp_path / name, stage_args(stage, model, data, tmp_path / f"out-{name}", *extra,
                                                                "--per_device_train_batch_size", batch,
                                                                "--deepspeed", config), nproc=2)
    finish(*procs.values())
    return {name: probes(tmp_path / name) for name in procs}


def check_run(tmp_path: Path, model: Path, stage: str, name: str, ranks: list[dict], zero: int,
              reference: list[dict] | None, **model_flags) -> None:
    """Sharded as ``zero`` says, trained like ``reference`` (if given), saved whole and reloaded exactly."""
    assert_zero_sharded(ranks, zero)
    if reference is not None:
        assert_same_training(reference[0], ranks)
    out = tmp_path / f"out-{name}"
    assert_saved_weights_complete(out, tmp_path / "out-ref" if (tmp_path / "out-ref").is_dir() else model)
    reloaded = reloaded_logits(stage, out, model, **model_flags)
    assert torch.allclose(reloaded, torch.tensor(ranks[0]["logits"]), atol=1e-5)


def logged_steps(out: Path) -> list[dict]:
    """The training-step entries of ``out/trainer_state.json`` (written by rank 0)."""
    return [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


# ----------------------------------------------------------------------------------------------------------------
# Default set: one ZeRO-2 and one ZeRO-3 job (SFT), GRPO's generation under ZeRO-2


def test_sft_zero2_lora_shards_optimizer_state_matches_one_process_and_reloads(tiny_dir, tmp_path):  # noqa: F811
    runs = run_zero(tmp_path, tiny_dir, "sft", {"zero2": ZERO2}, "--packing", "False")
    check_run(tmp_path, tiny_dir, "sft", "zero2", runs["zero2"], 2, runs["ref"])


def test_sft_zero3_full_and_lora_shard_parameters_and_save_complete_weights(tiny_dir, tmp_path):  # noqa: F811
    # Full training matches one process exactly. The LoRA run starts from a different adapter initialisation
    # (ZeRO-3 loading draws from the RNG; the script does not reseed before adding LoRA), so it is checked for
    # sharding, a falling loss and an exact reload only; it runs packed (the SFT default).
    data = write_data("sft", tmp_path / "data")
    full = ["--use_peft", "False", "--packing", "False"]
    ref = launch("sft", tmp_path / "ref", stage_args("sft", tiny_dir, data, tmp_path / "out-ref", *full,
                                                     "--per_device_train_batch_size", 2))
    zero3 = launch("sft", tmp_path / "zero3", stage_args("sft", tiny_dir, data, tmp_path / "out-zero3", *full,
                                                         "--per_device_train_batch_size", 1, "--deepspeed", ZERO3),
                   nproc=2)
    lora = launch("sft", tmp_path / "lora", stage_args("sft", tiny_dir, data, tmp_path / "out-lora", "--max_steps", 6,
                                                       "--packing", "True",
                                                       "--per_device_train_batch_size", 1, "--deepspeed", ZERO3),
                  nproc=2)
    finish(ref, zero3, lora)
    check_run(tmp_path, tiny_dir, "sft", "zero3", probes(tmp_path / "zero3"), 3, probes(tmp_path / "ref"))
    lora_ranks = probes(tmp_path / "lora")
    check_run(tmp_path, tiny_dir, "sft", "lora", lora_ranks, 3, None)
    losses = lora_ranks[0]["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_grpo_zero2_ranks_generate_for_their_own_prompts_and_reload(tmp_path):
    # Generation under DeepSpeed is GRPO's risky part: in the default set (15-20 s on 2 shared cores at load 4).
    from test_grpo import stops_early_model

    # a model whose replies sometimes end after 1-2 tokens, so the length reward varies within a group
    model = stops_early_model(tmp_path / "model")
    runs = run_zero(tmp_path, model, "grpo", {"zero2": ZERO2}, "--reward_funcs", "length", "--length_target_tokens", 2,
                    "--num_generations", 4, "--max_completion_length", 8, "--learning_rate", 3e-3, "--seed", 1,
                    reference=False, batch=4)
    ranks = runs["zero2"]
    check_run(tmp_path, model, "grpo", "zero2", ranks, 2, None)
    assert torch.allclose(torch.tensor(ranks[0]["logits"]), torch.tensor(ranks[1]["logits"]), atol=1e-6)
    # each rank generated for its own questions: 4 completions of one question per rank and step, no question on
    # both ranks, the 8 questions once each per epoch
    shares = [sorted(set(map(tuple, p["rows"]))) for p in ranks]
    assert [len(p["rows"]) for p in ranks] == [16, 16] and [len(share) for share in shares] == [4, 4]
    assert not set(shares[0]) & set(shares[1])
    steps = logged_steps(tmp_path / "out-zero2")
    assert len(steps) == 4 and all(math.isfinite(e["loss"]) for e in steps)
    assert steps[-1]["rewards/length/mean"] > steps[0]["rewards/length/mean"]


# ----------------------------------------------------------------------------------------------------------------
# Slow: the other stages, offload, quantization


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pt", "rm", "dpo", "orpo"])
def test_other_stages_zero2_and_zero3_match_one_process_and_reload(tiny_dir, tmp_path, stage):  # noqa: F811
    # Full training: LoRA would start from different random adapters in different runs (see
    # tests/test_distributed.py), so runs could not be compared step by step. DPO's ZeRO-3 run is the next test.
    # orpo_training.py runs SimPO here: ORPO's SFT term averages over the batch's tokens, so one batch of 2 pairs and
    # two ranks of 1 pair weigh tokens differently (5.919 vs 5.938 at step 1); SimPO's loss is a mean over pairs.
    # KTO is not compared: its KL term needs >= 2 examples per device and depends on the batch's composition.
    configs = {"zero2": ZERO2} if stage == "dpo" else {"zero2": ZERO2, "zero3": ZERO3}
    extra = ["--loss_type", "simpo"] if stage == "orpo" else []
    runs = run_zero(tmp_path, tiny_dir, stage, configs, "--use_peft", "False", *extra)
    for name, config in configs.items():
        check_run(tmp_path, tiny_dir, stage, name, runs[name], 2 if config == ZERO2 else 3, runs["ref"])


@pytest.mark.slow
def test_dpo_zero3_full_training_with_a_frozen_reference(tiny_dir, tmp_path):  # noqa: F811
    runs = run_zero(tmp_path, tiny_dir, "dpo", {"zero3": ZERO3}, "--use_peft", "False")
    check_run(tmp_path, tiny_dir, "dpo", "zero3", runs["zero3"], 3, runs["ref"])


@pytest.mark.slow
def test_offload_configs_match_one_process(tiny_dir, tmp_path):  # noqa: F811
    runs = run_zero(tmp_path, tiny_dir, "sft", {"zero2o": ZERO2_OFFLOAD, "zero3o": ZERO3_OFFLOAD},
                    "--use_peft", "False", "--packing", "False")
    check_run(tmp_path, tiny_dir, "sft", "zero2o", runs["zero2o"], 2, runs["ref"])
    check_run(tmp_path, tiny_dir, "sft", "zero3o", runs["zero3o"], 3, runs["ref"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "orpo", "kto"])
def test_qlora_with_zero2_on_cpu(tiny_dir, tmp_path, stage):  # noqa: F811
    # KTO: 2 examples per rank for its KL estimate (its QLoRA adapter is bf16, see reloaded_logits)
    runs = run_zero(tmp_path, tiny_dir, stage, {"zero2": ZERO2}, "--load_in_4bit", "--qlora", "--max_steps", 4,
                    reference=False, batch=2 if stage == "kto" else 1)
    check_run(tmp_path, tiny_dir, stage, "zero2", runs["zero2"], 2, None, load_in_4bit=True, qlora=True)


@pytest.mark.slow
def test_bf16_zero2_on_cpu_trains_close_to_float32(tiny_dir, tmp_path):  # noqa: F811
    runs = run_zero(tmp_path, tiny_dir, "sft", {"bf16": ZERO2}, "--packing", "False", "--bf16")
    [bf16_rank0, _] = runs["bf16"]
    assert_zero_sharded(runs["bf16"], 2)
    reference = runs["ref"][0]["losses"]  # the reference ran with --bf16 too: CPU autocast without DeepSpeed
    assert len(bf16_rank0["losses"]) == len(reference)
    assert all(abs(a - b) < 0.02 * b for a, b in zip(bf16_rank0["losses"], reference))
    assert_saved_weights_complete(tmp_path / "out-bf16", tiny_dir)


@pytest.mark.slow
def test_ppo_zero2_shards_and_saves_a_reloadable_adapter(tmp_path):
    from conftest import CHATML_TEMPLATE, build_model, build_tokenizer, run_script
    from test_distributed import write_jsonl

    policy = tmp_path / "policy"
    build_model(policy, build_tokenizer(policy, chat_template=CHATML_TEMPLATE))
    pref = write_jsonl(tmp_path / "pref" / "p.jsonl", [
        {"prompt": f"Question {i}: I have a fever, what should I do?", "chosen": "Rest and drink water.",
         "rejected": "No."} for i in range(8)])
    proc = run_script("reward_modeling.py", "--model_name_or_path", str(policy), "--train_file_dir", str(pref),
                      "--output_dir", str(tmp_path / "rm"), "--max_steps", "3", "--per_device_train_batch_size", "4",
                      "--report_to", "none", "--save_strategy", "no", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    finish(launch("ppo", tmp_path / "ppo", [
        "--model_name_or_path", str(policy), "--reward_model_name_or_path", str(tmp_path / "rm"),
        "--train_file_dir", str(pref), "--output_dir", str(tmp_path / "out-ppo"), "--report_to", "none",
        "--max_steps", "2", "--rollout_batch_size", "4", "--num_mini_batches", "2", "--num_ppo_epochs", "1",
        "--max_new_tokens", "6", "--save_strategy", "no", "--deepspeed", ZERO2], nproc=2))
    ranks = probes(tmp_path / "ppo")
    assert_zero_sharded(ranks, 2)
    reloaded = reloaded_logits("ppo", tmp_path / "out-ppo", policy)
    assert torch.allclose(reloaded, torch.tensor(ranks[0]["logits"]), atol=1e-5)


@pytest.mark.slow
def test_kto_zero2_lora_and_full_training_shard_and_reload(tiny_dir, tmp_path):  # noqa: F811
    # KTO's KL estimate scores each prompt with the next example's completion of the same per-device batch (TRL's
    # construction), so it needs >= 2 examples per rank and depends on how the batch is split: not compared with one
    # process. Feedback whose good replies recur across prompts, so the KL estimate moves off its floor (it is
    # clamped at 0; with prompt-specific replies, as in split pairs, it stays at 0 on this tiny model).
    # 16 examples, 2 per rank: 4 steps. Full training adds the frozen reference copy, which DeepSpeed must prepare.
    data = write_jsonl(tmp_path / "data" / "feedback.jsonl", [
        {"messages": [{"role": "user", "content": f"Question {i}: {q}"},
                      {"role": "assistant", "content": "Rest and drink water." if i % 3 else "Take salt."}],
         "label": bool(i % 3)} for i, (q, _) in enumerate(QA + QA)]).parent
    procs = {name: launch("kto", tmp_path / name, stage_args("kto", tiny_dir, data, tmp_path / f"out-{name}", *extra,
                                                             "--per_device_train_batch_size", 2, "--learning_rate",
                                                             1e-2, "--deepspeed", ZERO2), nproc=2)
             for name, extra in (("lora", []), ("full", ["--use_peft", "False"]))}
    finish(*procs.values())
    for name in procs:
        ranks = probes(tmp_path / name)
        check_run(tmp_path, tiny_dir, "kto", name, ranks, 2, None)
        # one policy on both ranks (ZeRO-2 gathers the updated shards)
        assert torch.allclose(torch.tensor(ranks[0]["logits"]), torch.tensor(ranks[1]["logits"]), atol=1e-6)
        steps = logged_steps(tmp_path / f"out-{name}")
        assert len(steps) == 4 and all(math.isfinite(e["loss"]) and math.isfinite(e["kl"]) for e in steps)
        assert steps[0]["kl"] == 0 and any(e["kl"] > 0 for e in steps[1:])  # policy == reference at step 1 only
