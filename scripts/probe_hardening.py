"""Hardening probes against a live gateway (issue 15): status, gateway RSS
growth and time for each attack, /metrics growth under random preset names,
/health latency during a burst of 16 large images, and what is left after
SIGKILL of the gateway.

.venv/bin/python scripts/probe_hardening.py   (about 3 minutes on 2 cores)

Starts its own gateway on the tiny checkpoint (built under checkpoints/ if
absent) with file URLs off and private image hosts allowed (a local origin
serves the decompression bomb and the slow answer); the SSRF forms are
probed on a second gateway with the defaults. Prints a markdown table.
"""
import asyncio
import base64
import gzip
import io
import json
import os
import random
import signal
import string
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feather_vllm.tools.checkpoints import ensure_checkpoint
from tests.helpers import ServerProcess, png_data_url, sample_images

ckpt = ensure_checkpoint("tiny", "checkpoints/tiny")
KEY = "k"
H = {"Authorization": f"Bearer {KEY}"}


class Origin(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/bomb":
            body = gzip.compress(gzip.compress(b"\0" * 300_000_000))
            self.send_response(200); self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip, gzip"); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        elif self.path == "/slow":
            self.send_response(200); self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000"); self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0"); self.wfile.flush(); time.sleep(9)
            except OSError:
                pass


origin = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
threading.Thread(target=origin.serve_forever, daemon=True).start()
oport = origin.server_address[1]

srv = ServerProcess(ckpt, "--served-model-name", "tiny", "--api-key", KEY, "--allow-private-image-hosts",
                    "--image-fetch-timeout-s", "10")
proc = psutil.Process(srv.proc.pid)


def rss() -> float:
    """The gateway process's resident memory, MiB."""
    return proc.memory_info().rss / 2**20

c = httpx.Client(base_url=srv.url, headers=H, timeout=120)


def chat(url=None, text="Where is the red square?", **kw):
    content = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}], **kw}


def probe(name, body=None, raw=None, headers=None):
    before, t = rss(), time.perf_counter()
    if raw is not None:
        r = c.post("/v1/chat/completions", content=raw, headers={**H, "content-type": "application/json", **(headers or {})})
    else:
        r = c.post("/v1/chat/completions", json=body, headers=headers)
    dt = time.perf_counter() - t
    msg = ""
    try:
        msg = r.json().get("error", {}).get("message", "")[:90]
    except Exception:
        pass
    print(f"| {name} | {r.status_code} | {rss() - before:+.1f} MB | {dt * 1000:.0f} ms | {msg} |", flush=True)


c.post("/v1/chat/completions", json=chat(png_data_url(sample_images()[1])))  # warm
print("| probe | status | gateway RSS | time | message |\n|---|---|---|---|---|")
for size in [(10000, 2), (4000, 2), (2, 10000)]:
    probe(f"{size[0]}x{size[1]} PNG", chat(png_data_url(Image.new("RGB", size))))
probe("gzip,gzip bomb 300 MB", chat(f"http://127.0.0.1:{oport}/bomb"))
probe("image placeholder x576 in text", chat(text="<image>" * 576))
probe("image placeholder in system message", {**chat(png_data_url(sample_images()[1])),
      "messages": [{"role": "system", "content": "<image>"}, chat(png_data_url(sample_images()[1]))["messages"][0]]})
probe("slow origin (1 byte / 9 s)", chat(f"http://127.0.0.1:{oport}/slow"))
probe("25 MB body, no key", raw=b'[' + b'{},' * (8 * 2**20) + b'{}]', headers={"Authorization": ""})
probe("file URL with %00", chat("file:///tmp/a%00.png"))


# SSRF forms on a gateway with the default settings (private hosts refused)
default = ServerProcess(ckpt, "--served-model-name", "tiny", "--api-key", KEY)
c_default = httpx.Client(base_url=default.url, headers=H, timeout=120)
for host in ["[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::1]", "[::169.254.169.254]", "[fec0::1]",
             "[2001:0:4136:e378:8000:63bf:5601:5601]", "169.254.169.254", "2130706433", "[::ffff:127.0.0.1]"]:
    t = time.perf_counter()
    r = c_default.post("/v1/chat/completions", json=chat(f"http://{host}/x.png"))
    print(f"| SSRF {host} | {r.status_code} | | {(time.perf_counter() - t) * 1000:.0f} ms | {r.json()['error']['message'][:60]} |")
default.stop()

# /metrics growth: 1000 requests with random preset names and stages
m0 = len(c.get("/metrics").text)
rng = random.Random(0)
async def flood():
    async with httpx.AsyncClient(base_url=srv.url, headers=H, timeout=60) as ac:
        sem = asyncio.Semaphore(16)
        async def one(i):
            name = "".join(rng.choices(string.ascii_letters, k=12))
            feather = {"preset": name} if i % 2 else {"preset": name, "stages": [{"layer": rng.randint(1, 31), "keep": 0.5}]}
            async with sem:
                await ac.post("/v1/chat/completions", json={**chat(), "feather": feather})
        await asyncio.gather(*(one(i) for i in range(1000)))
t = time.perf_counter(); asyncio.run(flood())
print(f"/metrics after 1000 random-preset requests: {len(c.get('/metrics').text) - m0:+d} bytes ({time.perf_counter() - t:.0f} s)")

# /health during bursts of 16 large images, probed from a separate process
# (a prober sharing this client's event loop would time its own sending).
import subprocess

import numpy as np

PROBER = """
import httpx, sys, time
client, lat, end = httpx.Client(base_url=sys.argv[1], timeout=30), [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.perf_counter(); client.get('/health'); lat.append(time.perf_counter() - t); time.sleep(0.02)
print(max(lat) * 1000, sorted(lat)[len(lat) // 2] * 1000, len(lat))
"""


def burst(label: str, image_url: str) -> None:
    body = json.dumps(chat(image_url)).encode()

    async def send() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.url, headers=H, timeout=300) as client:
            rs = await asyncio.gather(*(client.post("/v1/chat/completions", content=body,
                                                    headers={"content-type": "application/json"})
                                        for _ in range(16)))
            return [r.status_code for r in rs]

    prober = subprocess.Popen([sys.executable, "-c", PROBER, srv.url, "8"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    before = rss()
    codes = asyncio.run(send())
    grew = rss() - before
    worst, median, n = map(float, prober.communicate()[0].split())
    print(f"burst of 16 x {label}: statuses {sorted(set(codes))}, /health max {worst:.0f} ms, "
          f"p50 {median:.0f} ms over {n:.0f} probes; gateway RSS {grew:+.0f} MB")


ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
pixels = np.stack([np.tile(ramp, (4000, 1)), np.tile(ramp[:, None], (1, 4000)),
                   np.random.default_rng(0).integers(0, 40, (4000, 4000), dtype=np.uint8)], -1)
buf = io.BytesIO()
Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=True)
burst(f"16-megapixel progressive JPEGs ({len(buf.getvalue()) / 2**20:.1f} MB)",
      "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
for size in (9_500_000, 15_500_000):  # under and over the 10 MB image limit (400 / 413)
    burst(f"{size / 1e6:.1f} MB payloads", "data:image/jpeg;base64," + base64.b64encode(os.urandom(size)).decode())

# SIGKILL of the gateway: its descendants
kids = proc.children(recursive=True)
t = time.perf_counter(); os.kill(srv.proc.pid, signal.SIGKILL)
while any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids) and time.perf_counter() - t < 30:
    time.sleep(0.05)
print(f"SIGKILL gateway: {len(kids)} descendants, all gone after {time.perf_counter() - t:.2f} s")
