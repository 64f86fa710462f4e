"""Random-weight checkpoints of architectures FEATHER does not prune.

`python -m feather_vllm.tools.stock_checkpoints --arch {llama,llava-next} --out DIR [--seed N]`

The gateway serves them as vLLM serves them (no pruning override, vLLM's own
model class); the tests check that on these. Both share the tiny LLaVA's
tokenizer and chat template (`feather_vllm.tools.checkpoints`): a text-only
Llama decoder, and a LLaVA-NeXT with a 56-pixel CLIP tower (16 patches per
tile, at most a 2 x 2 grid of tiles: about 90 image tokens) so that a
prompt fits a small context.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from feather_vllm.tools.checkpoints import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer, save_model

ARCHS = ("llama", "llava-next")
HIDDEN = 64


def _text_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_stock_checkpoint(arch: str, out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight `arch` checkpoint (one of `ARCHS`) to `out`:
    LlamaForCausalLM or LlavaNextForConditionalGeneration, in the layout
    vLLM loads, with a tokenizer and chat template."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaForCausalLM,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(512, seed)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(_text_config(tokenizer)).eval()
        model.config.architectures = ["LlamaForCausalLM"]
    else:
        grid = [[56, 56], [56, 112], [112, 56], [112, 112]]
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32,
                                           hidden_act="quick_gelu"),
            text_config=_text_config(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_grid_pinpoints=grid, vision_feature_select_strategy="default", vision_feature_layer=-2,
            tie_word_embeddings=False)
        config.architectures = ["LlavaNextForConditionalGeneration"]
        model = LlavaNextForConditionalGeneration(config).eval()
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                     image_grid_pinpoints=grid)
        LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN).save_pretrained(out)
    with torch.no_grad():  # spread the logits: greedy decoding has clear winners (no near-ties)
        model.lm_head.weight.normal_(0.0, 4 / HIDDEN**0.5)
    if arch == "llama":
        model.save_pretrained(out)
    else:
        save_model(model, out)  # the llava-hf layout vLLM maps
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
