"""Chunked prefill while pruning, under a mixed load, side by side in one run.

python -m loadtest.chunked_prefill [--model DIR] [--requests 200] [--out results/]

Starts the gateway on the `bench` checkpoint twice, one after the other
(never sharing the machine): with vLLM's default scheduling (chunked
prefill on, the OpenAI server's default step budget) and with
`--no-enable-chunked-prefill` (vLLM's budget then fits the model's whole
context). Each gets the same closed-loop load: half image chats with
`feather` pruning, half long text prompts (510 words: about 1,500 tokens
with the project's checkpoints' tokenizer; the output gives the count),
streamed. It prints
the pruning fallback rate (from each image chat's report), and the
inter-token latency of every request (p50/p99), chunked vs not.

Then the KV a two-image chat holds under `feather` against the same chat
unpruned, from the engine's own gauge (`vllm:kv_cache_usage_perc`, read
while it decodes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.benchmark import Server, free_port, kv_held_while_decoding
from loadtest.generator import LoadConfig, run_load, summarize, synthetic_image_url

KV_BYTES = 2 * 2**30


def start_gateway(model: str, out: Path, name: str, *flags: str, enforce_eager: bool) -> Server:
    port = free_port()
    server = Server([sys.executable, "-m", "server", "--model", model, "--served-model-name", "bench",
                     "--port", str(port), "--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES),
                     "--max-waiting-requests", "512", "--no-enable-prefix-caching",
                     *(["--enforce-eager"] if enforce_eager else []), *flags],
                    out / f"gateway_{name}.log", port)
    try:
        server.wait()
    except BaseException:
        server.stop()
        raise
    return server


def mixed_load(url: str, requests: int, concurrency: int, max_tokens: int, text_words: int) -> LoadConfig:
    return LoadConfig(url=url, model="bench", presets=["feather"], kinds=["image", "text"], requests=requests,
                      concurrency=concurrency, max_tokens=max_tokens, text_words=text_words)


def fallbacks(results: list[Any]) -> dict[str, int]:
    """Image chats by pruning outcome: pruned, or the fallback's reason."""
    out: dict[str, int] = {}
    for r in results:
        if r.kind == "image" and r.ok:
            reason = ((r.feather or {}).get("fallback") or {}).get("reason", "pruned")
            out[reason] = out.get(reason, 0) + 1
    return out


async def kv_held_two_images(url: str, preset: str, max_tokens: int = 32) -> float:
    """vllm:kv_cache_usage_perc while one two-image chat decodes (after its
    8th token)."""
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "feather": {"preset": preset},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": synthetic_image_url(336, 0)}},
                {"type": "text", "text": "Left."},
                {"type": "image_url", "image_url": {"url": synthetic_image_url(336, 1)}},
                {"type": "text", "text": "Where is the red square?"}]}]}
    return await kv_held_while_decoding(url, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chunked_prefill", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the bench checkpoint, built if absent)")
    parser.add_argument("--out", type=Path, default=Path("results/chunked_prefill"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--text-words", type=int, default=510, help="words per text prompt (~3 tokens each)")
    parser.add_argument("--enforce-eager", action="store_true", help="both gateways eager (faster start-up)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from feather_vllm.tools.checkpoints import ensure_checkpoint

        model = str(ensure_checkpoint("bench", "checkpoints/bench"))

    runs: dict[str, dict[str, Any]] = {}
    kv: dict[str, float] = {}
    started = time.time()
    for name, flags in (("chunked", ()), ("unchunked", ("--no-enable-chunked-prefill",))):
        server = start_gateway(model, args.out, name, *flags, enforce_eager=args.enforce_eager)
        try:
            if name == "chunked":
                for preset in ("none", "feather"):
                    kv[preset] = asyncio.run(kv_held_two_images(server.url, preset))
            results = asyncio.run(run_load(mixed_load(server.url, args.requests, args.concurrency,
                                                      args.max_tokens, args.text_words)))
        finally:
            server.stop()
        runs[name] = {"summary": summarize(results), "pruning": fallbacks(results),
                      "text_prompt_tokens": max((r.prompt_tokens for r in results if r.kind == "text"), default=0)}

    text_tokens = runs["chunked"]["text_prompt_tokens"]
    lines = [f"mixed load: {args.requests} requests (half image chats with feather, half {text_tokens}-token "
             f"text prompts), concurrency {args.concurrency}, {args.max_tokens} tokens each"]
    for name, run in runs.items():
        s, pruning = run["summary"], run["pruning"]
        images = sum(pruning.values())
        fallback = images - pruning.get("pruned", 0)
        lines.append(f"  {name:9s}: fallbacks {fallback}/{images} {pruning}, ITL p50 {s['itl_s']['p50'] * 1e3:.1f} ms, "
                     f"p99 {s['itl_s']['p99'] * 1e3:.1f} ms, TTFT p50 {s['ttft_s']['p50']:.2f} s, "
                     f"errors {s['errors'] or 0}")
    ratio = runs["chunked"]["summary"]["itl_s"]["p99"] / runs["unchunked"]["summary"]["itl_s"]["p99"]
    lines.append(f"  ITL p99 chunked / unchunked: {ratio:.2f}x")
    lines.append(f"two-image chat, KV held while decoding (engine gauge): none {kv['none'] * 100:.2f}%, "
                 f"feather {kv['feather'] * 100:.2f}% ({kv['feather'] / kv['none']:.2f}x)")
    text = "\n".join(lines)
    print(text)
    (args.out / "chunked_prefill.json").write_text(json.dumps(
        {"runs": runs, "kv_two_images": kv, "itl_p99_ratio": ratio, "minutes": (time.time() - started) / 60,
         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
