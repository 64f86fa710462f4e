"""Autoscaling on queued requests vs on KV demand: a queue model of replicas.

python -m loadtest.autoscale_sim [--duration 3600] [--traces 5] [--seed 0] [--slo-s 10]
    [--startup-s 120] [--json results/autoscale_sim.json] [--plot results/autoscale_sim.png]

Each replica is one engine as vLLM schedules it: first come, first served,
a request is admitted when its KV blocks are free (and the step's prompt
token budget and the sequence limit allow), holding them until it
finishes; a step decodes every running request once and prefills the ones
admitted in it; the Service spreads arrivals round robin over ready pods.
A Kubernetes HPA (its algorithm: desired = ceil(sum of the per-pod metric
/ target), 10% tolerance, its default scale-up limit, the manifests'
scale-down window and policy, pods ready after a start-up delay, removed
pods draining their requests) scales the replicas on either signal:

* `waiting`: `vllm:num_requests_waiting`, requests not yet admitted;
* `kv_demand`: `feather_kv_demand_ratio`, (blocks in use + blocks the
  waiting requests need at their presets) / blocks in the pool.

The trace mixes pruned and unpruned image chats in phases whose pruned
share changes. Every figure comes from this repository's measurements on
the `bench` checkpoint (README, Results; `MEASURED`): KV blocks per request
and the pool from `loadtest.kv_capacity`, prefill time (TTFT at
concurrency 1) from `loadtest.benchmark`, decode step time by batch size
from `loadtest.decode_step`. It sweeps each signal's target and reports,
per signal, the fewest replicas (mean over the trace, what the GPUs cost)
that keep the p95 queueing delay within the SLO, and the run at the
manifests' targets (deploy/k8s/components/hpa-*).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import itertools
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SIGNALS = ("waiting", "kv_demand")
PRUNED = ("fastv", "feather", "pyramiddrop")


@dataclasses.dataclass(frozen=True)
class PresetCost:
    """What one request of a preset costs a replica."""

    blocks: int  # KV blocks it holds (at finish: the most it holds)
    prefill_s: float  # its prefill, alone
    step_b1_s: float  # a decode step with a batch of 1 of these
    step_b8_s: float  # ... and of 8

    @property
    def step_marginal_s(self) -> float:
        """What each request adds to a decode step (linear in the batch between 1 and 8)."""
        return (self.step_b8_s - self.step_b1_s) / 7


@dataclasses.dataclass(frozen=True)
class Costs:
    """A replica's engine: its pool and the costs of each preset."""

    presets: dict[str, PresetCost]
    pool_blocks: int  # usable KV blocks per replica
    prompt_tokens: int
    output_tokens: int
    step_tokens: int  # prompt tokens one step may prefill (vLLM's max_num_batched_tokens)
    max_num_seqs: int

    @property
    def step_base_s(self) -> float:
        """A decode step's fixed part (mean over presets of step(1) - marginal)."""
        return sum(p.step_b1_s - p.step_marginal_s for p in self.presets.values()) / len(self.presets)


