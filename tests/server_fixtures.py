"""The gateway shared by the tests/test_server_*.py files: one `python -m
server` with the real engine (on the tiny checkpoint) for the whole session,
its client, and the greedy texts of vLLM's offline engine to compare with.

tests/conftest.py imports the fixtures (session scope: one gateway and one
offline engine however many of those files run); the test files import the
constants and helpers, never the fixtures (a fixture imported into a test
module would be a second, module-level instance)."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import ServerProcess, png_data_url, sample_images

KEY = "test-key"
OTHER_KEY = "other-key"  # a second client (prefix-cache isolation per key)
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "Where is the red square?"
PRESETS = ["none", "fastv", "feather", "pyramiddrop"]
# The running gateway, for tests/conftest.py to stop after the last test that uses it.
SHARED_SERVER = pytest.StashKey[ServerProcess]()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory, request):
    local = tmp_path_factory.mktemp("images")
    sample_images()[1].save(local / "scene.png")
    proc = ServerProcess(tiny_checkpoint, "--served-model-name", "tiny", "--api-key", KEY, OTHER_KEY,
                         "--max-num-seqs", "4", "--max-waiting-requests", "4",
                         "--max-image-bytes", "200000", "--max-image-pixels", "1000000",
                         "--allow-file-urls", "--allowed-local-dir", str(local), "--stream-send-timeout-s", "3",
                         # vLLM's tool flags (tests/test_server_api.py); requests without tools are unaffected
                         "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    proc.local_dir = local
    request.config.stash[SHARED_SERVER] = proc
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def image_chat(image_url: str | None = None, text: str = QUESTION, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0}
    body.update(extra)
    return body


@pytest.fixture(scope="session")
def scene_url():
    return png_data_url(sample_images()[1])


@pytest.fixture(scope="session")
def offline_texts(tiny_checkpoint, server):
    """Greedy texts of the same chats from vLLM's offline engine (the server
    process is already up; this engine runs in the test process)."""
    from vllm import SamplingParams

    from feather_vllm.kv.plan import report_of
    from tests.helpers import chat, make_llm, shutdown

    llm = make_llm(tiny_checkpoint)
    try:
        out = {}
        for preset in PRESETS:
            params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"feather": preset})
            result = llm.chat(chat(sample_images()[1], QUESTION), params, use_tqdm=False)[0]
            report = report_of(result)
            out[preset] = result.outputs[0].text
            out[preset, "kept"] = [stage.total for stage in report.stages]
            out[preset, "indices"] = [list(stage.per_image[0]) for stage in report.stages]
            out[preset, "blocks"] = {"used": report.kv_blocks_used, "unpruned": report.kv_blocks_unpruned_total,
                                     "held_per_group": list(report.kv_blocks_held)}
        return out
    finally:
        shutdown(llm)


def _samples(client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out
