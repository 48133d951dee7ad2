"""The five entry points that load a finished model take the same model flags from one place: inference.py,
openai_api.py, web_demo.py and eval_benchmarks.py parse GenerationModelArguments, merge_peft_adapter.py its base
ModelSourceArguments (it renders no chat, and its --torch_dtype is the dtype it writes). Same spellings (the old
ones are aliases: --base_model = --model_name_or_path, --tokenizer_name_or_path = --tokenizer_path), defaults, help
and choices, the same values for the same command line, and no script re-declares one of them (which is how the
copies had drifted apart). Errors about the model directory name the spelling the user typed.
No model is loaded: parsing, and checks that fail before any weights are read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import HfArgumentParser

from medtrain.arguments import ModelSourceArguments, flag_spelling, parse_args
from medtrain.errors import ConfigError
from medtrain.generation import GenerationModelArguments
from medtrain.merging import MergeArguments

import eval_benchmarks
import inference
import merge_peft_adapter
import openai_api
import web_demo

SCRIPTS = {"inference.py": inference, "openai_api.py": openai_api, "web_demo.py": web_demo,
           "eval_benchmarks.py": eval_benchmarks, "merge_peft_adapter.py": merge_peft_adapter}
SHARED = {script: ModelSourceArguments if script == "merge_peft_adapter.py" else GenerationModelArguments
          for script in SCRIPTS}
# Flags of the script's other dataclasses whose name is a generation flag's but whose meaning is not (see the
# comment at MergeArguments.torch_dtype): allowed, and pinned here so no other one creeps in.
DIFFERENT_MEANING = {"merge_peft_adapter.py": {"torch_dtype"}}
# Flags each script needs besides the model's, to parse at all.
OTHER_REQUIRED = {"eval_benchmarks.py": ["--benchmark_dir", "bench", "--output_dir", "out"],
                  "merge_peft_adapter.py": ["--output_dir", "out"]}
SOURCE_FLAGS = [f.name for f in dataclasses.fields(ModelSourceArguments)]
MODEL_FLAGS = [f.name for f in dataclasses.fields(GenerationModelArguments)]
# What the flags were before they were shared (inference.py and merge spelled the model --base_model, eval and the
# training stages spell the tokenizer --tokenizer_name_or_path); tools call these.
EXPECTED_DEFAULTS = {"lora_model": None, "tokenizer_path": None, "template_name": None, "system_prompt": None,
                     "torch_dtype": "auto", "trust_remote_code": False}


def model_actions(dataclass_types: list[type], names: list[str]) -> dict[str, tuple]:
    """What `--help` and argparse know of each model flag: spellings, default, help, choices, required."""
    parser = HfArgumentParser(dataclass_types, conflict_handler="resolve")  # as medtrain.arguments.parse_args
    return {a.dest: (tuple(a.option_strings), a.default, a.help, tuple(a.choices or ()), a.required)
            for a in parser._actions if a.dest in names}


def parse(script: str, argv: list[str]) -> list:
    """The script's dataclasses for ``argv``, parsed as its main() parses them."""
    module = SCRIPTS[script]
    return parse_args(module.ARGUMENTS, [*argv, *OTHER_REQUIRED.get(script, [])],
                      required=getattr(module, "REQUIRED", ()))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_point_declares_the_model_flags_once_and_only_in_the_shared_dataclass(script):
    arguments, shared = SCRIPTS[script].ARGUMENTS, SHARED[script]
    assert shared in arguments
    names = [f.name for f in dataclasses.fields(shared)]
    for dataclass_type in arguments:
        if dataclass_type is not shared:
            copied = {f.name for f in dataclasses.fields(dataclass_type)} & set(MODEL_FLAGS)
            assert copied == DIFFERENT_MEANING.get(script, set()), (
                f"{script}: {dataclass_type.__name__} re-declares {sorted(copied)}")
    assert model_actions(arguments, names) == model_actions([shared], names)
    # the flags every entry point shares are one and the same, whichever shared class a script parses
    assert model_actions(arguments, SOURCE_FLAGS) == model_actions([ModelSourceArguments], SOURCE_FLAGS)


def test_the_model_flags_keep_their_spellings_defaults_and_safe_values():
    actions = model_actions([GenerationModelArguments], MODEL_FLAGS)
    assert set(actions) == set(EXPECTED_DEFAULTS) | {"model_name_or_path"}
    spellings, default, _, _, required = actions["model_name_or_path"]
    assert {"--model_name_or_path", "--base_model"} <= set(spellings) and required and default is None
    assert {"--tokenizer_path", "--tokenizer_name_or_path"} <= set(actions["tokenizer_path"][0])
    for name, expected in EXPECTED_DEFAULTS.items():
        assert f"--{name}" in actions[name][0] and actions[name][1] == expected and not actions[name][4], name
        assert actions[name][2], f"--{name} has no help"
    assert actions["torch_dtype"][3] == ("auto", "float32", "bfloat16", "float16")


SOURCE_COMMAND = ["--lora_model", "adapter", "--trust_remote_code"]
GENERATION_COMMAND = ["--template_name", "chatml", "--system_prompt", "Be brief.", "--torch_dtype", "float32"]
SOURCE = {"lora_model": "adapter", "tokenizer_path": "tok", "trust_remote_code": True}


