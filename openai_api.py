"""Serve a trained model behind the OpenAI chat API (base, merged, or base + LoRA adapter).

    python openai_api.py --model_name_or_path merged-sft --port 8000
    python openai_api.py --model_name_or_path models/SmolLM2-135M-Instruct --lora_model outputs-sft \
        --port 8000 --api_key "$KEY"
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "merged-sft", "messages": [{"role": "user", "content": "I have a fever."}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not; temperature, top_p, max_tokens, stop, seed,
n), GET /health. Prompts are rendered with the chat format recorded at training time and tokenised as training did.
Requests arriving together are generated as one batch on a worker thread (--max_batch_size); a full queue answers
429; a client that disconnects stops its generation. Listens on 127.0.0.1 unless --host says otherwise.
See docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from medtrain.arguments import flag_spelling, parse_args
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError
from medtrain.generation import GenerationModelArguments
from medtrain.openai_server import create_app
from medtrain.serving import ServeArguments, load_engine


@dataclass
class ApiArguments:
    """Flags of the HTTP API."""

    api_key: str | None = field(
        default=None,
        metadata={"help": "Require 'Authorization: Bearer KEY' on /v1 (default: the MEDTRAIN_API_KEY variable, if set; "
                          "else no key)."},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model id clients send; default: the adapter's (else the model's) dir name."}
    )
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body accepted (413 above)."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature when a request gives none (OpenAI: 1)."})
    top_p: float = field(default=1.0, metadata={"help": "top_p when a request gives none (OpenAI: 1)."})

    def __post_init__(self) -> None:
        problems = []
        if self.max_request_bytes < 1024:
            problems.append(f"--max_request_bytes must be >= 1024, got {self.max_request_bytes}.")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], got {self.top_p}.")
        if problems:
            raise ConfigError(problems)


# The flags: the model (as in inference.py and web_demo.py), the engine and where to listen, the API's own
ARGUMENTS = [GenerationModelArguments, ServeArguments, ApiArguments]


def main(args: list[str] | None = None) -> None:
    model_args, serve_args, api_args = parse_args(ARGUMENTS, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    import uvicorn

    engine, info = load_engine(model_args, serve_args,
                               flag_spelling(args, GenerationModelArguments, "model_name_or_path"))
    name = api_args.served_model_name or os.path.basename(
        os.path.normpath(model_args.lora_model or model_args.model_name_or_path))
    api_key = api_args.api_key or os.environ.get("MEDTRAIN_API_KEY") or None
    app = create_app(engine, name, api_key=api_key, max_tokens_limit=serve_args.max_tokens_limit,
                     max_request_bytes=api_args.max_request_bytes, default_temperature=api_args.temperature,
                     default_top_p=api_args.top_p, info=info)
    if serve_args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {serve_args.host} without --api_key: anyone who can reach it can use the model",
              file=sys.stderr, flush=True)
    print(f"serving model {name!r} (api key {'required' if api_key else 'off'})", flush=True)
    try:
        uvicorn.run(app, host=serve_args.host, port=8000 if serve_args.port is None else serve_args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    run_main(main)
