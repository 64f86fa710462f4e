"""Pruned vs unpruned serving, measured side by side in one run.

python -m loadtest.benchmark [--model DIR] [--out results/] [--rounds 5]
    [--image-size 672 --max-model-len 4096 --ttft-only]

Starts the gateway on the `bench` checkpoint (built if absent) with a fixed
KV budget, and vLLM's own OpenAI server on the same checkpoint and settings
with the plugin switched off (`VLLM_PLUGINS=feather_cpu_compat`: stock
LLaVA, stock vLLM, only the CPU-machine import shim).
Both run vLLM's defaults: compiled (`--enforce-eager` turns that off for
both) and vLLM's default dtype (bf16 on CPUs; `--dtype` sets another).
Then it measures, with presets interleaved round by round so that machine
noise hits all alike:
  1. prefill time: TTFT at concurrency 1, and the engine's own prefill time
     of the same requests (vLLM's `vllm:request_prefill_time_seconds`: no
     HTTP, image decoding or image processor), for a short question after
     the image and for a long text before it;
  2. KV held by one image request, from each engine's own gauge
     (`vllm:kv_cache_usage_perc`), against vLLM's own server;
  3. decode: inter-token latency at concurrency 1 and 8 (a fresh image per request);
  4. saturated throughput: closed loop at high concurrency;
  5. max concurrent image requests at the fixed KV budget, observed from the
     engine (`vllm:num_requests_running`, sampled during 4.);
  6. the gateway's overhead: TTFT at concurrency 1 against vLLM's server.
Prints each as a ratio to `none` (or to vLLM) next to the cost model's
prediction, and writes JSON and plots. The checkpoint may be LLaVA-1.5 or
LLaVA-NeXT (`--image-size` sets the square images' side in pixels: a
672-pixel image is 2,928 NeXT tokens; the cost model then uses the image's
layout bounds); `--ttft-only` measures 1. and 6. only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.generator import LoadConfig, run_load, summarize
from loadtest.plots import plot_latency_vs_load, plot_presets

PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
MAX_MODEL_LEN = 2048  # default --max-model-len
# TTFT cases: words of text before the image (0: the image, then a short question).
TTFT_CASES = {"short": 0, "long_text_first": 170}
DECODE_CONCURRENCY = (1, 8)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, ready once /health answers 200."""

    def __init__(self, argv: list[str], log: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited, see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout} s, see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def gateway_server(model: str, log: Path, kv_gib: float, block_size: int, max_num_seqs: int,
                   enforce_eager: bool, dtype: str, prefix_caching: bool = False,
                   max_model_len: int = MAX_MODEL_LEN, step_tokens: int | None = None) -> Server:
    """The gateway on `model` served as `bench` (started, not yet waited
    for): the benchmark's engine settings; prefix caching off unless
    `prefix_caching` (the benchmark's rounds repeat one prompt)."""
    port = free_port()
    return Server([sys.executable, "-m", "server", "--model", model, "--served-model-name", "bench",
                   "--port", str(port), "--dtype", dtype,
                   "--kv-cache-memory-bytes", str(int(kv_gib * 2**30)),
                   "--block-size", str(block_size), "--max-model-len", str(max_model_len),
                   *_step_budget(step_tokens),
                   "--max-num-seqs", str(max_num_seqs), "--max-waiting-requests", "256",
                   *([] if prefix_caching else ["--no-enable-prefix-caching"]),
                   *(["--enforce-eager"] if enforce_eager else [])],
                  log, port)


def _step_budget(step_tokens: int | None) -> list[str]:
    """vLLM's flag for the step budget, unless vLLM's default is kept."""
    return [] if step_tokens is None else ["--max-num-batched-tokens", str(step_tokens)]


