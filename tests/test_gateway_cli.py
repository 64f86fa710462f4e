"""The gateway's command line: vLLM's own engine flags (names, types and
defaults of `vllm serve`) plus the gateway's group, the pruning and gateway
overrides on top of vLLM's defaults, `--help`, and usage errors. Parsing
needs no engine; one gateway checks the engine's per-prompt image limit
end to end (refused before any image is fetched)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from feather_vllm import ARCHITECTURE
from feather_vllm.engine import PRUNING_OVERRIDES
from tests.helpers import ServerProcess, png_data_url, sample_images

ROOT = Path(__file__).resolve().parents[1]
# What the gateway sets differently from vLLM's defaults.
OVERRIDDEN = {"hf_overrides", "compilation_config", "disable_log_stats", "served_model_name", "block_size",
              "shutdown_timeout"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Parsing needs a directory that exists (vLLM resolves --model offline) with a config whose
    # architecture FEATHER prunes (the pruning overrides apply to no other).
    path = tmp_path_factory.mktemp("models") / "my-llava"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                                  "model_type": "llava"}))
    return path


@pytest.fixture
def parse(model_dir, monkeypatch):
    from server.settings import parse_args

    monkeypatch.delenv("FEATHER_MODEL", raising=False)
    return lambda *flags: parse_args(["--model", str(model_dir), *flags])


def _vllm_defaults(model_dir: Path):
    """What vLLM's own parser makes of `--model DIR` alone."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(model_dir)]))


def test_no_flags_give_vllms_defaults_plus_the_overrides(parse, model_dir):
    from vllm.config.compilation import CUDAGraphMode

    args = parse()
    engine = args.engine_args
    assert engine.hf_overrides == {"architectures": [ARCHITECTURE], "feather_default": "none"}
    assert engine.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert engine.disable_log_stats is False
    assert engine.block_size == 32  # on CPU, where vLLM's 128-token blocks round pruned stages up
    assert engine.shutdown_timeout == 600  # SIGTERM drains (vLLM's 0 would abort the answers)
    assert engine.served_model_name == ["my-llava"] and args.settings.model_name == "my-llava"
    # Left to vLLM: the context length it derives, chunked prefill, its token budget, the KV budget.
    assert engine.max_model_len is None and engine.enable_chunked_prefill is None
    assert engine.max_num_batched_tokens is None and engine.max_num_seqs is None
    assert engine.kv_cache_memory_bytes is None and engine.limit_mm_per_prompt == {}
    # Every other field is exactly what vLLM's own parser gives.
    stock = _vllm_defaults(model_dir)
    differ = {f.name for f in dataclasses.fields(engine)
              if f.name not in OVERRIDDEN and getattr(engine, f.name) != getattr(stock, f.name)}
    assert not differ, {name: (getattr(engine, name), getattr(stock, name)) for name in differ}
    assert {f.name for f in dataclasses.fields(engine) if f.name in OVERRIDDEN} == OVERRIDDEN


