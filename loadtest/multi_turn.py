"""Multi-turn chats about one image: what each turn costs per setting.

python -m loadtest.multi_turn [--model DIR] [--out results/] [--rounds 5] [--max-tokens 32] [--seed N]
    [--settings none,fastv,fastv+reuse,feather,pyramiddrop]
python -m loadtest.multi_turn --url http://127.0.0.1:8000 [--served-model-name NAME] [--api-key KEY]

Starts the gateway on the `bench` checkpoint (built if absent) with the
benchmark's engine settings (loadtest.benchmark) but prefix caching ON,
vLLM's default, as a chat service runs it; or, with --url, uses a running
server. Each conversation is 3 turns about one fresh image: turn 1 the
image and a question, turn k the whole history (earlier questions and the
replies they got) and a new question. Conversations run one at a time,
settings interleaved round by round (default: none, fastv, feather,
pyramiddrop, each with its preset's follow-up policy; "fastv+reuse" is
fastv with `"follow_up": "reuse"`) so that machine noise hits all alike,
after one unrecorded warm-up conversation per setting. Per setting and
turn:
  - TTFT (streamed: sending to the first content chunk), median, and its
    ratio to `none`'s at the same turn;
  - KV held: the gateway's report (`kv_blocks.used` / `unpruned`) and the
    engine's own gauge (`vllm:kv_cache_usage_perc`) read once the turn's
    first token has come, while it decodes alone (no reading where the
    engine runs no request by then);
  - prompt tokens, and how many the engine served from its prefix cache
    (`vllm:prefix_cache_hits` during the turn);
  - turns the report says were served from a pruned image's cache (its
    `reused`; a report without the field counts as not reused), and of
    those, how many kept turn 1's kept set (`reused.kept_from`); turns
    whose cut kept an earlier turn's kept set too (`united`).
Prints the table and writes multi_turn.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.benchmark import PRESETS, Server, _samples, gateway_server, stream_chat
from loadtest.generator import synthetic_image_url

QUESTIONS = ("Where is the red square?", "What colour is the square?", "Is the square nearer the top or the bottom?")
# The KV gauge is read after this many output chunks of a turn (the role
# chunk, then the first token): its prompt's KV is all held, and the rest
# of the turn's decoding leaves time to read the gauge before it ends.
GAUGE_AFTER = 2


async def _counter(client: httpx.AsyncClient, name: str) -> float:
    """The engine's counter `name` (summed over its labels)."""
    return sum(s.value for s in await _samples(client, name) if s.name.endswith("_total"))


async def prefix_caching(client: httpx.AsyncClient) -> bool | None:
    """Whether the engine caches prefixes (its `vllm:cache_config_info`); None if it does not say."""
    for sample in await _samples(client, "vllm:cache_config_info"):
        if "enable_prefix_caching" in sample.labels:
            return sample.labels["enable_prefix_caching"] == "True"
    return None


def feather_setting(name: str) -> dict[str, Any]:
    """The `feather` field a setting name stands for: "preset",
    "preset+follow_up" or "preset+add_back@share" (the share added back)."""
    preset, _, follow_up = name.partition("+")
    follow_up, _, share = follow_up.partition("@")
    out: dict[str, Any] = {"preset": preset}
    if follow_up:
        out["follow_up"] = follow_up
    if share:
        out["add_back"] = float(share)
    return out


async def conversation(client: httpx.AsyncClient, model: str, preset: str, image_url: str, max_tokens: int,
                       questions: tuple[str, ...] = QUESTIONS) -> list[dict[str, Any]]:
    """One conversation under setting `preset` (`feather_setting`), turn
    after turn; per turn what it cost."""
    messages: list[dict[str, Any]] = []
    turns = []
    for k, question in enumerate(questions):
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if k == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        messages.append({"role": "user", "content": content})
        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True,  # a chunk per token, text or not: the gauge's count
                "feather": feather_setting(preset)}
        hits = await _counter(client, "vllm:prefix_cache_hits")
        reply = await stream_chat(client, body, gauge_after=GAUGE_AFTER)
        hits = await _counter(client, "vllm:prefix_cache_hits") - hits
        if reply.ttft is None or reply.usage is None:
            raise RuntimeError(f"{preset} turn {k + 1}: no content or no usage in the stream")
        report = reply.feather or {}
        turns.append({"id": reply.id, "ttft_s": reply.ttft, "prompt_tokens": reply.usage["prompt_tokens"],
                      "prefix_cache_hit_tokens": hits, "kv_blocks": report.get("kv_blocks"),
                      "kv_usage_perc": reply.kv_usage, "reused": report.get("reused"),
                      "united": report.get("united"), "fallback": report.get("fallback")})
        messages.append({"role": "assistant", "content": reply.text})
    return turns


