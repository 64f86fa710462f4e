"""Plots of load-test results (matplotlib, files only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_presets(by_preset: dict[str, dict[str, Any]], path: str | Path, title: str) -> None:
    """Throughput and latency percentiles per preset, side by side."""
    plt = _plt()
    presets = list(by_preset)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(presets, [by_preset[p]["output_token_throughput"] for p in presets], color="tab:blue")
    a.set_ylabel("output tokens / s")
    a.set_title("throughput")
    width = 0.25
    for i, q in enumerate(("p50", "p90", "p99")):
        b.bar([x + (i - 1) * width for x in range(len(presets))],
              [by_preset[p]["ttft_s"][q] or 0 for p in presets], width, label=f"TTFT {q}")
    b.set_xticks(range(len(presets)), presets)
    b.set_ylabel("seconds")
    b.set_title("time to first token")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_vs_load(points: dict[str, list[tuple[float, dict[str, Any]]]], path: str | Path, title: str) -> None:
    """p50 TTFT and e2e latency against offered load (concurrency), per preset."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for preset, series in points.items():
        series = sorted(series)
        loads = [x for x, _ in series]
        a.plot(loads, [s["ttft_s"]["p50"] for _, s in series], marker="o", label=preset)
        b.plot(loads, [s["request_throughput"] for _, s in series], marker="o", label=preset)
    a.set_xlabel("concurrent requests")
    a.set_ylabel("p50 TTFT (s)")
    b.set_xlabel("concurrent requests")
    b.set_ylabel("requests / s")
    a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