def start_servers(model: str, out: Path, kv_gib: float, block_size: int, max_num_seqs: int,
                  enforce_eager: bool, dtype: str, max_model_len: int = MAX_MODEL_LEN,
                  step_tokens: int | None = None) -> tuple[Server, Server]:
    vllm_port = free_port()
    eager = ["--enforce-eager"] if enforce_eager else []
    gateway = gateway_server(model, out / "gateway.log", kv_gib, block_size, max_num_seqs, enforce_eager, dtype,
                             max_model_len=max_model_len, step_tokens=step_tokens)
    # The plugin off (only its CPU-machine import shim, a no-op where
    # torchvision loads): vLLM's own server as a user without feather-vllm runs it.
    stock = Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--served-model-name", "bench", "--port", str(vllm_port), "--dtype", dtype,
                    *eager, "--kv-cache-memory-bytes", str(int(kv_gib * 2**30)),
                    "--block-size", str(block_size), "--max-model-len", str(max_model_len),
                    *_step_budget(step_tokens),
                    "--max-num-seqs", str(max_num_seqs), "--no-enable-prefix-caching"],
                   out / "vllm_server.log", vllm_port, env={"VLLM_PLUGINS": "feather_cpu_compat"})
    try:
        gateway.wait()
        stock.wait()
    except BaseException:  # neither server outlives a failed start
        gateway.stop()
        stock.stop()
        raise
    return gateway, stock


def _load(url: str, preset: str | None, *, requests: int, concurrency: int, max_tokens: int, image_size: int,
          context_words: int = 0) -> LoadConfig:
    return LoadConfig(url=url, model="bench", presets=[preset], requests=requests, concurrency=concurrency,
                      max_tokens=max_tokens, context_words=context_words, image_size=image_size)


async def _families(client: httpx.AsyncClient, *names: str) -> dict[str, list[Any]]:
    """The samples of the engine's metric families `names`, from one read of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    out: dict[str, list[Any]] = {name: [] for name in names}
    for family in text_string_to_metric_families(text):
        if family.name in out:
            out[family.name] += family.samples
    return out


async def _samples(client: httpx.AsyncClient, name: str) -> list[Any]:
    """The samples of the engine's metric family `name`, from /metrics."""
    return (await _families(client, name))[name]


async def _gauge(client: httpx.AsyncClient, name: str) -> float:
    return sum(s.value for s in await _samples(client, name))


PREFILL_METRIC = "vllm:request_prefill_time_seconds"  # the engine's: scheduled to first token


async def _histogram(client: httpx.AsyncClient, name: str) -> tuple[float, float]:
    """(sum, count) of the engine's histogram `name`."""
    samples = await _samples(client, name)
    return (sum(s.value for s in samples if s.name.endswith("_sum")),
            sum(s.value for s in samples if s.name.endswith("_count")))


async def _ttft_and_prefill(url: str, cfg: LoadConfig) -> tuple[float, float]:
    """One request's TTFT (client side) and its prefill time in the engine
    (vLLM's own histogram, read once the engine has recorded it): the part
    of TTFT that pruning can shorten, without HTTP, image decoding and the
    image processor."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        total, count = await _histogram(client, PREFILL_METRIC)
        (r,) = await run_load(cfg, progress=False)
        if r.status != 200:  # e.g. a prompt longer than --max-model-len: say so, not "no prefill time"
            raise RuntimeError(f"the measured request failed: {r.error}")
        for _ in range(100):
            after, after_count = await _histogram(client, PREFILL_METRIC)
            if after_count > count:
                return r.ttft, after - total
            await asyncio.sleep(0.02)
    raise RuntimeError(f"the engine recorded no prefill time for the request ({PREFILL_METRIC})")


@dataclasses.dataclass
class Streamed:
    """One streamed chat, as `stream_chat` read it."""

    ttft: float | None  # seconds from sending to the first chunk with content
    text: str  # the reply (choice 0)
    id: str | None  # the completion's id
    usage: dict[str, Any] | None
    feather: dict[str, Any] | None  # the gateway's pruning report
    kv_usage: float | None  # vllm:kv_cache_usage_perc while it decoded (`stream_chat`'s gauge_after)


async def kv_usage_while_running(client: httpx.AsyncClient) -> float | None:
    """vllm:kv_cache_usage_perc, or None where the engine says it runs no
    request (the one measured has ended: its KV is no longer held)."""
    read = await _families(client, "vllm:kv_cache_usage_perc", "vllm:num_requests_running")
    if not sum(s.value for s in read["vllm:num_requests_running"]):
        return None
    return sum(s.value for s in read["vllm:kv_cache_usage_perc"])


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any], gauge_after: int | None = None) -> Streamed:
    """Send the streamed chat `body`; with `gauge_after`, read the engine's
    KV gauge once that many output chunks have come (the role chunk
    included; a chunk that carries token ids counts one per token), unless
    the chat has ended by then."""
    out = Streamed(ttft=None, text="", id=None, usage=None, feather=None, kv_usage=None)
    chunks = 0
    begin = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = [c for c in chunk.get("choices") or [] if c.get("index", 0) == 0]
            content = "".join((c.get("delta") or {}).get("content") or "" for c in choices)
            if content and out.ttft is None:
                out.ttft = time.perf_counter() - begin
            out.text += content
            before = chunks
            chunks += sum(len(c.get("token_ids") or [None]) for c in choices)
            if gauge_after is not None and before < gauge_after <= chunks \
                    and not any(c.get("finish_reason") for c in choices):
                out.kv_usage = await kv_usage_while_running(client)
            out.id = out.id or chunk.get("id")
            out.usage = chunk.get("usage") or out.usage
            out.feather = chunk.get("feather") or out.feather
    return out


async def kv_held_while_decoding(url: str, body: dict[str, Any]) -> float:
    """Share of the engine's KV cache (vllm:kv_cache_usage_perc) the
    streamed chat `body` holds while it decodes alone, read after its 8th
    output chunk."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        held = (await stream_chat(client, body, gauge_after=8)).kv_usage
    if held is None:
        raise RuntimeError("the chat ended before its 8th output chunk was read")
    return held


