"""Requests preempted while decoding, through HTTP: same answers as a roomy pool.

python -m loadtest.preemption [--model DIR] [--requests 16] [--max-tokens 300]
    [--small-kv-mib N] [--roomy-kv-mib N] [--enforce-eager] [--out results/preemption.json]

The offline scenario of tests/test_preemption.py (issue 23), served. On the
`bench` checkpoint (built if absent) in fp32, `--requests` image chats are
sent at once, each with ~500 tokens of text before its image (170 words of
the generator's `context_words`), a fresh synthetic image (its own seed),
greedy, `--max-tokens` tokens with ignore_eos, and the top 2 logprobs of
every token. The pruning presets take turns (none, fastv, feather,
pyramiddrop). The engine steps at most 700 tokens (text + image + tail
never fit one step: prompts are prefilled in chunks) and its KV pool is
small, so requests are preempted while decoding and recomputed. Each run
gets a fresh server process, one after the other:

  gateway, roomy pool            reference for the next two
  gateway, small pool, prefix caching off
  gateway, small pool, prefix caching on (vLLM's default)
  vLLM's own server, roomy pool  reference for the next (the plugin off:
                                 `VLLM_PLUGINS=feather_cpu_compat`; the
                                 same prompts without `feather`)
  vLLM's own server, small pool (prefix caching on, its default)

For each run it prints the engine's preemptions (Prometheus counter
`vllm:num_preemptions_total`, read from /metrics once every answer is in),
the requests that failed (not 200, an error in the stream, or a stream
without a finish reason) and the answers that differ from the reference's.
A difference at a numerical near-tie is not counted but shown apart: at
the first token where the answers part, the reference's logprobs of the two
tokens are within 1e-3 (fp32: a recompute's batch shapes may flip such an
argmax, and the rest of the answer then legitimately differs). Answers are
compared by token id (`return_token_ids`), each with its logprobs. Writes
JSON to --out, the servers' logs beside it.

The default pools are sized in KV blocks from the checkpoint's config and
the prompt the first run reports (1089 tokens on bench): the small one
holds three prompts and not their answers (three requests are admitted,
then one is preempted as they decode), the roomy one every request's whole
answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loadtest.benchmark import Server, free_port
from loadtest.generator import LoadConfig, chat_body, synthetic_image_url

PRESETS = ("none", "fastv", "feather", "pyramiddrop")
NEAR_TIE = 1e-3  # as tests/test_preemption.py
CONTEXT_WORDS = 170  # ~500 tokens of text before the image with the bench tokenizer
BATCH_TOKENS = 700  # --max-num-batched-tokens: text + image + tail never fit one step
BLOCK_SIZE = 32
MAX_NUM_SEQS = 16
PREEMPTIONS = "vllm:num_preemptions_total"  # vLLM 0.32's counter `vllm:num_preemptions`, as exposed
FLOAT32_BYTES = 4
SMALL_POOL_PROMPTS = 3  # the small pool holds this many prompts, not their answers

T = TypeVar("T", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where an answer first leaves the reference's."""

    index: int
    gap: float | None  # the two tokens' logprob difference in the reference; None: not both among its candidates

    @property
    def near_tie(self) -> bool:
        return self.gap is not None and self.gap < NEAR_TIE


def first_divergence(got: Sequence[T], want: Sequence[T], want_top: Sequence[Mapping[T, float]]) -> Divergence | None:
    """The first token where `got` leaves the reference answer `want`, with
    the reference's logprob gap there between its token and `got`'s (from
    `want_top`, its top_logprobs per step). None: the answers are equal.
    An answer that stops early leaves the other where it stops (no gap)."""
    index = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if index is None:
        return None if len(got) == len(want) else Divergence(min(len(got), len(want)), None)
    candidates = want_top[index] if index < len(want_top) else {}
    if got[index] in candidates and want[index] in candidates:
        return Divergence(index, abs(candidates[got[index]] - candidates[want[index]]))
    return Divergence(index, None)


@dataclasses.dataclass
class Answer:
    """One streamed chat: its token ids and each step's top candidates (id: logprob)."""

    preset: str | None
    error: str | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    top: list[dict[int, float]] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    fallback: Any = None  # the gateway's pruning report: why this request ran unpruned, if it did

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class Run:
    """One server process and the load it gets."""

    name: str
    stock: bool  # vLLM's own server with the plugin off, else the gateway
    pool: str  # "roomy" or "small"
    prefix_caching: bool
    reference: str | None = None  # the run whose answers this one's must equal