@pytest.mark.parametrize("flags,field,expected", [
    (["--tensor-parallel-size", "2"], "tensor_parallel_size", 2),
    (["-tp", "2"], "tensor_parallel_size", 2),
    (["--limit-mm-per-prompt", '{"image": 3}'], "limit_mm_per_prompt", {"image": 3}),
    (["--seed", "7"], "seed", 7),
    (["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "fp8"),
    (["--kv-cache-memory-bytes", "1G"], "kv_cache_memory_bytes", 2**30),
    (["--kv-cache-memory-bytes", "1073741824"], "kv_cache_memory_bytes", 2**30),
    (["--gpu-memory-utilization", "0.8"], "gpu_memory_utilization", 0.8),
    (["--max-num-batched-tokens", "4k"], "max_num_batched_tokens", 4000),
    (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
    (["--enable-prefix-caching"], "enable_prefix_caching", True),
    (["--no-enable-chunked-prefill"], "enable_chunked_prefill", False),
    (["--quantization", "fp8"], "quantization", "fp8"),
    (["--max-model-len", "2k"], "max_model_len", 2000),
    (["--max-num-seqs", "8"], "max_num_seqs", 8),
    (["--max_num_seqs", "8"], "max_num_seqs", 8),  # vLLM's parser takes underscores too
    (["--dtype", "float32"], "dtype", "float32"),
    (["--block-size", "64"], "block_size", 64),  # the user's value wins over the CPU override
    (["--enforce-eager"], "enforce_eager", True),
    (["--served-model-name", "llava", "llava-1.5"], "served_model_name", ["llava", "llava-1.5"]),
    (["--allowed-media-domains", "a.example", "b.example"], "allowed_media_domains", ["a.example", "b.example"]),
    (["--shutdown-timeout", "0"], "shutdown_timeout", 0),  # vLLM's abort-at-SIGTERM, when asked for
    (["--shutdown-timeout", "30"], "shutdown_timeout", 30),
], ids=["tensor-parallel-size", "tp-short", "limit-mm-per-prompt", "seed", "kv-cache-dtype",
        "kv-cache-memory-bytes-human", "kv-cache-memory-bytes", "gpu-memory-utilization",
        "max-num-batched-tokens-human", "no-enable-prefix-caching", "enable-prefix-caching",
        "no-enable-chunked-prefill", "quantization", "max-model-len-human", "max-num-seqs",
        "max-num-seqs-underscores", "dtype", "block-size", "enforce-eager", "served-model-names",
        "allowed-media-domains", "shutdown-timeout-0", "shutdown-timeout"])
def test_vllm_flags_parse_with_vllms_types(parse, flags, field, expected):
    assert getattr(parse(*flags).engine_args, field) == expected


def test_the_gateway_serves_the_first_served_name(parse):
    assert parse("--served-model-name", "llava", "llava-1.5").settings.model_name == "llava"


def test_user_hf_overrides_keep_their_keys_and_gain_the_architecture(parse):
    args = parse("--hf-overrides", json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                               "text_config": {"rope_theta": 5.0}}),
                 "--default-preset", "feather", "--kv-boundaries", "2,4")
    assert args.engine_args.hf_overrides == {"architectures": [ARCHITECTURE], "text_config": {"rope_theta": 5.0},
                                             "feather_default": "feather", "feather_kv_boundaries": [2, 4]}


@pytest.mark.parametrize("flags,expected", [
    (["--compilation-config", '{"mode": 0, "cudagraph_capture_sizes": [1, 2]}'],
     {"mode": 0, "cudagraph_capture_sizes": [1, 2], "cudagraph_mode": "PIECEWISE"}),
    (["--compilation-config.mode", "0"], {"mode": 0, "cudagraph_mode": "PIECEWISE"}),
    (["--compilation-config", '{"cudagraph_mode": "NONE"}'], {"cudagraph_mode": "NONE"}),
], ids=["json-keeps-fields", "dotted-keeps-fields", "users-cudagraph-mode-kept"])
def test_user_compilation_config_keeps_its_fields(parse, flags, expected):
    from vllm.config.compilation import CUDAGraphMode

    config = parse(*flags).engine_args.compilation_config
    for key, value in expected.items():
        got = getattr(config, key)
        assert (got.name if isinstance(got, CUDAGraphMode) else got) == value, key
    # vLLM's parser shares its default object between parses: it is never changed.
    assert parse().engine_args.compilation_config.mode is None
    assert _vllm_defaults(Path(".")).compilation_config.cudagraph_mode is None


def test_gateway_flags_env_vars_and_flag_precedence(parse, monkeypatch):
    monkeypatch.setenv("FEATHER_PORT", "9100")
    monkeypatch.setenv("FEATHER_MAX_WAITING_REQUESTS", "5")
    monkeypatch.setenv("FEATHER_ALLOW_TIFF_IMAGES", "true")
    settings = parse("--port", "9200", "--api-key", "a, b", "--allowed-image-ports", "443,8443",
                     "--log-level", "DEBUG").settings
    assert (settings.port, settings.max_waiting_requests, settings.allow_tiff_images) == (9200, 5, True)
    assert settings.api_keys == ["a", "b"] and settings.allowed_image_ports == [443, 8443]
    assert settings.log_level == "DEBUG"  # vLLM's --log-level sets the gateway's too


@pytest.mark.parametrize("flags, env, keys", [
    (["--api-key", "k1", "k2"], None, ["k1", "k2"]),  # vLLM's form: several keys after one flag
    (["--api-key", "k1", "k2,k3"], None, ["k1", "k2", "k3"]),  # each may still be comma-separated
    (["--api-key", "k1", "k2", "--port", "9300"], None, ["k1", "k2"]),  # the next flag ends the list
    (["--api-key", "only"], "e1,e2", ["only"]),  # a flag wins over FEATHER_API_KEY
    ([], "e1,e2", ["e1", "e2"]),
    ([], None, []),
], ids=["nargs", "nargs-and-commas", "nargs-then-flag", "flag-over-env", "env-commas", "none"])
def test_several_api_keys_as_vllm_takes_them(parse, monkeypatch, flags, env, keys):
    if env is None:
        monkeypatch.delenv("FEATHER_API_KEY", raising=False)
    else:
        monkeypatch.setenv("FEATHER_API_KEY", env)
    assert parse(*flags).settings.api_keys == keys


def test_lenient_fields_flag_and_env(parse, monkeypatch):
    monkeypatch.delenv("FEATHER_LENIENT_FIELDS", raising=False)
    assert parse().settings.lenient_fields is False
    assert parse("--lenient-fields").settings.lenient_fields is True
    monkeypatch.setenv("FEATHER_LENIENT_FIELDS", "1")
    assert parse().settings.lenient_fields is True
    assert parse("--no-lenient-fields").settings.lenient_fields is False


def test_allowed_media_domains_become_the_allowed_image_hosts(parse):
    assert parse("--allowed-media-domains", "a.example").settings.allowed_image_hosts == ["a.example"]
    settings = parse("--allowed-media-domains", "a.example", "--allowed-image-hosts", "b.example").settings
    assert settings.allowed_image_hosts == ["b.example"]  # the gateway's own flag wins
    assert parse().settings.allowed_image_hosts is None


def test_model_from_feather_model_env(model_dir, monkeypatch):
    from server.settings import parse_args

    monkeypatch.setenv("FEATHER_MODEL", str(model_dir))
    assert parse_args([]).engine_args.model == str(model_dir)


@pytest.mark.parametrize("argv,message", [
    (["--kv-cache-gib", "1"], "unrecognized arguments: --kv-cache-gib 1"),
    (["--max-images-per-request", "2"], "unrecognized arguments: --max-images-per-request 2"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--tensor-parallel-size", "two"], "argument --tensor-parallel-size/-tp: invalid int value: 'two'"),
    (["--port", "http"], "argument --port: invalid int value: 'http'"),
    (["--dtype", "float99"], "argument --dtype: invalid choice: 'float99'"),
], ids=["removed-kv-cache-gib", "removed-max-images-per-request", "unknown", "bad-vllm-type", "bad-gateway-type",
        "bad-vllm-choice"])
def test_usage_errors_exit_2_with_argparses_message(parse, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m server" in err and message in err, err


@pytest.mark.parametrize("argv,message", [
    ([], "--model is required"),
    (["--model", "/no/such/model-dir"], "--model"),
], ids=["no-model", "missing-model-dir"])
def test_model_errors_exit_2(monkeypatch, capsys, argv, message):
    from server.settings import parse_args

    monkeypatch.delenv("FEATHER_MODEL", raising=False)
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err, err


def _help(flag: str) -> str:
    result = subprocess.run([sys.executable, "-m", "server", flag], capture_output=True, text=True, cwd=ROOT,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return " ".join(result.stdout.split())  # wrapping aside


@pytest.mark.parametrize("flag,listed", [
    ("--help", ["--api-key", "--default-preset", "--kv-boundaries", "--max-waiting-requests", "--host",
                "--allowed-image-hosts", "env FEATHER_API_KEY", "ModelConfig", "CacheConfig", "vllm serve"]),
    ("--help=all", ["--tensor-parallel-size", "--gpu-memory-utilization", "--limit-mm-per-prompt",
                    "--kv-cache-memory-bytes", "--served-model-name", "--api-key"]),
], ids=["help", "help-all"])
def test_help_lists_flags_and_overrides_with_reasons(flag, listed):
    from server.engine import GATEWAY_OVERRIDES

    text = _help(flag)
    for word in listed:
        assert word in text, word
    for override in PRUNING_OVERRIDES + GATEWAY_OVERRIDES:
        assert f"{override.name} = " in text and " ".join(override.reason.split()) in text, override.name
    for removed in ("--kv-cache-gib", "--max-images-per-request"):
        assert removed not in text


# -- end to end: the engine's per-prompt image limit --------------------------

IMAGE_LIMIT = 2


@pytest.fixture(scope="module")
def gateway(tiny_checkpoint):
    # Two images of 576 tokens need more than the default 1024 positions of ServerProcess.
    proc = ServerProcess(tiny_checkpoint, "--limit-mm-per-prompt", json.dumps({"image": IMAGE_LIMIT}),
                         max_model_len=2048)
    yield proc
    proc.stop()


def _images_chat(urls: list[str], **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    content.append({"type": "text", "text": "Where is the red square?"})
    # No --served-model-name: the gateway serves the model directory's name.
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def test_more_images_than_the_engines_limit_get_400_before_any_fetch(gateway):
    # Loopback URLs would be refused as image_fetch_failed if they were fetched at all.
    urls = [f"http://127.0.0.1:9/{i}.png" for i in range(IMAGE_LIMIT + 1)]
    r = httpx.post(gateway.url + "/v1/chat/completions", json=_images_chat(urls, max_tokens=2), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_images" and error["param"] == "messages"
    assert f"at most {IMAGE_LIMIT}" in error["message"]


@pytest.mark.parametrize("preset", ["none", "feather"])
def test_images_up_to_the_engines_limit_are_served_and_pruned(gateway, preset):
    """Two images: each keeps its own share at each cut; the report gives
    kept tokens per cut (all images) and per image, with its statistics."""
    urls = [png_data_url(image) for image in sample_images()[:IMAGE_LIMIT]]
    r = httpx.post(gateway.url + "/v1/chat/completions",
                   json=_images_chat(urls, max_tokens=4, feather={"preset": preset, "return_kept": True}),
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens"] > IMAGE_LIMIT * 576
    report = body["feather"]
    assert report["fallback"] is None and report["image_tokens"] == IMAGE_LIMIT * 576
    assert [image["image_tokens"] for image in report["images"]] == [576] * IMAGE_LIMIT
    if preset == "none":
        assert report["stages"] == [] and all(image["stages"] == [] for image in report["images"])
        assert report["kv_blocks"]["used"] == report["kv_blocks"]["unpruned"]
        return
    assert [s["layer"] for s in report["stages"]] == [8, 16]
    for k, total in enumerate(report["stages"]):
        per_image = [image["stages"][k] for image in report["images"]]
        assert total["kept"] == sum(s["kept"] for s in per_image)
        for s in per_image:
            assert s["layer"] == total["layer"] and len(s["kept_indices"]) == s["kept"]
            assert 0 <= s["mean_row"] <= 1
    # Each image keeps its own top 30% (172) united with its grid (64) at layer 8.
    assert all(172 <= image["stages"][0]["kept"] <= 236 for image in report["images"])
    assert report["kv_blocks"]["used"] <= 0.5 * report["kv_blocks"]["unpruned"]
