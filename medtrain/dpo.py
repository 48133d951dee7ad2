"""Direct preference optimization on our own token ids: DPO-only flags and checks, the reference model, the trainer.

TRL 1.16's ``DPOTrainer`` documents pre-tokenized ``prompt_ids``/``chosen_ids``/``rejected_ids`` input, but its
``_prepare_dataset`` still runs prompt extraction and chat templating on them (``KeyError: 'chosen'``).
:class:`PretokenizedDPOTrainer` skips that step, so the ids :func:`medtrain.preference.encode_pairs` produced (the
turn exactly as SFT renders it) are what the model sees. ``DPOConfig.max_length`` is set to ``--model_max_length``,
which every encoded pair already fits, so TRL's collator never cuts a sequence a second time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from .arguments import DataArguments, LoraArguments, ModelArguments
from .errors import ConfigError
from .modeling import embedding_rows, load_model
from .preference import DPO_TRUNCATION_CHOICES, encode_pairs

logger = logging.getLogger(__name__)

ID_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]

# Largest |log-prob| difference between the packed and padded layouts accepted by the start-up check, with fp32 and
# with bf16/fp16 weights: rounding differs between the two layouts, a missing prompt does not stay this small
SHARED_PROMPT_TOLERANCE_FP32 = 2e-3
SHARED_PROMPT_TOLERANCE_HALF = 0.25

# Every loss TRL 1.16 implements (DPOTrainer._compute_loss); tests check this list against TRL's source.
LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
F_DIVERGENCE_TYPES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# Losses built on the chosen-rejected score difference: the only ones TRL allows a non-default f-divergence for.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
# The only losses that read label_smoothing in TRL 1.16 (sigmoid no longer does: cDPO smoothing was removed).
LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


@dataclass
class DPOArguments:
    """DPO inputs beyond TRL's DPOConfig: the reference model and how over-long pairs are fitted."""

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model (must share the policy's tokenizer). Default: with LoRA the base model with the "
            "adapter disabled (no second copy); with full training a frozen copy of the starting model."
        },
    )
    truncation: str = field(
        default="reply",
        metadata={
            "help": "Pairs longer than --model_max_length tokens: 'reply' (default: every pair is kept, as in TRL and "
            "LLaMA-Factory) keeps at least half the length for the end of the prompt and cuts both replies at the "
            "end; 'left' cuts only the prompt from the left (replies stay whole; a pair whose reply alone is too long "
            "is dropped); 'drop' skips the pair. Counts are logged.",
            "choices": DPO_TRUNCATION_CHOICES,
        },
    )
    shared_prompt: bool = field(
        default=True,
        metadata={
            "help": "Where our CPU paths are on (--cpu_paths; default on CPU): each batch runs as one padding-free "
            "row in which every prompt is computed once for both replies (medtrain/shared_prompt.py); the same "
            "log-probs as TRL's padded rows up to rounding, checked on the model at start-up. False: TRL's padded "
            "chosen/rejected rows."
        },
    )


def _default(name: str) -> Any:
    """DPOConfig's default for ``name`` (to tell whether a flag was changed)."""
    f = next(f for f in dataclasses.fields(DPOConfig) if f.name == name)
    return f.default


