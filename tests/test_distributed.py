"""torchrun on CPU (gloo): every stage really shards the data, and 2 ranks x batch 1 train exactly like 1 rank x
batch 2; a two-"node" launch over loopback; preflight.py; launch/precision checks; quantized training on CPU.

Launches run this file as the torchrun worker (``python -m torch.distributed.run ... tests/test_distributed.py STAGE
PROBE_DIR -- ARGS``): it runs the stage script's ``main`` and then writes what each rank saw (world size, backend,
the rows of its data shard, losses, logits of the trained model in memory, DeepSpeed partition sizes) to
``PROBE_DIR/rank<r>.json``. tests/test_deepspeed.py uses the same worker and helpers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"pt": "pretraining", "sft": "supervised_finetuning", "rm": "reward_modeling", "dpo": "dpo_training",
          "ppo": "ppo_training", "orpo": "orpo_training", "kto": "kto_training", "grpo": "grpo_training"}
PROBE_IDS = [[5, 17, 42, 99, 7, 3, 11, 12]]  # a fixed input whose logits compare in-memory and reloaded models


# ----------------------------------------------------------------------------------------------------------------
# The torchrun worker (runs in the launched processes, not under pytest)


def _row_fingerprints(trainer) -> list[list[int]]:
    """The rows (padding stripped) this rank's train dataloader yields in one epoch."""
    pad = trainer.processing_class.pad_token_id
    rows = []
    for batch in trainer.get_train_dataloader():
        if isinstance(batch, list):  # GRPO: the prompts themselves (it tokenizes when it generates), tokenized here
            rows += [trainer.processing_class(row["prompt"])["input_ids"] for row in batch]
            continue
        key = next(k for k in ("input_ids", "prompt_ids", "prompt_input_ids", "input_ids_chosen") if k in batch)
        for row in batch[key].tolist():
            while row and row[-1] == pad:
                row.pop()
            while row and row[0] == pad:  # DPO pads prompts on the left
                row.pop(0)
            rows.append(row)
    return rows


def _partition(engine) -> dict | None:
    """Elements this rank holds vs the full size: ZeRO-3 parameters, or ZeRO-1/2 fp32 optimizer partitions."""
    if not hasattr(engine, "zero_optimization_stage"):
        return None
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    if stage == 3:
        return {"stage": 3, "local": sum(p.ds_tensor.numel() for p in params), "full": sum(p.ds_numel for p in params)}
    local = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    return {"stage": stage, "local": local, "full": sum(p.numel() for p in params if p.requires_grad)}


def _logits(model) -> list:
    """Logits of PROBE_IDS from a trained model in memory (a DeepSpeed engine gathers ZeRO-3 shards)."""
    import torch

    model.eval()
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits.float().tolist()


def _probe_trainer(trainer) -> dict:
    import torch

    engine = trainer.model_wrapped
    deepspeed = hasattr(engine, "zero_optimization_stage")
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "deepspeed": trainer.is_deepspeed_enabled,
        "partition": _partition(engine),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "logits": _logits(engine if deepspeed else trainer.model),
        "rows": _row_fingerprints(trainer),
    }


def _probe_ppo(trainer, prompts: list[list[int]]) -> dict:
    import torch

    accelerator = trainer.accelerator
    return {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "num_processes": accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "deepspeed": trainer.is_deepspeed,
        "partition": _partition(trainer.model),
        "losses": [entry["loss/policy"] for entry in trainer.state.log_history if "loss/policy" in entry],
        "logits": _logits(accelerator.unwrap_model(trainer.model).policy),
        "rows": prompts,  # the prompts this rank generated from
    }


