"""Image loading from untrusted URLs (server/images.py), without an engine:
a local HTTP server plays the remote host. Checks the fetch limits (size
with and without Content-Length, time, redirects, status), the host allow
list, the public-address rule on every redirect hop, that the connection
goes to the address that was checked (no second DNS answer: DNS
rebinding), file URLs, and that decoding refuses what it should. Every
refused or failed fetch answers one text (the reason is only logged).

No test sends a packet beyond 127.0.0.0/8: probes of other addresses are
refused before any connect, and the HTTP client's send is replaced by one
that fails the test should a refused address ever get that far."""

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
from server.images import FETCH_FAILED, ImageLoader
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


def _fetch_refused(loader: ImageLoader, url: str, caplog, reason: str) -> None:
    """Refused with the one uniform text; `reason` only in the server log."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.images"):
        message = _refused(loader, url)
    assert message == FETCH_FAILED, message
    assert reason in caplog.text, caplog.text


def test_private_hosts_refused_by_default(origin, caplog):
    _fetch_refused(_loader(), origin + "/img.png", caplog, "non-public")
    port = origin.rsplit(":", 1)[1]
    for host in ("localhost", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]", "10.0.0.1", "192.168.1.1",
                 "169.254.169.254", "100.64.0.1", "[fe80::1]", "224.0.0.1"):
        _fetch_refused(_loader(), f"http://{host}:{port}/img.png", caplog, "non-public")


def test_fetch_limits(origin, caplog):
    loader = _loader(allow_private_image_hosts=True, max_image_bytes=10_000)
    _refused(loader, origin + "/chunked.png", 413)  # counted while streaming: no Content-Length
    big = _loader(allow_private_image_hosts=True, max_image_bytes=1000)
    _refused(big, origin + "/img.png", 413)  # Content-Length says too much
    loader = _loader(allow_private_image_hosts=True)
    _fetch_refused(loader, origin + "/slow.png", caplog, "no complete answer within 1.0 s")
    assert _load(loader, origin + "/redirect/3").size == (32, 24)  # 3 redirects: allowed
    _fetch_refused(loader, origin + "/redirect/4", caplog, "more than 3 redirects")
    _fetch_refused(loader, origin + "/missing.png", caplog, "HTTP 404")
    assert "not a supported image" in _refused(loader, origin + "/text")
    _fetch_refused(loader, origin + "/to-file", caplog, "not an http(s) URL")


def test_allowed_hosts(origin, caplog):
    loader = _loader(allow_private_image_hosts=True, allowed_image_hosts=["127.0.0.1"])
    assert _load(loader, origin + "/img.png").size == (32, 24)
    port = origin.rsplit(":", 1)[1]
    _fetch_refused(loader, f"http://localhost:{port}/img.png", caplog, "not in the allowed hosts")


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
    assert _refused(loader, f"http://images.test:{port}/to-private") == FETCH_FAILED
    assert looked_up[-1] == "10.1.2.3"


@pytest.mark.parametrize("url, fragment", [
    ("http://example.com:99999/x.png", "malformed image URL"),
    ("https://[zz]/x.png", "malformed image URL"),
    ("http:///x.png", "with a host"),
    ("gopher://example.com/x", "unsupported image URL scheme"),
    ("no-scheme.png", "unsupported image URL scheme"),
    ("http://no-such-host.invalid/x.png", FETCH_FAILED),
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
    # Once answered 500: a NUL byte in the name, a name longer than the file system allows.
    assert "names no readable file" in _refused(loader, f"file://{tmp_path}/ok%00.png")
    assert "names no" in _refused(loader, f"file://{tmp_path}/{'a' * 300}.png")


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_decoding():
    loader = _loader()
    for mode, fmt in [("RGBA", "PNG"), ("P", "GIF"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("L", "WEBP"),
                      ("1", "BMP")]:
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


# -- round 2: SSRF forms, uniform errors, total deadline, encodings, decoding -----------------------

def _no_network(monkeypatch) -> list:
    """Make the HTTP client's send fail the test: a probe address must be
    refused before any connect (and no packet may leave this machine)."""
    import httpx

    sent = []

    async def send(self, request, **kwargs):
        sent.append(str(request.url))
        raise AssertionError(f"a connection to {request.url} was attempted")

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    return sent


# Addresses a name may resolve to (or a URL may spell) that reach no public host.
REFUSED_ADDRESSES = [
    ("nat64-metadata", "64:ff9b::a9fe:a9fe"),  # 169.254.169.254 through NAT64
    ("nat64-loopback", "64:ff9b::7f00:1"),
    ("nat64-private", "64:ff9b::a00:1"),
    ("nat64-local-use", "64:ff9b:1::a9fe:a9fe"),
    ("6to4-metadata", "2002:a9fe:a9fe::1"),
    ("6to4-loopback", "2002:7f00:1::"),
    ("ipv4-compatible-metadata", "::a9fe:a9fe"),
    ("ipv4-compatible-loopback", "::127.0.0.1"),
    ("ipv4-mapped-loopback", "::ffff:127.0.0.1"),
    ("ipv4-mapped-private", "::ffff:192.168.0.1"),
    ("teredo", "2001:0:4136:e378:8000:63bf:3fff:fdd2"),
    ("teredo-hiding-private", "2001:0:4136:e378:8000:63bf:f5ff:fffe"),
    ("site-local", "fec0::1"),
    ("unique-local", "fd00::1"),
    ("link-local-v6", "fe80::1"),
    ("loopback-v6", "::1"),
    ("unspecified-v6", "::"),
    ("multicast-v6", "ff02::1"),
    ("documentation-v6", "2001:db8::1"),
    ("discard-only-v6", "100::1"),
    ("loopback", "127.0.0.1"),
    ("this-network", "0.0.0.0"),
    ("private-10", "10.1.2.3"),
    ("private-172", "172.16.0.1"),
    ("private-192", "192.168.1.1"),
    ("link-local-metadata", "169.254.169.254"),
    ("shared-cgnat", "100.64.0.1"),
    ("ietf-protocol", "192.0.0.8"),
    ("benchmarking", "198.18.0.1"),
    ("documentation", "203.0.113.5"),
    ("reserved-240", "240.0.0.1"),
    ("broadcast", "255.255.255.255"),
    ("multicast", "224.0.0.1"),
    ("scoped-link-local", "fe80::1%lo"),
    ("not-an-address", "example.com"),
]
GLOBAL_ADDRESSES = [
    ("ipv4", "8.8.8.8"),
    ("ipv6", "2606:4700:4700::1111"),
    ("nat64-of-public", "64:ff9b::808:808"),
    ("6to4-of-public", "2002:808:808::1"),
    ("ipv4-mapped-public", "::ffff:8.8.8.8"),
]


@pytest.mark.parametrize("address", [a for _, a in REFUSED_ADDRESSES], ids=[i for i, _ in REFUSED_ADDRESSES])
def test_non_global_addresses_refused(address):
    from server.images import is_global_unicast

    assert not is_global_unicast(address)


@pytest.mark.parametrize("address", [a for _, a in GLOBAL_ADDRESSES], ids=[i for i, _ in GLOBAL_ADDRESSES])
def test_global_unicast_addresses_allowed(address):
    from server.images import is_global_unicast

    assert is_global_unicast(address)


@pytest.mark.parametrize("address", [a for _, a in REFUSED_ADDRESSES[:20]], ids=[i for i, _ in REFUSED_ADDRESSES[:20]])
def test_ssrf_probe_refused_before_any_connect(address, monkeypatch, caplog):
    """A name resolving to the probe address, and the address as an URL
    literal: refused with the uniform text, no connection attempted."""
    sent = _no_network(monkeypatch)
    loader = _loader()

    async def resolve(host, port):
        return [address] if host == "probe.test" else [host]

    monkeypatch.setattr(loader, "_resolve", resolve)
    _fetch_refused(loader, "http://probe.test/latest/meta-data", caplog, "non-public")
    literal = f"[{address}]" if ":" in address else address
    if "%" not in address:
        _fetch_refused(loader, f"http://{literal}:8080/x.png", caplog, "non-public")
    assert sent == []


def _gzip_bomb() -> bytes:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    block = b"\0" * 2**20
    return b"".join(packer.compress(block) for _ in range(64)) + packer.flush()


_GZIP_BOMB = _gzip_bomb()  # 64 kB on the wire, 64 MB inflated


class _Counting(_Handler):
    connections = 0
    encodings: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Counting.connections += 1
        _Counting.encodings.append(self.headers.get("Accept-Encoding", ""))
        if self.path == "/gzip-bomb.png":
            body = _GZIP_BOMB
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/gzip-gzip.png":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip, gzip")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b\0\0")
        elif self.path == "/trickle.png":  # a byte every 0.3 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for b in PNG[:40]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def counting_origin():
    server = _Server(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_identity_encoding_asked_and_compressed_answers_refused(counting_origin, caplog):
    import resource

    loader = _loader(allow_private_image_hosts=True, max_image_bytes=10 * 2**20)
    _Counting.encodings.clear()
    assert _load(loader, counting_origin + "/img.png").size == (32, 24)
    assert _Counting.encodings == ["identity"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _fetch_refused(loader, counting_origin + "/gzip-bomb.png", caplog, "Content-Encoding 'gzip'")
    _fetch_refused(loader, counting_origin + "/gzip-gzip.png", caplog, "Content-Encoding 'gzip, gzip'")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 30, grown_mb  # never inflated (64 MB if it were)


def test_fetch_deadline_is_total_not_per_read(counting_origin, caplog):
    loader = _loader(allow_private_image_hosts=True, image_fetch_timeout_s=1.0)
    start = time.monotonic()
    _fetch_refused(loader, counting_origin + "/trickle.png", caplog, "no complete answer within 1.0 s")
    assert time.monotonic() - start < 2.5


def test_dns_lookup_within_the_deadline(monkeypatch, caplog):
    import socket

    sent = _no_network(monkeypatch)

    def slow_getaddrinfo(*args, **kwargs):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    loader = _loader(image_fetch_timeout_s=0.5)

    async def timed():
        start = time.monotonic()
        with pytest.raises(APIError) as err:
            await loader.load("http://slow-dns.test/x.png", "image")
        return time.monotonic() - start, err.value.message

    # (asyncio.run itself then waits for the lookup thread; a server's loop does not.)
    with caplog.at_level("WARNING", logger="server.images"):
        elapsed, message = asyncio.run(timed())
    assert elapsed < 1.0 and message == FETCH_FAILED and sent == []
    assert "no complete answer within 0.5 s" in caplog.text


def test_uniform_error_for_every_failed_fetch(counting_origin, caplog):
    from tests.helpers import free_port

    closed = free_port()
    loader = _loader(allow_private_image_hosts=True)
    _fetch_refused(loader, f"http://127.0.0.1:{closed}/x.png", caplog, "ConnectError")  # nothing listens
    port = counting_origin.rsplit(":", 1)[1]
    ports = _loader(allow_private_image_hosts=True, allowed_image_ports=[443])
    _fetch_refused(ports, counting_origin + "/img.png", caplog, f"port {port} is not in the allowed ports")
    _fetch_refused(_loader(allowed_image_ports=[80]), "http://example.com:8080/x.png", caplog,
                   "port 8080 is not in the allowed ports")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("size, ok", [((10000, 2), False), ((4000, 2), False), ((2, 10000), False),
                                      ((2001, 100), False), ((2000, 100), True), ((100, 2000), True)],
                         ids=["10000x2", "4000x2", "2x10000", "just-above-20", "exactly-20", "tall-20"])
def test_aspect_ratio_limit_before_decoding(size, ok):
    loader = _loader(max_image_pixels=16 * 2**20)
    url = _data_url(_encoded(Image.new("RGB", size, (200, 10, 10)), "PNG"))
    if ok:
        assert _load(loader, url).size == size
    else:
        with pytest.raises(APIError) as err:
            _load(loader, url)
        assert err.value.status == 400 and err.value.param == "image"
        assert err.value.code == "image_aspect_ratio" and "aspect ratio" in err.value.message


def test_tiff_only_when_enabled():
    tiff = _data_url(_encoded(Image.new("F", (20, 10)), "TIFF"), "image/tiff")
    assert "not a supported image format" in _refused(_loader(), tiff)
    assert _load(_loader(allow_tiff_images=True), tiff).size == (20, 10)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    loaded = _load(_loader(), _data_url(_encoded(image, "JPEG", exif=exif.tobytes()), "image/jpeg"))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and bottom[0] < 50  # the white half is now on top


def _noise_jpeg(side: int) -> bytes:
    noise = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return _encoded(Image.fromarray(noise), "JPEG", quality=90, progressive=True)


def test_decoding_capped_off_the_event_loop_and_timed():
    """Decodes run in the pool (at most image_decode_workers at once) while
    the event loop keeps ticking; a decode over its time limit is refused."""
    loader = _loader(max_image_bytes=20 * 2**20, max_image_pixels=16 * 2**20, image_decode_workers=2)
    url = _data_url(_noise_jpeg(1500), "image/jpeg")
    active, peak = 0, 0
    decode = loader._decode

    def counted(data, param):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return decode(data, param)
        finally:
            active -= 1

    loader._decode = counted

    async def run():
        gaps, last = [], time.perf_counter()

        async def tick():
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        images = await asyncio.gather(*(loader.load(url, "image") for _ in range(8)))
        ticker.cancel()
        return images, max(gaps)

    images, worst_gap = asyncio.run(run())
    assert all(i.size == (1500, 1500) for i in images)
    assert peak == 2
    assert worst_gap < 0.2, worst_gap
    slow = _loader(max_image_bytes=20 * 2**20, max_image_pixels=16 * 2**20, image_decode_timeout_s=0.001)
    with pytest.raises(APIError) as err:
        _load(slow, _data_url(_noise_jpeg(2000), "image/jpeg"))
    assert err.value.status == 400 and err.value.code == "image_decode_timeout"
