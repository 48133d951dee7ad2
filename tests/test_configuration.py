"""Configuration: pure import and parse, one finalize per stage, process settings only in start_run, no import
cycles, and the TRL private members the trainers still lean on."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, finalize, parse_args, peek_arg
from medtrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medtrain"
PROCESS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR",
                     "THP_MEM_ALLOC_ENABLE")


def _clean_env() -> dict:
    """This environment without the variables medtrain could set or that steer malloc."""
    drop = set(PROCESS_VARIABLES) | {"MEDTRAIN_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(code: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(),
                          cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return True


# --- no side effects at import or parse -------------------------------------------------------------------------------

_IMPORT_ALL = """
import importlib, json, os, pkgutil
# the libraries medtrain builds on set variables of their own at import (torch's inductor: TORCHINDUCTOR_CACHE_DIR;
# lm_eval: HF_XET_HIGH_PERFORMANCE): import them first, so only medtrain's own changes count
import accelerate, datasets, lm_eval, peft, torch, transformers, trl
before = dict(os.environ)
import medtrain
names = sorted(m.name for m in pkgutil.walk_packages(medtrain.__path__, "medtrain."))
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
page = os.sysconf("SC_PAGE_SIZE")
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
def returned_mb():
    x = torch.empty(16_000_000).fill_(1.0)  # 61 MiB, above glibc's default mmap threshold (<= 32 MB)
    with_block = resident_mb()
    del x
    return with_block - resident_mb()
returned_mb()
print(json.dumps({"modules": len(names), "changed": changed, "returned_mb": min(returned_mb() for _ in range(3))}))
"""


def test_importing_every_medtrain_module_changes_no_environment_variable_and_no_malloc_setting():
    result = json.loads(_run(_IMPORT_ALL))
    assert result["modules"] >= 20  # every module of the package was imported
    assert result["changed"] == []
    if sys.platform.startswith("linux") and _glibc():
        # malloc as glibc ships it: a freed 61 MiB block is unmapped (keep_freed_memory would keep it resident)
        assert result["returned_mb"] > 50


_PARSE_THEN_START = """
import json, os, sys
sys.argv = ["x"]
from trl import SFTConfig
import torch.distributed
import deepspeed.comm
# DeepSpeed's real start JIT-compiles its shared-memory op (minutes, once; test_deepspeed.py runs it for real):
# record the call and the environment it would see instead.
calls = []
deepspeed.comm.init_distributed = lambda **kw: calls.append(dict(kw, env={{k: os.environ.get(k) for k in VARS}}))
VARS = {variables!r}
from medtrain.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, finalize, parse_args
from medtrain.runtime import apply_process_settings
parsed = parse_args([ModelArguments, LoraArguments, DataArguments, RunArguments, SFTConfig],
                    ["--model_name_or_path", "m", "--train_file_dir", "d", "--output_dir", {out!r},
                     "--deepspeed", "deepspeed_zero_stage2_config.json", "--report_to", "none"])
finalize(*[parsed[i] for i in (0, 1, 2, 4)])
after_parse = dict(vars={{k: os.environ.get(k) for k in VARS}}, comm=deepspeed.comm.is_initialized(),
                   group=torch.distributed.is_initialized())
