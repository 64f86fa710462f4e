"""Check 4: TTFT none vs feather under vLLM's default compilation."""

from __future__ import annotations

import statistics
import time
from typing import Any

from feather_gpu_check.common import (
    BENCH_REQUESTS,
    QUESTION,
    Run,
    attention_backend,
    chat,
    fresh_image,
    new_llm,
    params,
    shutdown,
)


def benchmark(run: Run) -> dict[str, Any]:
    from feather_vllm.kv.plan import report_of

    kw = run.bench_kwargs()
    profile = "bench" if run.device == "cuda" else "tiny"
    llm = new_llm(kw)
    try:
        config = llm.llm_engine.vllm_config
        compilation = config.compilation_config
        figures: dict[str, Any] = {
            "checkpoint": profile, "compiled": not config.model_config.enforce_eager,
            "compilation_mode": getattr(compilation.mode, "name", str(compilation.mode)),
            "cudagraph_mode": getattr(compilation.cudagraph_mode, "name", str(compilation.cudagraph_mode)),
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "attention_backend": attention_backend(llm),
            "prefix_caching": config.cache_config.enable_prefix_caching,
            "requests_per_preset": BENCH_REQUESTS[run.device],
        }
        if run.device == "cpu":
            figures["note"] = ("cpu: eager (inductor's compile takes ~90 s on 2 cores); the ratio is "
                               "reported, not required")
        seed = iter(range(1000, 2000))  # every request its own image: no prefix or multimodal cache hits
        ttft: dict[str, list[float]] = {"none": [], "feather": []}
        fallbacks = []
        for _ in range(2):  # warm-up (lazy initialisation, first shapes), not measured
            for preset in ttft:
                llm.chat([chat(fresh_image(next(seed)), QUESTION)], params(preset, 1), use_tqdm=False)
        for _ in range(BENCH_REQUESTS[run.device]):
            for preset in ttft:  # interleaved
                conv = [chat(fresh_image(next(seed)), QUESTION)]
                start = time.perf_counter()
                (out,) = llm.chat(conv, params(preset, 1), use_tqdm=False)
                ttft[preset].append(time.perf_counter() - start)
                report = report_of(out)
                if preset == "feather" and (report is None or report.fallback is not None or not report.stages):
                    fallbacks.append(None if report is None else getattr(report.fallback, "value", None))
    finally:
        shutdown(llm)
        del llm
        run.release()
    median = {p: statistics.median(v) for p, v in ttft.items()}
    ratio = median["feather"] / median["none"]
    ok = not fallbacks and (run.device != "cuda" or ratio <= 1.0)
    error = None
    if fallbacks:
        error = f"feather requests were not pruned: {fallbacks}"
    elif not ok:
        error = f"feather's TTFT is {ratio:.3f}x none's (must be <= 1.0 on GPU)"
    return {"ok": ok, **figures, "ttft_s": {p: [round(t, 5) for t in v] for p, v in ttft.items()},
            "ttft_median_s": {p: round(t, 5) for p, t in median.items()},
            "ttft_ratio_feather_over_none": round(ratio, 4), "error": error}
