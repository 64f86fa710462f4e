"""The decoder layers of a cutting step, called one at a time.

A cutting step (model.py) runs the text model layer by layer, so that it
can score image tokens inside a layer and drop rows between layers. The
layer below mirrors vLLM's `LlamaDecoderLayer.forward` / `LlamaAttention.
forward` (the seam contract checks their source) and can hand back the
query/key rows a scorer asks for, before and after RoPE.

Every other step runs vLLM's own forward, which a compiled engine runs as
one graph: inductor fuses each chain of elementwise work between two
matmuls (residual add + RMSNorm, RoPE) into one kernel, and the whole
layer is one call. Called layer by layer, those ops would run unfused, op
by op: vLLM's native versions, as a compiled engine selects them, each
dispatched from Python. So in a compiled engine a layer runs here as two
graphs around its attention (which reads the step's per-layer metadata,
so stays outside, as vLLM keeps it outside its own graphs): input norm (+
residual add), QKV projection and RoPE; then output projection,
post-attention norm and MLP. Both are compiled once at load, dynamic in
the token count and shared by every layer (the layer is an argument: its
weights are graph inputs, not per-layer constants). The layer that scores
(one per cut) needs its query and key rows before RoPE too: it runs the
first graph's two halves (norm and QKV projection; RoPE) as two graphs
and gathers the rows between them. In an eager engine each op is called
as vLLM's eager forward calls it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# Per scorer: (its last prompt token, its image tokens) as row indices, or as the query and key rows there.
Picks = dict[int, tuple[torch.Tensor, torch.Tensor]]


def _rope(rotary: nn.Module, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> Any:
    return rotary(positions, q, k)


def _norm_qkv(layer: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None) -> Any:
    """Layer's input norm (+ residual add) and QKV projection, as vLLM's
    `LlamaDecoderLayer.forward` and `LlamaAttention.forward` run them:
    (q, k, v, residual), before RoPE."""
    if residual is None:
        residual = hidden
        x = layer.input_layernorm(hidden)
    else:
        x, residual = layer.input_layernorm(hidden, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    return q, k, v, residual


def _pre_attention(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: torch.Tensor | None) -> Any:
    """`_norm_qkv`, then RoPE: (q, k, v, residual), q and k roped."""
    q, k, v, residual = _norm_qkv(layer, hidden, residual)
    q, k = _rope(layer.self_attn.rotary_emb, positions, q, k)
    return q, k, v, residual


def _post_attention(layer: nn.Module, out: torch.Tensor, residual: torch.Tensor) -> Any:
    """Layer's output projection, post-attention norm (+ residual add) and
    MLP on the attention's output: (hidden, residual)."""
    out, _ = layer.self_attn.o_proj(out)
    hidden, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(hidden), residual


def _mark_dynamic_rows(*args: Any) -> None:
    """Mark every tensor argument's row count dynamic (as vLLM's
    `CustomOp.maybe_compile` does), for the compiling call: the graph is
    then one for all token counts (>= 2), whose guards later calls pass
    unmarked. Marking costs tens of microseconds per tensor: the steps'
    calls, five per layer, skip it."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.shape[0] >= 2:
            torch._dynamo.mark_dynamic(arg, 0)


def compiles(vllm_config: Any) -> bool:
    """Whether the engine compiles its model (then the cutting step's fused
    ops are compiled too), by the rule vLLM's `CustomOp.maybe_compile` uses."""
    from vllm.config.compilation import CompilationMode

    compilation = vllm_config.compilation_config
    return compilation.mode != CompilationMode.NONE and compilation.backend != "eager"


