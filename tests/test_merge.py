"""merge_peft_adapter.py on tiny models: causal-LM, reward-model (score head), resized-vocabulary and QLoRA adapters
merged exactly (checked independently of the script's own check), and bad inputs refused with exit 2, one clear
message and nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CHATML_TEMPLATE, MERGE_ATOL, build_model, build_tokenizer, run_script
from medtrain.chat_format import RECORD_FILE, get_chat_format, save_chat_format
from medtrain.entrypoint import run_main
from medtrain.merging import probe_batch

import merge_peft_adapter

ATOL = MERGE_ATOL
NEW_TOKENS = ["<symptom>", "<dose>"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_base(path, task: str, vocab: int | None = None, quantize: bool = False):
    """The base as training loads it: causal LM or one-output classifier, resized to ``vocab`` rows."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        model.config.pad_token_id = 0
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if vocab and vocab != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def train_adapter(base: Path, out: Path, task: str = "CAUSAL_LM", new_tokens: list[str] | None = None,
                  modules_to_save: list[str] | None = None, quantize: bool = False, steps: int = 3) -> Path:
    """A LoRA adapter trained for a few steps with PEFT (non-zero B from the start), saved as a stage saves it."""
    from peft import LoraConfig, get_peft_model

    from medtrain.modeling import fix_bnb_cpu_training

    torch.manual_seed(0)
    tokenizer = load_tokenizer(base)
    if new_tokens:
        tokenizer.add_tokens(new_tokens)
    model = load_base(base, task, vocab=len(tokenizer), quantize=quantize)
    config = LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules="all-linear",
                        modules_to_save=modules_to_save, init_lora_weights=False)
    model = get_peft_model(model, config)
    fix_bnb_cpu_training(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, len(tokenizer), (4, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        if task == "SEQ_CLS":
            scores = model(input_ids=ids).logits.squeeze(-1)
            loss = -torch.nn.functional.logsigmoid(scores[:2] - scores[2:]).mean()
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # PEFT saves resized embeddings anyway (with a warning); say so explicitly
    model.save_pretrained(out, save_embedding_layers=True if new_tokens else "auto")
    tokenizer.save_pretrained(out)
    save_chat_format(get_chat_format(tokenizer, None), str(out))
    return out


@torch.no_grad()
def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def probe_ids(vocab: int) -> torch.Tensor:
    """Random ids plus the highest ids (new tokens after a resize); id 0 (pad) avoided."""
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(7))
    return torch.cat([ids, torch.arange(vocab - 9, vocab)[None]])


def reference_outputs(base: Path, adapter: Path, task: str, ids: torch.Tensor, quantize: bool = False):
    """base + adapter through PEFT alone (not through the merge code)."""
    from peft import PeftModel

    tokenizer = load_tokenizer(adapter)
    model = PeftModel.from_pretrained(load_base(base, task, vocab=len(tokenizer), quantize=quantize), adapter)
    return outputs(model, ids)


def merge(*args: str):
    return merge_peft_adapter.main([*args])


def assert_refused(capsys, args: list[str], message: str) -> str:
    """The merge exits 2 with ``error: ...message...`` and no traceback."""
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: merge_peft_adapter.main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert "Traceback" not in err
    return err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: one base, adapters trained once per module


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    build_model(path, build_tokenizer(path, chat_template=CHATML_TEMPLATE))
    return path


@pytest.fixture(scope="module")
def causal_adapter(base, tmp_path_factory) -> Path:
    return train_adapter(base, tmp_path_factory.mktemp("sft-adapter"))


@pytest.fixture(scope="module")
def resized_adapter(base, tmp_path_factory) -> Path:
    return train_adapter(base, tmp_path_factory.mktemp("resized-adapter"), new_tokens=NEW_TOKENS,
                         modules_to_save=["embed_tokens", "lm_head"])


# ----------------------------------------------------------------------------------------------------------------
# Exact merges


def test_causal_lm_adapter_merges_exactly(base, causal_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = merge("--base_model", str(base), "--lora_model", str(causal_adapter), "--output_dir", str(out))
    ids = probe_ids(400)
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = reference_outputs(base, causal_adapter, "CAUSAL_LM", ids)
    diff = (outputs(merged, ids) - expected).abs().max().item()
    print(f"causal LM adapter: merged vs base + adapter max |logit diff| = {diff:.3g} (script: {report.max_abs_diff:.3g})")
    assert diff < ATOL and report.max_abs_diff < ATOL and report.written_max_abs_diff < ATOL
    # the adapter really changed the model, so the comparison above can fail
    assert (outputs(AutoModelForCausalLM.from_pretrained(base), ids) - expected).abs().max().item() > 1e-2
    assert report.model_type == "causal_lm" and report.resized_to is None and report.quantization is None
    files = sorted(os.listdir(out))
    assert files == ["chat_template.jinja", "config.json", "generation_config.json", "medtrain_chat_format.json",
                     "merge_report.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / RECORD_FILE).read_text()) == {"kind": "tokenizer", "template_name": None,
                                                           "system_prompt": None}
    tokenizer = load_tokenizer(out)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert leftovers(tmp_path) == []


def test_reward_model_adapter_merges_with_its_score_head(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from medtrain.reward import load_reward_model

    adapter = train_adapter(base, tmp_path / "rm-adapter", task="SEQ_CLS")
    out = tmp_path / "merged-rm"
    report = merge("--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out))
    assert report.model_type == "sequence_classification"
    ids = probe_ids(400)
    expected = reference_outputs(base, adapter, "SEQ_CLS", ids)
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.architectures == ["LlamaForSequenceClassification"]
    assert merged.config.pad_token_id == 0
    diff = (outputs(merged, ids) - expected).abs().max().item()
    print(f"reward adapter: merged vs base + adapter max |score diff| = {diff:.3g} (script: {report.max_abs_diff:.3g})")
    assert expected.shape == (3, 1) and diff < ATOL and report.max_abs_diff < ATOL
    # the reward stage's own loader reads the merged directory as a reward model with the same scores
    assert (outputs(load_reward_model(str(out)), ids) - expected).abs().max().item() < ATOL


def test_resized_embedding_adapter_is_merged_into_a_resized_base(base, resized_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged-resized"
    report = merge("--base_model", str(base), "--lora_model", str(resized_adapter), "--output_dir", str(out))
    assert report.resized_to == 402
    ids = probe_ids(402)  # the last row is ids 393..401: the two new tokens included
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape == (402, 64) and merged.config.vocab_size == 402
    assert len(load_tokenizer(out)) == 402
    diff = (outputs(merged, ids) - reference_outputs(base, resized_adapter, "CAUSAL_LM", ids)).abs().max().item()
    print(f"resized-embedding adapter: merged vs base + adapter max |logit diff| = {diff:.3g}")
    assert diff < ATOL and report.max_abs_diff < ATOL


def test_qlora_adapter_is_merged_into_the_full_precision_base(base, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = train_adapter(base, tmp_path / "qlora-adapter", quantize=True)
    out = tmp_path / "merged-qlora"
    report = merge("--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out),
                   "--training_quantization", "qlora")
    ids = probe_batch(400, pad_token_id=0)  # the script's probe inputs, so its reported difference can be compared
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_out = outputs(merged, ids)
    full_precision = (merged_out - reference_outputs(base, adapter, "CAUSAL_LM", ids)).abs().max().item()
    quantized = (merged_out - reference_outputs(base, adapter, "CAUSAL_LM", ids, quantize=True)).abs().max().item()
    print(f"QLoRA adapter: merged vs fp32 base + adapter {full_precision:.3g}; vs 4-bit base + adapter {quantized:.3g} "
          f"(script: {report.quantized_max_abs_diff:.3g})")
    assert full_precision < ATOL  # merged into the float32 base ...
    assert math.isfinite(quantized) and quantized > 100 * ATOL  # ... which is distinguishable from the 4-bit one
    assert report.quantization == "qlora" and math.isclose(report.quantized_max_abs_diff, quantized, rel_tol=1e-3)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {p.dtype for p in merged.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_missing_adapter_config_is_refused(base, causal_adapter, tmp_path, capsys):
    adapter = copy_adapter(causal_adapter, tmp_path / "no-config")
    os.remove(adapter / "adapter_config.json")
    out = tmp_path / "out"
    assert_refused(capsys, ["--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out)],
                   f"--lora_model {adapter}: no adapter_config.json there, so it is not a LoRA adapter.")
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_empty_output_dir_needs_overwrite(base, causal_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    args = ["--base_model", str(base), "--lora_model", str(causal_adapter), "--output_dir", str(out)]
    assert_refused(capsys, args, f"--output_dir {out} exists and is not empty: choose another directory or pass "
                                 "--overwrite_output_dir.")
    assert os.listdir(out) == ["keep.txt"]
    merge(*args, "--overwrite_output_dir")
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert leftovers(tmp_path) == []


def test_adapter_from_another_architecture_is_refused(causal_adapter, tmp_path, capsys):
    other = tmp_path / "narrow-base"
    build_model(other, build_tokenizer(other, chat_template=CHATML_TEMPLATE), hidden=32)
    out = tmp_path / "out"
    args = ["--base_model", str(other), "--lora_model", str(causal_adapter), "--output_dir", str(out)]
    # the base recorded in adapter_config.json is on disk: configs are compared before loading anything
    assert_refused(capsys, args, "whose architecture or vocabulary differs from --base_model (hidden_size 64 vs 32; "
                                 "adapter's base vs yours)")
    # messages name the model flag as typed: the training stages' spelling is an alias here
    assert_refused(capsys, ["--model_name_or_path", *args[1:]], "whose architecture or vocabulary differs from "
                   "--model_name_or_path (hidden_size 64 vs 32; adapter's base vs yours)")
    # recorded base unavailable: the adapter's tensors are checked against the base's modules
    moved = copy_adapter(causal_adapter, tmp_path / "moved", base_model_name_or_path="/nonexistent/base")
    args[3] = str(moved)
    assert_refused(capsys, args, "does not fit --base_model: model.layers.0.mlp.down_proj.lora_A.weight: adapter "
                                 "[4, 128], base expects ['r', 64]")
    assert_refused(capsys, ["--model_name_or_path", *args[1:]], "does not fit --model_name_or_path: ")
    assert not out.exists() and leftovers(tmp_path) == []


def test_adapter_from_another_vocabulary_is_refused(base, resized_adapter, tmp_path, capsys):
    bigger = tmp_path / "big-vocab-base"
    build_model(bigger, build_tokenizer(bigger, chat_template=CHATML_TEMPLATE, vocab_size=450))
    out = tmp_path / "out"
    args = ["--base_model", str(bigger), "--lora_model", str(resized_adapter), "--output_dir", str(out)]
    assert_refused(capsys, args, "(vocab_size 400 vs 450; adapter's base vs yours)")
    moved = copy_adapter(resized_adapter, tmp_path / "moved", base_model_name_or_path="/nonexistent/base")
    args[3] = str(moved)
    assert_refused(capsys, args, f"--lora_model {moved} was trained with a 402-row vocabulary but --base_model has "
                                 "450 embedding rows")
    # the right base, but a tokenizer larger than the adapter's vocabulary: not the one it was trained with
    assert_refused(capsys, ["--base_model", str(base), "--lora_model", str(resized_adapter), "--output_dir", str(out),
                            "--tokenizer_path", str(bigger)],
                   f"the tokenizer has 450 tokens but --lora_model {resized_adapter} was trained with 402 embedding "
                   "rows: this is not the tokenizer the adapter was trained with (pass it as --tokenizer_path).")
    assert not out.exists() and leftovers(tmp_path) == []


def test_unknown_recorded_template_and_quantized_base_are_refused(base, causal_adapter, tmp_path, capsys):
    adapter = copy_adapter(causal_adapter, tmp_path / "bad-template")
    (adapter / RECORD_FILE).write_text(json.dumps({"kind": "template", "template_name": "no-such-template",
                                                   "system_prompt": None}))
    out = tmp_path / "out"
    assert_refused(capsys, ["--base_model", str(base), "--lora_model", str(adapter), "--output_dir", str(out)],
                   f"{adapter / RECORD_FILE}: unknown conversation template 'no-such-template'; choose one of: ")
    quantized = tmp_path / "quantized-base"
    quantized.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    assert_refused(capsys, ["--base_model", str(quantized), "--lora_model", str(causal_adapter), "--output_dir",
                            str(out)], f"--base_model {quantized} stores quantized weights (bitsandbytes)")
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_verification_writes_nothing(base, causal_adapter, tmp_path, capsys, monkeypatch):
    import medtrain.merging

    monkeypatch.setattr(medtrain.merging, "max_abs_diff", lambda a, b: float("nan"))
    out = tmp_path / "out"
    assert_refused(capsys, ["--base_model", str(base), "--lora_model", str(causal_adapter), "--output_dir", str(out)],
                   "the merged model differs from base + adapter by nan (max |logit|, float32), more than --tolerance "
                   "0.001: nothing was written.")
    assert not out.exists() and leftovers(tmp_path) == []


def test_command_line_exit_status(base, tmp_path):
    """The script itself: exit 2, one error line, no traceback."""
    result = run_script("merge_peft_adapter.py", "--base_model", str(base), "--lora_model", str(base),
                        "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --lora_model {base}: no adapter_config.json there, so it is not a LoRA adapter. "
        "It holds a full model: use it as --base_model instead.")
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
