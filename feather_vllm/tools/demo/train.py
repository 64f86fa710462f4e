"""Train the demo model: `python -m feather_vllm.tools.demo.train --out DIR`.

A 1.5M-parameter LLaVA-1.5-layout model (CLIP 336/14 -> 576 image tokens,
32 Llama layers so the presets' cut layers apply) learns to answer
"Where is the {colour} {shape}?" with the 3x3-grid cell of the object.
Recipe measured on 2 CPU cores (../shared/DEMO_MODEL.md): loss on the
answer only, AdamW, cosine schedule, a size curriculum, a 2-D position
init for the vision tower and a wide projector init. About 1 s per step.

`--pruning-aware` drops image tokens on the presets' schedules (cut layers
and kept counts, jittered) in a share of the batches (`--drop-share`), so
that the model learns to answer from fewer tokens. The dropped tokens are
chosen as serving chooses them (`--criterion attention`: the last prompt
token's attention at the layer before each cut, RoPE or RoPE-free as the
stage says, united with FEATHER's grid) or at random (`--criterion random`).
`--init DIR` fine-tunes trained weights (the standard model), with their
tokenizer, instead of starting from scratch: no size curriculum, a shorter
warm-up. The shipped pruning-aware model is the standard one fine-tuned so
(`make demo-train-pruning-aware`).

`--pairs SHARE` trains a share of the batches on two-object scenes: half
of them one question about one of the objects, half two-turn chats (turn 1
asks about one object, the assistant answers, turn 2 asks about the other;
the loss is on both answers and their end tokens). Meant for a model that
`evaluate --multi-turn` can measure with. `--probe W` adds a loss (a
linear probe, not saved) that reads the asked object's colour and shape
from the last prompt token's input to layer `--bind-layer`; `--attend W`
a loss on that token's attention, in that layer (every layer from it on
with `--attend-all`), to the asked object's centre patches; `--blind
SHARE` hides the image from the text after it in every other layer in a
share of the two-object batches, so that the answer has to come from
that layer; `--locate W` two more probes: each image token's patch place
from that layer's keys and values, the asked object's cell from its
output at the last prompt token.
Fine-tuning the one-object model with them never made it tell the two
objects apart; from scratch, `--pairs 0.6 --probe 1 --attend 1 --locate 2`
does (`make demo-train-two-object`; README, "Conversations about one
image")."""

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

from feather_vllm.pruning import PRESETS, Stage, last_token_image_attention, select_stage
from feather_vllm.tools.demo.scenes import CELLS, COLOURS, SHAPES, make_pair, make_scene


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


def _pair_batch(processor, pairs, answer_ids: list[int], eos_id: int):
    """Two-turn chats about two-object scenes, rendered by the chat template
    as serving renders them (turn 1's answer in the history). Returns the
    inputs, the positions whose next token is an answer or its end token,
    and those tokens. Every chat has the same length (one-token answers,
    questions of equal length)."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first.question}]},
         {"role": "assistant", "content": first.answer},
         {"role": "user", "content": [{"type": "text", "text": second.question}]}],
        add_generation_prompt=True) for first, second in (p.objects for p in pairs)]
    inputs = processor(images=[p.image for p in pairs], text=texts, return_tensors="pt")
    answers = torch.tensor([answer_ids[p.objects[1].cell] for p in pairs])
    ids = torch.cat([inputs["input_ids"], answers[:, None], torch.full_like(answers, eos_id)[:, None]], dim=1)
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    first = torch.tensor([answer_ids[p.objects[0].cell] for p in pairs])
    # Turn 1's answer token and the end token after it, in each rendered chat.
    at = torch.stack([torch.nonzero(row == answer).flatten()[-1] for row, answer in zip(ids[:, :-2], first)])
    if not torch.all(ids[torch.arange(len(pairs)), at + 1] == eos_id):
        raise AssertionError("turn 1's answer is not followed by the end token in the chat template")
    n = ids.shape[1]
    positions = torch.stack([at - 1, at, torch.full_like(at, n - 3), torch.full_like(at, n - 2)], dim=1)
    return inputs, positions, ids.gather(1, positions + 1)


def _drop_schedule(rng: np.random.Generator, jitter: float = 0.5) -> tuple[Stage, ...]:
    """The stages of one pruning preset (fastv, feather or pyramiddrop, at
    random) with each keep fraction scaled by a random factor in
    [1 - jitter, 1 + jitter], so that the model meets the presets' cut
    layers and depths and the explicit stages around them (jitter 0: the
    presets exactly)."""
    names = [name for name, preset in PRESETS.items() if preset.stages]
    preset = PRESETS[names[rng.integers(len(names))]]
    if not jitter:
        return preset.stages
    return tuple(replace(stage, keep=min(1.0, stage.keep * rng.uniform(1 - jitter, 1 + jitter)))
                 for stage in preset.stages)


def _criterion_scores(layer, hidden: torch.Tensor, cos_sin, last: int, image_rows: torch.Tensor,
                      rope: bool) -> torch.Tensor:
    """Serving's criterion inside `layer` (the layer before a cut) for one
    sample: the last prompt token's attention to the image rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)[None]
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    if rope:
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    return last_token_image_attention(q[0, :, last], k[0, :, image_rows].transpose(0, 1), attn.scaling)