class CuttingLayers:
    """Runs decoder layer `idx` of `layers` on the rows a cutting step keeps."""

    def __init__(self, layers: nn.ModuleList, compiled: bool) -> None:
        self.layers = layers
        self._norm_qkv: Callable[..., Any] = _norm_qkv
        self._rope: Callable[..., Any] = _rope
        self._pre_attention: Callable[..., Any] = _pre_attention
        self._post_attention: Callable[..., Any] = _post_attention
        if compiled:
            from vllm.platforms import current_platform

            backend = current_platform.simple_compile_backend
            self._norm_qkv = torch.compile(_norm_qkv, dynamic=False, backend=backend)
            self._rope = torch.compile(_rope, dynamic=False, backend=backend)
            self._pre_attention = torch.compile(_pre_attention, dynamic=False, backend=backend)
            self._post_attention = torch.compile(_post_attention, dynamic=False, backend=backend)
        self.compiled = compiled

    @torch.inference_mode()  # as the model runner's steps: Dynamo guards on it
    def warm_up(self) -> None:
        """Compile the graphs (a compiled engine, at load: no request waits
        for them). Call outside the model's construction, whose default-device
        context Dynamo would guard on. The inputs have the layouts of a real
        step's (q and k are views into the QKV projection's output, the
        attention's output is contiguous). Every tensor-parallel rank calls
        it, so the projections' all-reduces pair up."""
        if not self.compiled:
            return
        # Dynamo guards on torch's default dtype too: vLLM loads a model
        # under the model's dtype (`set_default_torch_dtype`) and steps run
        # under torch's own (float32), so graphs compiled under the loading
        # default (bf16) would be compiled again by the first cutting step.
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            self._compile_all()
        finally:
            torch.set_default_dtype(default)

    def _compile_all(self) -> None:
        layer = self.layers[0]
        attn = layer.self_attn
        weight = layer.input_layernorm.weight
        rows = 2  # Dynamo specializes sizes 0 and 1
        x = torch.zeros(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        residual = torch.zeros_like(x)
        positions = torch.zeros(rows, dtype=torch.long, device=weight.device)
        qkv = torch.zeros(rows, attn.q_size + 2 * attn.kv_size, dtype=weight.dtype, device=weight.device)
        q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        out = torch.zeros(rows, attn.q_size, dtype=weight.dtype, device=weight.device)
        for compiled, *args in ((self._norm_qkv, layer, x, None),
                                (self._norm_qkv, layer, x, residual),
                                (self._rope, attn.rotary_emb, positions, q, k),
                                (self._pre_attention, layer, positions, x, None),
                                (self._pre_attention, layer, positions, x, residual),
                                (self._post_attention, layer, out, residual)):
            _mark_dynamic_rows(*args)
            compiled(*args)

    def inputs(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's inputs as the compiled ops expect them. The runner's
        persistent buffers are normal tensors, the step's own are inference
        tensors, and Dynamo guards on the difference: copies made here (in
        the step's inference mode) keep every call on one graph."""
        if self.compiled and not hidden.is_inference():
            hidden = hidden.clone()
        if self.compiled and not positions.is_inference():
            positions = positions.clone()
        return hidden, positions

    def __call__(self, idx: int, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                 picks: Picks | None = None) -> tuple[torch.Tensor, torch.Tensor, Picks, Picks]:
        """Layer `idx` on `hidden` (rows in the step's current order). `picks`
        maps a scorer to (row of its last prompt token, rows of its image
        tokens); for each the query and key rows are returned before RoPE
        (raw) and after (roped), as the layer's attention sees them."""
        layer = self.layers[idx]
        attn = layer.self_attn
        raw: Picks = {}
        roped: Picks = {}
        if not picks:
            q, k, v, residual = self._pre_attention(layer, positions, hidden, residual)
        else:
            q, k, v, residual = self._norm_qkv(layer, hidden, residual)
            raw = {i: (q[last], k[img]) for i, (last, img) in picks.items()}  # gathers copy
            q, k = self._rope(attn.rotary_emb, positions, q, k)
            roped = {i: (q[last], k[img]) for i, (last, img) in picks.items()}
        hidden, residual = self._post_attention(layer, attn.attn(q, k, v), residual)
        return hidden, residual, raw, roped