async def _kv_held(url: str, preset: str | None, max_tokens: int, image_size: int) -> float:
    """KV held by one image chat while it decodes."""
    from loadtest.generator import chat_body, synthetic_image_url

    cfg = _load(url, preset, requests=1, concurrency=1, max_tokens=max_tokens, image_size=image_size)
    return await kv_held_while_decoding(url, chat_body(cfg, synthetic_image_url(cfg.image_size, 0), preset))


async def _peak_running(url: str, stop: asyncio.Event) -> int:
    """Highest `vllm:num_requests_running` the engine reports while a load runs."""
    from prometheus_client.parser import text_string_to_metric_families

    peak = 0
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            text = (await client.get("/metrics")).text
            for family in text_string_to_metric_families(text):
                if family.name == "vllm:num_requests_running":
                    peak = max(peak, int(sum(s.value for s in family.samples)))
            await asyncio.sleep(0.2)
    return peak


async def _saturate(url: str, preset: str, requests: int, concurrency: int, max_tokens: int, image_size: int):
    stop = asyncio.Event()
    watcher = asyncio.create_task(_peak_running(url, stop))
    results = await run_load(_load(url, preset, requests=requests, concurrency=concurrency,
                                   max_tokens=max_tokens, image_size=image_size), progress=False)
    stop.set()
    return results, await watcher


def predictions(model: str, image_size: int = 336) -> dict[str, dict[str, float]]:
    """The paper's cost model, as ratios to `none` for the bench prompt (an
    image of `image_size` pixels square: LLaVA-1.5's 576 tokens, or its
    NeXT layout's, at the layout's bounds; + 15 text tokens): prefill FLOPs
    per TTFT case (its text before the image counted with the checkpoint's
    tokenizer) and prompt KV."""
    from transformers import AutoConfig, AutoTokenizer

    from feather_vllm.pruning import config as pcfg
    from feather_vllm.pruning.cost import flops_ratio, kv_ratio
    from feather_vllm.pruning.layout import LayoutRule, layout_kept_per_stage_max
    from loadtest.generator import context_text

    config = AutoConfig.from_pretrained(model)
    text = config.text_config
    tokenizer = AutoTokenizer.from_pretrained(model)
    layout = LayoutRule.of(config).layout((image_size, image_size))
    n_image, n_text = layout.num_tokens, 15
    before = {case: len(tokenizer(context_text(words), add_special_tokens=False).input_ids) if words else 0
              for case, words in TTFT_CASES.items()}
    out = {}
    for preset in PRESETS:
        cfg = pcfg.resolve(preset)
        kept = layout_kept_per_stage_max(cfg, layout)
        kv = kv_ratio(cfg, text.num_hidden_layers, n_image, n_text, kept)
        out[preset] = {
            **{f"prefill_{case}": flops_ratio(cfg, text.num_hidden_layers, text.hidden_size,
                                              text.intermediate_size, n_image, n_text + before[case], kept)
               for case in TTFT_CASES},
            "kv": kv,
            "concurrency": 1 / kv,
        }
    return out