async def measure(url: str, model: str, rounds: int, max_tokens: int, seed: int, api_key: str | None = None,
                  presets: list[str] = PRESETS) -> tuple[list[dict[str, Any]], bool | None]:
    """Every recorded conversation (round, preset, image seed and its
    turns), and whether the engine caches prefixes. Images are seeded from
    `seed` on, one per conversation: a run's turn 1 never finds its image
    in the prefix cache (unless an earlier run on the server had the same
    `seed`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        caching = await prefix_caching(client)
        for i, preset in enumerate(presets):  # first requests pay one-off costs
            await conversation(client, model, preset, synthetic_image_url(336, seed + i), max_tokens)
        for r in range(rounds):
            for i, preset in enumerate(presets):  # interleaved: noise hits every preset alike
                image_seed = seed + (r + 1) * len(presets) + i
                turns = await conversation(client, model, preset, synthetic_image_url(336, image_seed), max_tokens)
                out.append({"round": r, "preset": preset, "image_seed": image_seed, "turns": turns})
    return out, caching


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(conversations: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per preset, per turn: medians over conversations, ratios to `none`
    at the same turn, turns served from a pruned cache."""
    by: dict[str, list[list[dict[str, Any]]]] = {}
    for c in conversations:
        by.setdefault(c["preset"], []).append(c["turns"])
    out: dict[str, list[dict[str, Any]]] = {}
    for preset, runs in by.items():
        out[preset] = []
        for k in range(len(runs[0])):
            turns = [run[k] for run in runs]
            blocks = [t["kv_blocks"] for t in turns if t["kv_blocks"]]
            out[preset].append({
                "n": len(turns),
                "ttft_s": _median([t["ttft_s"] for t in turns]),
                "prompt_tokens": _median([t["prompt_tokens"] for t in turns]),
                "prefix_cache_hit_tokens": _median([t["prefix_cache_hit_tokens"] for t in turns]),
                "kv_blocks_used": _median([b["used"] for b in blocks]),
                "kv_blocks_unpruned": _median([b["unpruned"] for b in blocks]),
                "kv_usage_perc": _median([t["kv_usage_perc"] for t in turns]),
                "kv_usage_readings": sum(t["kv_usage_perc"] is not None for t in turns),
                "reused": sum(bool(t["reused"]) for t in turns),
                # reused turns whose kept set the report says turn 1 decided
                "kept_from_turn1": sum(bool(t["reused"]) and t["reused"].get("kept_from") == run[0]["id"]
                                       for t, run in zip(turns, runs)),
                # reused turns that added back image tokens turn 1 dropped (follow_up add_back)
                "added_back": sum(bool(t["reused"]) and bool(t["reused"].get("added")) for t in turns),
                "united": sum(bool(t.get("united")) for t in turns),
                "fallbacks": sum(bool(t["fallback"]) for t in turns)})
    base = out.get("none")
    for turns in out.values():
        for k, t in enumerate(turns):
            ref = base[k] if base is not None else {}
            for key in ("ttft_s", "kv_usage_perc"):
                t[f"{key}_x_none"] = t[key] / ref[key] if t[key] is not None and ref.get(key) else None
    return out


