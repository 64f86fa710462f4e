"""Gateway settings: environment variables (FEATHER_*) and CLI flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting is an env var `FEATHER_<NAME>` and a flag `--<name>`."""

    model_config = SettingsConfigDict(env_prefix="FEATHER_", extra="ignore")

    model: str = Field(description="checkpoint directory (llava-hf layout)")
    served_model_name: str | None = Field(None, description="name clients use (default: the model dir's name)")
    host: str = "127.0.0.1"
    port: int = 8000
    default_preset: str = Field("none", description="pruning preset for requests that name none")
    kv_boundaries: list[int] | None = Field(None, description="first layers of the KV stages after the first "
                                            "(default: equal stages of about 4 layers, no vLLM padding)")
    tensor_parallel_size: int = Field(1, description="GPUs (ranks) the model is split over (vLLM's "
                                      "--tensor-parallel-size)")
    enable_prefix_caching: bool = Field(True, description="reuse cached KV of shared prompt prefixes (vLLM's "
                                        "default; pruned requests reuse the text before their image)")
    enforce_eager: bool = Field(False, description="no compilation or CUDA graphs (vLLM's --enforce-eager): "
                                "faster start-up, slower decode")
    kv_cache_gib: float = Field(2.0, description="KV cache budget in GiB")
    block_size: int | None = Field(None, description="KV block size in tokens (default: vLLM's)")
    max_model_len: int | None = Field(None, description="context length (default: the model's, as vLLM derives it)")
    max_num_seqs: int = 32
    dtype: str = "auto"
    max_images_per_request: int = 1
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 25 * 2**20
    max_image_aspect_ratio: float = Field(20.0, description="longer/shorter image side above this is refused "
                                          "(vLLM's resize to the model's short side would blow it up)")
    image_fetch_timeout_s: float = Field(10.0, description="total time for DNS, connects and reads of one image "
                                         "fetch, all redirects included")
    image_decode_timeout_s: float = Field(10.0, description="time one image may wait for and take decoding")
    image_decode_workers: int = Field(default_factory=lambda: 1 if (os.cpu_count() or 1) <= 4 else 2,
                                      description="images decoded at once (worker threads; default 1 on "
                                      "machines with up to 4 cores, else 2)")
    max_image_redirects: int = 3
    allowed_image_hosts: list[str] | None = Field(None, description="if set, only these hosts are fetched")
    allowed_image_ports: list[int] | None = Field(None, description="if set, only these ports are fetched")
    allow_private_image_hosts: bool = Field(False, description="allow fetching loopback/private/link-local hosts")
    allow_tiff_images: bool = Field(False, description="accept TIFF images (refused by default: a large, "
                                    "rarely needed decoder)")
    allow_file_urls: bool = False
    allowed_local_dir: Path | None = Field(None, description="file:// URLs must lie under this directory")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on /v1/*; several "
                                "keys comma-separated (e.g. one per client)")
    max_requests_per_key: int | None = Field(None, description="chat completions in flight per API key "
                                             "(429 beyond)")
    max_waiting_requests: int = Field(64, description="requests beyond max_num_seqs that may wait")
    stream_send_timeout_s: float = Field(30.0, description="a stream whose client reads nothing for this long "
                                         "is ended and its request aborted")
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def api_keys(self) -> list[str]:
        """The accepted API keys (none: no authentication)."""
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]


def _flag_type(annotation: Any):
    text = str(annotation)
    if "list[int]" in text:
        return lambda s: [int(x) for x in s.split(",") if x.strip()]
    if "list[str]" in text:
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    if annotation is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    for t in (int, float):
        if annotation is t or text.startswith(f"{t.__name__} |"):
            return t
    return str


def parse_args(argv: list[str] | None = None) -> Settings:
    """CLI flags override environment variables, which override defaults."""
    parser = argparse.ArgumentParser(prog="python -m server", description="feather-vllm OpenAI-compatible gateway")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" [env FEATHER_{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(field.annotation), default=None, help=help_text)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**args)
