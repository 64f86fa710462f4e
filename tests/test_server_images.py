"""Image loading from untrusted URLs (server/images.py), without an engine:
a local HTTP server plays the remote host. Checks the fetch limits (size
with and without Content-Length, time, redirects, status), the host allow
list, the public-address rule on every redirect hop, that the connection
goes to the address that was checked (no second DNS answer: DNS
rebinding), file URLs, and that decoding refuses what it should."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from server.errors import APIError
from server.images import ImageLoader
from server.settings import Settings


def _png(size=(32, 24)) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()  # ~2.4 kB: noise does not compress


class _Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []  # Host headers seen

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Handler.hosts.append(self.headers.get("Host", ""))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, length=True)
        elif path == "/chunked.png":  # no Content-Length: read until close
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)
        elif path == "/slow.png":
            time.sleep(2)
            self._send(200, PNG, length=True)
        elif path.startswith("/redirect/"):  # /redirect/<n> -> /redirect/<n-1> ... -> /img.png
            n = int(path.rsplit("/", 1)[1])
            self._redirect("/img.png" if n <= 1 else f"/redirect/{n - 1}")
        elif path == "/to-private":
            self._redirect("http://10.1.2.3/img.png")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/text":
            self._send(200, b"hello, not an image", length=True)
        else:
            self._send(404, b"missing", length=True)

    def _send(self, status: int, body: bytes, length: bool) -> None:
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that stop reading (size limit, timeout) are the point of some tests


@pytest.fixture(scope="module")
def origin():
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _loader(**overrides) -> ImageLoader:
    settings = dict(model="unused", max_image_bytes=100_000, max_image_pixels=1_000_000,
                    image_fetch_timeout_s=1.0, max_image_redirects=3)
    settings.update(overrides)
    return ImageLoader(Settings(**settings))


def _load(loader: ImageLoader, url: str):
    return asyncio.run(loader.load(url, "image"))


def _refused(loader: ImageLoader, url: str, status: int = 400) -> str:
    with pytest.raises(APIError) as err:
        _load(loader, url)
    assert err.value.status == status and err.value.param == "image", err.value.message
    return err.value.message


def test_fetch_when_private_hosts_allowed(origin):
    image = _load(_loader(allow_private_image_hosts=True), origin + "/img.png")
    assert image.size == (32, 24) and image.mode == "RGB"


def test_private_hosts_refused_by_default(origin):
    assert "non-public" in _refused(_loader(), origin + "/img.png")
    port = origin.rsplit(":", 1)[1]
    for host in ("localhost", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]", "10.0.0.1", "192.168.1.1",
                 "169.254.169.254", "100.64.0.1", "[fe80::1]", "224.0.0.1"):
        assert "non-public" in _refused(_loader(), f"http://{host}:{port}/img.png"), host


def test_fetch_limits(origin):
    loader = _loader(allow_private_image_hosts=True, max_image_bytes=10_000)
    _refused(loader, origin + "/chunked.png", 413)  # counted while streaming: no Content-Length
    big = _loader(allow_private_image_hosts=True, max_image_bytes=1000)
    _refused(big, origin + "/img.png", 413)  # Content-Length says too much
    loader = _loader(allow_private_image_hosts=True)
    assert "timed out" in _refused(loader, origin + "/slow.png")
    assert _load(loader, origin + "/redirect/3").size == (32, 24)  # 3 redirects: allowed
    assert "redirected more than 3" in _refused(loader, origin + "/redirect/4")
    assert "HTTP 404" in _refused(loader, origin + "/missing.png")
    assert "not a supported image" in _refused(loader, origin + "/text")
    assert "http(s)" in _refused(loader, origin + "/to-file")


def test_allowed_hosts(origin):
    loader = _loader(allow_private_image_hosts=True, allowed_image_hosts=["127.0.0.1"])
    assert _load(loader, origin + "/img.png").size == (32, 24)
    port = origin.rsplit(":", 1)[1]
    assert "allowed hosts" in _refused(loader, f"http://localhost:{port}/img.png")


def test_connects_to_the_checked_address_and_checks_every_hop(origin, monkeypatch):
    """A name that resolves to an address deemed public is fetched from that
    very address (no second lookup that a rebinding DNS server could answer
    with another), with the original Host header; a redirect to a private
    address is refused."""
    loader = _loader()
    looked_up = []

    async def resolve(host, port):
        looked_up.append(host)
        return {"images.test": ["127.0.0.1"], "10.1.2.3": ["10.1.2.3"]}[host]

    monkeypatch.setattr(loader, "_resolve", resolve)
    monkeypatch.setattr(ImageLoader, "_public", staticmethod(lambda address: address == "127.0.0.1"))
    port = origin.rsplit(":", 1)[1]
    _Handler.hosts.clear()
    # "images.test" resolves nowhere for the HTTP client: only the pinned address can work.
    assert _load(loader, f"http://images.test:{port}/img.png").size == (32, 24)
    assert _Handler.hosts == [f"images.test:{port}"] and looked_up == ["images.test"]
    assert "non-public" in _refused(loader, f"http://images.test:{port}/to-private")
    assert looked_up[-1] == "10.1.2.3"


@pytest.mark.parametrize("url, fragment", [
    ("http://example.com:99999/x.png", "malformed image URL"),
    ("https://[zz]/x.png", "malformed image URL"),
    ("http:///x.png", "with a host"),
    ("gopher://example.com/x", "unsupported image URL scheme"),
    ("no-scheme.png", "unsupported image URL scheme"),
    ("http://no-such-host.invalid/x.png", "does not resolve"),
])
def test_malformed_urls(url, fragment):
    assert fragment in _refused(_loader(), url)


def test_file_urls(tmp_path):
    (tmp_path / "ok.png").write_bytes(PNG)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(PNG)
    (tmp_path / "link.png").symlink_to(outside)
    assert "disabled" in _refused(_loader(), f"file://{tmp_path}/ok.png")
    loader = _loader(allow_file_urls=True, allowed_local_dir=tmp_path)
    assert _load(loader, f"file://{tmp_path}/ok.png").size == (32, 24)
    assert "outside" in _refused(loader, f"file://{tmp_path}/../{outside.name}")
    assert "outside" in _refused(loader, f"file://{tmp_path}/link.png")  # symlinks resolved first
    assert "names no file" in _refused(loader, f"file://{tmp_path}/missing.png")
    assert "names no file" in _refused(loader, f"file://{tmp_path}")


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_decoding():
    loader = _loader()
    for mode, fmt in [("RGBA", "PNG"), ("P", "GIF"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("L", "WEBP"),
                      ("1", "BMP"), ("F", "TIFF")]:
        buf = io.BytesIO()
        Image.new(mode, (20, 10)).save(buf, format=fmt)
        assert _load(loader, _data_url(buf.getvalue())).mode == "RGB", (mode, fmt)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert "not a supported image" in _refused(loader, _data_url(eps))  # no Ghostscript on untrusted bytes
    assert "truncated or corrupt" in _refused(loader, _data_url(PNG[:-30]))
    assert "not valid base64" in _refused(loader, "data:image/png;base64,@@@")
    assert "not an image" in _refused(loader, _data_url(PNG, "text/html"))
    assert "base64-encoded" in _refused(loader, "data:image/png,rawbytes")
    assert "pixels" in _refused(_loader(max_image_pixels=100), _data_url(PNG), 413)
    assert "bytes" in _refused(_loader(max_image_bytes=1000), _data_url(PNG), 413)