def check_dpo_arguments(
    model_args: ModelArguments, lora_args: LoraArguments, data_args: DataArguments, dpo_args: DPOArguments,
    training_args: DPOConfig,
) -> None:
    """Refuse DPO flag combinations TRL rejects late (after loading the model) or silently ignores; all at once."""
    problems: list[str] = []
    t = training_args
    losses = list(t.loss_type)
    unknown = [loss for loss in losses if loss not in LOSS_TYPES]
    if unknown:
        problems.append(f"--loss_type {' '.join(unknown)}: unknown; choose from {', '.join(LOSS_TYPES)}.")
    if t.beta <= 0:
        problems.append(f"--beta must be positive, got {t.beta}.")

    # f-divergence (f-DPO)
    if t.f_divergence_type not in F_DIVERGENCE_TYPES:
        problems.append(f"--f_divergence_type {t.f_divergence_type}: unknown; choose from {', '.join(F_DIVERGENCE_TYPES)}.")
    elif t.f_divergence_type != "reverse_kl" and not set(losses) <= F_DIVERGENCE_LOSSES:
        problems.append(
            f"--f_divergence_type {t.f_divergence_type} works only with --loss_type in "
            f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}; got {' '.join(losses)}."
        )
    if t.f_alpha_divergence_coef != _default("f_alpha_divergence_coef") and t.f_divergence_type != "alpha_divergence":
        problems.append("--f_alpha_divergence_coef is used only with --f_divergence_type alpha_divergence.")

    # Loss-specific parameters that would otherwise be ignored or divide by zero
    if t.label_smoothing != 0.0 and not set(losses) & LABEL_SMOOTHING_LOSSES:
        problems.append(
            f"--label_smoothing has no effect with --loss_type {' '.join(losses)} (TRL 1.16 reads it only for "
            f"{', '.join(sorted(LABEL_SMOOTHING_LOSSES))}); for noisy labels use --loss_type robust."
        )
    if set(losses) & {"robust", "aot", "aot_unpaired"} and not 0.0 <= t.label_smoothing < 0.5:
        problems.append(f"--label_smoothing must be in [0, 0.5) for robust/aot losses, got {t.label_smoothing}.")
    if "exo_pair" in losses and not 0.0 < t.label_smoothing < 1.0:
        problems.append(f"--loss_type exo_pair needs 0 < --label_smoothing < 1 (the paper uses 1e-3), got {t.label_smoothing}.")
    if t.discopop_tau != _default("discopop_tau") and "discopop" not in losses:
        problems.append("--discopop_tau is used only with --loss_type discopop.")
    if t.discopop_tau <= 0:
        problems.append(f"--discopop_tau must be positive, got {t.discopop_tau}.")
    if t.ld_alpha is not None and not 0.0 <= t.ld_alpha <= 1.0:
        problems.append(f"--ld_alpha must be in [0, 1], got {t.ld_alpha}.")
    if t.use_weighting and set(losses) & {"aot", "aot_unpaired"}:
        problems.append("--use_weighting cannot be combined with aot/aot_unpaired losses (they sort pairs; TRL refuses).")

    # Reference model
    if t.sync_ref_model:
        if lora_args.use_peft:
            problems.append(
                "--sync_ref_model needs full training (--use_peft False): with LoRA the reference is the base model "
                "with the adapter disabled, so there is no separate reference to update."
            )
        if t.precompute_ref_log_probs:
            problems.append(
                "--sync_ref_model and --precompute_ref_log_probs exclude each other: precomputed reference log-probs "
                "go stale when the reference is updated during training."
            )
        if t.ref_model_sync_steps <= 0:
            problems.append(f"--ref_model_sync_steps must be positive, got {t.ref_model_sync_steps}.")
        if not 0.0 < t.ref_model_mixup_alpha <= 1.0:
            problems.append(f"--ref_model_mixup_alpha must be in (0, 1], got {t.ref_model_mixup_alpha}.")
    else:
        for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if getattr(t, name) != _default(name):
                problems.append(f"--{name} is used only with --sync_ref_model.")
    if t.precompute_ref_batch_size is not None and not t.precompute_ref_log_probs:
        problems.append("--precompute_ref_batch_size is used only with --precompute_ref_log_probs.")
    ref_path = dpo_args.ref_model_name_or_path
    if ref_path and lora_args.use_peft and model_args.model_name_or_path and \
            os.path.normpath(ref_path) == os.path.normpath(model_args.model_name_or_path):
        problems.append(
            "--ref_model_name_or_path is the base model itself: with LoRA the reference already is the base with the "
            "adapter disabled, so loading it again only doubles memory. Drop --ref_model_name_or_path."
        )
    targets = lora_args.target_module_list
    if lora_args.use_peft and isinstance(targets, list) and "lm_head" in targets:
        problems.append("--target_modules lm_head: DPO computes log-probs from lm_head.weight directly, so an adapter "
                        "there would never train. Remove lm_head.")

    # Lengths, tokenization and data preparation are ours, not TRL's
    # (--max_length: derived from --model_max_length by medtrain.arguments.finalize, which refuses a different one)
    if t.truncation_mode != _default("truncation_mode"):
        problems.append(
            f"--truncation_mode {t.truncation_mode} has no effect: every pair already fits --model_max_length. "
            "Use --truncation left|reply|drop to choose how over-long pairs are fitted."
        )
    if (data_args.preprocessing_num_workers or 0) > 1:
        problems.append(
            "--preprocessing_num_workers is not used by DPO: pairs are encoded in-process "
            "(tokenization only, fast). Remove the flag."
        )
    if t.padding_free:
        problems.append("--padding_free is disabled in TRL 1.16's DPOTrainer (it falls back to padding); remove it.")
    if t.model_init_kwargs:
        problems.append("--model_init_kwargs is not used here: the model is loaded from --model_name_or_path with "
                        "--torch_dtype/--load_in_4bit/--attn_implementation.")
    if t.pad_token is not None:
        problems.append("--pad_token is deprecated in TRL; the tokenizer's pad token is used (padding is masked anyway).")
    if t.activation_offloading and not _cuda_available():
        problems.append("--activation_offloading moves activations from a GPU to CPU memory: it needs a CUDA GPU.")
    if problems:
        raise ConfigError(problems)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_router_aux_loss(model: Any, training_args: DPOConfig) -> None:
    """``--router_aux_loss_coef`` weights a Mixture-of-Experts loss; refuse it for dense models before TRL does."""
    coef = training_args.router_aux_loss_coef
    if coef and not hasattr(model.config.get_text_config(), "output_router_logits"):
        raise ConfigError(f"--router_aux_loss_coef {coef}: {type(model).__name__} is not a Mixture-of-Experts model.")