def worker(stage: str, probe_dir: str, args: list[str]) -> None:
    """Run the stage script's main with ``args``; write this rank's probe of the trainer it built."""
    import importlib

    sys.path.insert(0, str(ROOT))
    if stage == "ppo":
        from medtrain.ppo.trainer import PPOTrainer as trainer_class
    else:
        from transformers import Trainer as trainer_class  # every other stage's trainer derives from it
    trainers = []
    original_init = trainer_class.__init__

    def record(self, *a, **kw):
        original_init(self, *a, **kw)
        trainers.append(self)

    trainer_class.__init__ = record
    prompts_seen: list[list[int]] = []
    if stage == "ppo":
        original_next = trainer_class._next_prompts

        def next_prompts(self):
            batch = original_next(self)
            prompts_seen.extend(batch)
            return batch

        trainer_class._next_prompts = next_prompts
    module = importlib.import_module(STAGES[stage])
    sys.argv = [f"{STAGES[stage]}.py", *args]
    module.main()
    probe = _probe_ppo(trainers[-1], prompts_seen) if stage == "ppo" else _probe_trainer(trainers[-1])
    Path(probe_dir).mkdir(parents=True, exist_ok=True)
    (Path(probe_dir) / f"rank{probe['rank']}.json").write_text(json.dumps(probe))


if __name__ == "__main__":
    from medtrain.entrypoint import run_main

    run_main(lambda: worker(sys.argv[1], sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:]))
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_deepspeed.py

# (imported here: the worker above runs without pytest)
import pytest
import torch

from conftest import build_model, build_tokenizer, run_script, write_jsonl
from transformers import AutoModelForCausalLM

QA = [
    ("What helps a fever?", "Rest and drink water."),
    ("What is hypertension?", "High blood pressure."),
    ("How to check diabetes?", "Check blood sugar."),
    ("发烧怎么办？", "多喝水，注意休息。"),
    ("What lowers blood pressure?", "Less salt and exercise."),
    ("When to see a doctor?", "If a fever lasts three days."),
    ("高血压患者应该怎么做？", "少吃盐，按时服药。"),
    ("What is diabetes?", "High blood sugar."),
]
TEXT = [
    "The patient has a fever and a cough.",
    "Drink water, rest, and see a doctor if it lasts more than three days.",
    "Hypertension means high blood pressure.",
    "Reduce salt, exercise, and take medicine as prescribed.",
    "Diabetes affects blood sugar.",
    "Check glucose often and follow the diet plan.",
    "发烧时多喝水，注意休息。",
    "高血压患者应少吃盐，按时服药。",
]
REJECTED = ["Ignore it.", "Eat more salt.", "Never check.", "不用管。", "More salt.", "Never.", "多吃盐。", "Low sugar."]


