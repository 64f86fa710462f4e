# feather-vllm: the two commands a new user needs are `make serve` and `make test`.
PY := .venv/bin/python
DEMO_MODEL ?= checkpoints/tiny
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: setup serve test checkpoints bench clean

setup:
	@bash scripts/setup.sh

checkpoints: setup
	@$(PY) -c "from feather_vllm.checkpoints import ensure_checkpoint; ensure_checkpoint('tiny', '$(DEMO_MODEL)')"

# Set up, build the demo checkpoint if absent, serve it (OpenAI-compatible).
serve: checkpoints
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
	$(PY) -m vllm.entrypoints.openai.api_server --model $(DEMO_MODEL) \
	  --hf-overrides '{"architectures": ["FeatherLlavaForConditionalGeneration"]}' \
	  --enforce-eager --dtype float32 --max-model-len 2048 --no-enable-chunked-prefill \
	  --disable-chunked-mm-input --max-num-batched-tokens 2112 --no-enable-prefix-caching \
	  --host $(HOST) --port $(PORT)

# Set up, then run the whole test suite. Exit code 5 (no tests ran) fails.
test: setup
	@bash scripts/test.sh

clean:
	rm -rf .venv checkpoints .pytest_cache
