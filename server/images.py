"""Loading images from untrusted URLs, within limits.

data: URLs are decoded; http(s) URLs are fetched under one total deadline
(DNS, connects and reads of every redirect hop together), with size and
redirect limits, `Accept-Encoding: identity` (a compressed answer is
refused, never inflated), an optional host and port allow list and, unless
private hosts are allowed, only from global unicast addresses (IPv4 inside
IPv6 forms such as NAT64, 6to4, IPv4-compatible/-mapped and Teredo is
decoded and checked too; checked on every redirect hop, and the connection
goes to the very address that was checked). Every refused or failed fetch
answers the same text; the reason goes to the server log only (no port
scanner or internal-DNS oracle). file: URLs only when enabled and inside one
directory, read in a worker thread.

Decoding runs in a small pool of worker threads (a concurrency cap and a
time limit) and refuses, from the header alone and before any pixel is
decoded: formats outside a short list (TIFF only when enabled), more than
`max_image_pixels` pixels and an aspect ratio above `max_image_aspect_ratio`
(vLLM's processor resizes the short side to the model's input size: a
10000x2 image would become 1.7M x 336 pixels). EXIF orientation is applied.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import ipaddress
import logging
import socket
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse, urlunparse

import httpx
from PIL import Image, ImageOps

from server.errors import APIError
from server.settings import Settings

logger = logging.getLogger("server.images")

FETCH_FAILED = "image URL could not be fetched"  # the one text for every refused or failed fetch


def _bad(message: str, param: str, status: int = 400, code: str = "invalid_image") -> APIError:
    return APIError(status, message, param=param, code=code)


class _FetchRefused(Exception):
    """A fetch refused or failed for `reason` (logged, never answered)."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


