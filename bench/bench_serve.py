"""openai_api.py under load vs the plain transformers generate loop, on the same model, prompts and token counts.

    python bench/bench_serve.py                                    # SmolLM2-135M-Instruct in models/, 64 new tokens
    python bench/bench_serve.py --model models/SmolLM2-135M-Instruct --new_tokens 32 --concurrency 1 4 16

For each concurrency C (C clients, each sending its share of the requests one after another) it reports time to
first token (median, p90), tokens/s of one stream (C = 1) and aggregate tokens/s (all generated tokens / wall
time), and each side's peak RSS. Both sides run in their own fresh process with the same torch thread count:

* server: ``openai_api.py`` (batched engine), streamed requests over HTTP from asyncio clients (httpx), every
  request with ``ignore_eos`` so each answer is exactly ``--new_tokens`` tokens;
* baseline: one ``model.generate`` per request, one after another (what a server without batching does), on the
  same prompt ids (:func:`medtrain.generation.prompt_ids`), eos ignored the same way; time to first token from a
  streamer, queueing included (request i of a burst of C waits for the ones before it).

Order: baseline, server (one round; pass --rounds 2 to alternate again). The CPU model, flags and load average are
recorded next to the figures; on a shared machine compare only ratios within one run. Results: bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import environment, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "data" / "prompts" / "heldout_questions.jsonl"


def prompts(count: int) -> list[list[dict]]:
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line]
    return [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(count)]


def summarize(ttfts: list[float], tokens: int, wall: float) -> dict:
    ttfts = sorted(ttfts)
    return {"requests": len(ttfts), "tokens": tokens, "wall_s": round(wall, 3),
            "ttft_median_s": round(statistics.median(ttfts), 3),
            "ttft_p90_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 3),
            "tokens_per_s": round(tokens / wall, 2)}


# --------------------------------------------------------------------------------------------------------------
# Baseline: the plain generate loop (runs in a child process)


def run_baseline(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    sys.path.insert(0, str(ROOT))
    from medtrain.chat_format import resolve_chat_format
    from medtrain.generation import prompt_ids

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    chat_format = resolve_chat_format(tokenizer, [args.model], None, None)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[],
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt, call 2 the first new token
                self.first = time.perf_counter()

        def end(self):
            pass

    results = {}
    for concurrency in args.concurrency:
        work = [prompt_ids(tokenizer, chat_format, m) for m in prompts(args.requests_per_client * concurrency)]
        with torch.no_grad():
            model.generate(torch.tensor([work[0]]), generation_config=config)  # warm-up
            # C clients, each sending its next request when its previous answer ended; served one at a time in
            # arrival order (FIFO), so time to first token includes the wait behind other clients' requests
            start = time.perf_counter()
            queue = [(start, k, 0) for k in range(concurrency)]
            ttfts, tokens = [], 0
            while queue:
                arrival, k, j = queue.pop(0)
                ids = work[k * args.requests_per_client + j]
                streamer = FirstToken()
                out = model.generate(torch.tensor([ids]), generation_config=config, streamer=streamer)
                ttfts.append(streamer.first - arrival)
                tokens += out.shape[1] - len(ids)
                if j + 1 < args.requests_per_client:
                    queue.append((time.perf_counter(), k, j + 1))
            wall = time.perf_counter() - start
        results[concurrency] = summarize(ttfts, tokens, wall)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


# --------------------------------------------------------------------------------------------------------------
# Server: openai_api.py in a child process, asyncio clients here


async def stream_one(client, url: str, name: str, messages: list[dict], new_tokens: int) -> tuple[float, int]:
    """One streamed request: (seconds to the first content chunk, completion tokens from the usage chunk)."""
    body = {"model": name, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), tokens


async def load_server(url: str, name: str, concurrency: int, requests_per_client: int, new_tokens: int) -> dict:
    import httpx

    work = prompts(concurrency * requests_per_client)

    async def client_loop(client, k: int):
        out = []
        for j in range(requests_per_client):
            out.append(await stream_one(client, url, name, work[k * requests_per_client + j], new_tokens))
        return out

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await stream_one(client, url, name, work[0], 4)  # warm-up
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(client, k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    return summarize([r[0] for r in results], sum(r[1] for r in results), wall)


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def run_server(args: argparse.Namespace) -> dict:
    command = [sys.executable, str(ROOT / "openai_api.py"), "--model_name_or_path", args.model, "--port", "0",
               "--num_threads", str(args.threads), "--max_batch_size", str(max(args.concurrency)),
               "--max_tokens_limit", str(args.new_tokens)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        url = None
        for line in process.stdout:
            if "Uvicorn running on http://" in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
                break
        if url is None:
            raise RuntimeError("the server did not start")
        import httpx

        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        results = {}
        for concurrency in args.concurrency:
            results[concurrency] = asyncio.run(load_server(url, name, concurrency, args.requests_per_client,
                                                           args.new_tokens))
        results["peak_rss_mb"] = peak_rss_mb(process.pid)
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=["baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "baseline":
        print("RESULT " + json.dumps(run_baseline(args)), flush=True)
        return

    record = {"environment": environment(), "args": vars(args), "rounds": []}
    for _ in range(args.rounds):
        child = subprocess.run([sys.executable, __file__, "--child", "baseline", "--model", args.model,
                                "--new_tokens", str(args.new_tokens), "--requests_per_client",
                                str(args.requests_per_client), "--threads", str(args.threads), "--concurrency",
                                *map(str, args.concurrency)], capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"baseline failed:\n{child.stderr[-3000:]}")
        baseline = json.loads(line[7:])
        server = run_server(args)
        record["rounds"].append({"baseline": baseline, "server": server, "loadavg_after": os.getloadavg()})
    record["uptime_after"] = load_average()

    print(f"environment: {json.dumps(record['environment'])}")
    env = record["environment"]
    print(f"{env['cpu_model']} ({env['cpu_count']} cores; {' '.join(env['precision_flags'])}), before: {env['uptime']}; "
          f"after: {record['uptime_after']}; shared machine")
    print(f"{'side':<9}{'clients':>8}{'requests':>9}{'TTFT med':>10}{'TTFT p90':>10}{'tok/s':>9}")
    for i, rnd in enumerate(record["rounds"]):
        for side in ("baseline", "server"):
            for c in args.concurrency:
                r = rnd[side][str(c)] if str(c) in rnd[side] else rnd[side][c]
                print(f"{side:<9}{c:>8}{r['requests']:>9}{r['ttft_median_s']:>10.3f}{r['ttft_p90_s']:>10.3f}"
                      f"{r['tokens_per_s']:>9.1f}")
            print(f"{side:<9} peak RSS {rnd[side]['peak_rss_mb']:.0f} MB (round {i + 1})")
    out = ROOT / "bench" / "results" / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