async def measure(gateway: Server, stock: Server, rounds: int, sat_requests: int, sat_concurrency: int,
                  max_tokens: int, image_size: int = 336, ttft_only: bool = False) -> dict[str, Any]:
    """Every measurement (1.-6.); with `ttft_only` the prefill and gateway-overhead ones."""
    load = functools.partial(_load, image_size=image_size)
    ttft = {case: {p: [] for p in PRESETS} for case in TTFT_CASES}
    prefill = {case: {p: [] for p in PRESETS} for case in TTFT_CASES}
    overhead = {"gateway": [], "vllm": []}
    # Warm both servers (first requests pay one-off costs).
    for url in (gateway.url, stock.url):
        await run_load(load(url, None, requests=2, concurrency=1, max_tokens=2), progress=False)
    for _ in range(rounds):
        for case, words in TTFT_CASES.items():
            for preset in PRESETS:  # interleaved: noise hits every preset alike
                t, engine = await _ttft_and_prefill(gateway.url, load(gateway.url, preset, requests=1, concurrency=1,
                                                                      max_tokens=4, context_words=words))
                ttft[case][preset].append(t)
                prefill[case][preset].append(engine)
        for name, url, preset in (("gateway", gateway.url, "none"), ("vllm", stock.url, None)):
            (r,) = await run_load(load(url, preset, requests=1, concurrency=1, max_tokens=4), progress=False)
            overhead[name].append(r.ttft)
    if ttft_only:
        return {"ttft_c1": ttft, "prefill_c1": prefill, "overhead_ttft_c1": overhead}
    kv_held: dict[str, list[float]] = {p: [] for p in [*PRESETS, "vllm"]}
    decode: dict[str, dict[int, list]] = {p: {c: [] for c in DECODE_CONCURRENCY} for p in [*PRESETS, "vllm"]}
    for _ in range(2):
        for name, url, preset in [*((p, gateway.url, p) for p in PRESETS), ("vllm", stock.url, None)]:
            kv_held[name].append(await _kv_held(url, preset, max_tokens=64, image_size=image_size))
            for concurrency in DECODE_CONCURRENCY:
                decode[name][concurrency] += await run_load(
                    load(url, preset, requests=concurrency, concurrency=concurrency, max_tokens=max_tokens),
                    progress=False)
    saturated: dict[str, list] = {p: [] for p in PRESETS}
    peaks = {p: 0 for p in PRESETS}
    for _ in range(2):
        for preset in PRESETS:
            results, peak = await _saturate(gateway.url, preset, sat_requests // 2, sat_concurrency, max_tokens,
                                            image_size)
            saturated[preset] += results
            peaks[preset] = max(peaks[preset], peak)
    return {"ttft_c1": ttft, "prefill_c1": prefill, "overhead_ttft_c1": overhead,
            "kv_held_perc": {p: statistics.median(v) for p, v in kv_held.items()},
            "decode_itl_s": {p: {c: summarize(r)["itl_s"] for c, r in by_c.items()} for p, by_c in decode.items()},
            "saturated": {p: summarize(saturated[p]) for p in PRESETS},
            "saturated_c1": {p: summarize([_as_result(t) for t in ttft["short"][p]]) for p in PRESETS},
            "max_concurrent": peaks}


def _as_result(ttft: float):
    from loadtest.generator import RequestResult

    return RequestResult(preset=None, ok=True, ttft=ttft, e2e=ttft, output_tokens=1)