# Special-purpose blocks refused whatever this Python's ipaddress tables say
# (they differ between versions): IANA's special-purpose registries.
_NON_GLOBAL_V4 = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")]
_NON_GLOBAL_V6 = [ipaddress.ip_network(n) for n in (
    "2001::/23", "2001:db8::/32", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")]


def _global_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in net for net in _NON_GLOBAL_V4)


def is_global_unicast(address: str) -> bool:
    """Whether fetching from `address` may reach only the public internet.

    IPv4: globally routable unicast. IPv6: inside 2000::/3 and globally
    routable (site-local fec0::/10, unique-local, link-local, multicast and
    the documentation ranges are not); an IPv4 address carried inside an IPv6
    one (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64
    64:ff9b::/96, 6to4 2002::/16, Teredo 2001::/32) must itself be global."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return _global_v4(ip)
    if ip.ipv4_mapped is not None:
        return _global_v4(ip.ipv4_mapped)
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:  # the IPv4 address is the low 32 bits
        return _global_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:  # local-use NAT64 prefixes (RFC 8215): the mapping is not known here
        return False
    if ip.sixtofour is not None:
        # 6to4 (2002::/16, inside 2000::/3) reaches its embedded IPv4 address: that decides. (Python's
        # own `is_global` of 2002::/16 changed between 3.11 patch releases: 3.11.2 calls it private.)
        return _global_v4(ip.sixtofour)
    if ip.teredo is not None and not all(_global_v4(v4) for v4 in ip.teredo):
        return False
    # Teredo (2001::/32, inside 2001::/23) relays tunnel to anywhere: never fetched.
    return ip in _GLOBAL_UNICAST_V6 and ip.is_global and not any(ip in net for net in _NON_GLOBAL_V6)


class ImageLoader:
    # Decoders for untrusted bytes: the common raster formats only (no EPS,
    # which would run Ghostscript, nor the long tail of rarely used plugins);
    # TIFF only when the setting enables it.
    FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.formats = self.FORMATS + (("TIFF",) if settings.allow_tiff_images else ())
        # The pool caps how many images decode at once (memory) and keeps the
        # event loop free; a decode that times out finishes in its thread but
        # never takes more than the pool's threads.
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, settings.image_decode_workers),
                                                           thread_name_prefix="image-decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def load(self, url: str, param: str) -> Image.Image:
        """The decoded RGB image at `url`; APIError (400/413) otherwise."""
        # Data URLs run to megabytes: nothing here copies the payload on the event loop.
        colon = url.find(":", 0, 64)
        scheme = url[:colon].strip().lower() if colon >= 0 else ""
        if scheme == "data":
            start = self._data_url_payload_start(url, param)
            data = await self._in_pool(self._b64decode, url, start, param)
        elif scheme in ("http", "https"):
            self._check_syntax(url, param)
            data = await self._fetch_with_deadline(url, param)
        elif scheme == "file":
            data = await asyncio.to_thread(self._read_file, url, param)
        else:
            raise _bad(f"unsupported image URL scheme {scheme[:20] or '(none)'!r}: use data:, http(s): or file:",
                       param)
        return await self._in_pool(self._decode, data, param)

    async def _in_pool(self, fn, *args):
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            async with asyncio.timeout(self.settings.image_decode_timeout_s):
                return await future
        except TimeoutError:
            raise _bad(f"image decoding took longer than {self.settings.image_decode_timeout_s} s", args[-1],
                       code="image_decode_timeout") from None

    # -- sources -------------------------------------------------------------

    def _check_size(self, size: int, param: str) -> None:
        if size > self.settings.max_image_bytes:
            raise _bad(f"image is {size} bytes; the limit is {self.settings.max_image_bytes}", param, 413)

    def _data_url_payload_start(self, url: str, param: str) -> int:
        """Where the base64 payload of a data: URL starts (its header checked)."""
        comma = url.find(",", 0, 1024)
        if comma < 0:
            raise _bad("malformed data URL: no ',' separating header and data", param)
        mime, *options = url[url.index(":") + 1:comma].split(";")
        if mime and not mime.lower().startswith("image/"):
            raise _bad(f"data URL media type {mime[:40]!r} is not an image", param)
        if "base64" not in options:
            raise _bad("data URL images must be base64-encoded", param)
        self._check_size((len(url) - comma - 1) * 3 // 4, param)
        return comma + 1

    @staticmethod
    def _b64decode(url: str, start: int, param: str) -> bytes:
        try:
            return base64.b64decode(url[start:], validate=True)
        except (binascii.Error, ValueError):
            raise _bad("data URL payload is not valid base64", param) from None

    @staticmethod
    def _check_syntax(url: str, param: str) -> None:
        """The client's own URL is well formed (told in detail: no oracle)."""
        try:
            parsed = urlparse(url)
            parsed.port  # noqa: B018 - raises on a bad port
        except ValueError as e:  # bad port, bad IPv6 literal
            raise _bad(f"malformed image URL: {e}", param) from None
        if not parsed.hostname:
            raise _bad("image URL is not an http(s) URL with a host", param)

    async def _fetch_with_deadline(self, url: str, param: str) -> bytes:
        """The bytes at `url`, or the one uniform error (reason logged)."""
        s = self.settings
        try:
            async with asyncio.timeout(s.image_fetch_timeout_s):
                return await self._fetch(url, param)
        except APIError:
            raise  # 413: the size limit, measured on what a permitted host sent
        except _FetchRefused as e:
            reason = str(e)
        except TimeoutError:
            reason = f"no complete answer within {s.image_fetch_timeout_s} s"
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
        logger.warning("image fetch refused or failed (%s): %s", param, reason)
        raise _bad(FETCH_FAILED, param, code="image_fetch_failed")

    async def _fetch(self, url: str, param: str) -> bytes:
        """GET `url` hop by hop: every hop's host is checked and, unless
        private hosts are allowed, the connection goes to the very address
        that was checked (no second DNS lookup that could answer otherwise)."""
        s = self.settings
        # Per-phase limits as well; the deadline above bounds the whole.
        async with httpx.AsyncClient(timeout=s.image_fetch_timeout_s, follow_redirects=False,
                                     trust_env=False) as client:
            for _ in range(s.max_image_redirects + 1):
                request = client.build_request("GET", **await self._pinned(url))
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise _FetchRefused(f"HTTP {response.status_code}")
                    encoding = response.headers.get("content-encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        # Asked for identity: anything else may be a decompression bomb.
                        raise _FetchRefused(f"Content-Encoding {encoding[:40]!r}")
                    declared = response.headers.get("content-length")
                    if declared is not None and declared.isdigit():
                        self._check_size(int(declared), param)
                    chunks, total = [], 0
                    async for chunk in response.aiter_raw():  # raw: never inflated by httpx
                        total += len(chunk)
                        self._check_size(total, param)
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    await response.aclose()
            raise _FetchRefused(f"more than {s.max_image_redirects} redirects")

    async def _pinned(self, url: str) -> dict:
        """Arguments of `build_request` for one hop: the URL (its host
        replaced by the checked address unless private hosts are allowed)
        plus the Host header and TLS server name of the original host."""
        s = self.settings
        try:
            parsed = urlparse(url)
            port = parsed.port
        except ValueError as e:  # bad port, bad IPv6 literal
            raise _FetchRefused(f"malformed URL: {e}") from None
        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https") or not parsed.hostname:
            raise _FetchRefused("not an http(s) URL with a host")
        host = parsed.hostname.lower()
        if s.allowed_image_hosts is not None and host not in {h.lower() for h in s.allowed_image_hosts}:
            raise _FetchRefused(f"host {host!r} is not in the allowed hosts")
        port = port or (443 if scheme == "https" else 80)
        if s.allowed_image_ports is not None and port not in s.allowed_image_ports:
            raise _FetchRefused(f"port {port} is not in the allowed ports")
        headers = {"Accept-Encoding": "identity"}
        if s.allow_private_image_hosts:
            return {"url": url, "headers": headers}
        address = await self._checked_address(host, port)
        netloc = f"[{address}]" if ":" in address else address
        pinned = urlunparse(parsed._replace(netloc=f"{netloc}:{port}"))
        host_header = f"[{host}]" if ":" in host else host
        if parsed.port is not None:
            host_header += f":{parsed.port}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        return {"url": pinned, "headers": {**headers, "Host": host_header}, "extensions": extensions}

    async def _resolve(self, host: str, port: int) -> list[str]:
        """Addresses of `host`, looked up in a worker thread (the fetch
        deadline stops the wait; getaddrinfo itself cannot be interrupted)."""
        infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        return [info[4][0] for info in infos]

    @staticmethod
    def _public(address: str) -> bool:
        return is_global_unicast(address)

    async def _checked_address(self, host: str, port: int) -> str:
        """One address of `host`, every one of which must be public."""
        try:
            addresses = await self._resolve(host, port)
        except (socket.gaierror, UnicodeError, ValueError) as e:
            raise _FetchRefused(f"host {host!r} does not resolve ({e})") from None
        if not addresses:
            raise _FetchRefused(f"host {host!r} does not resolve")
        refused = [a for a in addresses if not self._public(a)]
        if refused:
            raise _FetchRefused(f"host {host!r} resolves to non-public {refused[:3]}")
        return addresses[0].split("%")[0]

    def _read_file(self, url: str, param: str) -> bytes:
        s = self.settings
        if not s.allow_file_urls or s.allowed_local_dir is None:
            raise _bad("file: image URLs are disabled on this server", param)
        try:
            path = Path(unquote(urlparse(url).path)).resolve()
            root = Path(s.allowed_local_dir).resolve()
            if not path.is_relative_to(root):
                raise _bad("file: image URL is outside the allowed directory", param)
            if not path.is_file():
                raise _bad("file: image URL names no file", param)
            self._check_size(path.stat().st_size, param)
            with path.open("rb") as f:
                data = f.read(s.max_image_bytes + 1)
        except (ValueError, OSError):  # NUL in the name, a name too long, unreadable
            raise _bad("file: image URL names no readable file", param) from None
        self._check_size(len(data), param)
        return data

    # -- decoding (in the pool) ----------------------------------------------

    def _decode(self, data: bytes, param: str) -> Image.Image:
        s = self.settings
        self._check_size(len(data), param)
        try:
            image = Image.open(io.BytesIO(data), formats=self.formats)
        except Image.DecompressionBombError:
            raise _bad("image has too many pixels", param, 413) from None
        except Exception:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
            raise _bad(f"image data is not a supported image format ({', '.join(self.formats)})", param) from None
        width, height = image.size
        if width * height > s.max_image_pixels:
            raise _bad(f"image is {width}x{height} pixels; the limit is {s.max_image_pixels} pixels", param, 413)
        if min(width, height) < 1 or max(width, height) / min(width, height) > s.max_image_aspect_ratio:
            raise _bad(f"image is {width}x{height} pixels: its aspect ratio is above the limit of "
                       f"{s.max_image_aspect_ratio:g}:1", param, code="image_aspect_ratio")
        try:
            image.load()
        except Image.DecompressionBombError:
            raise _bad("image has too many pixels", param, 413) from None
        except Exception:  # noqa: BLE001
            raise _bad("image data is truncated or corrupt", param) from None
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the pixels as stored
            logger.debug("ignoring malformed EXIF orientation (%s)", param)
        try:
            return image.convert("RGB")
        except Exception:  # noqa: BLE001
            raise _bad("image data is truncated or corrupt", param) from None