def kv_bytes_per_token(model: str) -> int:
    """fp32 KV of one token in every decoder layer, from the checkpoint's config."""
    text = json.loads((Path(model) / "config.json").read_text())["text_config"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * text.get("num_key_value_heads", heads) * head_dim * FLOAT32_BYTES


def bodies(url: str, requests: int, max_tokens: int, pruned: bool) -> list[dict[str, Any]]:
    """The scenario's chats: presets in turn (`pruned` False: none named),
    a fresh image each, greedy, the top 2 logprobs of every token."""
    cfg = LoadConfig(url=url, model="bench", max_tokens=max_tokens, context_words=CONTEXT_WORDS)
    return [chat_body(cfg, synthetic_image_url(cfg.image_size, i), PRESETS[i % len(PRESETS)] if pruned else None)
            | {"logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True, "return_token_ids": True}
            for i in range(requests)]


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> Answer:
    """One chat's answer. Tokens come from `token_ids` (return_token_ids):
    a chunk carries them for every engine output, where the gateway sends
    no chunk (so none of its logprobs) for a token whose text is still
    empty (a partial UTF-8 character, a special token)."""
    answer = Answer(preset=(body.get("feather") or {}).get("preset"))
    finished = False
    entries = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                answer.error = f"HTTP {response.status_code}: {text}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    answer.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return answer
                for choice in chunk.get("choices", []):
                    answer.tokens += choice.get("token_ids") or []
                    for entry in (choice.get("logprobs") or {}).get("content") or []:
                        entries += 1
                        answer.top.append({_token_id(c["token"]): c["logprob"] for c in entry["top_logprobs"]})
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    answer.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("feather"):
                    answer.fallback = chunk["feather"].get("fallback")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        answer.error = f"{type(e).__name__}: {e}"
        return answer
    if not finished:
        answer.error = "stream ended without a finish_reason"
    elif entries != len(answer.tokens):
        answer.error = f"logprobs for {entries} of {len(answer.tokens)} tokens"
    return answer


async def _preemptions(client: httpx.AsyncClient) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families((await client.get("/metrics")).text) for s in f.samples]
    found = [s.value for s in samples if s.name == PREEMPTIONS]
    if not found:
        names = sorted({s.name for s in samples if "preempt" in s.name})
        raise RuntimeError(f"no {PREEMPTIONS} on /metrics (preemption metrics there: {names})")
    return int(sum(found))


async def send_all(url: str, requests: list[dict[str, Any]]) -> tuple[list[Answer], int]:
    """Every chat at once; the answers in request order and the engine's preemptions after."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        answers = await asyncio.gather(*(_stream(client, body) for body in requests))
        return list(answers), await _preemptions(client)


def start(run: Run, kv_bytes: int, model: str, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    flags = ["--model", model, "--served-model-name", "bench", "--port", str(port), "--dtype", "float32",
             "--kv-cache-memory-bytes", str(kv_bytes), "--block-size", str(BLOCK_SIZE),
             "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(MAX_NUM_SEQS),
             "--max-num-batched-tokens", str(BATCH_TOKENS),
             "--enable-prefix-caching" if run.prefix_caching else "--no-enable-prefix-caching",
             *(["--enforce-eager"] if args.enforce_eager else [])]
    log = logs / f"{run.name.replace(' ', '_').replace(',', '')}.log"
    if run.stock:  # the plugin off, only its CPU-machine import shim: vLLM as a user without feather-vllm runs it
        server = Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags], log, port,
                        env={"VLLM_PLUGINS": "feather_cpu_compat"})
    else:
        server = Server([sys.executable, "-m", "server", *flags], log, port)
    try:
        server.wait(timeout=1800)  # a loaded machine, compiling
    except BaseException:
        server.stop()
        raise
    return server


def compare(answers: list[Answer], reference: list[Answer] | None) -> list[Divergence | None]:
    """Per request, where its answer leaves the reference's (None: equal,
    failed, or no reference to compare with)."""
    if reference is None:
        return [None] * len(answers)
    return [first_divergence(got.tokens, want.tokens, want.top) if got.ok and want.ok else None
            for got, want in zip(answers, reference)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def pool_bytes(blocks: int, model: str) -> int:
    """A KV pool of `blocks` blocks in every layer, plus the one vLLM keeps back."""
    return (blocks + 1) * BLOCK_SIZE * kv_bytes_per_token(model)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| server | KV pool | prefix caching | preemptions | failed | differing | near-ties |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        compared = r["reference"] is not None
        lines.append(f"| {r['name']} | {_mib(r['kv_bytes'])} | {'on' if r['prefix_caching'] else 'off'} "
                     f"| {r['preemptions']} | {r['failed']}/{len(r['requests'])} "
                     f"| {r['differing'] if compared else 'reference'} | {r['near_ties'] if compared else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.preemption", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: the bench checkpoint, built if absent)")
    parser.add_argument("--out", type=Path, default=Path("results/preemption.json"))
    parser.add_argument("--requests", type=int, default=16, help="chats sent at once (presets in turn)")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--max-model-len", type=int, default=1408,
                        help="at least the prompt (1089 tokens on bench) + --max-tokens")
    parser.add_argument("--small-kv-mib", type=float,
                        help=f"the small pool (default: the blocks of {SMALL_POOL_PROMPTS} prompts)")
    parser.add_argument("--roomy-kv-mib", type=float, help="the reference pool (default: every request at once)")
    parser.add_argument("--enforce-eager", action="store_true", help="every server eager (vLLM's default compiles)")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from feather_vllm.tools.checkpoints import ensure_checkpoint

        model = str(ensure_checkpoint("bench", "checkpoints/bench"))
    blocks = math.ceil(args.max_model_len / BLOCK_SIZE)
    pools = {"roomy": int(args.roomy_kv_mib * 2**20) if args.roomy_kv_mib else
             pool_bytes(args.requests * blocks, model)}
    runs = [Run("gateway, roomy pool", False, "roomy", False),  # first: its prompt sizes the small pool
            Run("gateway, small pool", False, "small", False, "gateway, roomy pool"),
            Run("gateway, small pool, prefix caching", False, "small", True, "gateway, roomy pool"),
            Run("vLLM, roomy pool", True, "roomy", False),
            Run("vLLM, small pool, prefix caching", True, "small", True, "vLLM, roomy pool")]
    logs = args.out.parent / "preemption_logs"
    logs.mkdir(parents=True, exist_ok=True)

    started = time.time()
    answers: dict[str, list[Answer]] = {}
    results: list[dict[str, Any]] = []
    for run in runs:
        if run.pool not in pools:  # never below one request of --max-model-len: vLLM would refuse it
            prompt = max(a.prompt_tokens for a in answers[runs[0].name])
            pools["small"] = int(args.small_kv_mib * 2**20) if args.small_kv_mib else \
                pool_bytes(max(SMALL_POOL_PROMPTS * math.ceil(prompt / BLOCK_SIZE), blocks), model)
        t0 = time.time()
        server = start(run, pools[run.pool], model, args, logs)
        try:
            answers[run.name], preemptions = asyncio.run(
                send_all(server.url, bodies(server.url, args.requests, args.max_tokens, pruned=not run.stock)))
        finally:
            server.stop()
        divergences = compare(answers[run.name], answers[run.reference] if run.reference else None)
        results.append({
            **dataclasses.asdict(run), "kv_bytes": pools[run.pool], "preemptions": preemptions,
            "wall_s": time.time() - t0,
            "failed": sum(not a.ok for a in answers[run.name]),
            "differing": sum(d is not None and not d.near_tie for d in divergences),
            "near_ties": sum(d is not None and d.near_tie for d in divergences),
            "requests": [{"preset": a.preset, "error": a.error, "fallback": a.fallback,
                          "divergence": dataclasses.asdict(d) if d else None,
                          "prompt_tokens": a.prompt_tokens, "tokens": a.tokens}
                         for a, d in zip(answers[run.name], divergences)],
        })
        print(f"{run.name}: {results[-1]['preemptions']} preemptions, {results[-1]['failed']} failed "
              f"({results[-1]['wall_s']:.0f} s)", flush=True)

    print(table(results))
    minutes = (time.time() - started) / 60
    print(f"wall time {minutes:.1f} min; results in {args.out}, server logs in {logs}/")
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "model": model,
                     "small_kv_bytes": pools["small"], "roomy_kv_bytes": pools["roomy"],
                     "max_num_batched_tokens": BATCH_TOKENS,
                     "block_size": BLOCK_SIZE, "max_num_seqs": MAX_NUM_SEQS, "context_words": CONTEXT_WORDS,
                     "near_tie": NEAR_TIE},
        "minutes": minutes, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