@pytest.mark.parametrize("model_spelling", ["--model_name_or_path", "--base_model", "--base-model"])
@pytest.mark.parametrize("tokenizer_spelling", ["--tokenizer_path", "--tokenizer_name_or_path"])
def test_the_same_command_line_gives_the_same_model_in_every_entry_point(model_spelling, tokenizer_spelling):
    expected = GenerationModelArguments(model_name_or_path="m", template_name="chatml", system_prompt="Be brief.",
                                        torch_dtype="float32", **SOURCE)
    for script in SCRIPTS:
        command = [model_spelling, "m", tokenizer_spelling, "tok", *SOURCE_COMMAND]
        if SHARED[script] is GenerationModelArguments:
            assert parse(script, [*command, *GENERATION_COMMAND])[0] == expected, script
        else:  # merge renders no chat (--template_name is unknown to it); its --torch_dtype is its own
            assert parse(script, command)[0] == ModelSourceArguments(model_name_or_path="m", **SOURCE), script
            with pytest.raises(ConfigError, match="unknown flag.*--template_name"):
                parse(script, [*command, *GENERATION_COMMAND])
    for script in ("inference.py", "openai_api.py", "web_demo.py", "eval_benchmarks.py"):
        bare = parse(script, [model_spelling, "m"])[0]
        assert bare == GenerationModelArguments(model_name_or_path="m"), script
        assert {f: getattr(bare, f) for f in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS, script
    # the servers still listen on loopback unless told otherwise
    for script in ("openai_api.py", "web_demo.py"):
        assert parse(script, [model_spelling, "m"])[1].host == "127.0.0.1"


def test_merge_keeps_its_own_torch_dtype_and_requires_the_adapter(capsys):
    """merge_peft_adapter.py's --torch_dtype is the dtype it writes (auto = the base checkpoint's), not the one it
    loads in: a field of MergeArguments, not the shared one; --lora_model is what it merges, so it is required."""
    source, merge_args = parse("merge_peft_adapter.py", ["--base_model", "m", "--lora_model", "a", "--torch_dtype",
                                                         "bfloat16"])
    assert (source.model_name_or_path, source.lora_model, merge_args.torch_dtype) == ("m", "a", "bfloat16")
    assert not hasattr(source, "torch_dtype")
    assert parse("merge_peft_adapter.py", ["--base_model", "m", "--lora_model", "a"])[1].torch_dtype == "auto"
    assert "written" in model_actions([MergeArguments], ["torch_dtype"])["torch_dtype"][2]
    with pytest.raises(SystemExit) as exit_info:
        parse("merge_peft_adapter.py", ["--base_model", "m"])
    assert exit_info.value.code == 2
    assert "required: --lora_model" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_model_flag_exits_2_naming_both_spellings(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(script, ["--lora_model", "adapter"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "required" in err and "--model_name_or_path" in err and "--base_model" in err


def test_an_argument_file_may_use_the_alias_as_a_key(tmp_path):
    config = tmp_path / "infer.yaml"
    config.write_text("base_model: m\nlora_model: adapter\nmax_new_tokens: 7\n", encoding="utf-8")
    model_args, inference_args = parse_args(inference.ARGUMENTS, [str(config), "--max_new_tokens", "9"])
    assert (model_args.model_name_or_path, model_args.lora_model, inference_args.max_new_tokens) == ("m", "adapter", 9)
    config.write_text("base_modle: m\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown argument.*base_modle"):
        parse_args(inference.ARGUMENTS, [str(config)])
    config.write_text("model_name_or_path: m\ntokenizer_name_or_path: tok\nbenchmark_dir: b\noutput_dir: o\n",
                      encoding="utf-8")
    assert parse_args(eval_benchmarks.ARGUMENTS, [str(config)])[0].tokenizer_path == "tok"


# --------------------------------------------------------------------------------------------------------------
# Errors name the spelling the user typed


@pytest.mark.parametrize("argv, expected", [
    (["--base_model", "m"], "--base_model"), (["--base-model=m"], "--base-model"),
    (["--model_name_or_path", "m"], "--model_name_or_path"), (["--lora_model", "a"], "--model_name_or_path"),
    (["--model_name_or_path", "m", "--base_model", "n"], "--base_model"),  # the last one given wins, as in argparse
])
def test_flag_spelling(argv, expected):
    assert flag_spelling(argv, ModelSourceArguments, "model_name_or_path") == expected


def fake_adapter(path):
    """An adapter directory read_adapter accepts (its weights are never loaded here)."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(1, 1)}, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("spelling", ["--model_name_or_path", "--base_model"])
def test_a_missing_model_directory_is_named_by_the_flag_the_user_typed(spelling, tmp_path):
    missing = str(tmp_path / "no-such-model")
    adapter = str(fake_adapter(tmp_path / "adapter"))
    mains = {
        "merge_peft_adapter.py": lambda: merge_peft_adapter.main(
            [spelling, missing, "--lora_model", adapter, "--output_dir", str(tmp_path / "merged")]),
        "eval_benchmarks.py": lambda: eval_benchmarks.main(
            [spelling, missing, "--benchmark_dir", str(bench(tmp_path)), "--output_dir", str(tmp_path / "eval")]),
        "inference.py": lambda: inference.main([spelling, missing]),
        "openai_api.py": lambda: openai_api.main([spelling, missing, "--port", "0"]),  # fails before serving
        "web_demo.py": lambda: web_demo.main([spelling, missing, "--port", "0"]),
    }
    for script, main in mains.items():
        with pytest.raises(ConfigError) as err:
            main()
        assert str(err.value) == f"{spelling} {missing}: no such directory.", script
    assert not (tmp_path / "merged").exists() and not (tmp_path / "eval").exists()


def bench(tmp_path):
    path = tmp_path / "bench"
    if not path.exists():
        path.mkdir()
        (path / "anatomy.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    return path
