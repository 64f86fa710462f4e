"""Gateway settings and the command line.

The engine flags are vLLM's own (`AsyncEngineArgs.add_cli_args`: the names,
types, defaults and help of `vllm serve`); everything the user does not set
is vLLM's default except the overrides pruning and the gateway need
(`server.engine.OVERRIDES`, printed by `--help`). The gateway's own flags
form the "Gateway" group; each is also an environment variable
`FEATHER_<NAME>` (a flag wins over its variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from feather_vllm import ARCHITECTURES
from server.engine import DEFAULT_SHUTDOWN_TIMEOUT_S, OVERRIDE_NOTES, OVERRIDES, build_engine_args

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

PROG = "python -m server"
GATEWAY_GROUP = "Gateway"
# Settings fields that come from vLLM's flags (--model, --served-model-name, --log-level), not flags of their own.
ENGINE_FIELDS = ("model", "served_model_name", "log_level")
# vLLM's frontend (`vllm serve`) flags for tool calling, with vLLM's names, types, defaults and help
# (its BaseFrontendArgs); also environment variables FEATHER_<NAME>. server/tools.py uses them.
TOOL_FIELDS = ("enable_auto_tool_choice", "tool_call_parser", "tool_parser_plugin",
               "exclude_tools_when_tool_choice_none", "tool_strict_level")
TOOL_GROUP = "Tool calling (vLLM's flags)"
VLLM_ENGINE_ARGS_DOCS = "https://docs.vllm.ai/en/v0.32.0/configuration/engine_args/"


class Settings(BaseSettings):
    """The gateway's own settings: each is a flag `--<name>` and an
    environment variable `FEATHER_<NAME>`, except `ENGINE_FIELDS`, which
    `parse_args` takes from vLLM's flags (when given), and `TOOL_FIELDS`,
    vLLM's own flags (and variables `FEATHER_<NAME>`)."""

    model_config = SettingsConfigDict(env_prefix="FEATHER_", extra="ignore")

    model: str = Field(description="checkpoint directory (llava-hf layout): vLLM's --model")
    served_model_name: str | None = Field(None, description="the name clients use: the first of vLLM's "
                                          "--served-model-name (default: the model dir's name)")
    host: str = "127.0.0.1"
    port: int = 8000
    default_preset: str = Field("none", description="pruning preset for requests that name none")
    kv_boundaries: list[int] | None = Field(None, description="first layers of the KV stages after the first, "
                                            "comma-separated (default: equal stages of about 4 layers)")
    max_image_bytes: int = Field(10 * 2**20, description="largest image accepted (data URL or fetched)")
    max_image_pixels: int = Field(4096 * 4096, description="largest image, in pixels (checked before decoding)")
    max_body_bytes: int = Field(25 * 2**20, description="largest request body (413 beyond)")
    max_image_aspect_ratio: float = Field(20.0, description="longer/shorter image side above this is refused "
                                          "(vLLM's resize to the model's short side would blow it up)")
    image_fetch_timeout_s: float = Field(10.0, description="total time for DNS, connects and reads of one image "
                                         "fetch, all redirects included")
    image_decode_timeout_s: float = Field(10.0, description="time one image may wait for and take decoding")
    image_decode_workers: int = Field(default_factory=lambda: 1 if (os.cpu_count() or 1) <= 4 else 2,
                                      description="images decoded at once (worker threads; default 1 on "
                                      "machines with up to 4 cores, else 2)")
    max_image_redirects: int = Field(3, description="redirects followed per image fetch")
    allowed_image_hosts: list[str] | None = Field(None, description="if set, only these hosts are fetched, "
                                                  "comma-separated (default: vLLM's --allowed-media-domains)")
    allowed_image_ports: list[int] | None = Field(None, description="if set, only these ports are fetched, "
                                                  "comma-separated")
    allow_private_image_hosts: bool = Field(False, description="allow fetching loopback/private/link-local hosts")
    allow_tiff_images: bool = Field(False, description="accept TIFF images (refused by default: a large, "
                                    "rarely needed decoder)")
    allow_file_urls: bool = Field(False, description="accept file:// image URLs (under --allowed-local-dir)")
    allowed_local_dir: Path | None = Field(None, description="file:// URLs must lie under this directory")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on /v1/*, /version, "
                                "/tokenize and /detokenize; several keys (e.g. one per client) as vLLM takes "
                                "them (--api-key K1 K2) or comma-separated (also in the variable)")
    share_prefix_cache_across_keys: bool = Field(False, description="with several API keys, let every key's "
                                                 "requests reuse the others' cached prefixes (one tenant); "
                                                 "by default each key's cached prefixes are its own")
    max_requests_per_key: int | None = Field(None, description="chat completions in flight per API key "
                                             "(429 beyond)")
    max_waiting_requests: int = Field(64, description="requests beyond the engine's --max-num-seqs that may wait "
                                      "(429 beyond)")
    stream_send_timeout_s: float = Field(30.0, description="a stream whose client reads nothing for this long "
                                         "is ended and its request aborted")
    lenient_fields: bool = Field(False, description="ignore unknown request fields (with a warning log), as "
                                 "vLLM does, instead of refusing them with 400")
    log_level: str = Field("info", description="the gateway's log level: vLLM's --log-level when given")
    # TOOL_FIELDS: vLLM's flags (their help is vLLM's)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    tool_parser_plugin: str = ""
    exclude_tools_when_tool_choice_none: bool = False
    tool_strict_level: str = "auto"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def api_keys(self) -> list[str]:
        """The accepted API keys (none: no authentication)."""
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]


@dataclasses.dataclass(frozen=True)
class GatewayArgs:
    """A parsed command line: the gateway's settings and the engine's
    arguments (vLLM's flags, overrides applied)."""

    settings: Settings
    engine_args: AsyncEngineArgs


def _flag_type(annotation: Any):
    text = str(annotation)
    if "list[int]" in text:
        return lambda s: [int(x) for x in s.split(",") if x.strip()]
    if "list[str]" in text:
        return lambda s: [x.strip() for x in s.split(",") if x.strip()]
    for t in (int, float):
        if annotation is t or text.startswith(f"{t.__name__} |"):
            return t
    return str


def gateway_fields() -> list[str]:
    """Settings fields that are gateway flags."""
    return [name for name in Settings.model_fields if name not in ENGINE_FIELDS + TOOL_FIELDS]


def _add_tool_flags(parser: FlexibleArgumentParser) -> None:
    """vLLM's tool-calling flags, defined by vLLM (`BaseFrontendArgs`); not
    given, they stay out of the namespace (the environment variable or the default applies)."""
    from vllm.engine.arg_utils import get_kwargs
    from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs

    kwargs = BaseFrontendArgs._customize_cli_kwargs(get_kwargs(BaseFrontendArgs))
    group = parser.add_argument_group(TOOL_GROUP, description="vLLM's own flags: tools, tool_choice and "
                                      "parallel_tool_calls need --enable-auto-tool-choice and --tool-call-parser.")
    for name in TOOL_FIELDS:
        spec = {k: v for k, v in kwargs[name].items() if k != "flags"}
        spec["default"] = argparse.SUPPRESS
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, **spec)


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


def _epilog() -> str:
    import json
    import textwrap

    def wrap(text: str, indent: str = "") -> str:
        return textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent + "    ")

    parts = [wrap(f"Engine flags are vLLM's, with the names, types and defaults of `vllm serve` "
                  f"({VLLM_ENGINE_ARGS_DOCS}); --help=all lists every flag, --help=<group> one group's, "
                  "--help=<word> the flags matching it. --model defaults to $FEATHER_MODEL; "
                  "--served-model-name to the model directory's name (the gateway serves the first name)."),
             "",
             "Engine arguments the gateway sets differently from vLLM's defaults (the rest is vLLM's default):",
             wrap("(hf_overrides, compilation_config and block_size only for a checkpoint FEATHER can prune, "
                  f"architecture {' or '.join(ARCHITECTURES)}; any other runs as vLLM serves it, "
                  "unpruned, and requests with pruning settings get 400)", "  ")]
    for o in OVERRIDES:
        value = json.dumps(o.value) if isinstance(o.value, dict) else repr(o.value)
        note = f" ({OVERRIDE_NOTES[o.name]})" if o.name in OVERRIDE_NOTES else ""
        parts.append(wrap(f"{o.name} = {value}: {o.reason}{note}", "  "))
    parts.append(wrap(f"shutdown_timeout = {DEFAULT_SHUTDOWN_TIMEOUT_S} unless --shutdown-timeout is given "
                      "(vLLM's default 0 aborts answers at SIGTERM): on SIGTERM the gateway refuses new requests "
                      "(503), lets admitted ones finish for up to this many seconds, then aborts the rest", "  "))
    return "\n".join(parts).replace("%", "%%")


def _parser_class():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class GatewayParser(FlexibleArgumentParser):
        """vLLM's parser; plain --help shows vLLM's group summary, the
        gateway's flags in full and the overrides."""

        def format_help(self) -> str:
            keyword = FlexibleArgumentParser._search_keyword
            overrides = _epilog()
            if keyword is not None:  # --help=all|<group>|<word>: vLLM's search
                text = super().format_help()
                return text + "\n" + overrides + "\n" if keyword == "all" else text
            head = super().format_help() + "\n"  # usage, description, vLLM's summary of the groups
            formatter = self._get_formatter()
            group = next(g for g in self._action_groups if g.title == GATEWAY_GROUP)
            formatter.start_section(group.title)
            formatter.add_text(group.description)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
            formatter.add_text(overrides)
            return head + formatter.format_help()

    return GatewayParser


def build_parser() -> FlexibleArgumentParser:
    """The gateway's flags (group "Gateway") plus vLLM's engine flags."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _parser_class()(prog=PROG, usage=f"{PROG} --model DIR [gateway flags] [vLLM engine flags]",
                             description="feather-vllm's OpenAI-compatible gateway: vLLM's engine with "
                                         "FEATHER's image-token pruning.")
    group = parser.add_argument_group(GATEWAY_GROUP, description="The gateway's own flags; each is also an "
                                      "environment variable FEATHER_<NAME> (a flag wins).")
    for name in gateway_fields():
        field = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = ((field.description + " " if field.description else "")
                     + f"[default: {_default_text(name)}; env FEATHER_{name.upper()}]").replace("%", "%%")
        # SUPPRESS: a flag not given stays out of the namespace, so the env var or the default applies.
        if name == "api_key":  # vLLM's form, several keys after one flag; joined in parse_args
            group.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=name, type=_flag_type(field.annotation), default=argparse.SUPPRESS,
                               help=help_text)
    _add_tool_flags(parser)
    AsyncEngineArgs.add_cli_args(parser)
    # None: not given, the gateway's drain default applies (server.engine.DEFAULT_SHUTDOWN_TIMEOUT_S).
    parser.set_defaults(model=os.environ.get("FEATHER_MODEL") or None, shutdown_timeout=None)
    return parser


def parse_args(argv: list[str] | None = None) -> GatewayArgs:
    """Flags override FEATHER_* environment variables, which override
    defaults; engine flags not given are vLLM's defaults (plus the overrides)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = build_parser()
    namespace = parser.parse_args(argv)
    if not namespace.model:
        parser.error("--model is required (or the environment variable FEATHER_MODEL)")
    given = {name: getattr(namespace, name) for name in (*gateway_fields(), *TOOL_FIELDS) if hasattr(namespace, name)}
    if isinstance(given.get("api_key"), list):  # --api-key K1 K2 (and each may still be comma-separated)
        given["api_key"] = ",".join(given["api_key"])
    served = namespace.served_model_name
    if isinstance(served, list):
        served = served[0] if served else None
    if getattr(namespace, "log_level", None):  # vLLM's --log-level (not in the namespace unless given)
        given["log_level"] = namespace.log_level
    try:
        settings = Settings(model=namespace.model, served_model_name=served, **given)
    except ValidationError as e:
        parser.error(" ".join(str(e).split()))
    from server.tools import check_flags

    tool_error = check_flags(settings.enable_auto_tool_choice, settings.tool_call_parser, settings.tool_parser_plugin)
    if tool_error:
        parser.error(tool_error)
    try:  # vLLM checks some arguments here (e.g. a --model it cannot find)
        engine_args = AsyncEngineArgs.from_cli_args(namespace)
        if settings.allowed_image_hosts is None and engine_args.allowed_media_domains:
            # vLLM's media allow list means the same: only these hosts' images are fetched.
            settings = settings.model_copy(update={"allowed_image_hosts": list(engine_args.allowed_media_domains)})
        engine_args = build_engine_args(settings.model, settings.default_preset, settings.kv_boundaries,
                                        engine_args)
    except Exception as e:  # noqa: BLE001 - a usage error: one line, exit code 2
        parser.error(" ".join(f"{type(e).__name__}: {e}".split())[:1000])
    return GatewayArgs(settings, engine_args)