settings = apply_process_settings(parsed[-1])
after_start = dict(vars={{k: os.environ.get(k) for k in VARS}}, calls=calls, settings=settings)
print(json.dumps(dict(after_parse=after_parse, after_start=after_start)))
"""


def test_parse_and_finalize_are_pure_and_start_run_sets_up_the_process_in_order(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    result = json.loads(_run(_PARSE_THEN_START.format(variables=PROCESS_VARIABLES, out=str(out))))
    parsed = result["after_parse"]
    assert parsed == {"vars": dict.fromkeys(PROCESS_VARIABLES), "comm": False, "group": False}
    started = result["after_start"]
    env = started["vars"]
    # python script.py --deepspeed: a one-process launch environment, DeepSpeed comm on gloo before any model
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("0", "0", "1") and int(env["MASTER_PORT"]) > 0
    [call] = started["calls"]
    assert call["dist_backend"] == "gloo" and call["auto_mpi_discovery"] is False
    assert call["env"]["RANK"] == "0" and call["env"]["MASTER_PORT"] == env["MASTER_PORT"]  # env first, then comm
    assert env["TENSORBOARD_LOGGING_DIR"] == str(out / "logs") and env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert started["settings"]["single_process_env"] is True and started["settings"]["deepspeed_comm"] is True
    assert started["settings"]["keep_freed_memory"] is (sys.platform.startswith("linux") and _glibc())
    assert not out.exists()  # setting the process up writes nothing


# --- one spelling per flag ---------------------------------------------------------------------------------------------


def test_removed_neft_alpha_names_its_replacement_from_flags_and_from_a_file(tmp_path):
    from trl import SFTConfig

    types = [DataArguments, SFTConfig]
    with pytest.raises(ConfigError) as err:
        parse_args(types, ["--train_file_dir", "d", "--neft_alpha", "5", "--report_to", "none"])
    assert err.value.problems == ["--neft_alpha was removed: use --neftune_noise_alpha (same meaning)."]
    config = tmp_path / "sft.yaml"
    config.write_text("train_file_dir: d\nneft_alpha: 5\n")
    with pytest.raises(ConfigError, match=r"sft.yaml: --neft_alpha was removed: use --neftune_noise_alpha"):
        parse_args(types, [str(config)])
    (_, sft) = parse_args(types, ["--train_file_dir", "d", "--neftune_noise_alpha", "5", "--report_to", "none"])
    assert sft.neftune_noise_alpha == 5.0


# --- finalize: derived once, checked at once ---------------------------------------------------------------------------


def _trainer_configs():
    from trl import DPOConfig, RewardConfig, SFTConfig

    return [SFTConfig, DPOConfig, RewardConfig]


@pytest.mark.parametrize("config_index", [0, 1, 2], ids=["sft", "dpo", "rm"])
def test_trainer_max_length_is_derived_from_model_max_length_and_a_conflicting_one_is_refused(config_index):
    config_class = _trainer_configs()[config_index]
    types = [ModelArguments, LoraArguments, DataArguments, config_class]
    base = ["--model_name_or_path", "m", "--train_file_dir", "d", "--report_to", "none", "--model_max_length", "96"]
    model_args, lora_args, data_args, training_args = parse_args(types, base)
    assert training_args.max_length is None  # as parsed: nothing derived yet
    finalize(model_args, lora_args, data_args, training_args)
    assert training_args.max_length == 96
    # the same value given explicitly is fine; another one is an error, whatever the stage
    finalize(*parse_args(types, [*base, "--max_length", "96"]))
    with pytest.raises(ConfigError, match=r"--max_length 64 differs from --model_max_length 96"):
        finalize(*parse_args(types, [*base, "--max_length", "64"]))


def test_a_script_without_model_max_length_keeps_its_own_max_length():
    import score_rewards

    (score_args,) = parse_args([score_rewards.ScoreArguments], ["--model", "m", "--data_file", "d", "--output_file", "o"])
    assert score_args.max_length == 1024


def test_finalize_reports_every_problem_at_once():
    from trl import SFTConfig

    parsed = parse_args([ModelArguments, LoraArguments, DataArguments, SFTConfig],
                        ["--model_name_or_path", "m", "--train_file_dir", "d", "--report_to", "none",
                         "--max_length", "64", "--neftune_noise_alpha", "-1", "--peft_path", "a", "--use_peft", "False"])
    with pytest.raises(ConfigError) as err:
        finalize(*parsed, checks=(lambda: (_ for _ in ()).throw(ConfigError("a stage check")),))
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert [p.split(" ")[0] for p in problems] == ["--max_length", "--neftune_noise_alpha", "--peft_path", "a"]
    assert parsed[-1].max_length == 64  # a refused configuration is not half-derived


# --- --rl_algo from a file ----------------------------------------------------------------------------------------------


def test_rl_algo_is_read_from_a_yaml_file_and_flags_override_it(tmp_path):
    from transformers import TrainingArguments
    from trl import GRPOConfig, RLOOConfig

    import ppo_training

    config = tmp_path / "rl.yaml"
    config.write_text("rl_algo: grpo\nmodel_name_or_path: m\nreward_model_name_or_path: rm\ntrain_file_dir: d\n"
                      f"output_dir: {tmp_path / 'out'}\nreport_to: none\nnum_generations: 2\n")
    assert peek_arg("rl_algo", "ppo", [str(config)]) == "grpo"
    parsed = ppo_training.parse_config([str(config)])
    assert parsed[4].rl_algo == "grpo" and type(parsed[-1]) is GRPOConfig and parsed[5] is None
    assert parsed[-1].num_generations == 2  # a GRPOConfig field from the file reached the GRPO config
    parsed = ppo_training.parse_config([str(config), "--rl_algo", "rloo"])
    assert parsed[4].rl_algo == "rloo" and type(parsed[-1]) is RLOOConfig
    config.write_text(config.read_text().replace("num_generations: 2\n", ""))
    parsed = ppo_training.parse_config([str(config), "--rl_algo=ppo"])
    assert parsed[4].rl_algo == "ppo" and type(parsed[-1]) is TrainingArguments and parsed[5] is not None


def test_rl_validation_prompts_are_refused_not_dropped(tmp_path):
    import ppo_training

    model_args, lora_args, data_args, _, _, _, training_args = ppo_training.parse_config(
        ["--model_name_or_path", "m", "--reward_model_name_or_path", "rm", "--train_file_dir", "d",
         "--validation_split_percentage", "10", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    with pytest.raises(ConfigError, match="--validation_file_dir/--validation_split_percentage would be silently"):
        finalize(model_args, lora_args, data_args, training_args,
                 checks=(lambda: ppo_training.check_no_validation_data(data_args),))


# --- import graph -------------------------------------------------------------------------------------------------------


def medtrain_import_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    """module -> the medtrain modules it imports (relative imports; at module level only, or everywhere)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medtrain"):
                deps.add(node.module)
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep in graph and not state.get(dep):
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node):
            found = visit(node)
            if found:
                return found
    return None