# The bench checkpoint (32 layers, 12 KV heads of 64, fp32) on this repository's 2-core CPU (README, Results):
# - blocks: "KV capacity" table, block size 32, one 591-token image chat (576 image tokens) after 48 tokens;
# - pool: its 640 MiB budget / (32 tokens x 4 layers x 2 x 12 x 64 x 4 bytes) = 853 blocks, less vLLM's null block;
# - prefill: "Serving benchmark" (3 rounds), TTFT p50 at concurrency 1;
# - decode steps: "Decode step" table, median engine step at batch 1 and 8 (compiled).
MEASURED = Costs(
    presets={"none": PresetCost(160, 1.833, 0.0389, 0.0770),
             "fastv": PresetCost(69, 0.716, 0.0350, 0.0531),
             "feather": PresetCost(70, 0.818, 0.0340, 0.0592),
             "pyramiddrop": PresetCost(86, 1.046, 0.0332, 0.0697)},
    pool_blocks=852, prompt_tokens=591, output_tokens=48,
    step_tokens=2048,  # vLLM's OpenAI-server step budget on CPU (README, chunked prefill)
    max_num_seqs=64)  # deploy/k8s/base/deployment.yaml


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of the trace: Poisson arrivals at `rate` per second (rising
    or falling linearly to `rate_end` when given), a `pruned` share of them
    spread evenly over the pruned presets."""

    duration_s: float
    rate: float
    pruned: float
    rate_end: float | None = None

    def rate_at(self, t: float) -> float:
        """The arrival rate `t` seconds into the phase."""
        end = self.rate if self.rate_end is None else self.rate_end
        return self.rate + (end - self.rate) * t / self.duration_s


# An hour: traffic rising from quiet, mostly pruned; the same rate mostly unpruned (a client that turned
# pruning off); a peak with half of each; back to quiet. Rates in image chats per second, ramps over minutes.
DEFAULT_PHASES = (Phase(600, 0.2, 0.9, rate_end=1.5), Phase(900, 1.5, 0.9), Phase(900, 1.5, 0.1),
                  Phase(300, 1.5, 0.5, rate_end=2.5), Phase(300, 2.5, 0.5), Phase(600, 2.5, 0.5, rate_end=0.2))


@dataclasses.dataclass(frozen=True)
class Request:
    arrival: float
    preset: str


def make_trace(phases: Sequence[Phase], seed: int = 0) -> list[Request]:
    """Poisson arrivals through the phases (seeded: the same trace for every signal)."""
    rng = random.Random(seed)
    out: list[Request] = []
    start = 0.0
    for phase in phases:
        peak = max(phase.rate, phase.rate_end or 0.0)
        t = 0.0
        while peak > 0:
            t += rng.expovariate(peak)  # thinning: candidates at the peak rate, kept at rate(t) / peak
            if t >= phase.duration_s:
                break
            if rng.random() * peak > phase.rate_at(t):
                continue
            preset = rng.choice(PRUNED) if rng.random() < phase.pruned else "none"
            out.append(Request(start + t, preset))
        start += phase.duration_s
    return out


@dataclasses.dataclass(frozen=True)
class Scaler:
    """An HPA on one per-pod signal (AverageValue target)."""

    signal: str  # one of SIGNALS
    target: float
    interval_s: float = 15.0  # the HPA's sync period
    tolerance: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 16
    startup_s: float = 120.0  # pod scheduled, image present, model loaded, /health 200
    scale_down_window_s: float = 300.0  # the HPA's default stabilization window
    # The manifests' scale-down policy: one pod per period (a removed pod drains for minutes).
    scale_down_period_s: float = 120.0


class _Replica:
    def __init__(self, index: int, created: float, ready_at: float, pool: int) -> None:
        self.index, self.created, self.ready_at = index, created, ready_at
        self.removed: float | None = None
        self.retiring = False
        self.free = pool
        self.waiting: collections.deque[int] = collections.deque()  # request indices
        self.waiting_blocks = 0
        self.decoding: list[list[int]] = []  # [request index, tokens left]
        self.prefilling: list[int] = []
        self.busy = False

    def idle(self) -> bool:
        return not (self.waiting or self.decoding or self.prefilling)


def simulate(trace: Sequence[Request], costs: Costs, scaler: Scaler | None, replicas: int = 1,
             record: bool = False) -> dict[str, Any]:
    """Run `trace` through replicas scaled by `scaler` (None: `replicas`
    fixed). Returns the distributions of queueing delay (arrival to
    admission) and TTFT, what the replicas cost (their mean count until the
    last request finished: pods from creation to deletion, starting and
    draining ones included), and with `record` the pods at each HPA sync."""
    pool = costs.pool_blocks
    blocks = {name: p.blocks for name, p in costs.presets.items()}
    if max(blocks.values()) > pool:
        raise ValueError("a request needs more blocks than the pool holds")
    events: list[tuple[float, int, str, int]] = []
    seq = itertools.count()
    reps: list[_Replica] = []
    admitted = [math.nan] * len(trace)
    first_token = [math.nan] * len(trace)
    finished = 0
    last_finish = 0.0
    peak_used = 0
    peak_pods = 0
    rr = itertools.count()

    def add_replica(now: float, ready_at: float) -> None:
        nonlocal peak_pods
        reps.append(_Replica(len(reps), now, ready_at, pool))
        peak_pods = max(peak_pods, sum(1 for r in reps if r.removed is None))
        if ready_at > now:
            heapq.heappush(events, (ready_at, next(seq), "ready", len(reps) - 1))

    def step(r: _Replica, now: float) -> None:
        """Admit what fits (FCFS, like vLLM's scheduler) and start the next step."""
        nonlocal peak_used
        budget = costs.step_tokens
        while (r.waiting and len(r.decoding) + len(r.prefilling) < costs.max_num_seqs
               and blocks[trace[r.waiting[0]].preset] <= r.free and costs.prompt_tokens <= budget):
            i = r.waiting.popleft()
            need = blocks[trace[i].preset]
            r.free -= need
            r.waiting_blocks -= need
            budget -= costs.prompt_tokens
            admitted[i] = now
            r.prefilling.append(i)
        peak_used = max(peak_used, pool - r.free)
        duration = sum(costs.presets[trace[i].preset].prefill_s for i in r.prefilling)
        if r.decoding:
            duration += costs.step_base_s + sum(costs.presets[trace[i].preset].step_marginal_s
                                                for i, _ in r.decoding)
        if duration == 0:
            r.busy = False
            if r.retiring and r.removed is None:
                r.removed = now  # drained: the pod goes
            return
        r.busy = True
        heapq.heappush(events, (now + duration, next(seq), "step", r.index))

    def end_step(r: _Replica, now: float) -> None:
        nonlocal finished, last_finish
        still = []
        for entry in r.decoding:
            entry[1] -= 1
            if entry[1] == 0:
                r.free += blocks[trace[entry[0]].preset]
                finished += 1
                last_finish = now
            else:
                still.append(entry)
        for i in r.prefilling:
            first_token[i] = now
            still.append([i, costs.output_tokens - 1])
        r.decoding, r.prefilling = still, []
        step(r, now)

    def signal(r: _Replica, kind: str) -> float:
        if kind == "waiting":
            return float(len(r.waiting))
        return (pool - r.free + r.waiting_blocks) / pool

    for _ in range(replicas if scaler is None else scaler.min_replicas):
        add_replica(0.0, 0.0)
    for i, req in enumerate(trace):
        heapq.heappush(events, (req.arrival, next(seq), "arrive", i))
    end = trace[-1].arrival if trace else 0.0
    if scaler is not None:
        heapq.heappush(events, (scaler.interval_s, next(seq), "tick", 0))
    history: collections.deque[tuple[float, int]] = collections.deque()  # (time, desired): scale-down window
    last_down = -math.inf
    timeline: list[tuple[float, int, int, float]] = []  # (time, ready, pods, signal per ready pod)

    while events:
        now, _, kind, arg = heapq.heappop(events)
        if kind == "arrive":
            ready = [r for r in reps if r.ready_at <= now and not r.retiring]
            r = ready[next(rr) % len(ready)]  # the Service spreads requests over ready pods
            r.waiting.append(arg)
            r.waiting_blocks += blocks[trace[arg].preset]
            if not r.busy:
                step(r, now)
        elif kind == "step":
            end_step(reps[arg], now)
        elif kind == "ready":
            r = reps[arg]
            if r.retiring and r.removed is None:
                r.removed = now
        elif kind == "tick" and scaler is not None:
            live = [r for r in reps if not r.retiring]
            ready = [r for r in live if r.ready_at <= now]
            total = sum(signal(r, scaler.signal) for r in ready)
            current = len(live)
            desired = current
            if ready and abs(total / (scaler.target * len(ready)) - 1) > scaler.tolerance:
                desired = math.ceil(total / scaler.target)
                desired = min(desired, max(2 * current, current + 4))  # the HPA's default scale-up limit
            desired = min(max(desired, scaler.min_replicas), scaler.max_replicas)
            history.append((now, desired))
            while history and history[0][0] < now - scaler.scale_down_window_s:
                history.popleft()
            if desired < current:  # scale down only to the highest recommendation in the window, one pod a period
                desired = min(current, max(d for _, d in history))
                if desired < current:
                    desired = current if now - last_down < scaler.scale_down_period_s else current - 1
                    last_down = now if desired < current else last_down
            if desired > current:
                for _ in range(desired - current):
                    add_replica(now, now + scaler.startup_s)
            elif desired < current:
                # Pods still starting go first, then the least loaded; each drains what it holds.
                for r in sorted(live, key=lambda r: (r.ready_at <= now, len(r.waiting) + len(r.decoding)))[
                        :current - desired]:
                    r.retiring = True
                    if r.ready_at > now or (r.idle() and not r.busy):
                        r.removed = now
                if not any(r.ready_at <= now and not r.retiring for r in reps):  # never leave none ready
                    keep = next((r for r in reps if r.retiring and r.ready_at <= now and r.removed is None), None)
                    if keep is not None:
                        keep.retiring = False
            if record:
                ready = [r for r in reps if r.ready_at <= now and not r.retiring]
                timeline.append((now, len(ready), sum(1 for r in reps if r.removed is None),
                                 sum(signal(r, scaler.signal) for r in ready) / max(len(ready), 1)))
            if now < end or any(not r.idle() for r in reps):
                heapq.heappush(events, (now + scaler.interval_s, next(seq), "tick", 0))

    stop = max(last_finish, end)
    cost = sum((r.removed if r.removed is not None else stop) - r.created for r in reps)
    delays = [a - req.arrival for a, req in zip(admitted, trace)]
    ttfts = [f - req.arrival for f, req in zip(first_token, trace)]
    return {"requests": len(trace), "finished": finished, "duration_s": stop,
            "mean_replicas": cost / stop if stop else float(len(reps)),
            "peak_replicas": peak_pods,
            "pods_created": len(reps), "peak_blocks_used": peak_used,
            "queue_delay_s": _dist(delays), "ttft_s": _dist(ttfts),
            "timeline": timeline if record else []}


def _dist(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}

    def pct(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": sum(ordered) / len(ordered), "p50": pct(0.5), "p95": pct(0.95), "max": ordered[-1]}


# Targets swept per signal (per pod, the HPA's AverageValue); the manifests' own included.
MANIFEST_TARGETS = {"waiting": 0.5, "kv_demand": 0.75}  # deploy/k8s/components/{hpa,keda}-*
SWEEP = {"waiting": (0.5, 1.0, 2.0, 4.0, 8.0), "kv_demand": (0.5, 0.6, 0.75, 0.9, 1.0, 1.25)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def compare(traces: Sequence[Sequence[Request]], costs: Costs = MEASURED, slo_s: float = 10.0,
            sweep: dict[str, Sequence[float]] | None = None, **scaler_args: Any) -> dict[str, Any]:
    """Both signals on the same traces (several seeds: one trace's p95 hangs
    on a few unlucky bursts). For each signal and target: mean replicas and
    p95 queueing delay, averaged over the traces; the fewest mean replicas
    that meet the SLO; the manifests' target with the first trace's
    timeline. Also the fewest fixed replicas meeting the SLO, for reference."""
    sweep = sweep or SWEEP
    requests = sum(len(t) for t in traces)
    out: dict[str, Any] = {"traces": len(traces), "requests": requests, "slo_p95_queue_delay_s": slo_s,
                           "pruned_share": sum(r.preset != "none" for t in traces for r in t) / max(requests, 1),
                           "signals": {}}
    for signal in SIGNALS:
        runs = []
        for target in sorted({*sweep[signal], MANIFEST_TARGETS[signal]}):
            manifest = target == MANIFEST_TARGETS[signal]
            results = [simulate(t, costs, Scaler(signal, target, **scaler_args), record=manifest and i == 0)
                       for i, t in enumerate(traces)]
            runs.append({"target": target,
                         "mean_replicas": _mean([r["mean_replicas"] for r in results]),
                         "peak_replicas": max(r["peak_replicas"] for r in results),
                         "pods_created": _mean([r["pods_created"] for r in results]),
                         "queue_delay_p50_s": _mean([r["queue_delay_s"]["p50"] for r in results]),
                         "queue_delay_p95_s": _mean([r["queue_delay_s"]["p95"] for r in results]),
                         "ttft_p95_s": _mean([r["ttft_s"]["p95"] for r in results]),
                         "finished": sum(r["finished"] for r in results),
                         "timeline": results[0]["timeline"]})
        meeting = [r for r in runs if r["queue_delay_p95_s"] <= slo_s]
        best = min(meeting, key=lambda r: r["mean_replicas"]) if meeting else None
        out["signals"][signal] = {
            "runs": runs, "manifest_target": MANIFEST_TARGETS[signal],
            "best_within_slo": None if best is None else {k: v for k, v in best.items() if k != "timeline"}}
    fixed = None
    for n in range(1, scaler_args.get("max_replicas", Scaler.max_replicas) + 1):
        p95 = _mean([simulate(t, costs, None, replicas=n)["queue_delay_s"]["p95"] for t in traces])
        if p95 <= slo_s:
            fixed = {"replicas": n, "queue_delay_p95_s": p95}
            break
    out["fixed_within_slo"] = fixed
    return out


def report(result: dict[str, Any]) -> str:
    """The comparison as text: one line per signal and target."""
    lines = [f"{result['traces']} traces, {result['requests']} image chats, {result['pruned_share']:.0%} pruned; "
             f"SLO: p95 queueing delay <= {result['slo_p95_queue_delay_s']:g} s (means over the traces)",
             f"{'signal':<10} {'target':>7} {'mean replicas':>14} {'peak':>5} {'pods made':>10} "
             f"{'queue p50':>10} {'queue p95':>10} {'TTFT p95':>9}"]
    for signal, data in result["signals"].items():
        for run in data["runs"]:
            mark = " <- manifests" if run["target"] == data["manifest_target"] else ""
            lines.append(f"{signal:<10} {run['target']:>7g} {run['mean_replicas']:>14.2f} {run['peak_replicas']:>5} "
                         f"{run['pods_created']:>10.1f} {run['queue_delay_p50_s']:>9.1f}s "
                         f"{run['queue_delay_p95_s']:>9.1f}s {run['ttft_p95_s']:>8.1f}s{mark}")
    for signal, data in result["signals"].items():
        best = data["best_within_slo"]
        lines.append(f"fewest replicas within the SLO, {signal}: " + (
            "none of the targets" if best is None else
            f"{best['mean_replicas']:.2f} mean (target {best['target']:g}, peak {best['peak_replicas']}, "
            f"p95 queueing {best['queue_delay_p95_s']:.1f} s)"))
    fixed = result["fixed_within_slo"]
    lines.append("fixed replicas within the SLO: " + ("more than the maximum" if fixed is None else
                                                       f"{fixed['replicas']} "
                                                       f"(p95 queueing {fixed['queue_delay_p95_s']:.1f} s)"))
    return "\n".join(lines)


def plot(result: dict[str, Any], trace: Sequence[Request], path: str | Path) -> None:
    """Left: p95 queueing delay against mean replicas, each signal's sweep.
    Right: replicas over the trace at the manifests' targets, with the
    pruned share of arrivals."""
    from loadtest.plots import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = {"waiting": "tab:orange", "kv_demand": "tab:blue"}
    labels = {"waiting": "vllm:num_requests_waiting", "kv_demand": "feather_kv_demand_ratio"}
    for signal, data in result["signals"].items():
        runs = sorted(data["runs"], key=lambda r: r["mean_replicas"])
        a.plot([r["mean_replicas"] for r in runs], [r["queue_delay_p95_s"] for r in runs], "o",
               color=colors[signal], label=labels[signal])
        for r in runs:
            a.annotate(f"{r['target']:g}", (r["mean_replicas"], r["queue_delay_p95_s"]), fontsize=7,
                       textcoords="offset points", xytext=(3, 3))
        timeline = next(r for r in runs if r["target"] == data["manifest_target"])["timeline"]
        b.step([t / 60 for t, *_ in timeline], [pods for _, _, pods, _ in timeline], where="post",
               color=colors[signal], label=f"{labels[signal]} (target {data['manifest_target']:g})")
    a.axhline(result["slo_p95_queue_delay_s"], color="grey", ls="--", lw=1, label="SLO")
    a.set_xlabel("mean replicas (GPU cost)")
    a.set_ylabel("p95 queueing delay (s)")
    a.set_yscale("symlog", linthresh=1)
    a.set_ylim(bottom=0)
    if result["fixed_within_slo"]:
        a.axvline(result["fixed_within_slo"]["replicas"], color="grey", ls=":", lw=1,
                  label="fixed replicas within the SLO")
    a.set_title("each signal's targets (labels), means over the traces")
    a.legend(fontsize=8)
    b.set_xlabel("minutes")
    b.set_ylabel("pods (starting and draining included)")
    b.set_title("pods over the first trace, at the manifests' targets")
    if trace:
        share = b.twinx()
        bins = max(1, int(trace[-1].arrival // 60) + 1)
        counts, pruned = [0] * bins, [0] * bins
        for req in trace:
            counts[int(req.arrival // 60)] += 1
            pruned[int(req.arrival // 60)] += req.preset != "none"
        share.plot(range(bins), [p / c if c else 0 for p, c in zip(pruned, counts)], color="grey", lw=0.8,
                   alpha=0.6)
        share.set_ylim(0, 1.05)
        share.set_ylabel("pruned share of arrivals (grey)")
    b.legend(fontsize=8, loc="upper left")
    fig.suptitle("Autoscaling on queued requests vs KV demand (queue model fed with this repository's "
                 "measurements)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.autoscale_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None,
                        help="stretch the default trace's phases to this many seconds (default: 3600)")
    parser.add_argument("--seed", type=int, default=0, help="the first trace's seed")
    parser.add_argument("--traces", type=int, default=5, help="traces (seeds) averaged")
    parser.add_argument("--slo-s", type=float, default=10.0, help="p95 queueing delay to meet")
    parser.add_argument("--startup-s", type=float, default=120.0, help="a new pod's time to ready")
    parser.add_argument("--json", default="results/autoscale_sim.json")
    parser.add_argument("--plot", default="results/autoscale_sim.png")
    args = parser.parse_args(argv)
    phases = DEFAULT_PHASES
    if args.duration:
        scale = args.duration / sum(p.duration_s for p in phases)
        phases = tuple(dataclasses.replace(p, duration_s=p.duration_s * scale) for p in phases)
    traces = [make_trace(phases, args.seed + i) for i in range(args.traces)]
    result = compare(traces, MEASURED, args.slo_s, startup_s=args.startup_s)
    for path in (args.json, args.plot):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result, traces[0], args.plot)
    print(report(result))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
