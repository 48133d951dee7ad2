"""The SFT recipe end to end on tiny models: loss falls, answers are learned, adapters reload exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, run_script
from medtrain.chat_format import load_recorded_chat_format, resolve_chat_format

QA = [
    ("What helps a fever?", "Rest and drink water."),
    ("What is hypertension?", "High blood pressure."),
    ("How to check diabetes?", "Check blood sugar."),
    ("发烧怎么办？", "多喝水，注意休息。"),
]


def write_data(directory):
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    rows.append({"conversations": [
        {"from": "system", "value": "You are a doctor."},
        {"from": "human", "value": QA[0][0]}, {"from": "gpt", "value": QA[0][1]},
        {"from": "human", "value": QA[1][0]}, {"from": "gpt", "value": QA[1][1]}]})
    (directory / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return directory


def sft_args(model_dir, data_dir, out_dir, *extra):
    return ["--model_name_or_path", str(model_dir), "--train_file_dir", str(data_dir), "--output_dir", str(out_dir),
            "--per_device_train_batch_size", "5", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--do_eval", "False", *extra]


def run_sft(*args):
    import supervised_finetuning

    return supervised_finetuning.main(list(args))


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def greedy(model, tokenizer, chat_format, question, max_new_tokens=40):
    prompt = chat_format.generation_prompt([{"role": "user", "content": question}])
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids(chat_format.stop_str),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_full_sft_loss_falls_and_answers_are_learned(tiny_chat_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "full"
    trainer = run_sft(*sft_args(tiny_chat_model_dir, data, out, "--use_peft", "False", "--max_steps", "60",
                                "--learning_rate", "3e-3", "--lr_scheduler_type", "constant"))
    history = losses(trainer)
    assert history[-1] < 0.2 * history[0], history
    # a full model reloads with AutoModelForCausalLM and the recorded chat format answers as trained
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    fmt = resolve_chat_format(tokenizer, [str(out)], None, None)
    assert load_recorded_chat_format(str(out)) == {"kind": "tokenizer", "template_name": None, "system_prompt": None}
    for question, answer in QA:
        assert greedy(model, tokenizer, fmt, question).strip() == answer
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model*.bin"))
    assert (out / "train_results.txt").read_text().startswith("epoch = ")


def test_lora_save_reload_identical_logits_and_peft_path_continues(tiny_model_dir, tmp_path):
    from peft import PeftModel

    data = write_data(tmp_path / "data")
    out = tmp_path / "lora"
    trainer = run_sft(*sft_args(tiny_model_dir, data, out, "--max_steps", "60", "--learning_rate", "1e-2", "--lora_alpha", "32",
                                "--lora_rank", "16", "--template_name", "chatml", "--validation_split_percentage", "20",
                                "--do_eval", "True"))
    first = losses(trainer)
    assert first[-1] < first[0] * 0.8, first
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "perplexity = " in (out / "eval_results.txt").read_text()
    assert load_recorded_chat_format(str(out))["template_name"] == "chatml"
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        reloaded = PeftModel.from_pretrained(base, out).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    # --peft_path continues the saved adapter: it starts where the first run ended, not from scratch
    cont = run_sft(*sft_args(tiny_model_dir, data, tmp_path / "cont", "--max_steps", "5", "--learning_rate", "1e-2",
                             "--template_name", "chatml", "--peft_path", str(out)))
    # an untrained tiny model sits near ln(vocab) = ln(400) ~ 5.99; the continued adapter starts well below it
    assert losses(cont)[0] < first[0] - 0.5, (losses(cont)[0], first[0])
    state = {k: v for k, v in cont.model.state_dict().items() if "lora_B" in k}
    assert state and all(v.abs().sum() > 0 for v in state.values())  # a fresh adapter would start with lora_B == 0


def test_qlora_4bit_gradients_survive_an_eval_pass(tiny_model_dir):
    """STACK-NOTES trap 6: an eval-mode no-grad forward must not freeze 4-bit LoRA layers on AVX512-BF16 CPUs."""
    from medtrain.arguments import LoraArguments, ModelArguments
    from medtrain.modeling import apply_lora, load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), load_in_4bit=True, qlora=True)
    tokenizer = load_tokenizer(model_args)
    model = apply_lora(load_model(model_args, tokenizer=tokenizer), LoraArguments(lora_rank=4))
    assert getattr(model, "is_loaded_in_4bit", False) or model.base_model.model.is_loaded_in_4bit
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 12]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A grads are 0 while B == 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_script_run_trains_on_cpu(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    trainer = run_sft(*sft_args(tiny_model_dir, data, tmp_path / "q", "--load_in_4bit", "--qlora", "--max_steps", "15",
                                "--learning_rate", "1e-2", "--template_name", "chatml", "--eval_on_start", "True",
                                "--eval_strategy", "steps", "--eval_steps", "5", "--validation_split_percentage", "20",
                                "--do_eval", "True"))
    history = losses(trainer)
    assert history[-1] < history[0], history


def test_torchrun_two_processes_is_really_distributed(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "supervised_finetuning.py"),
           *sft_args(tiny_model_dir, data, out, "--per_device_train_batch_size", "1", "--num_train_epochs", "1", "--packing", "False",
                     "--template_name", "chatml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads(m) for m in re.findall(r"environment: (\{.*\})", proc.stdout + proc.stderr)]
    assert infos and all(i["world_size"] == 2 and i["backend"] == "gloo" for i in infos)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # 5 samples over 2 ranks x batch 1 -> ceil(5/2) = 3 steps, not 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--template_name", "nope"], "unknown conversation template 'nope'; choose one of: alpaca,"),
        (["--qlora"], "--qlora needs --load_in_4bit"),
        (["--attn_implementation", "flash_attention_2"], "--attn_implementation flash_attention_2 needs a CUDA GPU"),
        (["--fp16"], "--fp16 needs a CUDA GPU"),
        (["--no_such_flag", "1"], "unknown flag(s) --no_such_flag"),
        (["--train_file_dir", "BADDATA"], "bad.jsonl:2: conversations[1].from: unknown role 'doctor'"),
        (["--train_file_dir", "MISSING"], "data directory does not exist"),
        (["--load_in_4bit", "--use_peft", "False"], "train through LoRA only"),
    ],
)
def test_bad_input_is_one_clear_error_and_output_dir_is_untouched(tiny_model_dir, tmp_path, extra, message):
    data = write_data(tmp_path / "data")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
                                   + "\n" + json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "doctor", "value": "a"}]}) + "\n")
    extra = [str(bad) if e == "BADDATA" else str(tmp_path / "missing") if e == "MISSING" else e for e in extra]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_script("supervised_finetuning.py", *sft_args(tiny_model_dir, data, out, "--overwrite_output_dir", *extra))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_non_empty_output_dir_is_refused_without_a_flag(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    proc = run_script("supervised_finetuning.py", *sft_args(tiny_model_dir, data, out))
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "model.safetensors").read_text() == "old"


def test_arguments_file_with_flag_override(tiny_model_dir, tmp_path):
    import yaml

    data = write_data(tmp_path / "data")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "train_file_dir": str(data),
                                      "output_dir": str(tmp_path / "o"), "max_steps": 2, "report_to": "none",
                                      "template_name": "chatml", "save_strategy": "no", "do_eval": False}))
    trainer = run_sft(str(config), "--max_steps", "3")
    assert trainer.state.global_step == 3
    config.write_text(yaml.safe_dump({"model_name_or_path": "x", "train_file_dir": "y", "lora_rnk": 3}))
    proc = run_script("supervised_finetuning.py", str(config))
    assert proc.returncode == 2 and "unknown argument(s) lora_rnk" in proc.stderr
