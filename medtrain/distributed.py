"""Multi-process and multi-node launches: what torchrun will set up, DeepSpeed configs, and the checks around them.

Every stage runs under ``torchrun`` (one process per GPU, or per share of the CPU). Three things go wrong silently
or late on this stack, and are handled here:

* On CPU, Trainer only shards the data when ``use_cpu`` is on (``parse_args`` defaults it on without CUDA); the
  process group is then gloo. On GPU it is nccl.
* With ``use_cpu``, accelerate opens a torch gloo group but not DeepSpeed's own communication layer, which
  ZeRO-3 needs *before* the model is loaded (``deepspeed.zero.Init`` partitions the weights as they are read):
  :func:`start_deepspeed_comm` starts it on the existing group.
* A worker node that cannot reach the master waits for the rendezvous timeout (minutes) before failing:
  :func:`check_master` answers in seconds (``preflight.py``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UserError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


# ----------------------------------------------------------------------------------------------------------------
# Launch layout


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes a launch starts and where they meet (the torchrun flags the run_*.sh scripts pass)."""

    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT

    def __post_init__(self) -> None:
        problems = []
        if self.nnodes < 1:
            problems.append(f"NNODES must be at least 1, got {self.nnodes}.")
        if self.nproc_per_node < 1:
            problems.append(f"NPROC_PER_NODE must be at least 1, got {self.nproc_per_node}.")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            problems.append(f"NODE_RANK must be in 0..{self.nnodes - 1} for NNODES={self.nnodes}, got {self.node_rank}.")
        if not 1 <= self.master_port <= 65535:
            problems.append(f"MASTER_PORT must be a TCP port (1..65535), got {self.master_port}.")
        if problems:
            raise ConfigError(problems)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def global_ranks(self) -> range:
        """The global ranks the processes of this node get."""
        return range(self.node_rank * self.nproc_per_node, (self.node_rank + 1) * self.nproc_per_node)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer.") from None


