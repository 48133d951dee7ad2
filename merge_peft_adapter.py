"""Merge a LoRA adapter (SFT, reward model, QLoRA, resized vocabulary) into its base model.

    python merge_peft_adapter.py --base_model models/SmolLM2-135M-Instruct --lora_model outputs-sft \
        --output_dir merged-sft
    python merge_peft_adapter.py --base_model merged-sft --lora_model outputs-rm --output_dir merged-rm

The adapter is applied to the full-precision base (also when it was trained with QLoRA), in float32, and the merged
model is compared with base + adapter on a few inputs: the largest logit difference is printed and the merge fails
above --tolerance. The output dir gets safetensors weights, the tokenizer with the chat format recorded at training
time as its chat template (so vLLM/SGLang prompt it as training did; docs/serving.md), that record
(medtrain_chat_format.json), the generation config (eos includes the end-of-turn token) and merge_report.json. It is
written to a temporary directory first and renamed when complete.
"""

from __future__ import annotations

import logging
import sys

from medtrain.arguments import ModelSourceArguments, flag_spelling, parse_args
from medtrain.entrypoint import run_main
from medtrain.merging import MergeArguments, MergeReport, merge_adapter

logger = logging.getLogger("medtrain.merge")

# --base_model (alias of --model_name_or_path), --lora_model, --tokenizer_path, --trust_remote_code: the model-source
# flags every loading entry point shares; then the merge's own (its --torch_dtype is the dtype written).
ARGUMENTS = [ModelSourceArguments, MergeArguments]
REQUIRED = ("lora_model",)  # optional elsewhere (a plain model); here it is what gets merged


def main(args: list[str] | None = None) -> MergeReport:
    source, merge_args = parse_args(ARGUMENTS, args, required=REQUIRED)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO, force=True)
    report = merge_adapter(source, merge_args, flag_spelling(args, ModelSourceArguments, "model_name_or_path"))
    if report.max_abs_diff is not None:
        print(f"max |logit difference| merged vs base + adapter (float32): {report.max_abs_diff:.3g}")
    if report.quantized_max_abs_diff is not None:
        print(f"max |logit difference| merged vs {report.quantization}-quantized base + adapter: "
              f"{report.quantized_max_abs_diff:.3g}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"merged {report.model_type} model written to {report.output_dir} ({report.dtype})")
    return report


if __name__ == "__main__":
    run_main(main)
