"""examples/<stage>.yaml: each parses with its stage's parser, holds no key that repeats a default (one place per
default), and a run from the YAML equals the same run from flags (identical trainer_state.json losses)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

EXAMPLES = ROOT / "examples"
# examples/<stage>.yaml -> the script that reads it (the launcher run_<stage>.sh passes it first)
STAGES = {"pt": "pretraining", "sft": "supervised_finetuning", "rm": "reward_modeling", "ppo": "ppo_training",
          "dpo": "dpo_training", "orpo": "orpo_training", "kto": "kto_training", "grpo": "grpo_training",
          "eval": "eval_benchmarks"}
# Keys that locate the run rather than set a default: they may equal a default (None) without being a duplicate.
PATH_KEYS = {"model_name_or_path", "train_file_dir", "reward_model_name_or_path", "benchmark_dir"}
# Per stage, fields the script requires (no default at all): a value there cannot repeat a default.
REQUIRED = {"eval": {"output_dir"}}


class Parsed(Exception):
    """Raised by the patched parse_args() to stop a stage right after parsing, carrying what it parsed."""

    def __init__(self, objects):
        super().__init__("parsed")
        self.objects = objects


def parse_stage(monkeypatch, script: str, argv: list[str]) -> dict:
    """Every field the stage parsed from ``argv``, by name (all dataclasses merged), without running the stage."""
    module = importlib.import_module(script)
    real = module.parse_args

    def stop(*args, **kwargs):
        raise Parsed(real(*args, **kwargs))

    monkeypatch.setattr(module, "parse_args", stop)
    with pytest.raises(Parsed) as caught:
        module.main(argv)
    values = {}
    for obj in caught.value.objects:
        values.update({k: v for k, v in vars(obj).items() if not k.startswith("_")})
    return values


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def test_every_stage_has_an_example_and_every_example_a_stage():
    names = {p.stem for p in example_files()}
    # other stages (added later) register themselves in STAGES; an example without a stage here is not tested
    assert set(STAGES) <= names, f"missing examples/{sorted(set(STAGES) - names)}.yaml"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_example_parses_and_repeats_no_default(stage, monkeypatch):
    path = EXAMPLES / f"{stage}.yaml"
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(settings, dict) and settings, path
    parsed = parse_stage(monkeypatch, STAGES[stage], [str(path)])  # unknown keys are a ConfigError here
    for key, value in settings.items():
        assert parsed[key] == value or str(parsed[key]) == str(value) or (
            isinstance(parsed[key], list) and parsed[key] == [value]), (key, parsed[key], value)
    # one place per default: a key that the script already defaults to the same value is a duplicate
    located = PATH_KEYS | REQUIRED.get(stage, set())
    required = {k: settings[k] for k in located if k in settings}
    baseline = parse_stage(monkeypatch, STAGES[stage], [f"--{k}={v}" for k, v in required.items()])
    duplicates = sorted(k for k in set(settings) - located if baseline[k] == parsed[k])
    assert not duplicates, f"{path.name}: {duplicates} repeat the script's own default; drop them (or comment them)"


def test_launchers_pass_the_example_first():
    for stage, script in STAGES.items():
        text = (ROOT / f"run_{stage}.sh").read_text()
        assert f"{script}.py examples/{stage}.yaml" in text.replace("\\\n", "").replace("  ", " "), stage


def yaml_to_flags(settings: dict) -> list[str]:
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}", str(value)]
    return flags


def test_sft_run_from_the_example_equals_the_run_from_flags(tiny_chat_model_dir, tmp_path):
    """The issue's acceptance test: examples/sft.yaml vs the same settings as flags -> identical losses."""
    from test_sft import write_data

    import supervised_finetuning

    data = write_data(tmp_path / "data")
    # tiny run: our model/data, 3 steps, nothing saved but the final state; every other setting from the example
    overrides = ["--model_name_or_path", str(tiny_chat_model_dir), "--train_file_dir", str(data),
                 "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
                 "--eval_strategy", "no", "--do_eval", "False", "--validation_split_percentage", "0"]
    settings = yaml.safe_load((EXAMPLES / "sft.yaml").read_text(encoding="utf-8"))
    runs = {}
    for name, head in (("yaml", [str(EXAMPLES / "sft.yaml")]), ("flags", yaml_to_flags(settings))):
        out = tmp_path / name
        supervised_finetuning.main([*head, *overrides, "--output_dir", str(out)])
        state = json.loads((out / "trainer_state.json").read_text())
        runs[name] = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(runs["yaml"]) == 3
    assert runs["yaml"] == runs["flags"]
    # every stage ends by drawing its curves (medtrain.plotting): a PNG that decodes
    from matplotlib.image import imread

    assert imread(tmp_path / "yaml" / "training_curves.png").shape[0] > 100
