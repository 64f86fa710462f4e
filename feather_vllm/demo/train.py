"""Train the demo model: `python -m feather_vllm.demo.train --out DIR`.

A 1.5M-parameter LLaVA-1.5-layout model (CLIP 336/14 -> 576 image tokens,
32 Llama layers so the presets' cut layers apply) learns to answer
"Where is the {colour} {shape}?" with the 3x3-grid cell of the object.
Recipe measured on 2 CPU cores (../shared/DEMO_MODEL.md): loss on the
answer only, AdamW, cosine schedule, a size curriculum, a 2-D position
init for the vision tower and a wide projector init. About 1 s per step.

`--pruning-aware` drops random image tokens on the presets' schedules (cut
layers and kept counts, jittered) in half of the batches, so that the model
learns to answer from fewer tokens.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from feather_vllm.demo.scenes import CELLS, make_scene
from feather_vllm.pruning import PRESETS, Stage, select_stage


def _init_vision_positions(model) -> None:
    """2-D sin/cos plus a linear row and column ramp: the patches know where
    they are from the first step (a random table left training at chance)."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    dim = emb.shape[1]
    side = int(math.isqrt(emb.shape[0] - 1))
    table = torch.zeros_like(emb)
    index = torch.arange(side * side)
    rows, cols = index // side, index % side
    table[1:, 0] = rows / (side - 1) * 2 - 1
    table[1:, 1] = cols / (side - 1) * 2 - 1
    quarter = (dim - 2) // 4
    freqs = 1.0 / (100 ** (torch.arange(quarter) / quarter))
    for i, coord in enumerate((rows, cols)):
        angles = coord[:, None].float() * freqs[None]
        start = 2 + 2 * i * quarter
        table[1:, start:start + quarter] = torch.sin(angles)
        table[1:, start + quarter:start + 2 * quarter] = torch.cos(angles)
    with torch.no_grad():
        emb.copy_(table)


def _batch(processor, scenes, answer_ids: list[int], eos_id: int):
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
        add_generation_prompt=True) for s in scenes]
    inputs = processor(images=[s.image for s in scenes], text=texts, return_tensors="pt")
    answers = torch.tensor([answer_ids[s.cell] for s in scenes])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answers[:, None]], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    targets = torch.stack([answers, torch.full_like(answers, eos_id)], dim=1)
    return inputs, targets


def _drop_schedule(rng: np.random.Generator) -> tuple[Stage, ...]:
    """The stages of one pruning preset (fastv, feather or pyramiddrop, at
    random) with each keep fraction scaled by a random factor in [0.5, 1.5],
    so that the model meets the presets' cut layers and depths and the
    explicit stages around them."""
    names = [name for name, preset in PRESETS.items() if preset.stages]
    preset = PRESETS[names[rng.integers(len(names))]]
    return tuple(replace(stage, keep=min(1.0, stage.keep * rng.uniform(0.5, 1.5))) for stage in preset.stages)


