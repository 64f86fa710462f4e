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

# Set up, build the demo checkpoint if absent, serve it with the gateway.
serve: checkpoints
	$(PY) -m server --model $(DEMO_MODEL) --served-model-name demo --dtype float32 \
	  --host $(HOST) --port $(PORT)

# Set up, then run the whole test suite. Exit code 5 (no tests ran) fails.
test: setup
	@bash scripts/test.sh

clean:
	rm -rf .venv checkpoints .pytest_cache
