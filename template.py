"""Conversation templates (re-exported from :mod:`medtrain.templates`) and a small CLI to inspect them.

    python template.py --list                   # registered template names, one per line
    python template.py --name qwen              # a rendered 2-turn example with a system prompt (repr)
    python template.py --name llama2 --system "You are a doctor."
"""

from __future__ import annotations

import argparse

from medtrain.entrypoint import run_main
from medtrain.templates import *  # noqa: F401,F403  (the public API, importable as `template`)
from medtrain.templates import get_conv_template, list_templates

EXAMPLE = [
    {"role": "user", "content": "I have a fever."},
    {"role": "assistant", "content": "Rest and drink water."},
    {"role": "user", "content": "For how long?"},
    {"role": "assistant", "content": "Three days."},
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the registered template names")
    what.add_argument("--name", help="print a rendered example of this template")
    parser.add_argument("--system", default="You are a doctor.", help="system prompt for the example")
    args = parser.parse_args(argv)

    if args.list:
        print("\n".join(list_templates()))
        return
    template = get_conv_template(args.name)
    messages = [{"role": "system", "content": args.system}, *EXAMPLE]
    # repr keeps every newline and space of the format visible
    print(f"name:           {template.name}")
    print(f"reference:      {template.reference}")
    print(f"stop_str:       {template.stop_str!r}")
    print(f"default system: {template.system_prompt!r}")
    print(f"render:         {template.render(messages)!r}")
    print(f"get_prompt:     {template.get_prompt(messages[:-1])!r}")
    samples = template.get_samples(messages)
    if len(samples) > 1:
        print(f"training samples: {len(samples)} (the template rewrites earlier turns: one sample per reply)")
    for number, pieces in enumerate(samples):
        for turn, (prompt, answer) in enumerate(pieces):
            label = f"turn {turn}" if len(samples) == 1 else f"sample {number} turn {turn}"
            print(f"{label} prompt:  {prompt!r}")
            print(f"{label} answer:  {answer!r}")


if __name__ == "__main__":
    run_main(main)
