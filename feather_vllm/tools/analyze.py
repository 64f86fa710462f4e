"""Which image tokens a pruning setting keeps, through the real vLLM path.

python -m feather_vllm.tools.analyze --model DIR --image FILE --prompt TEXT \\
    --preset NAME --json OUT [--png OUT.png]

Runs one greedy request on FEATHER's model (single-process engine; a
LLaVA-1.5 or LLaVA-NeXT checkpoint), reads the kept token indices of every
stage from the engine's report, and writes them with the mean kept row
(0 = top, 1 = bottom) and per-quadrant coverage, per region of the image's
layout (LLaVA-1.5: one 24 x 24 raster; NeXT: the base view and the tile
map, whose newline tokens are counted apart); the PNG overlays each
stage's kept tokens on the image as each region saw it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from feather_vllm.kv.plan import report_of
from feather_vllm.pruning import config as pcfg
from feather_vllm.pruning.layout import NEWLINE, region_kept_counts, region_kept_indices, region_stats


def model_view(image: Image.Image, size: int = 336) -> Image.Image:
    """The image as CLIP's processor crops it: shortest side to `size`, centre crop."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def analyze(model: str, image: Image.Image, prompt: str, preset: Any,
            max_tokens: int = 16, dtype: str = "float32") -> dict[str, Any]:
    """Run one request and report what each stage kept."""
    from vllm import LLM, SamplingParams

    from feather_vllm.engine import engine_kwargs

    config = pcfg.resolve(preset)
    llm = LLM(distributed_executor_backend="uni",
              **engine_kwargs(model, dtype=dtype, max_num_seqs=4,
                              kv_cache_bytes=2**30, enforce_eager=True))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": prompt}]}]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            extra_args={"feather": config.to_dict()})
    out = llm.chat(messages, params, use_tqdm=False)[0]
    report = report_of(out)
    (n,) = report.image_tokens  # one image
    layout = report.layouts[0] if report.layouts else None
    stages = []
    for stage in report.stages:
        kept = list(stage.per_image[0])
        stats = region_stats(kept, layout)
        indices = region_kept_indices(kept, layout)
        stages.append({"layer": stage.layer, "kept": kept, "num_kept": len(kept),
                       "newlines_kept": region_kept_counts(kept, layout)[NEWLINE],
                       "regions": {r.name: {**stats[r.name], "kept_indices": indices[r.name]}
                                   for r in layout.regions}})
    return {
        "preset": config.name,
        "settings": config.to_dict(),
        "image_tokens": n,
        "regions": [{"name": r.name, "rows": r.rows, "cols": r.cols, "newline": r.newline}
                    for r in layout.regions] if layout else None,
        "stages": stages,
        "fallback": report.fallback.value if report.fallback else None,
        "text": out.outputs[0].text,
        "token_ids": list(out.outputs[0].token_ids),
    }


def region_view(image: Image.Image, region: dict[str, Any]) -> Image.Image:
    """The image as a region saw it: LLaVA-1.5's centre crop; NeXT's base
    view is the whole image squeezed to one tile, its tile map the whole
    image at its own aspect (the letterbox padding is cropped away)."""
    if region["name"] == "image":
        return model_view(image)
    image = image.convert("RGB")
    if region["name"] == "base":
        return image.resize((336, 336), Image.BICUBIC)
    return image


def plot(report: dict[str, Any], image: Image.Image, path: str | Path) -> None:
    """Kept tokens of each stage over the image, one row of panels per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    regions = [r for r in report["regions"] if r["rows"] and r["cols"]]
    columns = 1 + len(report["stages"])
    fig, axes = plt.subplots(len(regions), columns, figsize=(3.4 * columns, 3.6 * len(regions)), squeeze=False)
    for row, region in zip(axes, regions):
        view = np.asarray(region_view(image, region))
        rows, cols = region["rows"], region["cols"]
        panels = [(f"{region['name']}: {rows} x {cols} tokens", None)] + [
            (f"layer {s['layer']}: {s['regions'][region['name']]['kept']} kept", s["regions"][region["name"]])
            for s in report["stages"]]
        for ax, (title, kept) in zip(row, panels):
            ax.imshow(view)
            if kept is not None:
                mask = np.zeros(rows * cols, dtype=bool)
                mask[kept["kept_indices"]] = True
                shade = np.where(mask.reshape(rows, cols)[..., None], [0, 0, 0, 0], [0, 0, 0, 0.75])
                ax.imshow(shade, extent=(0, view.shape[1], view.shape[0], 0), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    newlines = ", ".join(f"layer {s['layer']}: {s['newlines_kept']}" for s in report["stages"])
    fig.suptitle(f"{report['preset']}: kept image tokens per stage (dark = pruned)"
                 + (f"; newline tokens kept: {newlines}" if any(r["newline"] for r in report["regions"]) else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.tools.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--preset", default="feather",
                        help=f"one of {sorted(pcfg.PRESETS)} or a JSON object with 'stages'")
    parser.add_argument("--json", required=True, dest="json_out")
    parser.add_argument("--png")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    preset = json.loads(args.preset) if args.preset.lstrip().startswith("{") else args.preset
    image = Image.open(args.image)
    report = analyze(args.model, image, args.prompt, preset, args.max_tokens, args.dtype)
    Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.png and report["stages"]:
        plot(report, image, args.png)
    summary = "; ".join(f"layer {s['layer']}: {s['num_kept']} kept (" + ", ".join(
        f"{name} {r['kept']}, mean row {r['mean_row']:.2f}" for name, r in s["regions"].items())
        + (f", {s['newlines_kept']} newlines" if s["newlines_kept"] else "") + ")"
        for s in report["stages"]) or f"unpruned ({report['fallback'] or 'no stages'})"
    print(f"{report['preset']}: {report['image_tokens']} image tokens; {summary}")


if __name__ == "__main__":
    main()
