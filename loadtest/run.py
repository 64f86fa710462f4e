"""Load-test any OpenAI-compatible endpoint with image chat requests.

python -m loadtest.run --url http://127.0.0.1:8000 --model demo \\
    [--concurrency 8 | --rate 2.0] [--requests 64] [--duration 120] \\
    [--presets none,feather] [--images a.png b.jpg] [--max-tokens 32] \\
    [--slo-ttft 2.0] [--slo-tpot 0.2] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from loadtest.generator import LoadConfig, run_load, summarize, summarize_by_preset
from loadtest.plots import plot_presets


def _fmt(d: dict | None, scale: float = 1000.0) -> str:
    if not d or d.get("p50") is None:
        return "-"
    return " / ".join(f"{d[q] * scale:.0f}" for q in ("p50", "p90", "p99"))


def print_table(by_preset: dict[str, dict]) -> None:
    print(f"{'preset':<12} {'done':>5} {'req/s':>7} {'tok/s':>8} {'goodput':>8} "
          f"{'TTFT ms p50/90/99':>20} {'ITL ms p50/90/99':>18} {'E2E ms p50/90/99':>20} errors")
    for preset, s in by_preset.items():
        print(f"{preset:<12} {s['completed']:>5} {s['request_throughput']:>7.2f} {s['output_token_throughput']:>8.1f} "
              f"{s['goodput']:>8.2f} {_fmt(s['ttft_s']):>20} {_fmt(s['itl_s']):>18} {_fmt(s['e2e_s']):>20} "
              f"{s['errors'] or ''}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--duration", type=float, help="stop starting requests after this many seconds")
    parser.add_argument("--presets", default="", help="comma-separated presets cycled over requests; "
                                                      "empty sends no feather field")
    parser.add_argument("--images", nargs="*", type=Path, default=[])
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Where is the red square?")
    parser.add_argument("--slo-ttft", type=float)
    parser.add_argument("--slo-tpot", type=float)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()] or [None]
    cfg = LoadConfig(url=args.url, model=args.model, presets=presets, requests=args.requests,
                     duration_s=args.duration, concurrency=args.concurrency, rate=args.rate,
                     max_tokens=args.max_tokens, prompt=args.prompt, image_size=args.image_size,
                     images=args.images, api_key=args.api_key)
    results = asyncio.run(run_load(cfg))
    slo = {"slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot}
    by_preset = summarize_by_preset(results, **slo)
    print_table(by_preset)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"overall": summarize(results, **slo), "by_preset": by_preset}, indent=2))
    if args.plot:
        plot_presets(by_preset, args.plot, f"{args.model} at {args.rate or args.concurrency} "
                                           f"{'req/s' if args.rate else 'concurrent'}")


if __name__ == "__main__":
    main()