def report(summary: dict[str, list[dict[str, Any]]]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'setting':<17} {'turn':>4} {'prompt tok':>10} {'TTFT ms':>8} {'x none':>7}   "
             f"{'KV blocks used/unpruned':>23} {'KV gauge %':>10} {'x none':>7}   "
             f"{'prefix-cache hits':>17} {'pruned reuse':>12} {'kept from t1':>12} {'added back':>10} "
             f"{'kept both':>9}"]
    for preset, turns in summary.items():
        for k, t in enumerate(turns):
            blocks = f"{num(t['kv_blocks_used'], '.0f')}/{num(t['kv_blocks_unpruned'], '.0f')}"
            ttft = None if t["ttft_s"] is None else 1000 * t["ttft_s"]
            gauge = None if t["kv_usage_perc"] is None else 100 * t["kv_usage_perc"]
            lines.append(f"{preset:<17} {k + 1:>4} {num(t['prompt_tokens'], '.0f'):>10} {num(ttft, '.0f'):>8} "
                         f"{num(t['ttft_s_x_none'], '.2f'):>7}   {blocks:>23} {num(gauge, '.3f'):>10} "
                         f"{num(t['kv_usage_perc_x_none'], '.2f'):>7}   "
                         f"{num(t['prefix_cache_hit_tokens'], '.0f'):>17} {'{}/{}'.format(t['reused'], t['n']):>12}"
                         f" {t['kept_from_turn1']:>12} {t['added_back']:>10} {t['united']:>9}")
    if not any(t["reused"] for turns in summary.values() for t in turns):
        lines.append("no turn was served from a pruned image's cache (no `reused` in the reports): follow-up turns "
                     "re-prefill their image (unpruned prefix caching aside)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.multi_turn", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: build the bench profile)")
    parser.add_argument("--url", help="use this running server instead of starting the gateway")
    parser.add_argument("--served-model-name", default="bench", help="the model name requests carry (with --url)")
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settings", default=",".join(PRESETS),
                        help="comma-separated: a preset, preset+follow_up (reuse, add_back, reselect, keep_both), "
                             "or preset+add_back@share (the share of each image added back)")
    parser.add_argument("--max-tokens", type=int, default=32,
                        help=f"per turn (more than {GAUGE_AFTER}: the KV gauge is read while the turn decodes)")
    parser.add_argument("--seed", type=int, help="first image seed (default: random, so that no image is "
                                                 "already in a running server's prefix cache)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.6)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="no compilation (vLLM's default compiles)")
    parser.add_argument("--dtype", default="auto", help="vLLM's default: bf16 on CPUs")
    args = parser.parse_args(argv)
    if args.max_tokens <= GAUGE_AFTER:
        parser.error(f"--max-tokens must be more than {GAUGE_AFTER} (the KV gauge is read after that many)")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    server: Server | None = None
    model = args.model
    url, served = args.url, args.served_model_name
    if url is None:
        if model is None:
            from feather_vllm.tools.checkpoints import ensure_checkpoint

            model = str(ensure_checkpoint("bench", "checkpoints/bench"))
        server = gateway_server(model, args.out / "multi_turn_gateway.log", args.kv_cache_gib, args.block_size,
                                max_num_seqs=4, enforce_eager=args.enforce_eager, dtype=args.dtype,
                                prefix_caching=True)
        url, served = server.url, "bench"
    try:
        if server is not None:
            server.wait()
        conversations, caching = asyncio.run(measure(url, served, args.rounds, args.max_tokens, args.seed,
                                                     args.api_key, args.settings.split(",")))
    finally:
        if server is not None:
            server.stop()
    summary = summarize(conversations)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "settings": vars(args) | {"model": model, "url": args.url, "out": str(args.out),
                                        "questions": list(QUESTIONS), "prefix_caching": caching},
              "wall_s": time.time() - started, "summary": summary, "conversations": conversations}
    (args.out / "multi_turn.json").write_text(json.dumps(result, indent=2, default=str))
    print(report(summary))
    if caching is not True:
        print(f"the engine's prefix caching is {'off' if caching is False else 'not reported'}: "
              "follow-up turns recompute their whole history")
    print(f"wall time {result['wall_s'] / 60:.1f} min; results in {args.out}/multi_turn.json")


if __name__ == "__main__":
    main()
