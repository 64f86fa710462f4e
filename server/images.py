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
from urllib.parse import unquote, urljoin, urlparse

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
        scheme = urlparse(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            data = self._decode_data_url(url, param)
        elif scheme in ("http", "https"):
            data = await self._fetch(url, param)
        elif scheme == "file":
            data = self._read_file(url, param)
        else:
            raise _bad(f"unsupported image URL scheme {scheme or '(none)'!r}: use data:, http(s): or file:", param)
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
            raise _bad(f"data URL media type {mime!r} is not an image", param)
        if "base64" not in options:
            raise _bad("data URL images must be base64-encoded", param)
        self._check_size(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("data URL payload is not valid base64", param) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        s = self.settings
        try:
            async with httpx.AsyncClient(timeout=s.image_fetch_timeout_s, follow_redirects=False) as client:
                for _ in range(s.max_image_redirects + 1):
                    await self._check_host(url, param)
                    async with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise _bad(f"image URL answered HTTP {response.status_code}", param)
                        declared = int(response.headers.get("content-length") or 0)
                        self._check_size(declared, param)
                        chunks, total = [], 0
                        async for chunk in response.aiter_bytes():
                            total += len(chunk)
                            self._check_size(total, param)
                            chunks.append(chunk)
                        return b"".join(chunks)
                raise _bad(f"image URL redirected more than {s.max_image_redirects} times", param)
        except httpx.TimeoutException:
            raise _bad(f"image fetch timed out after {s.image_fetch_timeout_s} s", param) from None
        except httpx.HTTPError as e:
            raise _bad(f"image URL could not be fetched: {type(e).__name__}", param) from None

    async def _check_host(self, url: str, param: str) -> None:
        s = self.settings
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise _bad("image redirect to a non-http(s) URL", param)
        host = parsed.hostname.lower()
        if s.allowed_image_hosts is not None and host not in {h.lower() for h in s.allowed_image_hosts}:
            raise _bad(f"image host {host!r} is not in the allowed hosts", param)
        if s.allow_private_image_hosts:
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise _bad(f"image host {host!r} does not resolve", param) from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if not ip.is_global or ip.is_multicast:
                raise _bad(f"image host {host!r} resolves to a non-public address; fetching it is not allowed", param)

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

    def _decode(self, data: bytes, param: str) -> Image.Image:
        self._check_size(len(data), param)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise _bad("image has too many pixels", param, 413) from None
        except (UnidentifiedImageError, OSError):
            raise _bad("image data is not a supported image format", param) from None
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise _bad(f"image is {width}x{height} pixels; the limit is {self.settings.max_image_pixels} pixels",
                       param, 413)
        try:
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError):
            raise _bad("image data is truncated or corrupt", param) from None
        return image.convert("RGB")
