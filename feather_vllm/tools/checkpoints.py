"""Build local LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints with random weights.

`python -m feather_vllm.tools.checkpoints --profile tiny --out DIR [--seed N]
[--family llava-next|llava-onevision] [--vision-image-size PIXELS]`

The machines this project is developed and tested on have no model hub, so
every checkpoint is made here: a CLIP ViT-336/14 vision tower (24 x 24 = 576
image tokens), a GELU MLP projector and a 32-layer Llama decoder (so the
paper's cut layers 3, 8, 16 and 24 apply unchanged), saved in the llava-hf
layout that both transformers and vLLM load, with a byte-level BPE tokenizer
trained here, a chat template and the processor config. LLaVA-OneVision's
are a SigLIP tower and a Qwen2 decoder of the profile's sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

from feather_vllm.pruning.layout import LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # OneVision's processor needs one (added to its tokenizer only)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format. Handles both string content (vLLM puts the
# "<image>" placeholder into the text itself) and OpenAI-style content parts.
# Tool calling in Hermes' format (vLLM's `hermes` tool parser): the tools in a
# <tools> block, an assistant's calls as <tool_call> JSON, tool results as
# <tool_response>; a prompt without tools renders as plain LLaVA-1.5.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<tools>{{ '\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "</tools>{{ '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>{{ '\\n' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n' }}</tool_call>{% endfor %}{{ eos_token }}{{ '\\n' }}"
    "{% elif message['role'] == 'tool' %}TOOL: <tool_response>{{ '\\n' }}{{ message['content'] }}"
    "{{ '\\n' }}</tool_response>{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one checkpoint profile."""

    vision_hidden: int
    vision_mlp: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_mlp: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    init_std: float
    dtype: str
    # Whole words the tokenizer keeps as single tokens (the demo's answers).
    word_tokens: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    # Fast tests: ~1M parameters. GQA (2 query heads of dim 32 on 1 KV head) so the
    # head expansion of the pruning criterion is exercised.
    "tiny": Profile(
        vision_hidden=32, vision_mlp=64, vision_layers=2, vision_heads=2,
        text_hidden=64, text_mlp=128, text_layers=32, text_heads=2,
        text_kv_heads=1, vocab_size=512, init_std=0.3, dtype="float32",
    ),
    # Speed benchmarks: the decoder dominates prefill FLOPs (as in
    # LLaVA-1.5-7B, vision tower < 10%) and one unpruned prefill of a
    # ~620-token image prompt takes about a second on 2 cores.
    "bench": Profile(
        vision_hidden=128, vision_mlp=256, vision_layers=2, vision_heads=4,
        text_hidden=768, text_mlp=2048, text_layers=32, text_heads=12,
        text_kv_heads=12, vocab_size=1024, init_std=0.05, dtype="float32",
    ),
    # The trained demo (feather_vllm/tools/demo): a 1.5M-parameter LLaVA that
    # answers where an object is. Answers, colours and shapes are single
    # tokens, so every question has the same length.
    "demo": Profile(
        vision_hidden=64, vision_mlp=128, vision_layers=2, vision_heads=2,
        text_hidden=64, text_mlp=128, text_layers=32, text_heads=2,
        text_kv_heads=2, vocab_size=360, init_std=0.02, dtype="float32",
        word_tokens=("top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
                     "bottom-left", "bottom-center", "bottom-right",
                     " red", " green", " blue", " yellow", " square", " circle"),
    ),
}


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic English-like text to train the BPE tokenizer on."""
    rng = random.Random(seed)
    words = (
        "the a an is are was of in on at to and or where what which who how "
        "image picture photo object square circle red green blue yellow grey "
        "top middle bottom left right center centre corner row column cell "
        "USER ASSISTANT describe show find locate see there here this that "
        "small large big little color colour shape answer question yes no "
        "one two three four five six seven eight nine zero hello world model "
        "token vision language server request response please thank you"
    ).split()
    out = []
    for _ in range(lines):
        n = rng.randint(3, 14)
        sent = " ".join(rng.choice(words) for _ in range(n))
        out.append(sent[0].upper() + sent[1:] + rng.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(vocab_size: int, seed: int, word_tokens: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer locally and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if word_tokens:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in word_tokens])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _to_llava_hf_layout(state_dict: dict) -> dict:
    """Rename transformers-5 LLaVA keys to the llava-hf layout vLLM maps."""
    renames = [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value.contiguous()
    return out


def save_model(model, out: Path) -> None:
    """Weights in the llava-hf layout, plus the config."""
    from safetensors.torch import save_file

    save_file(_to_llava_hf_layout(model.state_dict()), out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)


FAMILIES = ("llava", "llava-next", "llava-onevision")


def scaled_pinpoints(pinpoints, tile: int, vision_image_size: int) -> list[list[int]]:
    """A model's default tile grids (`pinpoints` for its `tile`-pixel tower:
    NeXT's five at 336, OneVision's 36 at 384) for a tower of
    `vision_image_size` pixels."""
    return [[h * vision_image_size // tile, w * vision_image_size // tile] for h, w in pinpoints]


def build_checkpoint(profile: str, out: str | Path, seed: int = 0, max_positions: int = 4096,
                     family: str = "llava", vision_image_size: int = 336) -> Path:
    """Write a random-weight checkpoint to `out`: LLaVA-1.5 (`family`
    "llava"), LLaVA-NeXT ("llava-next": anyres with NeXT's default tile
    grids, base view + unpadded tile map with newline tokens; CLIP + Llama)
    or LLaVA-OneVision ("llava-onevision": anyres_max_9 on 1x1 to 6x6 tile
    grids; SigLIP + Qwen2), a vision tower of `vision_image_size` pixels in
    14-pixel patches, and a text model of `max_positions` positions
    (`max_position_embeddings`)."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    p = PROFILES[profile]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(p.vocab_size, seed, p.word_tokens)
    if family == "llava-onevision":
        tokenizer.add_special_tokens({"extra_special_tokens": [VIDEO_TOKEN]})
    text = dict(
        hidden_size=p.text_hidden,
        intermediate_size=p.text_mlp,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        initializer_range=p.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_mlp,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=vision_image_size,
        patch_size=14,
    )
    build = _onevision if family == "llava-onevision" else _llava_or_next
    config, model_class, processor = build(family, tokenizer, text, vision)
    config.architectures = [model_class.__name__]
    config.dtype = p.dtype

    torch.manual_seed(seed)
    model = model_class(config).to(getattr(torch, p.dtype)).eval()
    # Spread the logits so that greedy decoding has clear winners: equality
    # tests across implementations must not hinge on near-ties.
    if not p.word_tokens:  # random profiles; the demo is trained from its own init
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 1.0 / p.text_hidden**0.5 * 4)
    save_model(model, out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation = {"bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _llava_or_next(family: str, tokenizer, text: dict, vision: dict):
    """(config, model class, processor) of LLaVA-1.5 or NeXT: CLIP + Llama."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    size = vision["image_size"]
    side = size // 14
    common = dict(
        vision_config=CLIPVisionConfig(**vision, projection_dim=vision["hidden_size"], hidden_act="quick_gelu"),
        text_config=LlamaConfig(**text, rms_norm_eps=1e-5, rope_theta=10000.0),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    # CLIP's preprocessing (OpenAI's mean and std), at the tower's size.
    clip = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor_kwargs = dict(tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    if family == "llava":
        return (LlavaConfig(**common, image_seq_length=side * side), LlavaForConditionalGeneration,
                LlavaProcessor(image_processor=CLIPImageProcessorPil(**clip, do_center_crop=True), **processor_kwargs))
    grid = scaled_pinpoints(LLAVA_NEXT_PINPOINTS, 336, size)
    return (LlavaNextConfig(**common, image_grid_pinpoints=grid), LlavaNextForConditionalGeneration,
            LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**clip, image_grid_pinpoints=grid),
                               **processor_kwargs))


def _onevision(family: str, tokenizer, text: dict, vision: dict):
    """(config, model class, processor) of LLaVA-OneVision: SigLIP + Qwen2,
    transformers' defaults (all SigLIP layers, every patch, anyres_max_9).
    Its processor holds a video processor, which needs torchvision."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    size = vision["image_size"]
    grid = scaled_pinpoints(LLAVA_ONEVISION_PINPOINTS, 384, size)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision),
        text_config=Qwen2Config(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=grid,
        tie_word_embeddings=False,
    )
    square = {"height": size, "width": size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=grid),
        video_processor=LlavaOnevisionVideoProcessor(size=square),
        tokenizer=tokenizer, num_image_tokens=(size // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN)
    return config, LlavaOnevisionForConditionalGeneration, processor


def ensure_checkpoint(profile: str, out: str | Path, seed: int = 0) -> Path:
    """Build the checkpoint unless `out` already holds one."""
    out = Path(out)
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    return build_checkpoint(profile, out, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.tools.checkpoints",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-positions", type=int, default=4096, help="the text model's positions")
    parser.add_argument("--family", choices=FAMILIES, default="llava",
                        help="LLaVA-1.5, LLaVA-NeXT (anyres tiles, NeXT's default tile grids) or "
                             "LLaVA-OneVision (anyres_max_9, SigLIP + Qwen2)")
    parser.add_argument("--vision-image-size", type=int, default=336,
                        help="the vision tower's input size in pixels (14-pixel patches)")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.profile, args.out, args.seed, args.max_positions, args.family,
                            args.vision_image_size)
    print(f"wrote {args.profile} {args.family} checkpoint (seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