def _dropping_forward(model, inputs, rng: np.random.Generator,
                      schedule: Callable[[np.random.Generator], tuple[Stage, ...]] = _drop_schedule,
                      kept_log: dict[tuple[int, int], torch.Tensor] | None = None):
    """Forward through the decoder with image tokens dropped (masked out as
    keys) at the cut layers of a random preset schedule, per sample. Each cut
    keeps a random subset of the surviving image tokens of the size the
    preset keeps (united with FEATHER's uniform grid where the stage has
    one): the presets' selection with random scores instead of attention.
    `schedule(rng)` gives a sample's stages (default: a jittered preset);
    `kept_log`, when given, receives each (sample, layer)'s survivors. The
    order of random draws is that of the shipped weights' training run."""
    inner = model.model
    lm = inner.language_model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"],
                                     vision_feature_layer=model.config.vision_feature_layer,
                                     vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                     return_dict=True).pooler_output
    feats = torch.cat(list(feats), 0).to(embeds.dtype)
    is_image = ids == model.config.image_token_index
    embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), feats)
    batch, length = ids.shape
    positions = torch.arange(length)[None].expand(batch, -1)
    cos_sin = lm.rotary_emb(embeds, position_ids=positions)
    causal = torch.full((length, length), float("-inf")).triu(1)
    dropped = torch.zeros(batch, length, dtype=torch.bool)
    image_rows = [torch.nonzero(is_image[b]).flatten() for b in range(batch)]
    survivors = [torch.arange(rows.numel()) for rows in image_rows]
    cuts: dict[int, list[tuple[int, Stage]]] = {}
    for b in range(batch):
        for stage in schedule(rng):
            cuts.setdefault(stage.layer, []).append((b, stage))
    hidden = embeds
    for index, layer in enumerate(lm.layers):
        for b, stage in cuts.get(index, []):
            scores = torch.from_numpy(rng.random(survivors[b].numel()))
            kept = select_stage(scores, survivors[b], stage, image_rows[b].numel())
            gone = survivors[b][~torch.isin(survivors[b], kept)]
            dropped[b, image_rows[b][gone]] = True
            survivors[b] = kept
            if kept_log is not None:
                kept_log[b, index] = kept
        mask = causal[None, None].expand(batch, 1, length, length).clone()
        mask.masked_fill_(dropped[:, None, None, :], float("-inf"))
        mask[:, :, torch.arange(length), torch.arange(length)] = 0.0  # a row always sees itself
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = lm.norm(hidden[:, -2:])
    return model.lm_head(hidden)


def train(out: Path, steps: int, seed: int, pruning_aware: bool, threads: int, batch_size: int = 8,
          lr: float = 3e-3, save_every: int = 0) -> dict:
    from tqdm import tqdm
    from transformers import AutoProcessor

    from feather_vllm.checkpoints import build_checkpoint, save_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Tokenizer, processor and config of the demo profile; weights are trained here.
        base = build_checkpoint("demo", Path(tmp) / "init", seed)
        for item in base.iterdir():
            if item.name != "model.safetensors":
                shutil.copy(item, out / item.name)
    processor = AutoProcessor.from_pretrained(out)
    model = _fresh_model(out, seed)
    _init_vision_positions(model)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.normal_(0.0, 0.25)
    tokenizer = processor.tokenizer
    answer_ids = [tokenizer.convert_tokens_to_ids(c) for c in CELLS]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if "embed" in name or "norm" in name or name.endswith("bias") else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    bar = tqdm(range(steps), desc="training demo", unit="step")
    running = None
    for step in bar:
        # Curriculum: large objects first, shrinking to the target sizes by 40%.
        t = min(1.0, step / (0.4 * steps))
        lo, hi = int(110 + (64 - 110) * t), int(170 + (112 - 170) * t)
        scenes = [make_scene(rng, (lo, hi)) for _ in range(batch_size)]
        inputs, targets = _batch(processor, scenes, answer_ids, tokenizer.eos_token_id)
        if pruning_aware and rng.random() < 0.5:
            logits = _dropping_forward(model, inputs, rng)
        else:
            logits = model(**inputs, logits_to_keep=2).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", size=f"{lo}-{hi}")
        if save_every and (step + 1) % save_every == 0:
            save_model(model, out)  # a usable checkpoint if the run is cut short
    model.eval()
    save_model(model, out)
    return {"steps": steps, "final_loss": running, "pruning_aware": pruning_aware, "seed": seed}


def _fresh_model(out: Path, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig.from_pretrained(out)).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=2300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruning-aware", action="store_true")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    args = parser.parse_args(argv)
    summary = train(args.out, args.steps, args.seed, args.pruning_aware, args.threads,
                    save_every=args.save_every)
    print(f"saved to {args.out}: {summary}")


if __name__ == "__main__":
    main()
