# feather-vllm: the two commands a new user needs are `make serve` and `make test`.
PY := .venv/bin/python
# The trained demo model ships in the package (a few MB); no training needed.
DEMO_MODEL ?= feather_vllm/demo/weights
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: setup serve test seams checkpoints bench demo-train demo-train-pruning-aware demo-train-two-object clean

setup:
	@bash scripts/setup.sh

# Random-weight checkpoints for tests and benchmarks.
checkpoints: setup
	@$(PY) -c "from feather_vllm.tools.checkpoints import ensure_checkpoint as e; e('tiny', 'checkpoints/tiny'); e('bench', 'checkpoints/bench')"

# vLLM compiles by default (CUDA graphs on GPU); without a GPU that gains
# nothing and costs minutes of start-up, so CPU machines serve eager, with a
# 2 GiB KV cache (vLLM's CPU default sizes it from the machine's memory).
# ENGINE_FLAGS takes any of vLLM's engine flags (`vllm serve`'s names).
ENGINE_FLAGS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,--enforce-eager --kv-cache-memory-bytes 2G)

# Set up and serve the shipped demo model with the gateway.
serve: setup
	$(PY) -m server --model $(DEMO_MODEL) --served-model-name demo --dtype float32 \
	  --host $(HOST) --port $(PORT) $(ENGINE_FLAGS)

# Re-train the demo model from its seed (about 35 min on 2 cores).
TRAIN_FLAGS ?=
demo-train: setup
	$(PY) -m feather_vllm.tools.demo.train --out $(DEMO_MODEL) --steps 1800 --seed 0 $(TRAIN_FLAGS)

# The pruning-aware variant: fine-tunes the standard weights with serving's
# own token selection in 3 of 4 batches (about 25-30 min on 2 cores).
PRUNING_AWARE_MODEL ?= feather_vllm/demo/weights_pruning_aware
demo-train-pruning-aware: setup
	$(PY) -m feather_vllm.tools.demo.train --out $(PRUNING_AWARE_MODEL) --init $(DEMO_MODEL) --pruning-aware \
	  --criterion attention --drop-share 0.75 --jitter 0 --lr 1e-3 --steps 1000 --seed 1 --threads 2

# The two-object variant that `evaluate --multi-turn` measures reuse with:
# from scratch, 60% of the batches on two-object scenes (half of them
# two-turn chats), with the probes that make layer 4 find the asked object
# (about 40 min on 2 cores).
TWO_OBJECT_MODEL ?= feather_vllm/demo/weights_two_object
demo-train-two-object: setup
	$(PY) -m feather_vllm.tools.demo.train --out $(TWO_OBJECT_MODEL) --pairs 0.6 --probe 1 --attend 1 --locate 2 \
	  --steps 2300 --seed 31 --threads 2

# The serving benchmark: pruned vs unpruned, and vs vLLM's own server.
bench: setup
	$(PY) -m loadtest.benchmark

# Set up, then run the whole test suite. Exit code 5 (no tests ran) fails.
test: setup
	@bash scripts/test.sh

# The seam contract (feather_vllm/kv/seams.py) against the source of each
# vLLM release it names (wheels downloaded once into ~/.cache/feather-vllm/seams,
# or $$FEATHER_VLLM_SEAMS_CACHE): supported releases must pass, the next must be refused.
seams: setup
	$(PY) -m feather_vllm.kv.seams

clean:
	rm -rf .venv checkpoints .pytest_cache
