"""Random-weight checkpoints of architectures FEATHER does not prune.

`python -m feather_vllm.tools.stock_checkpoints --arch llama --out DIR [--seed N]`

The gateway serves them as vLLM serves them (no pruning override, vLLM's own
model class); the tests check that on these: a text-only Llama decoder with
the tiny LLaVA's tokenizer and chat template (`feather_vllm.tools.checkpoints`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from feather_vllm.tools.checkpoints import build_tokenizer

ARCHS = ("llama",)
HIDDEN = 64


def _text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_stock_checkpoint(arch: str, out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight `arch` checkpoint (one of `ARCHS`) to `out`
    (LlamaForCausalLM), in the layout vLLM loads, with a tokenizer and chat
    template."""
    import torch
    from transformers import LlamaForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(512, seed)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config(tokenizer)).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    with torch.no_grad():  # spread the logits: greedy decoding has clear winners (no near-ties)
        model.lm_head.weight.normal_(0.0, 4 / HIDDEN**0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.tools.stock_checkpoints",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {args.arch} checkpoint to {build_stock_checkpoint(args.arch, args.out, args.seed)}")


if __name__ == "__main__":
    main()