# ----------------------------------------------------------------------------------------------------------------
# Data


def encode_preference_dataset(records: list[dict], tokenizer: Any, chat_format: Any, max_length: int,
                              truncation: str, name: str):
    """A ``datasets.Dataset`` of ``prompt_ids``/``chosen_ids``/``rejected_ids`` (over-long pairs fitted and counted)."""
    import datasets

    pairs = encode_pairs(records, tokenizer, chat_format, max_length, truncation, name=name)
    dataset = datasets.Dataset.from_dict({column: [pair[column] for pair in pairs] for column in ID_COLUMNS})
    lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    logger.info("%s: %d preference pairs, longest %d tokens, mean %.0f", name, len(pairs), max(lengths),
                sum(lengths) / len(lengths))
    return dataset


def describe_pair(tokenizer: Any, example: dict) -> str:
    """The decoded layout of one pair: the prompt (context only) and both replies (their log-probs are compared)."""
    sizes = ", ".join(f"{side} {len(example[f'{side}_ids'])}" for side in ("prompt", "chosen", "rejected"))
    lines = [f"pair layout (tokens): {sizes}; only the replies are scored"]
    for side in ("prompt", "chosen", "rejected"):
        lines.append(f"  [{side:<8}] {tokenizer.decode(example[f'{side}_ids'], skip_special_tokens=False)!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reference model and trainer


def load_reference_model(model: Any, model_args: ModelArguments, lora_args: LoraArguments, dpo_args: DPOArguments,
                         training_args: DPOConfig, tokenizer: Any) -> Any | None:
    """The reference model to hand to DPOTrainer, or None.

    ``--ref_model_name_or_path``: that model, loaded like the policy. LoRA: None (DPOTrainer runs the base with the
    adapter disabled). Full training: a frozen copy of the starting weights, except with
    ``--precompute_ref_log_probs``, where the policy itself scores the data once before its first update.
    """
    if dpo_args.ref_model_name_or_path:
        _check_same_tokenizer(dpo_args.ref_model_name_or_path, model_args, tokenizer)
        ref_args = dataclasses.replace(model_args, model_name_or_path=dpo_args.ref_model_name_or_path)
        ref_model = load_model(ref_args, tokenizer=tokenizer)
        ref_rows, policy_rows = embedding_rows(ref_model), embedding_rows(model)
        if ref_rows != policy_rows:
            raise ConfigError(
                f"--ref_model_name_or_path {dpo_args.ref_model_name_or_path}: its vocabulary has {ref_rows} rows, the "
                f"policy's {policy_rows}; the reference must use the policy's tokenizer."
            )
        logger.info("reference model: %s (a second model in memory)", dpo_args.ref_model_name_or_path)
    elif lora_args.use_peft:
        logger.info("reference model: the base with the LoRA adapter disabled (no copy)")
        return None
    elif training_args.precompute_ref_log_probs:
        logger.info("reference model: none kept; reference log-probs are precomputed by the starting model")
        return None
    else:
        from transformers.integrations import is_deepspeed_zero3_enabled

        # A deepcopy of ZeRO-3-partitioned weights has empty shards: load the starting model again instead.
        ref_model = load_model(model_args, tokenizer=tokenizer) if is_deepspeed_zero3_enabled() else copy.deepcopy(model)
        logger.info("reference model: a frozen copy of the starting model")
    ref_model.requires_grad_(False)
    ref_model.eval()
    return ref_model


def _check_same_tokenizer(path: str, model_args: ModelArguments, tokenizer: Any) -> None:
    """Token ids are only comparable when the reference was trained with the same vocabulary."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path) or not any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return
    ref_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"--ref_model_name_or_path {path}: its tokenizer differs from the policy's; the reference must score "
            "the same token ids."
        )


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on datasets that already hold ``prompt_ids``/``chosen_ids``/``rejected_ids``.

    TRL 1.16 would re-extract and re-tokenize them (and fail, since there is no text), so preparation is skipped.
    """

    def __init__(self, *args: Any, shared_prompt: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared_prompt = shared_prompt and self._use_shared_prompt()

    def _use_shared_prompt(self) -> bool:
        """Switch to one padding-free row per batch with each prompt computed once (:mod:`medtrain.shared_prompt`),
        after checking on the loaded model that it gives TRL's log-probs; False (TRL's padded rows) otherwise."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        from .shared_prompt import (SharedPromptCollator, add_shared_prompt_forward, shared_prompt_mismatch,
                                    use_segment_attention)

        def off(why: str, restore: list[str] | None = None) -> bool:
            for m, attention in zip(models, restore or []):
                m.set_attn_implementation(attention)
            logger.info("shared-prompt pair rows off: %s; TRL's padded chosen/rejected rows", why)
            return False

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # a separate reference is already prepared: under DeepSpeed an engine holding the model in .module
        reference = getattr(self.ref_model, "module", self.ref_model)
        models = [base] + ([reference] if reference is not None else [])
        if is_deepspeed_zero3_enabled() or self.is_fsdp_enabled:
            return off("sharded weights (ZeRO-3/FSDP) are gathered only inside the engine, so the check cannot run")
        before = [m.config._attn_implementation for m in models]
        if any(use_segment_attention(m) is None for m in models):
            return off(f"attention {'/'.join(before)} cannot run per-segment sdpa", restore=before)
        collator = SharedPromptCollator(self.data_collator)
        vocab = base.get_input_embeddings().num_embeddings
        for m in models:
            add_shared_prompt_forward(m)
        # both layouts through the policy (and a separate reference): same log-probs up to rounding
        checked = [self.model] + ([reference] if reference is not None else [])
        mismatch = max(shared_prompt_mismatch(m, collator, vocab) for m in checked)
        fp32 = base.get_input_embeddings().weight.dtype == torch.float32
        tolerance = SHARED_PROMPT_TOLERANCE_FP32 if fp32 else SHARED_PROMPT_TOLERANCE_HALF
        if not mismatch <= tolerance:
            return off(f"on this model the packed row's log-probs differ from the padded rows' by {mismatch:.3g} "
                       f"(> {tolerance})", restore=before)
        self.data_collator = collator
        logger.info("shared-prompt pair rows: one padding-free row per batch, each prompt computed once "
                    "(log-probs checked against TRL's padded rows: max difference %.2g)", mismatch)
        return True

    # Private hook: DPOConfig has no public switch to skip TRL's preparation (SFTConfig's dataset_kwargs
    # skip_prepare_dataset has no DPO twin in TRL 1.16). Signature pinned by tests/test_configuration.py.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = [column for column in ID_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks {missing}: encode it with encode_preference_dataset")
        return dataset

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        # PEFT writes every adapter; the frozen "ref" copy (continued adapters only) would land in output_dir/ref/
        # and is not a training result: it is rebuilt from --peft_path on resume.
        super()._save(output_dir, state_dict)
        ref_dir = os.path.join(output_dir or self.args.output_dir, "ref")
        if "ref" in getattr(self.model, "peft_config", {}) and os.path.isdir(ref_dir):
            shutil.rmtree(ref_dir)


def build_trainer(model: Any, ref_model: Any | None, training_args: DPOConfig, train_dataset: Any, eval_dataset: Any,
                  tokenizer: Any, lora_args: LoraArguments, callbacks: list | None = None,
                  shared_prompt: bool = False) -> PretokenizedDPOTrainer:
    """DPOTrainer with our reference-model policy applied.

    Given a PeftModel and no reference, TRL adds a "ref" adapter copied from the trainable one. For a fresh adapter
    (B = 0) that copy equals the base, so it is removed and the reference is the base with adapters disabled. A
    continued adapter (``--peft_path``) keeps its "ref" copy: the reference is then the adapter DPO started from
    (normally the SFT policy), which is what DPO should stay close to.
    """
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        shared_prompt=shared_prompt,
    )
    if "ref" in getattr(trainer.model, "peft_config", {}) and not lora_args.peft_path:
        trainer.model.delete_adapter("ref")
        logger.info("fresh LoRA adapter: reference = base model with the adapter disabled")
    if training_args.precompute_ref_log_probs:
        # The reference log-probs now live in the datasets; nothing may score with the reference model again.
        trainer.ref_model = None
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")
    return trainer