def _embedded(model, inputs):
    """The decoder's input: the token embeddings with the image features in
    the image tokens' places; which tokens are image tokens, the positions
    and RoPE's (cos, sin)."""
    inner = model.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"],
                                     vision_feature_layer=model.config.vision_feature_layer,
                                     vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                                     return_dict=True).pooler_output
    feats = torch.cat(list(feats), 0).to(embeds.dtype)
    is_image = ids == model.config.image_token_index
    embeds = embeds.masked_scatter(is_image[..., None].expand_as(embeds), feats)
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    return embeds, is_image, positions, inner.language_model.rotary_emb(embeds, position_ids=positions)


def _blind_forward(model, inputs, seeing: int, rows: torch.Tensor | None = None):
    """The model's forward, decoder layer by layer, in which `rows` (per
    sample; default: every text token after the first image token) see no
    image token in any layer but `seeing`, so that what the text learns of
    the image, and so the answer, has to come from that layer's look at it.
    Returns the logits at every position and each layer's input (as
    transformers' `hidden_states`)."""
    lm = model.model.language_model
    embeds, is_image, positions, cos_sin = _embedded(model, inputs)
    batch, length = is_image.shape
    causal = torch.full((length, length), float("-inf")).triu(1)
    blind = causal[None].repeat(batch, 1, 1)
    for b in range(batch):
        image = torch.nonzero(is_image[b]).flatten()
        blinded = torch.nonzero(~is_image[b] & (positions[b] > image[0])).flatten() if rows is None else rows[b]
        blind[b, blinded[:, None], image[None, :]] = float("-inf")
    hidden, states = embeds, []
    for index, layer in enumerate(lm.layers):
        states.append(hidden)
        mask = causal[None, None].expand(batch, 1, length, length) if index == seeing else blind[:, None]
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(hidden)), states


def _forward(model, inputs, watch: bool, seeing: int | None):
    """Logits at every position and, if `watch` (a loss reads them), each
    layer's input; with `seeing`, `_blind_forward`'s."""
    if seeing is not None:
        return _blind_forward(model, inputs, seeing)
    result = model(**inputs, output_hidden_states=watch)
    return result.logits, result.hidden_states if watch else None


