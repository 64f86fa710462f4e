"""KV blocks per image request and max image requests decoding at once at a
fixed KV budget, per preset, observed in the real engine's scheduler.

python -m loadtest.kv_capacity [--model DIR] [--kv-cache-mib 640] [--block-size 32]

Prints each preset's figures as ratios to `none`, next to the paper's cost
model (prompt KV in token-layers). Without --model it builds the `bench` checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
QUESTION = "Where is the red square?"


def bench_prompt() -> dict[str, Any]:
    """One LLaVA-1.5 image chat (576 image tokens) for `LLMEngine.add_request`."""
    import numpy as np
    from PIL import Image

    scene = np.full((336, 336, 3), 128, dtype=np.uint8)
    scene[40:140, 200:300] = (220, 30, 30)
    return {"prompt": f"<s>USER: <image>\n{QUESTION}\nASSISTANT:", "multi_modal_data": {"image": Image.fromarray(scene)}}


def measure(model: str, kv_cache_mib: int, block_size: int, requests: int, max_tokens: int,
            enforce_eager: bool = True) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from feather_vllm.engine import engine_kwargs
    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning import config as pcfg
    from feather_vllm.pruning.cost import kv_ratio

    llm = LLM(distributed_executor_backend="uni",
              **engine_kwargs(model, dtype="float32", max_model_len=1024, max_num_seqs=64, block_size=block_size,
                              kv_cache_bytes=kv_cache_mib * 2**20, enforce_eager=enforce_eager,
                              enable_prefix_caching=False))  # identical prompts: measure each one's own KV
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    num_layers = llm.llm_engine.model_config.hf_config.text_config.num_hidden_layers
    prompt = bench_prompt()
    results: dict[str, Any] = {"block_size": block_size, "kv_cache_mib": kv_cache_mib,
                               "num_blocks": kv.block_pool.num_gpu_blocks, "presets": {}}
    for preset in PRESETS:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args={"feather": preset})
        # One request alone: the blocks each KV group held, from the engine's report.
        (probe,) = [o for o in llm.generate([prompt], params, use_tqdm=False)]
        report = report_of(probe)
        image_tokens = report.image_tokens_total
        text_tokens = len(probe.prompt_token_ids) - image_tokens
        # Peak of requests decoding at once when many arrive together (past
        # their prefill: "running" also counts requests that only computed a
        # chunk of text before their image and may yet be preempted).
        for i in range(requests):
            engine.add_request(f"{preset}-{i}", prompt, params)
        peak = 0
        while engine.has_unfinished_requests():
            engine.step()
            peak = max(peak, sum(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running))
        results["presets"][preset] = {
            "blocks_per_group": list(report.kv_blocks_held), "blocks": report.kv_blocks_used,
            # The paper's cost model: prompt KV in token-layers, at the stages' upper bounds.
            "predicted_ratio": kv_ratio(pcfg.resolve(preset), num_layers, image_tokens, text_tokens),
            "max_concurrent": peak}
    return results


def report(results: dict[str, Any]) -> str:
    base = results["presets"]["none"]
    lines = [f"KV budget {results['kv_cache_mib']} MiB = {results['num_blocks']} blocks of "
             f"{results['block_size']} tokens; one image request (576 image tokens)",
             f"{'preset':<12} {'blocks/req':>10} {'x none':>7} {'cost model':>10} "
             f"{'max decoding':>15} {'x none':>7}"]
    for preset, r in results["presets"].items():
        lines.append(
            f"{preset:<12} {r['blocks']:>10} {r['blocks'] / base['blocks']:>7.2f} {r['predicted_ratio']:>10.2f} "
            f"{r['max_concurrent']:>15} {r['max_concurrent'] / base['max_concurrent']:>7.2f}")
    return "\n".join(lines)


def offline_setup(model: str | None) -> str:
    """Environment for one in-process engine; the checkpoint to load (the
    `bench` profile, built if absent, unless `model` is given)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the budget
    if model is not None:
        return model
    from feather_vllm.tools.checkpoints import ensure_checkpoint

    return str(ensure_checkpoint("bench", "checkpoints/bench"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.kv_capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: build the bench profile)")
    parser.add_argument("--kv-cache-mib", type=int, default=640)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", default="results/kv_capacity.json")
    args = parser.parse_args(argv)
    model = offline_setup(args.model)
    results = measure(model, args.kv_cache_mib, args.block_size, args.requests, args.max_tokens)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
