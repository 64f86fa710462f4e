"""Loading images from untrusted URLs, within limits.

data: URLs are decoded; http(s) URLs are fetched with size, time and
redirect limits, an optional host allow list and, unless allowed, never
from loopback, private, link-local or otherwise reserved addresses (checked
on every redirect hop); file: URLs only when enabled and inside one
directory. Decoded images are bounded in bytes and pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse, urlunparse

import httpx
from PIL import Image, UnidentifiedImageError

from server.errors import APIError
from server.settings import Settings


def _bad(message: str, param: str, status: int = 400) -> APIError:
    return APIError(status, message, param=param, code="invalid_image")


class ImageLoader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def load(self, url: str, param: str) -> Image.Image:
        """The decoded RGB image at `url`; APIError (400/413) otherwise."""
        scheme = url.partition(":")[0].strip().lower() if ":" in url else ""
        if scheme == "data":
            data = self._decode_data_url(url, param)
        elif scheme in ("http", "https"):
            data = await self._fetch(url, param)
        elif scheme == "file":
            data = self._read_file(url, param)
        else:
            raise _bad(f"unsupported image URL scheme {scheme[:20] or '(none)'!r}: use data:, http(s): or file:",
                       param)
        return self._decode(data, param)

    # -- sources -------------------------------------------------------------

    def _check_size(self, size: int, param: str) -> None:
        if size > self.settings.max_image_bytes:
            raise _bad(f"image is {size} bytes; the limit is {self.settings.max_image_bytes}", param, 413)

    def _decode_data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise _bad("malformed data URL: no ',' separating header and data", param)
        mime, *options = header.split(";")
        if mime and not mime.lower().startswith("image/"):
            raise _bad(f"data URL media type {mime[:40]!r} is not an image", param)
        if "base64" not in options:
            raise _bad("data URL images must be base64-encoded", param)
        self._check_size(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("data URL payload is not valid base64", param) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        """GET `url` hop by hop: every hop's host is checked and, unless
        private hosts are allowed, the connection goes to the very address
        that was checked (no second DNS lookup that could answer otherwise)."""
        s = self.settings
        try:
            async with httpx.AsyncClient(timeout=s.image_fetch_timeout_s, follow_redirects=False,
                                         trust_env=False) as client:
                for _ in range(s.max_image_redirects + 1):
                    request = client.build_request("GET", **await self._pinned(url, param))
                    response = await client.send(request, stream=True)
                    try:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise _bad(f"image URL answered HTTP {response.status_code}", param)
                        declared = response.headers.get("content-length")
                        if declared is not None and declared.isdigit():
                            self._check_size(int(declared), param)
                        chunks, total = [], 0
                        async for chunk in response.aiter_bytes():
                            total += len(chunk)
                            self._check_size(total, param)
                            chunks.append(chunk)
                        return b"".join(chunks)
                    finally:
                        await response.aclose()
                raise _bad(f"image URL redirected more than {s.max_image_redirects} times", param)
        except httpx.TimeoutException:
            raise _bad(f"image fetch timed out after {s.image_fetch_timeout_s} s", param) from None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            raise _bad(f"image URL could not be fetched: {type(e).__name__}", param) from None

    async def _pinned(self, url: str, param: str) -> dict:
        """Arguments of `build_request` for one hop: the URL (its host
        replaced by the checked address unless private hosts are allowed)
        plus the Host header and TLS server name of the original host."""
        s = self.settings
        try:
            parsed = urlparse(url)
            port = parsed.port
        except ValueError as e:  # bad port, bad IPv6 literal
            raise _bad(f"malformed image URL: {e}", param) from None
        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https") or not parsed.hostname:
            raise _bad("image URL (or a redirect) is not an http(s) URL with a host", param)
        host = parsed.hostname.lower()
        if s.allowed_image_hosts is not None and host not in {h.lower() for h in s.allowed_image_hosts}:
            raise _bad(f"image host {host!r} is not in the allowed hosts", param)
        if s.allow_private_image_hosts:
            return {"url": url}
        port = port or (443 if scheme == "https" else 80)
        address = await self._checked_address(host, port, param)
        netloc = f"[{address}]" if ":" in address else address
        pinned = urlunparse(parsed._replace(netloc=f"{netloc}:{port}"))
        host_header = f"[{host}]" if ":" in host else host
        if parsed.port is not None:
            host_header += f":{parsed.port}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        return {"url": pinned, "headers": {"Host": host_header}, "extensions": extensions}

    async def _resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [info[4][0] for info in infos]

    @staticmethod
    def _public(address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_global and not ip.is_multicast

    async def _checked_address(self, host: str, port: int, param: str) -> str:
        """One address of `host`, every one of which must be public."""
        try:
            addresses = await self._resolve(host, port)
        except (socket.gaierror, UnicodeError, ValueError):
            raise _bad(f"image host {host!r} does not resolve", param) from None
        if not addresses:
            raise _bad(f"image host {host!r} does not resolve", param)
        if not all(self._public(a) for a in addresses):
            raise _bad(f"image host {host!r} resolves to a non-public address; fetching it is not allowed", param)
        return addresses[0].split("%")[0]

    def _read_file(self, url: str, param: str) -> bytes:
        s = self.settings
        if not s.allow_file_urls or s.allowed_local_dir is None:
            raise _bad("file: image URLs are disabled on this server", param)
        path = Path(unquote(urlparse(url).path)).resolve()
        root = Path(s.allowed_local_dir).resolve()
        if not path.is_relative_to(root):
            raise _bad("file: image URL is outside the allowed directory", param)
        if not path.is_file():
            raise _bad("file: image URL names no file", param)
        self._check_size(path.stat().st_size, param)
        return path.read_bytes()

    # -- decoding ------------------------------------------------------------

    # Decoders for untrusted bytes: the common raster formats only (no EPS,
    # which would run Ghostscript, nor the long tail of rarely used plugins).
    FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

    def _decode(self, data: bytes, param: str) -> Image.Image:
        self._check_size(len(data), param)
        try:
            image = Image.open(io.BytesIO(data), formats=self.FORMATS)
        except Image.DecompressionBombError:
            raise _bad("image has too many pixels", param, 413) from None
        except Exception:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
            raise _bad(f"image data is not a supported image format ({', '.join(self.FORMATS)})", param) from None
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise _bad(f"image is {width}x{height} pixels; the limit is {self.settings.max_image_pixels} pixels",
                       param, 413)
        try:
            image.load()
            return image.convert("RGB")
        except Image.DecompressionBombError:
            raise _bad("image has too many pixels", param, 413) from None
        except Exception:  # noqa: BLE001
            raise _bad("image data is truncated or corrupt", param) from None