def _dropping_forward(model, inputs, rng: np.random.Generator,
                      schedule: Callable[[np.random.Generator], tuple[Stage, ...]] = _drop_schedule,
                      kept_log: dict[tuple[int, int], torch.Tensor] | None = None, criterion: str = "random"):
    """Forward through the decoder with image tokens dropped (masked out as
    keys) at the cut layers of a random preset schedule, per sample. Each cut
    keeps the presets' count of the surviving image tokens (united with
    FEATHER's uniform grid where the stage has one), ranked by serving's
    criterion (`criterion="attention"`, computed without gradient in the
    layer before the cut) or by random scores (`"random"`). `schedule(rng)`
    gives a sample's stages (default: a jittered preset); `kept_log`, when
    given, receives each (sample, layer)'s survivors. With random scores the
    order of random draws is that of the standard recipe's first run."""
    lm = model.model.language_model
    embeds, is_image, positions, cos_sin = _embedded(model, inputs)
    batch, length = is_image.shape
    causal = torch.full((length, length), float("-inf")).triu(1)
    dropped = torch.zeros(batch, length, dtype=torch.bool)
    image_rows = [torch.nonzero(is_image[b]).flatten() for b in range(batch)]
    survivors = [torch.arange(rows.numel()) for rows in image_rows]
    cuts: dict[int, list[tuple[int, Stage]]] = {}
    for b in range(batch):
        for stage in schedule(rng):
            cuts.setdefault(stage.layer, []).append((b, stage))
    hidden = embeds
    pending: dict[tuple[int, int], torch.Tensor] = {}  # (sample, cut layer) -> criterion scores
    for index, layer in enumerate(lm.layers):
        for b, stage in cuts.get(index, []):
            if criterion == "attention":
                scores = pending.pop((b, index))
            else:
                scores = torch.from_numpy(rng.random(survivors[b].numel()))
            kept = select_stage(scores, survivors[b], stage, image_rows[b].numel())
            gone = survivors[b][~torch.isin(survivors[b], kept)]
            dropped[b, image_rows[b][gone]] = True
            survivors[b] = kept
            if kept_log is not None:
                kept_log[b, index] = kept
        if criterion == "attention":
            with torch.no_grad():
                for b, stage in cuts.get(index + 1, []):
                    pending[b, index + 1] = _criterion_scores(
                        layer, hidden[b], (cos_sin[0][b:b + 1], cos_sin[1][b:b + 1]), length - 2,
                        image_rows[b][survivors[b]], stage.criterion == "rope")
        mask = causal[None, None].expand(batch, 1, length, length).clone()
        mask.masked_fill_(dropped[:, None, None, :], float("-inf"))
        mask[:, :, torch.arange(length), torch.arange(length)] = 0.0  # a row always sees itself
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = lm.norm(hidden[:, -2:])
    return model.lm_head(hidden)


def object_patches(centre: tuple[int, int], side: int, patch: int) -> torch.Tensor:
    """The patches of a side x side raster (row-major, bool) whose centres
    lie within 1.5 patches of an object's centre in both axes (3 x 3, or up
    to 4 x 4 where it sits on a patch border): inside every object the
    scenes draw (half-side >= 32 px)."""
    centres = torch.arange(side) * patch + patch / 2
    x, y = centre
    return (((centres[None, :] - x).abs() <= 1.5 * patch) & ((centres[:, None] - y).abs() <= 1.5 * patch)).flatten()