def write_data(stage: str, directory: Path) -> Path:
    """Eight distinct training rows for ``stage`` (so two ranks get four each, none shared)."""
    if stage == "pt":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "corpus.txt").write_text("\n".join(TEXT) + "\n", encoding="utf-8")
        return directory
    if stage == "sft":
        return write_jsonl(directory / "train.jsonl", [
            {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]).parent
    if stage == "grpo":
        return write_jsonl(directory / "questions.jsonl", [{"question": q, "answer": a} for q, a in QA]).parent
    return write_jsonl(directory / "pairs.jsonl", [
        {"question": q, "response_chosen": a, "response_rejected": r} for (q, a), r in zip(QA, REJECTED)]).parent


def stage_args(stage: str, model_dir, data, out, *extra) -> list[str]:
    """Quiet, deterministic, one-epoch arguments (LoRA without dropout so ranks and layouts compare exactly).

    PT and SFT run unpacked: packing changes the rows, not the sharding this tests.
    """
    args = ["--model_name_or_path", str(model_dir), "--train_file_dir", str(data), "--output_dir", str(out),
            "--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--seed", "0", "--do_eval", "False", "--disable_tqdm", "True", "--lora_dropout", "0",
            "--learning_rate", "5e-3"]
    if stage == "pt":
        args += ["--block_size", "64", "--packing", "False", "--cache_dir_data", f"{out}-cache"]
    else:
        args += ["--template_name", "chatml"]
    if stage == "sft":
        args += ["--packing", "False"]  # one conversation per row: the rows each rank sees are countable
    return args + [str(e) for e in extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(stage: str, probe_dir: Path, args: list[str], nproc: int = 1, port: int | None = None, nnodes: int = 1,
           node_rank: int = 0) -> subprocess.Popen:
    """Start ``torchrun`` on this file's worker (one thread per rank); output goes to ``<probe_dir>[-node<r>].log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", str(nnodes),
           "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
           str(Path(__file__).resolve()), stage, str(probe_dir), "--", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    log_path = f"{probe_dir}-node{node_rank}.log" if nnodes > 1 else f"{probe_dir}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    proc.log_path = log_path
    return proc


def finish(*procs: subprocess.Popen, timeout: float = 900) -> None:
    """Wait for every launch; a failed one fails the test with the end of its log."""
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        assert proc.returncode == 0, Path(proc.log_path).read_text()[-4000:]


def probes(probe_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(probe_dir).glob("rank*.json"))]


def assert_same_training(reference: dict, ranks: list[dict], rel: float = 1e-4, atol: float = 5e-4) -> None:
    """Same loss at every step (relative ``rel``) and the same trained model (logits within ``atol``).

    Measured: losses agree to ~1e-6 relative. Adam divides by sqrt(v), so float-level gradient differences (another
    reduction order) move weights with tiny gradients visibly: after 4 full-training steps logits differ by up to
    1e-4, while the steps themselves moved them by ~1e-1.
    """
    losses = reference["losses"]
    for probe in ranks:
        assert len(probe["losses"]) == len(losses) > 1
        for step, (got, want) in enumerate(zip(probe["losses"], losses)):
            assert abs(got - want) <= rel * abs(want), (step, got, want)
        assert torch.allclose(torch.tensor(probe["logits"]), torch.tensor(reference["logits"]), atol=atol)


def assert_sharded(reference: dict, ranks: list[dict]) -> None:
    """Each of the ranks saw a disjoint share of the rows, together exactly the single process's rows."""
    n = len(ranks)
    assert all(p["world_size"] == n and p["num_processes"] == n and p["backend"] == "gloo" for p in ranks)
    assert [p["rank"] for p in ranks] == list(range(n))
    shares = [sorted(map(tuple, p["rows"])) for p in ranks]
    assert all(len(share) == len(reference["rows"]) // n for share in shares)
    together = [row for share in shares for row in share]
    assert sorted(together) == sorted(map(tuple, reference["rows"]))
    assert len(set(together)) == len(together)  # no row on two ranks


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose byte-level BPE tokenizer has no chat template (ChatML comes from --template_name)."""
    path = tmp_path_factory.mktemp("tiny-dist")
    build_model(path, build_tokenizer(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# DDP: two ranks, two nodes


@pytest.fixture(scope="module")
def sft_reference(tiny_dir, tmp_path_factory) -> dict:
    """One process, batch 2: the global batch the distributed runs below must reproduce."""
    root = tmp_path_factory.mktemp("sft-ref")
    data = write_data("sft", root / "data")
    finish(launch("sft", root / "one", stage_args("sft", tiny_dir, data, root / "out-one",
                                                   "--per_device_train_batch_size", 2)))
    [one] = probes(root / "one")
    assert one["world_size"] == 1 and len(one["rows"]) == 8 and len(one["losses"]) == 4
    return {"data": data, **one}


def test_sft_two_ranks_see_half_the_data_each_and_train_like_one_rank(tiny_dir, tmp_path, sft_reference):
    finish(launch("sft", tmp_path / "two", stage_args("sft", tiny_dir, sft_reference["data"], tmp_path / "out",
                                                       "--per_device_train_batch_size", 1), nproc=2))
    ranks = probes(tmp_path / "two")
    assert_sharded(sft_reference, ranks)
    assert_same_training(sft_reference, ranks)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 8 rows / (2 ranks x batch 1), not 8 as each rank alone would take


def test_two_nodes_over_loopback_train_like_one_rank(tiny_dir, tmp_path, sft_reference):
    port = free_port()
    args = stage_args("sft", tiny_dir, sft_reference["data"], tmp_path / "out", "--per_device_train_batch_size", 1)
    nodes = [launch("sft", tmp_path / "nodes", args, nproc=1, port=port, nnodes=2, node_rank=rank) for rank in (0, 1)]
    finish(*nodes)
    ranks = probes(tmp_path / "nodes")
    assert_sharded(sft_reference, ranks)
    assert_same_training(sft_reference, ranks)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pt", "rm", "dpo"])
def test_other_stages_two_ranks_train_like_one_rank(tiny_dir, tmp_path, stage):
    # Full training, so the comparison is about the data split and gradient averaging alone (the seeded adapter is
    # covered by the resume tests and test_the_adapter_depends_on_the_seed_and_not_on_the_cache).
    data = write_data(stage, tmp_path / "data")
    one = launch(stage, tmp_path / "one", stage_args(stage, tiny_dir, data, tmp_path / "o1", "--use_peft", "False",
                                                     "--per_device_train_batch_size", 2))
    two = launch(stage, tmp_path / "two", stage_args(stage, tiny_dir, data, tmp_path / "o2", "--use_peft", "False",
                                                     "--per_device_train_batch_size", 1), nproc=2)
    finish(one, two)
    [reference] = probes(tmp_path / "one")
    assert len(reference["rows"]) == (16 if stage in ("rm", "dpo") else 8)  # pairs: a chosen and a rejected row
    ranks = probes(tmp_path / "two")
    assert_sharded(reference, ranks)
    assert_same_training(reference, ranks)


def test_ppo_two_ranks_split_the_prompts_and_keep_one_policy(tiny_dir, tmp_path):
    """PPO under torchrun: each rank generates from its own prompts, gradients are averaged, so both ranks hold the
    same policy. (Rollouts are sampled per rank, so the losses are not compared with a one-process run.)"""
    data = write_data("rm", tmp_path / "data")
    rm = run_script("reward_modeling.py", *stage_args("rm", tiny_dir, data, tmp_path / "rm", "--max_steps", "2",
                                                      "--per_device_train_batch_size", "4"),
                    env={"OMP_NUM_THREADS": "1"})
    assert rm.returncode == 0, rm.stderr[-3000:]
    finish(launch("ppo", tmp_path / "ppo", [
        "--model_name_or_path", str(tiny_dir), "--reward_model_name_or_path", str(tmp_path / "rm"),
        "--train_file_dir", str(data), "--template_name", "chatml", "--output_dir", str(tmp_path / "out"),
        "--report_to", "none", "--seed", "0", "--max_steps", "2", "--rollout_batch_size", "2",
        "--num_mini_batches", "1", "--num_ppo_epochs", "2", "--max_new_tokens", "6", "--learning_rate", "1e-2",
        "--save_strategy", "no"], nproc=2))
    ranks = probes(tmp_path / "ppo")
    assert [p["rank"] for p in ranks] == [0, 1]
    assert all(p["world_size"] == 2 and p["backend"] == "gloo" and not p["deepspeed"] for p in ranks)
    # 2 updates x 2 prompts per rank: the 8 prompts once each, 4 on each rank
    shares = [sorted(map(tuple, p["rows"])) for p in ranks]
    assert [len(share) for share in shares] == [4, 4]
    assert len(set(shares[0] + shares[1])) == 8
    assert all(len(p["losses"]) == 2 for p in ranks)
    # one policy on both ranks (DDP averaged the gradients), and it moved away from the starting model
    first, second = (torch.tensor(p["logits"]) for p in ranks)
    assert torch.allclose(first, second, atol=1e-5)
    start_logits = torch.tensor(_logits(AutoModelForCausalLM.from_pretrained(tiny_dir)))
    assert (first - start_logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Launchers


@pytest.mark.parametrize("script, stage_script", [
    ("run_pt.sh", "pretraining.py"), ("run_sft.sh", "supervised_finetuning.py"), ("run_rm.sh", "reward_modeling.py"),
    ("run_dpo.sh", "dpo_training.py"), ("run_ppo.sh", "ppo_training.py"), ("run_orpo.sh", "orpo_training.py"),
    ("run_kto.sh", "kto_training.py"), ("run_grpo.sh", "grpo_training.py"),
])
def test_launchers_hand_the_node_layout_to_torchrun(tmp_path, tiny_dir, script, stage_script):
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} not written yet")
    fake = tmp_path / "bin" / "torchrun"  # records its arguments instead of launching
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", ARGS_OUT=str(tmp_path / "args"),
               MODEL=str(tiny_dir), REWARD_MODEL=str(tiny_dir), NPROC_PER_NODE="8", NNODES="2", NODE_RANK="1",
               MASTER_ADDR="10.0.0.1", MASTER_PORT="29555")
    proc = subprocess.run(["bash", str(ROOT / script), "--seed", "7"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:11] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
                         "--master_port", "29555", stage_script]
    assert args[-2:] == ["--seed", "7"]  # the user's flags come last and override the script's defaults


GLOO_STAGE = """
import atexit, pathlib, sys, threading, time
import torch, torch.distributed as dist
from medtrain.entrypoint import run_main
out = pathlib.Path(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
def main():
    if sys.argv[2] == "collectives":  # the last collectives of a stage, their tensors still held by gloo's threads
        for _ in range(500):
            t = torch.randn(1 << 16)
            dist.all_gather([torch.empty_like(t)], t, async_op=True)
    else:
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
    print("trained", end="")  # no newline: only a flush gets it out
    return object()
run_main(main)
print("after run_main")
"""


def test_a_stage_under_torchrun_exits_cleanly_while_gloo_still_drops_tensors(tmp_path):
    # Seen in CI on the two-rank SFT launch: training and saving succeeded, then rank 1 aborted at interpreter exit
    # ("terminate called without an active exception") because a gloo worker thread released a finished
    # all_gather's tensors during finalization. 500 un-awaited all_gathers right before exit make that race near certain
    # (SIGABRT in 6 of 8 plain exits on torch 2.13); run_main must end the process cleanly, and still wait for
    # non-daemon threads, run atexit handlers and flush stdout as a normal exit does.
    for case in ("collectives", "exit hygiene"):
        proc = subprocess.run([sys.executable, "-c", GLOO_STAGE, str(tmp_path), case], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), cwd=ROOT, timeout=120)
        assert proc.returncode == 0, (case, proc.stderr)
        assert "terminate called" not in proc.stderr
        assert proc.stdout == "trained"  # the process ended in run_main
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"


def test_run_main_without_a_process_group_returns_and_never_imports_torch():
    code = "import sys\nfrom medtrain.entrypoint import run_main\nprint(run_main(lambda: 3), 'torch' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "False"]


# ----------------------------------------------------------------------------------------------------------------
# preflight.py


def preflight(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "preflight.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)
    return proc, time.monotonic() - start


def test_preflight_node0_reports_the_launch():
    port = free_port()
    proc, _ = preflight("--deepspeed", "deepspeed_zero_stage3_config.json",
                        env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(port)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "launch     1 node(s) x 2 process(es) = world size 2; this is node 0, global rank(s) 0..1"
    assert lines[1] == f"master     127.0.0.1:{port} is this machine (node 0) and the port is free"
    if not torch.cuda.is_available():
        assert lines[2].startswith("device     CPU (") and "-> backend gloo, use_cpu on" in lines[2]
        assert lines[3].startswith("precision  float32; bf16 supported")
        # no precision flag: what the stages will choose here (the suite pins MEDTRAIN_CPU_BF16=0, tests/conftest.py)
        assert lines[3].endswith("; the stages' default here: float32 (MEDTRAIN_CPU_BF16=0)")
    assert lines[4] == ("deepspeed  deepspeed_zero_stage3_config.json: ZeRO-3, Trainer's optimizer (--optim), "
                        "Trainer's scheduler (--lr_scheduler_type), 16-bit weights gathered on save")
    assert lines[-1] == "ok         this node can launch"


def test_preflight_worker_fails_fast_when_nothing_listens_on_the_master_port():
    port = free_port()
    proc, seconds = preflight("--nnodes", "2", "--node_rank", "1", "--master_port", str(port))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: the master 127.0.0.1 answers but nothing listens on port {port}: start node 0 "
                           "first (its run_*.sh, or `python preflight.py --serve 120` there), and check MASTER_PORT "
                           "is the same on every node.\n")
    assert seconds < 10


def test_preflight_worker_times_out_on_a_master_that_never_answers():
    # A listener with a full accept queue drops new SYNs: the same silence as a firewall or a wrong address.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            fillers.append(client)
        time.sleep(0.2)
        proc, seconds = preflight("--timeout", "2", env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                                         "MASTER_PORT": str(port)})
        for client in fillers:
            client.close()
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot reach the master 127.0.0.1:{port}: no answer within 2 s.")
    assert 2 <= seconds < 12


def test_preflight_worker_reaches_a_serving_master():
    port = free_port()
    master = subprocess.Popen([sys.executable, str(ROOT / "preflight.py"), "--serve", "60", "--master_port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), cwd=ROOT)
    try:
        for line in master.stdout:  # wait until node 0 listens
            if line.startswith("serving"):
                break
        proc, _ = preflight("--nnodes", "2", "--node_rank", "1", "--master_port", str(port))
    finally:
        master.terminate()
        master.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith(f"master     127.0.0.1:{port} reachable (TCP connect in ")


def test_preflight_node0_refuses_a_foreign_master_address_and_a_busy_port():
    proc, _ = preflight("--master_addr", "192.0.2.1")  # TEST-NET-1: never this machine
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: MASTER_ADDR 192.0.2.1 is not an address of this machine, but this is node 0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, _ = preflight("--master_port", str(port))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: port {port} on 127.0.0.1 is already in use (another run?): pick a free "
                           "MASTER_PORT on every node.\n")


def test_preflight_lists_every_problem_of_a_launch(tmp_path):
    config = tmp_path / "z3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    proc, _ = preflight("--deepspeed", str(config), "--fp16", "--master_port", str(free_port()))
    assert proc.returncode == 2
    problems = proc.stderr.removeprefix("error: ").splitlines()
    expected = [
        f"--deepspeed {config}: ZeRO-3 without \"stage3_gather_16bit_weights_on_model_save\": true saves a model "
        "directory without weights (only sharded checkpoints). Set it to true.",
        f"--deepspeed {config}: optimizer offload needs an \"optimizer\" block (DeepSpeed then runs its CPU Adam); "
        "copy it from deepspeed_zero_stage3_offload_config.json.",
    ]
    if not torch.cuda.is_available():
        expected.insert(0, "--fp16 needs a CUDA GPU; on CPU drop it (the default: bf16 where bf16 matmul is fast, "
                           "else float32) or use --bf16.")
    assert problems == expected
    proc, _ = preflight("--nnodes", "2", "--node_rank", "2")
    assert proc.returncode == 2 and proc.stderr == "error: NODE_RANK must be in 0..1 for NNODES=2, got 2.\n"


# ----------------------------------------------------------------------------------------------------------------
# check_arguments: launch, DeepSpeed and precision combinations


def _check(tmp_path, monkeypatch, cuda=False, bf16_gpu=True, devices=0, model=None, **training):
    """check_arguments on a stand-in for the training config (no TrainingArguments: it would set global state)."""
    from types import SimpleNamespace

    import medtrain.arguments as arguments
    import medtrain.distributed as distributed
    from medtrain.arguments import LoraArguments, ModelArguments, check_arguments
    from medtrain.errors import ConfigError

    monkeypatch.setattr(arguments, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(distributed, "bf16_supported", lambda cuda: bf16_gpu if cuda else True)
    defaults = dict(deepspeed=None, use_cpu=not cuda, bf16=False, fp16=False, ddp_backend=None,
                    per_device_train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0,
                    learning_rate=5e-5, weight_decay=0.0, adam_epsilon=1e-8, adam_beta1=0.9, adam_beta2=0.999)
    training_args = SimpleNamespace(**{**defaults, **training})
    try:
        check_arguments(ModelArguments(model_name_or_path="m", **(model or {})), LoraArguments(), training_args)
    except ConfigError as err:
        return err.problems
    return []


def test_shipped_deepspeed_configs_pass_and_quantized_zero3_is_refused(tmp_path, monkeypatch):
    for name in ("deepspeed_zero_stage2_config.json", "deepspeed_zero_stage3_config.json",
                 "deepspeed_zero_stage2_offload_config.json", "deepspeed_zero_stage3_offload_config.json"):
        assert _check(tmp_path, monkeypatch, deepspeed=str(ROOT / name)) == [], name
    assert _check(tmp_path, monkeypatch, deepspeed=str(ROOT / "deepspeed_zero_stage2_config.json"),
                  model={"load_in_4bit": True, "qlora": True}) == []
    assert _check(tmp_path, monkeypatch, deepspeed=str(ROOT / "deepspeed_zero_stage3_config.json"),
                  model={"load_in_8bit": True}) == [
        "quantized weights (--load_in_4bit/--load_in_8bit) cannot be sharded by DeepSpeed ZeRO-3: use "
        "deepspeed_zero_stage2_config.json, or drop the quantization."]


def test_deepspeed_values_that_contradict_flags_are_refused_before_loading(tmp_path, monkeypatch):
    config = tmp_path / "fixed.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
                                  "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                  "zero_optimization": {"stage": 2}}))
    assert _check(tmp_path, monkeypatch, deepspeed=str(config), per_device_train_batch_size=2) == [
        f"--deepspeed {config}: \"train_micro_batch_size_per_gpu\": 4 contradicts --per_device_train_batch_size 2; "
        "set it to \"auto\" (as the shipped configs do) or change the flag.",
        f"--deepspeed {config}: \"optimizer.params.lr\": 0.001 contradicts --learning_rate 5e-05; set it to \"auto\" "
        "(as the shipped configs do) or change the flag.",
        f"--deepspeed {config}: \"bf16.enabled\": true contradicts --bf16 False; set it to \"auto\" (as the shipped "
        "configs do) or change the flag.",
    ]
    assert _check(tmp_path, monkeypatch, deepspeed=str(tmp_path / "missing.json")) == [
        f"--deepspeed {tmp_path / 'missing.json'}: no such file. The shipped configs are "
        "deepspeed_zero_stage2_config.json, deepspeed_zero_stage3_config.json and their *_offload_config.json variants."]


def test_cpu_refuses_gpu_only_precision_and_backends(tmp_path, monkeypatch):
    assert _check(tmp_path, monkeypatch, fp16=True, ddp_backend="nccl",
                  model={"attn_implementation": "flash_attention_2", "torch_dtype": "float16"}) == [
        "--ddp_backend nccl needs CUDA GPUs; on CPU the backend is gloo (leave --ddp_backend unset).",
        "--fp16 needs a CUDA GPU; on CPU drop it (the default: bf16 where bf16 matmul is fast, "
        "else float32) or use --bf16.",
        "--torch_dtype float16 is not supported for training on CPU: use float32 or bfloat16.",
        "--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU leave it unset (sdpa is used).",
    ]
    assert _check(tmp_path, monkeypatch, bf16=True) == []  # bf16 autocast works on CPU (use_cpu)
    assert _check(tmp_path, monkeypatch, use_cpu=False) == [
        "--use_cpu False on a machine without a GPU: leave use_cpu on (see docs/distributed.md)."]


def test_gpu_refuses_bf16_before_ampere_and_more_ranks_than_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _check(tmp_path, monkeypatch, cuda=True, bf16_gpu=False, devices=2, bf16=True, fp16=True) == [
        "4 processes on this node but 2 GPU(s): set NPROC_PER_NODE (torchrun --nproc_per_node) to at most 2.",
        "--bf16 and --fp16 exclude each other: pick one.",
        "this GPU has no bf16 support (it needs Ampere or newer): use --fp16 instead of --bf16 / --torch_dtype "
        "bfloat16.",
    ]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _check(tmp_path, monkeypatch, cuda=True, devices=2, bf16=True) == []
    assert _check(tmp_path, monkeypatch, cuda=True, devices=2, use_cpu=True, model={"load_in_8bit": True}) == [
        "--use_cpu with --load_in_4bit/--load_in_8bit on a GPU machine: quantized weights are placed on the GPU. "
        "Drop --use_cpu (or hide the GPUs with CUDA_VISIBLE_DEVICES=\"\")."]


def test_parse_args_reports_a_missing_deepspeed_file_before_building_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from medtrain.arguments import parse_args
    from medtrain.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args([TrainingArguments], ["--output_dir", str(tmp_path), "--deepspeed", str(tmp_path / "z.json")])
    assert str(err.value).startswith(f"--deepspeed {tmp_path / 'z.json'}: no such file.")


def test_bare_precision_switches_parse_for_trl_configs():
    """TRL declares bf16 as `bool | None`; `--bf16` alone must work as the README writes it."""
    from trl import SFTConfig

    from medtrain.arguments import parse_args

    [config] = parse_args([SFTConfig], ["--output_dir", "unused", "--report_to", "none", "--bf16"])
    assert config.bf16 is True
    [config] = parse_args([SFTConfig], ["--output_dir", "unused", "--report_to", "none", "--bf16", "False"])
    assert config.bf16 is False


def test_deepspeed_without_a_launcher_gets_a_one_process_environment():
    from medtrain.distributed import default_single_process_env

    env: dict = {}
    assert default_single_process_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    launched = {"RANK": "3", "WORLD_SIZE": "4"}  # torchrun's own values are left alone
    assert not default_single_process_env(launched) and launched == {"RANK": "3", "WORLD_SIZE": "4"}


def test_cpu_deepspeed_training_arguments_really_distribute(monkeypatch):
    """STACK-NOTES trap 1: on CPU, use_cpu is what makes torchrun shard; parse_args turns it on without CUDA."""
    from transformers import TrainingArguments

    from medtrain.arguments import parse_args

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    [args] = parse_args([TrainingArguments], ["--output_dir", "unused", "--report_to", "none"])
    assert args.use_cpu and not args.bf16 and not args.fp16


# ----------------------------------------------------------------------------------------------------------------
# Quantized training on CPU


def _lora_b_grads_after_eval(trainer) -> list[float]:
    """One more backward after the runs' evaluations: |grad| of every lora_B (0/None = frozen by the eval pass)."""
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model, batch).backward()
    return [0.0 if p.grad is None else float(p.grad.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n]


@pytest.mark.parametrize("bits", ["4", pytest.param("8", marks=pytest.mark.slow)])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_quantized_lora_trains_through_an_evaluation_pass_on_cpu(tiny_dir, tmp_path, stage, bits):
    """STACK-NOTES trap 6 on CPUs with AVX512-BF16 (elsewhere the property holds trivially, and is still checked)."""
    import importlib

    quant = ["--load_in_4bit", "--qlora"] if bits == "4" else ["--load_in_8bit"]
    data = write_data(stage, tmp_path / "data")
    args = stage_args(stage, tiny_dir, data, tmp_path / "out", *quant, "--per_device_train_batch_size", 2,
                      "--per_device_eval_batch_size", 2, "--max_steps", 4, "--validation_split_percentage", 25,
                      "--do_eval", "True", "--eval_on_start", "True", "--eval_strategy", "steps", "--eval_steps", 2)
    trainer = importlib.import_module(STAGES[stage]).main(args)
    model = trainer.model
    base = model.get_base_model()
    assert getattr(base, f"is_loaded_in_{bits}bit")
    # evaluations ran before and during training, and every adapter still learned: lora_B starts at 0
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) >= 3
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.detach().abs().sum() > 0 for p in lora_b.values())
    grads = _lora_b_grads_after_eval(trainer)
    assert len(grads) == len(lora_b) and all(g > 0 for g in grads)
