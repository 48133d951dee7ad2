"""inference.py, openai_api.py and web_demo.py take the same model-loading flags (one GenerationModelArguments):
same spellings (--model_name_or_path and its alias --base_model), defaults, help and choices, the same values
for the same command line, and no script re-declares one of them (which is how the copies had drifted apart).
No model is loaded: parsing only."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from medtrain.arguments import parse_args
from medtrain.errors import ConfigError
from medtrain.generation import GenerationModelArguments

import inference
import openai_api
import web_demo

SCRIPTS = {"inference.py": inference, "openai_api.py": openai_api, "web_demo.py": web_demo}
MODEL_FLAGS = [f.name for f in dataclasses.fields(GenerationModelArguments)]
# What the flags were before they were shared (inference.py spelled the model --base_model); tools call these.
EXPECTED_DEFAULTS = {"lora_model": None, "tokenizer_path": None, "template_name": None, "system_prompt": None,
                     "torch_dtype": "auto", "trust_remote_code": False}


def model_actions(dataclass_types: list[type]) -> dict[str, tuple]:
    """What `--help` and argparse know of each model flag: spellings, default, help, choices, required."""
    parser = HfArgumentParser(dataclass_types, conflict_handler="resolve")  # as medtrain.arguments.parse_args
    return {a.dest: (tuple(a.option_strings), a.default, a.help, tuple(a.choices or ()), a.required)
            for a in parser._actions if a.dest in MODEL_FLAGS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_point_declares_the_model_flags_once_and_only_in_the_shared_dataclass(script):
    arguments = SCRIPTS[script].ARGUMENTS
    assert GenerationModelArguments in arguments
    for dataclass_type in arguments:
        if dataclass_type is not GenerationModelArguments:
            copied = {f.name for f in dataclasses.fields(dataclass_type)} & set(MODEL_FLAGS)
            assert not copied, f"{script}: {dataclass_type.__name__} re-declares {sorted(copied)}"
    assert model_actions(arguments) == model_actions([GenerationModelArguments])


def test_the_model_flags_keep_their_spellings_defaults_and_safe_values():
    actions = model_actions([GenerationModelArguments])
    assert set(actions) == set(EXPECTED_DEFAULTS) | {"model_name_or_path"}
    spellings, default, _, _, required = actions["model_name_or_path"]
    assert {"--model_name_or_path", "--base_model"} <= set(spellings) and required and default is None
    for name, expected in EXPECTED_DEFAULTS.items():
        assert f"--{name}" in actions[name][0] and actions[name][1] == expected and not actions[name][4], name
        assert actions[name][2], f"--{name} has no help"
    assert actions["torch_dtype"][3] == ("auto", "float32", "bfloat16", "float16")


COMMAND = ["--lora_model", "adapter", "--tokenizer_path", "tok", "--template_name", "chatml", "--system_prompt",
           "Be brief.", "--torch_dtype", "float32", "--trust_remote_code"]


@pytest.mark.parametrize("spelling", ["--model_name_or_path", "--base_model", "--base-model"])
def test_the_same_command_line_gives_the_same_model_in_every_entry_point(spelling):
    expected = GenerationModelArguments(model_name_or_path="m", lora_model="adapter", tokenizer_path="tok",
                                        template_name="chatml", system_prompt="Be brief.", torch_dtype="float32",
                                        trust_remote_code=True)
    for script, module in SCRIPTS.items():
        parsed = parse_args(module.ARGUMENTS, [spelling, "m", *COMMAND])
        assert parsed[0] == expected, script
        bare = parse_args(module.ARGUMENTS, [spelling, "m"])[0]
        assert bare == GenerationModelArguments(model_name_or_path="m"), script
        assert {f: getattr(bare, f) for f in EXPECTED_DEFAULTS} == EXPECTED_DEFAULTS, script
    # the servers still listen on loopback unless told otherwise
    for module in (openai_api, web_demo):
        assert parse_args(module.ARGUMENTS, [spelling, "m"])[1].host == "127.0.0.1"


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_model_flag_exits_2_naming_both_spellings(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(SCRIPTS[script].ARGUMENTS, ["--lora_model", "adapter"])
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
