"""Render the Grafana dashboard's panels from a live gateway, without Grafana.

python deploy/render_dashboard.py --gateway http://127.0.0.1:8000 --model NAME \\
    [--duration 120] [--out docs/dashboard.png]

Starts a local Prometheus (the `prometheus` binary, e.g. Debian's package)
scraping the gateway every 2 s, drives a mixed-preset load with the load
generator, then evaluates every panel's own PromQL query over the run with
Prometheus's query_range API and plots the panels in the dashboard's layout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/feather.json"


def start_prometheus(gateway: str, workdir: Path, port: int) -> subprocess.Popen:
    target = urlparse(gateway).netloc
    config = {"global": {"scrape_interval": "2s"},
              "scrape_configs": [{"job_name": "feather-gateway", "static_configs": [{"targets": [target]}]}]}
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("needs the prometheus binary (apt-get install prometheus)")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(60):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("prometheus did not start")


def query_range(port: int, expr: str, start: float, end: float) -> list[dict]:
    expr = expr.replace("$__rate_interval", "20s")
    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query_range",
                  params={"query": expr, "start": start, "end": end, "step": "2s"}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt


def render(port: int, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            for series in query_range(port, target["expr"], start, end):
                times = [float(t) - start for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(times, values, label=legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} (panels' PromQL evaluated by Prometheus; x: seconds into the run)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--prometheus-port", type=int, default=19090)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/dashboard.png")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(ROOT))
    from loadtest.generator import LoadConfig, run_load

    with tempfile.TemporaryDirectory() as tmp:
        prometheus = start_prometheus(args.gateway, Path(tmp), args.prometheus_port)
        try:
            start = time.time()
            cfg = LoadConfig(url=args.gateway, model=args.model, presets=["none", "fastv", "feather", "pyramiddrop"],
                             requests=100_000, duration_s=args.duration, concurrency=6, max_tokens=16)
            asyncio.run(run_load(cfg))
            time.sleep(6)  # two more scrapes
            args.out.parent.mkdir(parents=True, exist_ok=True)
            render(args.prometheus_port, start, time.time(), args.out)
        finally:
            prometheus.terminate()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
