"""Check that this load generator measures what vLLM's own `bench serve` does.

python -m loadtest.agreement --url http://127.0.0.1:8000 --model NAME \\
    --tokenizer CHECKPOINT_DIR [--requests 16] [--concurrency 4]

Runs vLLM's benchmark (vllm.benchmarks.serve: random-mm dataset, one
336x336 image per request, a short random prompt, fixed output length,
ignore_eos) and then this generator with the same image size, output length
and concurrency against the same server, and prints both TTFT (mean,
median) and output-token throughput with their ratio. They should agree
within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from loadtest.generator import LoadConfig, run_load, summarize


def run_vllm_bench(url: str, model: str, tokenizer: str, requests: int, concurrency: int, output_len: int,
                   result_dir: Path) -> dict[str, Any]:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", url,
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random-mm",
        "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
        "--random-input-len", "8", "--random-output-len", str(output_len), "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", '{(336, 336, 1): 1.0}', "--ignore-eos",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", "vllm_bench.json",
    ])
    return serve.main(args)


def compare(url: str, model: str, tokenizer: str, requests: int, concurrency: int, output_len: int,
            out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    theirs = run_vllm_bench(url, model, tokenizer, requests, concurrency, output_len, out)
    cfg = LoadConfig(url=url, model=model, requests=requests, concurrency=concurrency, max_tokens=output_len,
                     prompt="Describe this image in a few words please.")
    ours = summarize(asyncio.run(run_load(cfg)))
    rows = {
        "mean TTFT (ms)": (ours["ttft_s"]["mean"] * 1000, theirs["mean_ttft_ms"]),
        "median TTFT (ms)": (ours["ttft_s"]["p50"] * 1000, theirs["median_ttft_ms"]),
        "output tokens/s": (ours["output_token_throughput"], theirs["output_throughput"]),
    }
    result = {name: {"loadtest": a, "vllm_bench": b, "ratio": a / b} for name, (a, b) in rows.items()}
    (out / "agreement.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True, help="the served checkpoint's directory")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("results/agreement"))
    args = parser.parse_args(argv)
    result = compare(args.url, args.model, args.tokenizer, args.requests, args.concurrency, args.output_len, args.out)
    for name, r in result.items():
        flag = "ok" if abs(r["ratio"] - 1) <= 0.10 else "DIFFERS >10%"
        print(f"{name:<18} loadtest {r['loadtest']:>9.1f}   vllm bench serve {r['vllm_bench']:>9.1f}   "
              f"ratio {r['ratio']:.3f}  {flag}")


if __name__ == "__main__":
    main()
