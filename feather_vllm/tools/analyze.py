"""Which image tokens a pruning setting keeps, through the real vLLM path.

python -m feather_vllm.tools.analyze --model DIR --image FILE --prompt TEXT \\
    --preset NAME --json OUT [--png OUT.png]

Runs one greedy request on FeatherLlava (single-process engine), reads the
kept token indices of every stage from the model, and writes them with the
mean kept row (0 = top, 1 = bottom) and per-quadrant coverage; the PNG
overlays each stage's kept tokens on the image as the model saw it.
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
from feather_vllm.pruning.stats import mean_row, quadrant_coverage


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
    side = int(round(n ** 0.5))
    stages = []
    for stage in report.stages:
        kept = list(stage.per_image[0])
        stages.append({"layer": stage.layer, "kept": kept, "num_kept": len(kept),
                       "mean_row": mean_row(kept, n), "quadrant_coverage": quadrant_coverage(kept, n)})
    return {
        "preset": config.name,
        "settings": config.to_dict(),
        "image_tokens": n,
        "grid": [side, side] if side * side == n else None,
        "stages": stages,
        "fallback": report.fallback.value if report.fallback else None,
        "text": out.outputs[0].text,
        "token_ids": list(out.outputs[0].token_ids),
    }


def plot(report: dict[str, Any], image: Image.Image, path: str | Path) -> None:
    """Kept tokens of each stage over the image, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    view = np.asarray(model_view(image))
    rows, cols = report["grid"]
    panels = [("all image tokens", None)] + [
        (f"layer {s['layer']}: {s['num_kept']} kept, mean row {s['mean_row']:.2f}", s["kept"])
        for s in report["stages"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, (title, kept) in zip(axes[0], panels):
        ax.imshow(view)
        if kept is not None:
            mask = np.zeros(rows * cols, dtype=bool)
            mask[kept] = True
            shade = np.where(mask.reshape(rows, cols)[..., None], [0, 0, 0, 0], [0, 0, 0, 0.75])
            ax.imshow(shade, extent=(0, view.shape[1], view.shape[0], 0), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{report['preset']}: kept image tokens per stage (dark = pruned)", fontsize=10)
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
    if args.png and report["grid"] and report["stages"]:
        plot(report, image, args.png)
    summary = ", ".join(f"layer {s['layer']}: {s['num_kept']} kept (mean row {s['mean_row']:.2f})"
                        for s in report["stages"]) or f"unpruned ({report['fallback'] or 'no stages'})"
    print(f"{report['preset']}: {report['image_tokens']} image tokens; {summary}")


if __name__ == "__main__":
    main()