def report(m: dict[str, Any], pred: dict[str, dict[str, float]]) -> str:
    lines = [] if "saturated" not in m else _table(m, pred)
    for case in TTFT_CASES:
        for what, key in (("TTFT", "ttft_c1"), ("engine prefill", "prefill_c1")):
            # A TTFT is None when no streamed chunk had text (a random checkpoint's first tokens
            # can all be special tokens, which decode to nothing); the engine's prefill still counts.
            by = {p: statistics.median(v) if None not in v else None for p, v in m[key][case].items()}
            lines.append(f"{what} c=1, {case}: none {_ms(by['none'])}; " + ", ".join(
                f"{p} {_ms(by[p])} ({by[p] / by['none']:.2f}x none, model {pred[p]['prefill_' + case]:.2f}x: "
                f"{by[p] / by['none'] / pred[p]['prefill_' + case]:.2f}x the model)"
                if by[p] is not None and by["none"] is not None else f"{p} n/a (no text streamed)"
                for p in PRESETS[1:]))
    gw = statistics.median(m["overhead_ttft_c1"]["gateway"])
    vl = statistics.median(m["overhead_ttft_c1"]["vllm"])
    lines.append(f"gateway overhead: p50 TTFT at c=1 (preset none) {gw * 1000:.0f} ms vs vLLM's own server "
                 f"{vl * 1000:.0f} ms: x{gw / vl:.3f}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def _table(m: dict[str, Any], pred: dict[str, dict[str, float]]) -> list[str]:
    med = {p: statistics.median(v) for p, v in m["ttft_c1"]["short"].items()}
    thr = {p: m["saturated"][p]["output_token_throughput"] for p in PRESETS}
    conc = m["max_concurrent"]
    kv = m["kv_held_perc"]
    itl = {p: {c: d["p50"] for c, d in by_c.items()} for p, by_c in m["decode_itl_s"].items()}
    lines = [f"{'preset':<12} {'TTFT c=1 ms':>11} {'x none':>7} {'pred':>6}   {'KV held %':>9} {'x vLLM':>7} "
             f"{'pred':>6}   {'ITL c=1 ms':>10} {'ITL c=8 ms':>10}   {'sat. tok/s':>10} {'x none':>7}"
             f"   {'max running':>11} {'x none':>7} {'pred':>6}"]
    for p in PRESETS:
        lines.append(f"{p:<12} {med[p] * 1000:>11.0f} {med[p] / med['none']:>7.2f} {pred[p]['prefill_short']:>6.2f}"
                     f"   {kv[p] * 100:>9.3f} {kv[p] / kv['vllm']:>7.2f} {pred[p]['kv']:>6.2f}"
                     f"   {itl[p][1] * 1000:>10.1f} {itl[p][8] * 1000:>10.1f}"
                     f"   {thr[p]:>10.1f} {thr[p] / thr['none']:>7.2f}"
                     f"   {conc[p]:>11} {conc[p] / max(conc['none'], 1):>7.2f} {pred[p]['concurrency']:>6.2f}")
    lines.append(f"{'vLLM (stock)':<12} {'':>11} {'':>7} {'':>6}   {kv['vllm'] * 100:>9.3f} {1:>7.2f} {'':>6}"
                 f"   {itl['vllm'][1] * 1000:>10.1f} {itl['vllm'][8] * 1000:>10.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: build the bench profile)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kv-cache-gib", type=float, default=0.6)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--saturation-requests", type=int, default=24)
    parser.add_argument("--saturation-concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="both servers without compilation (vLLM's default compiles)")
    parser.add_argument("--dtype", default="auto", help="both servers (vLLM's default: bf16 on CPUs)")
    parser.add_argument("--image-size", type=int, default=336, help="side of the square images, in pixels")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    parser.add_argument("--ttft-only", action="store_true", help="only TTFT/prefill and the gateway's overhead")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="both servers' step budget (default: vLLM's, 2048 on CPUs: less than one "
                             "672-pixel NeXT image, whose requests would then run unpruned, prompt_split)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from feather_vllm.tools.checkpoints import ensure_checkpoint

        model = str(ensure_checkpoint("bench", "checkpoints/bench"))
    started = time.time()
    pred = predictions(model, args.image_size)
    gateway, stock = start_servers(model, args.out, args.kv_cache_gib, args.block_size,
                                   max_num_seqs=args.saturation_concurrency, enforce_eager=args.enforce_eager,
                                   dtype=args.dtype, max_model_len=args.max_model_len,
                                   step_tokens=args.max_num_batched_tokens)
    try:
        m = asyncio.run(measure(gateway, stock, args.rounds, args.saturation_requests,
                                args.saturation_concurrency, args.max_tokens, args.image_size, args.ttft_only))
    finally:
        gateway.stop()
        stock.stop()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "settings": vars(args) | {"model": model, "out": str(args.out)},
              "wall_s": time.time() - started, "measured": m, "predicted": pred}
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2, default=str))
    print(report(m, pred))
    print(f"wall time {result['wall_s'] / 60:.1f} min; results in {args.out}/")
    if args.ttft_only:
        return
    plot_presets(m["saturated"], args.out / "throughput_per_preset.png",
                 f"saturated load ({args.saturation_concurrency} concurrent), bench checkpoint")
    plot_latency_vs_load({p: [(1, m["saturated_c1"][p]), (args.saturation_concurrency, m["saturated"][p])]
                          for p in PRESETS}, args.out / "latency_vs_load.png", "latency and throughput vs load")


if __name__ == "__main__":
    main()
