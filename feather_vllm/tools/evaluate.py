"""What each pruning setting costs in localization accuracy, measured against
any OpenAI-compatible endpoint.

python -m feather_vllm.tools.evaluate --url http://127.0.0.1:8000 --model demo \\
    [--presets none,fastv,feather,pyramiddrop] [--stages '[{"layer": 8, "keep": 0.2}]'] \\
    [--scenes 200 --seed 12345 | --jsonl refs.jsonl] [--json out.json] [--png out.png]

Built-in task: held-out synthetic scenes ("Where is the {colour} {shape}?",
answer: the 3x3-grid cell). The reply is correct when the first cell name
it contains ("top-left" ... "bottom-right"; spaces or hyphens) is the
object's cell.

RefCOCO-style JSONL: one object per line, {"image": path or URL,
"expression": str, "box": [x0, y0, x1, y1] in pixels}. The model is asked
for the region's bounding box; the first four numbers in its reply are the
box (all <= 1: fractions of the image size; else pixels); correct when
IoU >= 0.5.

Per setting: accuracy with its standard error, the paired difference to
`none` (same items) with its standard error, accuracy by where the target
is (top / middle / bottom third) and, when the endpoint is feather-vllm's
gateway, the kept tokens' mean row and quadrant coverage per stage. The PNG
also draws kept-token maps of the first `--maps` scenes (the gateway's
`"return_kept": true`): each token shaded by how many stages it survived.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from feather_vllm.tools.demo.scenes import CELLS, ROWS, held_out

REFCOCO_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}"


def parse_cell(reply: str) -> int | None:
    """Index of the first cell name in the reply ("top left" = "top-left")."""
    text = reply.lower().replace("_", "-")
    text = re.sub(r"\b(top|middle|bottom)\s+(left|center|centre|right)\b", r"\1-\2", text).replace("centre", "center")
    found = [(text.find(name), i) for i, name in enumerate(CELLS) if re.search(rf"(?<![\w-]){name}(?![\w-])", text)]
    return min(found)[1] if found else None


def parse_box(reply: str, width: int, height: int) -> tuple[float, float, float, float] | None:
    # Numbers standing alone (not the digits of labels such as "x1").
    numbers = [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", reply)[:4]]
    if len(numbers) < 4:
        return None
    if all(abs(n) <= 1.0 for n in numbers):
        numbers = [numbers[0] * width, numbers[1] * height, numbers[2] * width, numbers[3] * height]
    x0, y0, x1, y1 = numbers
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def builtin_items(n: int, seed: int, maps: int = 0) -> list[dict[str, Any]]:
    """Held-out scenes; the first `maps` also keep their image for kept-token maps."""
    items = []
    for i, s in enumerate(held_out(n, seed)):
        item = {"image_url": _data_url(s.image), "question": s.question, "cell": s.cell, "row": s.row,
                "size": s.image.size}
        if i < maps:
            item["image"] = s.image
        items.append(item)
    return items


def jsonl_items(path: Path) -> list[dict[str, Any]]:
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        ref = json.loads(line)
        source = ref["image"]
        if source.startswith(("http://", "https://", "data:")):
            url, size = source, tuple(ref.get("size") or (0, 0))
        else:
            image = Image.open((path.parent / source) if not Path(source).is_absolute() else source)
            url, size = _data_url(image), image.size
        box = tuple(float(v) for v in ref["box"])
        centre_y = (box[1] + box[3]) / 2
        items.append({"image_url": url, "question": REFCOCO_PROMPT.format(ref["expression"]), "box": box,
                      "size": size, "row": ROWS[min(2, int(3 * centre_y / size[1]))] if size[1] else "middle"})
    return items


async def _ask(client: httpx.AsyncClient, model: str, item: dict[str, Any], setting: dict[str, Any] | None,
               max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": [
                                {"type": "image_url", "image_url": {"url": item["image_url"]}},
                                {"type": "text", "text": item["question"]}]}]}
    if setting is not None:
        # Items drawn as kept-token maps ask the gateway for the kept indices.
        body["feather"] = {**setting, "return_kept": True} if "image" in item else setting
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    reply = data["choices"][0]["message"]["content"] or ""
    if "cell" in item:
        correct = parse_cell(reply) == item["cell"]
    else:
        box = parse_box(reply, *item["size"])
        correct = box is not None and iou(box, item["box"]) >= 0.5
    return {"reply": reply, "correct": correct, "feather": data.get("feather")}


async def evaluate(url: str, model: str, items: list[dict[str, Any]], settings: dict[str, dict | None],
                   concurrency: int = 4, max_tokens: int = 8, api_key: str | None = None) -> dict[str, list]:
    """Answers per setting, item order preserved."""
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items) * len(settings), desc="evaluating", unit="req")
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        async def one(item, setting):
            async with semaphore:
                result = await _ask(client, model, item, setting, max_tokens)
            bar.update(1)
            return result

        out = {}
        for name, setting in settings.items():
            out[name] = await asyncio.gather(*(one(item, setting) for item in items))
    bar.close()
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarize(items: list[dict[str, Any]], answers: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = answers.get("none")
    report: dict[str, Any] = {}
    for name, results in answers.items():
        correct = [float(r["correct"]) for r in results]
        acc, se = _mean_se(correct)
        entry: dict[str, Any] = {"accuracy": acc, "se": se, "n": len(correct), "by_row": {}}
        for row in ROWS:
            sub = [c for c, item in zip(correct, items) if item["row"] == row]
            if sub:
                entry["by_row"][row] = {"accuracy": sum(sub) / len(sub), "n": len(sub)}
        if base is not None and name != "none":
            diff, diff_se = _mean_se([c - float(b["correct"]) for c, b in zip(correct, base)])
            entry["vs_none"] = {"difference": diff, "se": diff_se}
        stages: dict[int, dict[str, list]] = {}
        for r in results:
            for stage in _image_stages(r.get("feather")):
                if stage.get("mean_row") is None:
                    continue
                agg = stages.setdefault(stage["layer"], {"kept": [], "mean_row": [], "coverage": []})
                agg["kept"].append(stage["kept"])
                agg["mean_row"].append(stage["mean_row"])
                agg["coverage"].append(stage["quadrant_coverage"])
        entry["stages"] = [{
            "layer": layer, "kept": sum(a["kept"]) / len(a["kept"]), "mean_row": sum(a["mean_row"]) / len(a["mean_row"]),
            "quadrant_coverage": {q: sum(c[q] for c in a["coverage"]) / len(a["coverage"]) for q in a["coverage"][0]},
        } for layer, a in sorted(stages.items())]
        report[name] = entry
    return report


def _image_stages(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The cuts of a one-image request's report (its `images[0].stages`)."""
    images = (report or {}).get("images") or [{}]
    return images[0].get("stages", [])


