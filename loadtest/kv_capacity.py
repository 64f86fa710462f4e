"""KV blocks per image request and max image requests decoding at once at a
fixed KV budget, per preset, observed in the real engine's scheduler.

python -m loadtest.kv_capacity [--model DIR] [--kv-cache-mib 640] [--block-size 32]
    [--image-size 672x672] [--max-model-len 4096]

Prints each preset's figures as ratios to `none`, next to the paper's cost
model (prompt KV in token-layers), and the KV that vLLM's own model class
holds for the same request on the same budget (its block manager's blocks
times the layers each block holds). Works on LLaVA-1.5 and LLaVA-NeXT
checkpoints (a NeXT image's token count depends on --image-size). Without
--model it builds the `bench` checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
QUESTION = "Where is the red square?"


def bench_prompt(image_size: tuple[int, int] = (336, 336)) -> dict[str, Any]:
    """One image chat (LLaVA-1.5: 576 image tokens) for `LLMEngine.add_request`:
    a grey scene of `image_size` (height, width) with a red square."""
    import numpy as np
    from PIL import Image

    height, width = image_size
    scene = np.full((height, width, 3), 128, dtype=np.uint8)
    scene[height // 8:height * 5 // 12, width * 10 // 17:width * 15 // 17] = (220, 30, 30)
    return {"prompt": f"<s>USER: <image>\n{QUESTION}\nASSISTANT:", "multi_modal_data": {"image": Image.fromarray(scene)}}


def _layer_blocks(kv: Any, request_id: str) -> int:
    """Blocks a running request holds, each counted once per layer it holds KV for."""
    groups = kv.kv_cache_config.kv_cache_groups
    return sum(len(blocks) * len(group.layer_names) for blocks, group in zip(kv.get_block_ids(request_id), groups))


def vllm_layer_blocks(model: str, prompt: dict[str, Any], max_tokens: int, **engine: Any) -> int:
    """What vLLM's own model class holds for `prompt` at its last decoding
    step (block manager's blocks x layers per block), on the same settings."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, distributed_executor_backend="uni", **engine)
    try:
        core = llm.llm_engine.engine_core.engine_core
        llm.llm_engine.add_request("probe", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                   ignore_eos=True))
        held = 0
        while llm.llm_engine.has_unfinished_requests():
            held = max([held, *(_layer_blocks(core.scheduler.kv_cache_manager, r.request_id)
                                for r in core.scheduler.running)])
            llm.llm_engine.step()
        return held
    finally:
        llm.llm_engine.engine_core.shutdown()


def measure(model: str, kv_cache_mib: int, block_size: int, requests: int, max_tokens: int,
            enforce_eager: bool = True, image_size: tuple[int, int] = (336, 336),
            max_model_len: int = 1024, max_num_batched_tokens: int | None = None) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from feather_vllm.engine import engine_kwargs
    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning import config as pcfg
    from feather_vllm.pruning.cost import kv_ratio
    from feather_vllm.pruning.layout import LayoutRule, layout_kept_per_stage_max

    prompt = bench_prompt(image_size)
    settings = dict(dtype="float32", max_model_len=max_model_len, max_num_seqs=64, block_size=block_size,
                    kv_cache_memory_bytes=kv_cache_mib * 2**20, enforce_eager=enforce_eager,
                    enable_prefix_caching=False,  # identical prompts: measure each one's own KV
                    max_num_batched_tokens=max_num_batched_tokens)
    vllm_held = vllm_layer_blocks(model, prompt, max_tokens, **settings)
    llm = LLM(distributed_executor_backend="uni", **engine_kwargs(model, **settings))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    kv = scheduler.kv_cache_manager
    hf_config = llm.llm_engine.model_config.hf_config
    num_layers = hf_config.text_config.num_hidden_layers
    layout = LayoutRule.of(hf_config).layout(image_size)
    layers_per_group = [len(g.layer_names) for g in kv.kv_cache_config.kv_cache_groups]
    results: dict[str, Any] = {"block_size": block_size, "kv_cache_mib": kv_cache_mib, "image_size": image_size,
                               "image_tokens": layout.num_tokens, "num_blocks": kv.block_pool.num_gpu_blocks,
                               "vllm_layer_blocks": vllm_held, "presets": {}}
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
        config = pcfg.resolve(preset)
        results["presets"][preset] = {
            "blocks_per_group": list(report.kv_blocks_held), "blocks": report.kv_blocks_used,
            "x_vllm": sum(b * n for b, n in zip(report.kv_blocks_held, layers_per_group)) / vllm_held,
            # The paper's cost model: prompt KV in token-layers, at the stages' upper bounds.
            "predicted_ratio": kv_ratio(config, num_layers, image_tokens, text_tokens,
                                        layout_kept_per_stage_max(config, layout)),
            "max_concurrent": peak,
            # Why a pruned preset ran unpruned (e.g. prompt_split: a step budget below the image).
            "fallback": None if report.fallback is None else report.fallback.value}
    return results


def report(results: dict[str, Any]) -> str:
    base = results["presets"]["none"]
    height, width = results["image_size"]
    lines = [f"KV budget {results['kv_cache_mib']} MiB = {results['num_blocks']} blocks of "
             f"{results['block_size']} tokens; one {height}x{width} image request "
             f"({results['image_tokens']} image tokens)",
             f"{'preset':<12} {'blocks/req':>10} {'x none':>7} {'x vLLM':>7} {'cost model':>10} "
             f"{'max decoding':>15} {'x none':>7}"]
    for preset, r in results["presets"].items():
        lines.append(
            f"{preset:<12} {r['blocks']:>10} {r['blocks'] / base['blocks']:>7.2f} {r['x_vllm']:>7.2f} "
            f"{r['predicted_ratio']:>10.2f} "
            f"{r['max_concurrent']:>15} {r['max_concurrent'] / base['max_concurrent']:>7.2f}"
            + (f"  UNPRUNED: fallback {r['fallback']}" if r.get("fallback") else ""))
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
    parser.add_argument("--image-size", default="336x336", help="HEIGHTxWIDTH of the request's image")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the step budget (vLLM's default when absent); the cut needs the image and the "
                             "last prompt token in one step, so it must exceed the image's tokens")
    parser.add_argument("--json", default="results/kv_capacity.json")
    args = parser.parse_args(argv)
    model = offline_setup(args.model)
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    results = measure(model, args.kv_cache_mib, args.block_size, args.requests, args.max_tokens,
                      image_size=(height, width), max_model_len=args.max_model_len,
                      max_num_batched_tokens=args.max_num_batched_tokens)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