def launch_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The layout the run_*.sh scripts pass to torchrun, from NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR and
    MASTER_PORT (their defaults when unset), as LaunchPlan keyword arguments; not yet validated."""
    env = os.environ if env is None else env
    return dict(
        nnodes=_env_int(env, "NNODES", 1),
        node_rank=_env_int(env, "NODE_RANK", 0),
        nproc_per_node=_env_int(env, "NPROC_PER_NODE", 1),
        master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_env_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
    )


def world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    """Processes in this job as torchrun tells its workers (WORLD_SIZE); 1 outside torchrun."""
    return _env_int(os.environ if env is None else env, "WORLD_SIZE", 1)


def local_world_size_from_env(env: Mapping[str, str] | None = None) -> int:
    """Processes torchrun started on this node (LOCAL_WORLD_SIZE); 1 outside torchrun."""
    return _env_int(os.environ if env is None else env, "LOCAL_WORLD_SIZE", 1)


def backend_for(use_cpu: bool, cuda: bool) -> str:
    """The process-group backend Trainer uses: nccl between GPUs, gloo on CPU."""
    return "nccl" if cuda and not use_cpu else "gloo"


# ----------------------------------------------------------------------------------------------------------------
# Precision support


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); without them torch emulates bf16 (slowly)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def bf16_supported(cuda: bool) -> bool:
    """bf16 training works here: on GPU it needs Ampere or newer; on CPU torch always has it (maybe emulated)."""
    import torch

    if cuda:
        return bool(torch.cuda.is_bf16_supported())
    return True


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed configs


@dataclass(frozen=True)
class DeepSpeedSummary:
    """The parts of a DeepSpeed config that decide how a run behaves."""

    stage: int
    offload_optimizer: str | None  # "cpu" / "nvme" or None
    offload_param: str | None
    gather_16bit_weights_on_save: bool
    bf16: Any  # True / False / "auto" (= --bf16)
    fp16: Any
    has_optimizer: bool
    has_scheduler: bool

    def describe(self) -> str:
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer:
            parts.append(f"optimizer offload to {self.offload_optimizer}")
        if self.offload_param:
            parts.append(f"parameter offload to {self.offload_param}")
        parts.append("DeepSpeed optimizer" if self.has_optimizer else "Trainer's optimizer (--optim)")
        parts.append("DeepSpeed scheduler" if self.has_scheduler else "Trainer's scheduler (--lr_scheduler_type)")
        if self.stage == 3:
            parts.append("16-bit weights gathered on save" if self.gather_16bit_weights_on_save
                         else "weights NOT gathered on save")
        return ", ".join(parts)


def read_deepspeed_config(source: str | Mapping[str, Any]) -> dict:
    """The config as a dict; a missing, unreadable or non-mapping file is a ConfigError naming it."""
    if isinstance(source, Mapping):
        return dict(source)
    try:
        with open(source, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"--deepspeed {source}: no such file. The shipped configs are deepspeed_zero_stage2_config.json, "
            "deepspeed_zero_stage3_config.json and their *_offload_config.json variants."
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"--deepspeed {source}: cannot read the DeepSpeed config: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed {source}: a DeepSpeed config must be a JSON object.")
    return config


def _device(block: Any) -> str | None:
    device = block.get("device") if isinstance(block, dict) else None
    return None if device in (None, "none") else str(device)


def summarize_deepspeed(config: Mapping[str, Any]) -> DeepSpeedSummary:
    zero = config.get("zero_optimization") or {}
    try:
        stage = int(zero.get("stage", 0) or 0)
    except (TypeError, ValueError):
        stage = -1
    return DeepSpeedSummary(
        stage=stage,
        offload_optimizer=_device(zero.get("offload_optimizer")),
        offload_param=_device(zero.get("offload_param")),
        gather_16bit_weights_on_save=bool(
            zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save", False))
        ),
        bf16=(config.get("bf16") or config.get("bfloat16") or {}).get("enabled", False),
        fp16=(config.get("fp16") or {}).get("enabled", False),
        has_optimizer="optimizer" in config,
        has_scheduler="scheduler" in config,
    )


def deepspeed_problems(config: Mapping[str, Any], name: str) -> list[str]:
    """What in a DeepSpeed config would fail late (at engine start) or silently (a save without weights)."""
    problems = []
    summary = summarize_deepspeed(config)
    if summary.stage not in (0, 1, 2, 3):
        problems.append(f"--deepspeed {name}: zero_optimization.stage must be 0, 1, 2 or 3.")
    if summary.stage == 3 and not summary.gather_16bit_weights_on_save:
        problems.append(
            f"--deepspeed {name}: ZeRO-3 without \"stage3_gather_16bit_weights_on_model_save\": true saves a model "
            "directory without weights (only sharded checkpoints). Set it to true."
        )
    if summary.offload_optimizer and not summary.has_optimizer:
        problems.append(
            f"--deepspeed {name}: optimizer offload needs an \"optimizer\" block (DeepSpeed then runs its CPU Adam); "
            "copy it from deepspeed_zero_stage3_offload_config.json."
        )
    if summary.offload_param and summary.stage != 3:
        problems.append(f"--deepspeed {name}: offload_param works only with ZeRO-3 (this config is ZeRO-{summary.stage}).")
    return problems


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def deepspeed_mismatches(config: Mapping[str, Any], name: str, training_args: Any, world_size: int) -> list[str]:
    """Explicit (non-"auto") config values that contradict the flags.

    transformers finds these too, but only after the model is loaded (``trainer_config_finalize``).
    """
    t = training_args
    per_device = getattr(t, "per_device_train_batch_size", 1)
    accumulation = getattr(t, "gradient_accumulation_steps", 1)
    pairs = [
        ("train_micro_batch_size_per_gpu", per_device, f"--per_device_train_batch_size {per_device}"),
        ("gradient_accumulation_steps", accumulation, f"--gradient_accumulation_steps {accumulation}"),
        ("train_batch_size", per_device * accumulation * world_size,
         f"per_device_train_batch_size x gradient_accumulation_steps x world size = {per_device * accumulation * world_size}"),
        ("gradient_clipping", getattr(t, "max_grad_norm", None), f"--max_grad_norm {getattr(t, 'max_grad_norm', None)}"),
        ("optimizer.params.lr", getattr(t, "learning_rate", None), f"--learning_rate {getattr(t, 'learning_rate', None)}"),
        ("optimizer.params.weight_decay", getattr(t, "weight_decay", None),
         f"--weight_decay {getattr(t, 'weight_decay', None)}"),
        ("optimizer.params.eps", getattr(t, "adam_epsilon", None), f"--adam_epsilon {getattr(t, 'adam_epsilon', None)}"),
        ("optimizer.params.betas", [getattr(t, "adam_beta1", None), getattr(t, "adam_beta2", None)],
         f"--adam_beta1/--adam_beta2 {getattr(t, 'adam_beta1', None)}/{getattr(t, 'adam_beta2', None)}"),
        ("bf16.enabled", bool(getattr(t, "bf16", False) or getattr(t, "bf16_full_eval", False)),
         f"--bf16 {bool(getattr(t, 'bf16', False))}"),
        ("fp16.enabled", bool(getattr(t, "fp16", False) or getattr(t, "fp16_full_eval", False)),
         f"--fp16 {bool(getattr(t, 'fp16', False))}"),
    ]
    problems = []
    for key, wanted, flag in pairs:
        value = _lookup(config, key)
        if value is None or value == "auto" or wanted is None:
            continue
        same = list(value) == list(wanted) if isinstance(value, (list, tuple)) else value == wanted
        if not same:
            problems.append(f"--deepspeed {name}: \"{key}\": {json.dumps(value)} contradicts {flag}; set it to "
                            "\"auto\" (as the shipped configs do) or change the flag.")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Flag combinations


def distributed_problems(model_args: Any, lora_args: Any, training_args: Any, cuda: bool,
                         device_count: int = 0) -> list[str]:
    """Launch, DeepSpeed and precision combinations that cannot run here; all of them, as messages."""
    problems: list[str] = []
    use_cpu = bool(getattr(training_args, "use_cpu", False))
    deepspeed = getattr(training_args, "deepspeed", None)
    summary = None
    if deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            problems.append("--deepspeed needs the deepspeed package: pip install deepspeed.")
        try:
            config = read_deepspeed_config(deepspeed)
        except ConfigError as err:
            problems.extend(err.problems)
        else:
            name = deepspeed if isinstance(deepspeed, str) else "<dict>"
            problems.extend(deepspeed_problems(config, name))
            problems.extend(deepspeed_mismatches(config, name, training_args, world_size_from_env()))
            summary = summarize_deepspeed(config)

    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and summary is not None and summary.stage == 3:
        problems.append(
            "quantized weights (--load_in_4bit/--load_in_8bit) cannot be sharded by DeepSpeed ZeRO-3: use "
            "deepspeed_zero_stage2_config.json, or drop the quantization."
        )
    if quantized and cuda and use_cpu:
        problems.append("--use_cpu with --load_in_4bit/--load_in_8bit on a GPU machine: quantized weights are placed on "
                        "the GPU. Drop --use_cpu (or hide the GPUs with CUDA_VISIBLE_DEVICES=\"\").")
    if quantized and summary is not None and summary.offload_param:
        problems.append("quantized weights cannot be offloaded by DeepSpeed (offload_param): drop one of them.")

    ddp_backend = getattr(training_args, "ddp_backend", None)
    if ddp_backend == "nccl" and (use_cpu or not cuda):
        problems.append("--ddp_backend nccl needs CUDA GPUs; on CPU the backend is gloo (leave --ddp_backend unset).")
    if cuda and not use_cpu and device_count and local_world_size_from_env() > device_count:
        problems.append(
            f"{local_world_size_from_env()} processes on this node but {device_count} GPU(s): set NPROC_PER_NODE "
            f"(torchrun --nproc_per_node) to at most {device_count}."
        )

    # Precision
    bf16 = bool(getattr(training_args, "bf16", False))
    fp16 = bool(getattr(training_args, "fp16", False))
    if bf16 and fp16:
        problems.append("--bf16 and --fp16 exclude each other: pick one.")
    if cuda and not use_cpu:
        if (bf16 or model_args.torch_dtype == "bfloat16") and not bf16_supported(cuda=True):
            problems.append("this GPU has no bf16 support (it needs Ampere or newer): use --fp16 instead of --bf16 / "
                            "--torch_dtype bfloat16.")
    else:
        if fp16:
            problems.append("--fp16 needs a CUDA GPU; on CPU drop it (the default: bf16 where bf16 matmul is fast, "
                            "else float32) or use --bf16.")
        if model_args.torch_dtype == "float16":
            problems.append("--torch_dtype float16 is not supported for training on CPU: use float32 or bfloat16.")
    if model_args.attn_implementation == "flash_attention_2":
        if not cuda or use_cpu:
            problems.append("--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU leave it unset (sdpa is used).")
        else:
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                problems.append("--attn_implementation flash_attention_2 needs the flash-attn package: pip install "
                                "flash-attn --no-build-isolation.")
            if model_args.torch_dtype == "float32":
                problems.append("--attn_implementation flash_attention_2 runs in float16/bfloat16 only: drop --torch_dtype "
                                "float32.")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed on CPU


def default_single_process_env(env: dict | None = None) -> bool:
    """Outside a launcher, give DeepSpeed the environment of a one-process torchrun (rank 0 of 1, a free port).

    Without it DeepSpeed looks for MPI to find its ranks and stops with "No module named 'mpi4py'". Returns
    whether anything was set (nothing under torchrun or another launcher).
    """
    env = os.environ if env is None else env
    if "RANK" in env or "LOCAL_RANK" in env or "WORLD_SIZE" in env:
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR), MASTER_PORT=env.get("MASTER_PORT", str(port)))
    return True


def start_deepspeed_comm(training_args: Any) -> bool:
    """With ``--deepspeed`` and ``use_cpu``, start DeepSpeed's comm layer on gloo, before any model is loaded.

    On GPU accelerate does this itself. On CPU it opens only a torch process group (under a launcher), so
    ``deepspeed.zero.Init`` (ZeRO-3 loading) sees a world of one rank and stops with "train_batch_size is not equal
    to micro_batch_per_gpu * gradient_acc_step * world_size"; and a one-process run started with plain ``python``
    has no group at all, which DeepSpeed would open on its CPU default backend (ccl) instead of gloo. Needs the
    launch environment (:func:`default_single_process_env` outside a launcher). Returns whether it started it.
    """
    if not getattr(training_args, "deepspeed", None) or not training_args.use_cpu:
        return False
    import deepspeed.comm as dist  # optional dependency: only with --deepspeed

    training_args.world_size  # noqa: B018  (sets up the device: opens the gloo group under a launcher)
    if dist.is_initialized():
        return False
    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Reachability


def resolve_host(addr: str) -> list[str]:
    """IP addresses of ``addr``; a UserError when it does not resolve."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"MASTER_ADDR {addr!r} does not resolve ({err.strerror}): use the master's IP address.") from None
    return sorted({info[4][0] for info in infos})