def _attention_loss(model, layers: range, ids: torch.Tensor, hidden_states, last: torch.Tensor,
                    asked) -> torch.Tensor:
    """-log of the attention (RoPE'd, mean over heads, over the image
    tokens) that each sample's last prompt token pays to the patches at the
    asked object's centre (`object_patches`), averaged over decoder `layers`."""
    lm = model.model.language_model
    vision = model.config.vision_config
    positions = torch.arange(ids.shape[1])[None]
    cos_sin = lm.rotary_emb(hidden_states[0][:1], position_ids=positions)
    losses = []
    for b, scene in enumerate(asked):
        rows = torch.nonzero(ids[b] == model.config.image_token_index).flatten()
        near = object_patches(scene.centre, vision.image_size // vision.patch_size, vision.patch_size)
        for layer in layers:
            attention = _criterion_scores(lm.layers[layer], hidden_states[layer][b], cos_sin, int(last[b]), rows,
                                          rope=True)
            losses.append(-torch.log(attention[near].sum() + 1e-6))
    return torch.stack(losses).mean()


def _place_loss(model, locator: torch.nn.ModuleDict, layer: int, states, ids: torch.Tensor,
                last: torch.Tensor, asked) -> torch.Tensor:
    """Where things are, as decoder `layer` must see it for an attention
    that picks the asked object to answer with it (the one-object model
    keeps neither read there): a linear read (`locator["patch"]`) of each image
    token's patch row and column (0..1) from the layer's normed input, which
    its keys and values are made of, as 1 - R^2; plus the cross-entropy of a
    linear read (`locator["cell"]`) of the asked object's cell from the last
    prompt token's output of the layer."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    index = torch.arange(side * side)
    where = torch.stack([index // side, index % side], dim=1).float() / (side - 1)
    normed = model.model.language_model.layers[layer].input_layernorm(states[layer])
    read = locator["patch"](normed[ids == model.config.image_token_index])  # image tokens, raster order
    patch = torch.nn.functional.mse_loss(read, where.repeat(ids.shape[0], 1)) / where.var(dim=0).mean()
    out = states[layer + 1][torch.arange(ids.shape[0]), last]
    return patch + torch.nn.functional.cross_entropy(locator["cell"](out), torch.tensor([s.cell for s in asked]))


def train(out: Path, steps: int, seed: int, pruning_aware: bool, threads: int, batch_size: int = 8,
          lr: float = 3e-3, save_every: int = 0, init: Path | None = None, drop_share: float = 0.5,
          criterion: str = "random", jitter: float = 0.5, pairs: float = 0.0, probe: float = 0.0,
          bind_layer: int = 4, attend: float = 0.0, attend_all: bool = False, blind: float = 0.0,
          locate: float = 0.0) -> dict:
    from tqdm import tqdm
    from transformers import AutoProcessor

    from feather_vllm.tools.checkpoints import build_checkpoint, save_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Tokenizer, processor and config: fine-tuning keeps the trained
        # weights' own (their embeddings are indexed by its ids); from
        # scratch, the demo profile's. Weights are trained here.
        base = init if init is not None else build_checkpoint("demo", Path(tmp) / "init", seed)
        for item in base.iterdir():
            if item.name != "model.safetensors" and item.resolve() != (out / item.name).resolve():
                shutil.copy(item, out / item.name)
    processor = AutoProcessor.from_pretrained(out)
    if init is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    else:
        model = _fresh_model(out, seed)
        _init_vision_positions(model)
        with torch.no_grad():
            model.model.multi_modal_projector.linear_1.weight.normal_(0.0, 0.25)
    tokenizer = processor.tokenizer
    answer_ids = [tokenizer.convert_tokens_to_ids(c) for c in CELLS]
    # A probe (trained, never saved) reads the asked object's colour and
    # shape from the last prompt token after `bind_layer` layers: the
    # question must reach the token that will look for the object.
    names = [*COLOURS, *SHAPES]
    hidden = model.config.text_config.hidden_size
    reader = torch.nn.Linear(hidden, len(names)) if probe else None
    # Two more (never saved) read where things are in the bind layer (`_place_loss`).
    locator = torch.nn.ModuleDict({"patch": torch.nn.Linear(hidden, 2),
                                   "cell": torch.nn.Linear(hidden, len(CELLS))}) if locate else None
    watch = bool(probe or attend or locate)  # the losses read each layer's input
    decay, no_decay = [], []
    probes = [*(reader.named_parameters(prefix="probe") if reader else []),
              *(locator.named_parameters(prefix="locator") if locator else [])]
    for name, param in [*model.named_parameters(), *probes]:
        (no_decay if "embed" in name or "norm" in name or name.endswith("bias") else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = 50 if init is None else 20
    # From scratch, large objects first, shrinking to the target sizes by 40%
    # of the steps; trained weights start at the target sizes.
    curriculum = 0.4 if init is None else 0.0

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
        t = min(1.0, step / (curriculum * steps)) if curriculum else 1.0
        lo, hi = int(110 + (64 - 110) * t), int(170 + (112 - 170) * t)
        two_objects = bool(pairs) and rng.random() < pairs
        blinded = bool(blind) and two_objects and rng.random() < blind
        seeing = bind_layer if blinded else None
        if two_objects and rng.random() < 0.5:
            chats = [make_pair(rng, (lo, hi)) for _ in range(batch_size)]
            inputs, positions, targets = _pair_batch(processor, chats, answer_ids, tokenizer.eos_token_id)
            logits, states = _forward(model, inputs, watch, seeing)
            logits = logits.gather(1, positions[..., None].expand(-1, -1, model.config.text_config.vocab_size))
            last, asked = positions[:, 2], [c.objects[1] for c in chats]  # turn 2's question, at its last token
        else:
            # One question; with two objects, about one of them at random.
            asked = [make_pair(rng, (lo, hi)).objects[int(rng.integers(2))] if two_objects
                     else make_scene(rng, (lo, hi)) for _ in range(batch_size)]
            inputs, targets = _batch(processor, asked, answer_ids, tokenizer.eos_token_id)
            last = torch.full((batch_size,), inputs["input_ids"].shape[1] - 2)
            if pruning_aware and rng.random() < drop_share:
                logits, states = _dropping_forward(model, inputs, rng, lambda r: _drop_schedule(r, jitter),
                                                   criterion=criterion), None
            elif not watch and not blinded:
                logits, states = model(**inputs, logits_to_keep=2).logits, None
            else:
                logits, states = _forward(model, inputs, watch, seeing)
                logits = logits[:, -2:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        layers = range(bind_layer, model.config.text_config.num_hidden_layers if attend_all else bind_layer + 1)
        if states is not None and attend:
            loss = loss + attend * _attention_loss(model, layers, inputs["input_ids"], states, last, asked)
        if states is not None and reader is not None:
            colour = torch.tensor([names.index(s.colour) for s in asked])
            shape = torch.tensor([names.index(s.shape) for s in asked]) - len(COLOURS)
            for layer in layers:  # the question stays readable in every layer the attention loss covers
                read = reader(states[layer][torch.arange(batch_size), last])
                loss = loss + probe / len(layers) * (
                    torch.nn.functional.cross_entropy(read[:, :len(COLOURS)], colour)
                    + torch.nn.functional.cross_entropy(read[:, len(COLOURS):], shape))
        if states is not None and locator is not None:
            loss = loss + locate * _place_loss(model, locator, bind_layer, states, inputs["input_ids"], last, asked)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", size=f"{lo}-{hi}")
        if save_every and (step + 1) % save_every == 0:
            save_model(model, out)  # a usable checkpoint if the run is cut short
    model.eval()
    save_model(model, out)
    return {"steps": steps, "final_loss": running, "pruning_aware": pruning_aware, "seed": seed,
            "init": str(init) if init else None, "drop_share": drop_share, "criterion": criterion, "jitter": jitter,
            "pairs": pairs, "probe": probe, "bind_layer": bind_layer, "attend": attend, "attend_all": attend_all,
            "blind": blind, "locate": locate}


def _fresh_model(out: Path, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig.from_pretrained(out)).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.tools.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=2300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruning-aware", action="store_true")
    parser.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    parser.add_argument("--init", type=Path, help="fine-tune these trained weights instead of starting fresh")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--drop-share", type=float, default=0.5, help="share of batches with dropped tokens")
    parser.add_argument("--criterion", choices=["random", "attention"], default="random",
                        help="how dropped tokens are chosen (attention: as serving chooses)")
    parser.add_argument("--pairs", type=float, default=0.0,
                        help="share of batches on two-object scenes (half of them two-turn chats)")
    parser.add_argument("--probe", type=float, default=0.0,
                        help="weight of a loss that reads the asked object's colour and shape from the last "
                             "prompt token (a probe, not saved)")
    parser.add_argument("--bind-layer", type=int, default=4,
                        help="the decoder layer whose input --probe reads, whose attention --attend trains and in "
                             "which alone --blind batches see the image")
    parser.add_argument("--attend", type=float, default=0.0,
                        help="weight of a loss on the last prompt token's attention, in layer --bind-layer, "
                             "to the asked object")
    parser.add_argument("--attend-all", action="store_true",
                        help="--attend in every layer from --bind-layer on")
    parser.add_argument("--blind", type=float, default=0.0,
                        help="share of two-object batches in which the text after the image sees the image only "
                             "in layer --bind-layer")
    parser.add_argument("--locate", type=float, default=0.0,
                        help="weight of a loss that reads each image token's patch row and column from layer "
                             "--bind-layer's normed input and the asked object's cell from its output at the last "
                             "prompt token (probes, not saved)")
    parser.add_argument("--jitter", type=float, default=0.5,
                        help="keep fractions scaled by a random factor in [1 - j, 1 + j] (0: the presets)")
    args = parser.parse_args(argv)
    summary = train(args.out, args.steps, args.seed, args.pruning_aware, args.threads,
                    lr=args.lr, save_every=args.save_every, init=args.init, drop_share=args.drop_share,
                    criterion=args.criterion, jitter=args.jitter, pairs=args.pairs, probe=args.probe,
                    bind_layer=args.bind_layer, attend=args.attend, attend_all=args.attend_all,
                    blind=args.blind, locate=args.locate)
    print(f"saved to {args.out}: {summary}")


if __name__ == "__main__":
    main()