def test_medtrain_has_no_import_cycle_even_counting_function_local_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker finds one
    graph = medtrain_import_graph(top_level_only=False)
    assert "medtrain.entrypoint" in graph and "medtrain.distributed" in graph["medtrain.entrypoint"]
    assert graph["medtrain.errors"] == set()  # every module may import the errors
    assert find_cycle(graph) is None


# --- TRL private members we still lean on (fail here, clearly, when TRL changes them) ---------------------------------


def test_trl_private_members_the_trainers_use_still_exist():
    from transformers import Trainer
    from trl import DPOTrainer, RewardTrainer, SFTTrainer

    # PretokenizedDPOTrainer overrides _prepare_dataset: DPOTrainer has no public switch to skip re-tokenising
    # already-encoded pairs (SFTConfig has dataset_kwargs skip_prepare_dataset; DPOConfig does not).
    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters)[:5] == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    assert "self._prepare_dataset(train_dataset" in inspect.getsource(DPOTrainer.__init__)
    # EfficientSFTTrainer / RewardModelTrainer log through TRL's metric store, which TRL's log() averages and
    # resets; there is no public API to add a metric to it.
    for trainer in (SFTTrainer, RewardTrainer):
        init, log = inspect.getsource(trainer.__init__), inspect.getsource(trainer.log)
        assert "self._metrics = {" in init and "self._total_train_tokens = 0" in init, trainer
        assert "self._metrics[mode]" in log, trainer
    assert "self._tp_size" in inspect.getsource(RewardTrainer.__init__)
    # PretokenizedDPOTrainer._save removes PEFT's frozen "ref" adapter dir after transformers writes the model
    assert list(inspect.signature(Trainer._save).parameters) == ["self", "output_dir", "state_dict"]


@pytest.mark.parametrize("old, value, replacement", [
    ("flash_attn", "True", "--attn_implementation flash_attention_2"),
    ("dataset_num_proc", "2", "--preprocessing_num_workers"),
])
def test_removed_duplicate_flags_name_their_replacement(tmp_path, old, value, replacement):
    from trl import SFTConfig

    types = [ModelArguments, DataArguments, SFTConfig]
    with pytest.raises(ConfigError) as err:
        parse_args(types, ["--train_file_dir", "d", f"--{old}", value])
    assert err.value.problems == [f"--{old} was removed: use {replacement} (same meaning)."]
    config = tmp_path / "sft.yaml"
    config.write_text(f"train_file_dir: d\n{old}: {value}\n")
    with pytest.raises(ConfigError, match=f"sft.yaml: --{old} was removed: use {replacement}"):
        parse_args(types, [str(config)])


def test_the_kept_spellings_reach_the_model_and_the_trainer():
    from trl import SFTConfig

    model_args, lora_args, data_args, sft = parse_args(
        [ModelArguments, LoraArguments, DataArguments, SFTConfig],
        ["--train_file_dir", "d", "--attn_implementation", "eager", "--preprocessing_num_workers", "3",
         "--report_to", "none"])
    assert model_args.attn_implementation == "eager" and not hasattr(model_args, "flash_attn")
    finalize(model_args, lora_args, data_args, sft)
    assert data_args.preprocessing_num_workers == 3 and sft.dataset_num_proc == 3  # TRL's field, derived once
