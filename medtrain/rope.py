"""RoPE scaling for training past a model's pretrained context (``--rope_scaling linear|dynamic``).

transformers 5 keeps every rotary setting in ``config.rope_parameters`` (``rope_type``, ``factor``, ``rope_theta``);
the old ``rope_scaling`` attribute is read once at load time and folded into it. We write the scaled parameters into
the config before the weights are built, so the rotary tables use them during training and ``save_pretrained`` records
them in ``config.json``: a model reloaded from the output directory (full training or merged LoRA) uses the same
positions at inference.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

ROPE_SCALING_TYPES = ["linear", "dynamic"]


def rope_scaling_factor(original_positions: int, max_length: int | None, factor: float | None) -> float:
    """The scale factor: ``factor`` when given, else ``max_length / original_positions`` (at least 1)."""
    if factor is not None:
        if factor < 1.0:
            raise ConfigError(f"--rope_scaling_factor must be >= 1 (1 = no scaling), got {factor}.")
        return float(factor)
    if not max_length:
        raise ConfigError("--rope_scaling needs --model_max_length (or --rope_scaling_factor) to derive the factor.")
    return max(1.0, max_length / original_positions)


def apply_rope_scaling(config: Any, kind: str | None, max_length: int | None = None,
                       factor: float | None = None) -> float | None:
    """Set ``config.rope_parameters`` for ``kind`` ('linear' or 'dynamic'); return the factor (None = unchanged).

    The model's own ``rope_theta`` is kept. Linear scaling (position interpolation) divides positions by the factor,
    so ``max_position_embeddings`` grows by the factor. Dynamic NTK scaling only changes the base once a sequence is
    longer than ``max_position_embeddings``, which therefore stays the original length (its threshold). When the
    training length fits the model already and no factor is given, nothing changes (a warning says so).
    """
    if kind is None:
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ConfigError(f"--rope_scaling {kind}: choose one of {', '.join(ROPE_SCALING_TYPES)}.")
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"--rope_scaling: the {config.model_type} config has no single rotary setting to scale.")
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"--rope_scaling: the model already uses rope_type {params['rope_type']!r}; "
                          "scaling it again is not supported.")
    original = int(config.max_position_embeddings)
    scale = rope_scaling_factor(original, max_length, factor)
    if scale == 1.0:
        logger.warning("--rope_scaling %s has no effect: --model_max_length %s fits the model's %d positions "
                       "(pass --rope_scaling_factor to force one)", kind, max_length, original)
        return None
    params.update(rope_type=kind, factor=scale)
    config.rope_parameters = params
    if kind == "linear":
        config.max_position_embeddings = int(math.ceil(original * scale))
    logger.info("rope scaling %s, factor %.3f (theta %s, %d -> %d positions)", kind, scale, params.get("rope_theta"),
                original, config.max_position_embeddings if kind == "linear" else int(original * scale))
    return scale


ROPE_RECORD = "rope_scaling.json"


def save_rope_record(model: Any, output_dir: str) -> str | None:
    """Write the scaled rotary settings next to a LoRA adapter (``rope_scaling.json``); None when unscaled.

    A full model records them in its ``config.json``; an adapter directory has no model config, so merging or
    loading the adapter onto the (unscaled) base must apply this record: :func:`apply_recorded_rope_scaling`.
    """
    import json
    import os

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = dict(getattr(base.config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") not in ROPE_SCALING_TYPES:
        return None
    path = os.path.join(output_dir, ROPE_RECORD)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"rope_parameters": params, "max_position_embeddings": base.config.max_position_embeddings}, fh,
                  indent=2, sort_keys=True)
    return path


def apply_recorded_rope_scaling(config: Any, *model_dirs: str) -> bool:
    """Apply the first ``rope_scaling.json`` found in ``model_dirs`` to ``config`` (a base model's); True if applied."""
    import json
    import os

    for directory in model_dirs:
        path = os.path.join(directory, ROPE_RECORD)
        if directory and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                record = json.load(fh)
            config.rope_parameters = dict(record["rope_parameters"])
            config.max_position_embeddings = int(record["max_position_embeddings"])
            logger.info("applied the rope scaling recorded in %s: %s", path, record["rope_parameters"])
            return True
    return False
