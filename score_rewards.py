"""Score conversations or preference pairs with a trained reward model, one JSON line per record.

    python score_rewards.py --model outputs-rm --data_file data/reward/medical_pairs_en.jsonl --output_file scores.jsonl
    python score_rewards.py --model outputs-rm --base models/SmolLM2-135M-Instruct --data_file convs/ --output_file s.jsonl

--model is the output_dir of reward_modeling.py (a LoRA adapter with its score head; the base comes from its
adapter_config.json unless --base is given) or a full/merged reward model. Each file is detected on its own: pairs
(any preference format) get chosen_reward/rejected_reward and a pairwise accuracy; conversations ending with an
assistant turn (ShareGPT/OpenAI/alpaca) get reward. The chat format recorded at training time is used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from medtrain.arguments import TORCH_DTYPES, ModelArguments, parse_args
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError
from medtrain.formats import find_data_files
from medtrain.reward import load_reward_scorer, load_scoring_records, score_records, write_jsonl

logger = logging.getLogger("medtrain.score")


@dataclass
class ScoreArguments:
    """What to score, with which reward model, and where the scores go."""

    model: str = field(metadata={"help": "Reward model directory: reward_modeling.py's output_dir or a merged model."})
    data_file: str = field(metadata={"help": "A .json/.jsonl file (or a directory of them) of conversations or pairs."})
    output_file: str = field(metadata={"help": "JSON Lines file to write, one scored record per line."})
    base: str | None = field(
        default=None, metadata={"help": "Base model of an adapter (default: its adapter_config.json base)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_length: int = field(
        default=1024, metadata={"help": "Longer sequences keep their last max_length tokens (where the reward is read)."}
    )
    template_name: str | None = field(
        default=None, metadata={"help": "Conversation template; default: the one recorded with the reward model."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Replace the template's default system text."})
    torch_dtype: str = field(
        default="auto", metadata={"help": "Dtype of the weights; 'auto' = float32 on CPU.", "choices": TORCH_DTYPES}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model/tokenizer code from the checkpoint."})
    overwrite_output_file: bool = field(default=False, metadata={"help": "Replace an existing --output_file."})

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size <= 0:
            problems.append(f"--batch_size must be positive, got {self.batch_size}.")
        if self.max_length <= 0:
            problems.append(f"--max_length must be positive, got {self.max_length}.")
        if os.path.exists(self.output_file) and not self.overwrite_output_file:
            problems.append(f"--output_file {self.output_file} exists: choose another or pass --overwrite_output_file.")
        if problems:
            raise ConfigError(problems)


def main(args: list[str] | None = None) -> dict[str, float]:
    (score_args,) = parse_args([ScoreArguments], args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)

    # Read the data first: a bad record fails before the model is loaded
    records = load_scoring_records(find_data_files(score_args.data_file))
    model_args = ModelArguments(torch_dtype=score_args.torch_dtype, trust_remote_code=score_args.trust_remote_code)
    scorer = load_reward_scorer(score_args.model, score_args.base, model_args, score_args.template_name,
                                score_args.system_prompt, score_args.max_length, score_args.batch_size)
    logger.info("chat format: %s", scorer.chat_format.record())

    rows, metrics = score_records(scorer, records)
    write_jsonl(rows, score_args.output_file)
    pairs = sum("chosen" in r for r in rows)
    logger.info("scored %d pair(s) and %d conversation(s) -> %s", pairs, len(rows) - pairs, score_args.output_file)
    if metrics:
        logger.info("pairs: %s", ", ".join(f"{k} = {v:.4f}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    run_main(main)