def print_table(report: dict[str, Any]) -> None:
    print(f"{'setting':<14} {'accuracy':>15} {'vs none':>16} {'top':>6} {'middle':>7} {'bottom':>7}   kept mean row per stage")
    for name, e in report.items():
        vs = e.get("vs_none")
        rows = [e["by_row"].get(r, {}).get("accuracy") for r in ROWS]
        stages = ", ".join(f"L{s['layer']}: {s['kept']:.0f} kept, row {s['mean_row']:.2f}" for s in e["stages"])
        diff = "" if vs is None else "{:+7.1f} ± {:.1f}".format(100 * vs["difference"], 100 * vs["se"])
        by_row = "".join(" {:>6}".format("-" if a is None else f"{100 * a:.0f}") for a in rows)
        print(f"{name:<14} {100 * e['accuracy']:>7.1f} ± {100 * e['se']:>4.1f} {diff:>16}{by_row}   {stages}")


def kept_maps(items: list[dict[str, Any]], answers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """For each item kept for a map: its image, question and, per pruned
    setting, how many stages each image token survived and the reply."""
    maps = []
    for index, item in enumerate(items):
        if "image" not in item:
            continue
        panels = {}
        for name, results in answers.items():
            report = results[index].get("feather") or {}
            stages = [s.get("kept_indices") for s in _image_stages(report)]
            if not stages or any(kept is None for kept in stages):
                continue  # unpruned, a fallback, or a server that does not report indices
            survived = [0] * report["images"][0]["image_tokens"]
            for kept in stages:
                for i in kept:
                    survived[i] += 1
            panels[name] = {"survived": survived, "stages": len(stages), "reply": results[index]["reply"],
                            "correct": results[index]["correct"],
                            "kept": [len(kept) for kept in stages]}
        if panels:
            maps.append({"image": item["image"], "question": item["question"], "panels": panels})
    return maps


def _draw_map(ax, image: Image.Image, panel: dict[str, Any]) -> None:
    """The image darkened where tokens were dropped: full brightness for
    tokens that survived every stage (outlined in red), darker the earlier a
    token went."""
    import numpy as np

    side = math.isqrt(len(panel["survived"]))
    # Drawn at 14 px per token (CLIP's patch): exact for the square demo scenes.
    pixels = np.asarray(image.convert("RGB").resize((side * 14, side * 14)), dtype=float) / 255
    depth = np.asarray(panel["survived"], dtype=float).reshape(side, side) / panel["stages"]
    shade = np.kron(0.15 + 0.85 * depth, np.ones((14, 14)))
    ax.imshow(pixels * shade[..., None])
    ax.contour(np.kron(depth == 1, np.ones((14, 14))), levels=[0.5], colors="red", linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def plot(report: dict[str, Any], path: Path, title: str, maps: list[dict[str, Any]] | None = None) -> None:
    """Accuracy per setting, accuracy by target row and, when `maps` has
    scenes, their kept-token maps per pruned setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    maps = maps or []
    columns = sorted({name for m in maps for name in m["panels"]}, key=names.index)
    fig = plt.figure(figsize=(12, 4.2 + 2.6 * len(maps)), layout="constrained")
    charts, grid = fig.subfigures(2, 1, height_ratios=[4.2, 2.6 * len(maps)]) if maps else (fig, None)
    a, b = charts.subplots(1, 2)
    a.bar(names, [100 * report[n]["accuracy"] for n in names],
          yerr=[100 * report[n]["se"] for n in names], capsize=4, color="tab:blue")
    a.set_ylabel("accuracy (%)")
    a.set_title("localization accuracy (± 1 s.e.)")
    a.tick_params(axis="x", rotation=20)
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        b.bar([x + i * width for x in range(3)], [100 * report[n]["by_row"].get(r, {}).get("accuracy", 0) for r in ROWS],
              width, label=n)
    b.set_xticks([x + 0.4 - width / 2 for x in range(3)], [f"target {r}" for r in ROWS])
    b.set_ylabel("accuracy (%)")
    b.set_title("by where the target is")
    b.legend(fontsize=8)
    if grid is not None:
        axes = grid.subplots(len(maps), len(columns) + 1, squeeze=False)
        for row, scene in zip(axes, maps):
            row[0].imshow(scene["image"])
            row[0].set_xticks([])
            row[0].set_yticks([])
            row[0].set_title(scene["question"], fontsize=8)
            for ax, name in zip(row[1:], columns):
                panel = scene["panels"].get(name)
                if panel is None:
                    ax.axis("off")
                    continue
                _draw_map(ax, scene["image"], panel)
                mark = "right" if panel["correct"] else "wrong"
                reply = "".join(c if c.isprintable() else "?" for c in panel["reply"].strip()[:24])
                ax.set_title(f"{name}: kept {'/'.join(map(str, panel['kept']))}\n\"{reply}\" ({mark})", fontsize=8)
        grid.suptitle("kept image tokens (brighter = survived more stages; red: kept to the last stage)", fontsize=10)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feather_vllm.tools.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of an OpenAI-compatible server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--presets", default="none,fastv,feather,pyramiddrop")
    parser.add_argument("--stages", action="append", default=[],
                        help="explicit stages as JSON (repeatable), e.g. '[{\"layer\": 8, \"keep\": 0.2}]'")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345, help="held-out scenes (training never uses it)")
    parser.add_argument("--jsonl", type=Path, help="RefCOCO-style file instead of the built-in scenes")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--maps", type=int, default=3, help="scenes drawn as kept-token maps in the PNG")
    parser.add_argument("--no-pruning-field", action="store_true",
                        help="send no `feather` field (servers that do not know it); evaluates one setting")
    args = parser.parse_args(argv)
    items = jsonl_items(args.jsonl) if args.jsonl else builtin_items(args.scenes, args.seed, args.maps)
    if args.no_pruning_field:
        settings: dict[str, dict | None] = {"none": None}
    else:
        settings = {p: {"preset": p} for p in args.presets.split(",") if p}
        for i, stages in enumerate(args.stages):
            settings[f"stages{i + 1}"] = {"stages": json.loads(stages)}
    answers = asyncio.run(evaluate(args.url, args.model, items, settings, args.concurrency,
                                   args.max_tokens if not args.jsonl else max(args.max_tokens, 32), args.api_key))
    report = summarize(items, answers)
    maps = kept_maps(items, answers)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "items": len(items), "settings": settings, "report": report,
            "answers": {k: [{"reply": r["reply"], "correct": r["correct"]} for r in v] for k, v in answers.items()},
            "maps": [{"question": m["question"], "panels": m["panels"]} for m in maps]}, indent=2))
    if args.png:
        plot(report, args.png, f"{args.model}: {len(items)} {'references' if args.jsonl else 'held-out scenes'}",
             maps)


if __name__ == "__main__":
    main()
