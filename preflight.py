"""Check, in seconds, what a (multi-node) launch will use and whether this node can join it.

    python preflight.py                                     # the launch the run_*.sh scripts start with your env
    NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 python preflight.py --deepspeed deepspeed_zero_stage3_config.json
    python preflight.py --serve 120                         # on node 0: hold MASTER_PORT open for the others' checks

Takes the same NNODES / NODE_RANK / NPROC_PER_NODE / MASTER_ADDR / MASTER_PORT environment as run_*.sh (flags
override them) and prints the ranks, the master and whether it is reachable, the device and process-group backend,
precision support, and the DeepSpeed stage. On a worker node (NODE_RANK > 0) it opens a TCP connection to
MASTER_ADDR:MASTER_PORT and fails within --timeout seconds when it cannot; on node 0 it checks that MASTER_ADDR is
this machine and the port is free. Exits 0 when the launch can start, 2 with the reasons when it cannot.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil

from medtrain.distributed import (
    LaunchPlan,
    backend_for,
    bf16_supported,
    check_bindable,
    check_master,
    cpu_bf16_native,
    deepspeed_problems,
    launch_env,
    read_deepspeed_config,
    serve_master,
    summarize_deepspeed,
)
from medtrain.entrypoint import run_main
from medtrain.hardware import cpu_bf16_fast
from medtrain.errors import ConfigError

def parse(argv: list[str] | None) -> argparse.Namespace:
    env = launch_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnodes", type=int, default=env["nnodes"], help="Machines in the job (env NNODES).")
    parser.add_argument("--node_rank", type=int, default=env["node_rank"], help="This machine's index, 0 = master (env NODE_RANK).")
    parser.add_argument("--nproc_per_node", type=int, default=env["nproc_per_node"],
                        help="Processes per machine, one per GPU (env NPROC_PER_NODE).")
    parser.add_argument("--master_addr", default=env["master_addr"], help="Node 0's address (env MASTER_ADDR).")
    parser.add_argument("--master_port", type=int, default=env["master_port"], help="Rendezvous port (env MASTER_PORT).")
    parser.add_argument("--deepspeed", default=None, help="The DeepSpeed config the launch will pass.")
    parser.add_argument("--bf16", action="store_true", help="The launch passes --bf16.")
    parser.add_argument("--fp16", action="store_true", help="The launch passes --fp16.")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds to wait for the master (default 5).")
    parser.add_argument("--serve", type=float, default=0.0, metavar="SECONDS",
                        help="On node 0: after the checks, listen on MASTER_PORT this long so other nodes can check.")
    return parser.parse_args(argv)


def line(label: str, text: str) -> None:
    print(f"{label:<10} {text}", flush=True)


def check_network(plan: LaunchPlan, timeout: float) -> None:
    if plan.node_rank == 0:
        check_bindable(plan.master_addr, plan.master_port)
        line("master", f"{plan.master_addr}:{plan.master_port} is this machine (node 0) and the port is free")
    else:
        seconds = check_master(plan.master_addr, plan.master_port, timeout)
        line("master", f"{plan.master_addr}:{plan.master_port} reachable (TCP connect in {seconds * 1000:.1f} ms)")


def describe_device(plan: LaunchPlan, problems: list[str]) -> bool:
    """Print the device and backend; returns whether CUDA is used."""
    import torch  # local: preflight answers its network checks in seconds, before torch loads

    cuda = torch.cuda.is_available()
    if cuda:
        count = torch.cuda.device_count()
        line("device", f"{count} x {torch.cuda.get_device_name(0)} -> backend {backend_for(False, True)}")
        if plan.nproc_per_node > count:
            problems.append(f"NPROC_PER_NODE={plan.nproc_per_node} but this node has {count} GPU(s): use at most {count}.")
    else:
        cores = os.cpu_count() or 1
        line("device", f"CPU ({cores} cores), no CUDA -> backend {backend_for(True, False)}, use_cpu on "
                       f"(each rank trains its shard; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
        if plan.nproc_per_node > cores:
            problems.append(f"NPROC_PER_NODE={plan.nproc_per_node} exceeds this node's {cores} CPU cores: ranks would "
                            "fight for cores. Use at most one process per core.")
    return cuda


def describe_precision(cuda: bool, bf16: bool, fp16: bool, problems: list[str]) -> None:
    if cuda:
        bf16_ok = bf16_supported(cuda=True)
        support = f"bf16 {'supported' if bf16_ok else 'NOT supported (pre-Ampere): use --fp16'}, fp16 supported"
    else:
        bf16_ok = True
        native = cpu_bf16_native()
        support = ("bf16 supported (native AVX512-BF16/AMX)" if native
                   else "bf16 supported but emulated (no AVX512-BF16/AMX: slower than float32)") + "; fp16 needs a GPU"
    chosen = "bf16" if bf16 else "fp16" if fp16 else ("bf16/fp16 as --bf16/--fp16 say" if cuda else None)
    if chosen is None:  # a CPU launch without precision flags: the stages' automatic choice (medtrain.hardware)
        fast, why = cpu_bf16_fast()
        chosen = "bf16 (DPO, KTO, PPO, GRPO: float32)" if fast else "float32"
        support += f"; the stages' default here: {chosen} ({why})"
    line("precision", f"{chosen}; {support}")
    if bf16 and fp16:
        problems.append("--bf16 and --fp16 exclude each other: pick one.")
    if bf16 and not bf16_ok:
        problems.append("--bf16 needs an Ampere or newer GPU here: use --fp16.")
    if fp16 and not cuda:
        problems.append("--fp16 needs a CUDA GPU; on CPU drop it (the default: bf16 where bf16 matmul is fast, "
                        "else float32) or use --bf16.")


def describe_deepspeed(path: str | None, cuda: bool, problems: list[str]) -> None:
    if not path:
        line("deepspeed", "off (plain DDP: every rank holds the whole model)")
        return
    try:
        config = read_deepspeed_config(path)
    except ConfigError as err:
        problems.extend(err.problems)
        return
    summary = summarize_deepspeed(config)
    line("deepspeed", f"{path}: {summary.describe()}")
    problems.extend(deepspeed_problems(config, path))
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("--deepspeed needs the deepspeed package: pip install deepspeed.")
    elif not cuda:
        # On CPU DeepSpeed compiles its shared-memory comm op (and CPU Adam for offload) with g++ on first use.
        missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
        if missing and importlib.util.find_spec("ninja") is None:
            problems.append(f"DeepSpeed on CPU compiles its ops on first use and needs {' and '.join(missing)} "
                            "(apt install g++; pip install ninja).")
        else:
            line("", "DeepSpeed compiles its CPU ops on the first run (cached in ~/.cache/torch_extensions)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = LaunchPlan(args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr, args.master_port)
    ranks = plan.global_ranks
    line("launch", f"{plan.nnodes} node(s) x {plan.nproc_per_node} process(es) = world size {plan.world_size}; "
                   f"this is node {plan.node_rank}, global rank(s) {ranks.start}..{ranks.stop - 1}")
    # The network first: an unreachable master fails before torch is even imported.
    check_network(plan, args.timeout)
    problems: list[str] = []
    cuda = describe_device(plan, problems)
    describe_precision(cuda, args.bf16, args.fp16, problems)
    describe_deepspeed(args.deepspeed, cuda, problems)
    if problems:
        raise ConfigError(problems)
    line("ok", "this node can launch")
    if args.serve > 0:
        if plan.node_rank != 0:
            raise ConfigError("--serve is for node 0 (the master); the other nodes connect to it.")
        line("serving", f"listening on port {plan.master_port} for {args.serve:g} s (Ctrl-C to stop)")
        seen = serve_master(plan.master_addr, plan.master_port, args.serve)
        line("served", f"{seen} connection(s)")
    return 0


if __name__ == "__main__":
    run_main(main)
