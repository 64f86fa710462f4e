"""Decode step time of pruned vs unpruned image requests, in one engine.

python -m loadtest.decode_step [--model DIR] [--batches 1,16] [--steps 24] [--repeats 3] [--enforce-eager]

One offline engine (vLLM's default compiled mode unless --enforce-eager) on
the `bench` checkpoint. For each batch size B, B image requests of one
preset are prefilled, then `--steps` decode steps of the whole batch are
timed (wall time of `LLMEngine.step`); presets alternate, repeated, so that
machine noise hits all alike. Prints the median ms per decode step and its
ratio to `none`: after the cut, a pruned request decodes through vLLM's own
forward with shorter per-group metadata, reading less KV.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from loadtest.kv_capacity import PRESETS, bench_prompt, offline_setup


def _decode_ms(llm: Any, preset: str, batch: int, steps: int) -> float:
    """Median wall time of one decode step of `batch` requests of `preset`."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=batch + steps + 2, temperature=0.0, ignore_eos=True,
                            extra_args={"feather": preset})
    prompt = bench_prompt()
    for i in range(batch):
        engine.add_request(f"{preset}-{batch}-{time.monotonic_ns()}-{i}", prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in list(scheduler.requests):
        engine.abort_request([request_id], internal=True)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times) * 1000


def measure(model: str, batches: list[int], steps: int, repeats: int, enforce_eager: bool) -> dict[str, Any]:
    from vllm import LLM

    from feather_vllm.engine import engine_kwargs

    llm = LLM(distributed_executor_backend="uni",
              **engine_kwargs(model, dtype="float32", max_model_len=1024, max_num_seqs=max(batches),
                              block_size=32, kv_cache_bytes=4 * 2**30, enforce_eager=enforce_eager,
                              enable_prefix_caching=False))  # identical prompts: measure each one's own KV
    _decode_ms(llm, "feather", 1, 2)  # warm-up
    samples: dict[int, dict[str, list[float]]] = {b: {p: [] for p in PRESETS} for b in batches}
    for _ in range(repeats):
        for batch in batches:
            for preset in PRESETS:
                samples[batch][preset].append(_decode_ms(llm, preset, batch, steps))
    return {"enforce_eager": enforce_eager, "steps": steps, "repeats": repeats,
            "ms_per_step": {b: {p: statistics.median(v) for p, v in by.items()} for b, by in samples.items()},
            "samples": samples}


def report(results: dict[str, Any]) -> str:
    mode = "eager" if results["enforce_eager"] else "compiled"
    lines = [f"decode step, {mode}, median of {results['repeats']} x {results['steps']} steps",
             f"{'batch':>5} " + " ".join(f"{p:>18}" for p in PRESETS)]
    for batch, by in results["ms_per_step"].items():
        base = by["none"]
        lines.append(f"{batch:>5} " + " ".join(f"{by[p]:>9.1f} ms {by[p] / base:>4.2f}x" for p in PRESETS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.decode_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: build the bench profile)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", default="results/decode_step.json")
    args = parser.parse_args(argv)
    model = offline_setup(args.model)
    results = measure(model, [int(b) for b in args.batches.split(",")], args.steps, args.repeats,
                      args.enforce_eager)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