def check_master(addr: str, port: int, timeout: float = 5.0) -> float:
    """Open a TCP connection to the master within ``timeout`` seconds; returns the seconds it took.

    Raises UserError saying which of the usual causes it is: the name does not resolve, nothing answers (wrong
    address, host down, firewall), or the host answers but nothing listens on the port (node 0 not started yet).
    """
    resolve_host(addr)
    start = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return time.monotonic() - start
    except TimeoutError:
        raise UserError(
            f"cannot reach the master {addr}:{port}: no answer within {timeout:g} s. Check MASTER_ADDR (it must be "
            "node 0's address as seen from this node), that node 0 is up, and that no firewall drops the port."
        ) from None
    except ConnectionRefusedError:
        raise UserError(
            f"the master {addr} answers but nothing listens on port {port}: start node 0 first (its run_*.sh, or "
            "`python preflight.py --serve 120` there), and check MASTER_PORT is the same on every node."
        ) from None
    except OSError as err:
        raise UserError(f"cannot reach the master {addr}:{port}: {err.strerror or err}.") from None


def check_bindable(addr: str, port: int) -> None:
    """On node 0: the master's address must be one of this machine's and its port free (torchrun binds it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as torchrun's store sets it: a port in TIME_WAIT is free, one with a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError as err:
            if err.errno == 99:  # EADDRNOTAVAIL
                raise UserError(
                    f"MASTER_ADDR {addr} is not an address of this machine, but this is node 0 (the master): run "
                    "NODE_RANK=0 on the machine MASTER_ADDR names, or fix MASTER_ADDR."
                ) from None
            if err.errno == 98:  # EADDRINUSE
                raise UserError(
                    f"port {port} on {addr} is already in use (another run?): pick a free MASTER_PORT on every node."
                ) from None
            raise UserError(f"cannot bind {addr}:{port} on node 0: {err.strerror or err}.") from None


def serve_master(addr: str, port: int, seconds: float) -> int:
    """Listen on the master port for ``seconds`` so other nodes' preflight can connect; returns connections seen."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    seen = 0
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("" if family == socket.AF_INET else "::", port))
        server.listen()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            server.settimeout(left)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            conn.close()
            seen += 1
    return seen


# ----------------------------------------------------------------------------------------------------------------
# Ending a launched process


def exit_distributed_process(status: int = 0) -> None:
    """End a process that has an open torch.distributed group (no-op without one): wait for non-daemon threads,
    run the ``atexit`` handlers, flush stdio, then ``os._exit(status)`` without the interpreter's teardown.

    Gloo's worker threads drop the tensors of a finished collective after the caller has its result; when that
    last reference falls during interpreter finalization, taking the GIL ends the thread and libstdc++ aborts the
    process (``terminate called without an active exception``, SIGABRT, ~5% of 2-rank CPU runs under load), so
    torchrun reports a run that trained and saved as failed. ``destroy_process_group`` does not close the gap: the
    group lives on in the DDP wrapper. Skipping finalization does: every file the stages write is closed by then,
    and what atexit flushes (logging, tensorboard, temporary directories) still runs.
    """
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import atexit
    import os
    import threading

    for thread in threading.enumerate():  # what a normal exit waits for
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(status)
