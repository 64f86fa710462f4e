"""What each pruning setting costs in localization accuracy, measured against
any OpenAI-compatible endpoint.

python -m feather_vllm.tools.evaluate --url http://127.0.0.1:8000 --model demo \\
    [--presets none,fastv,feather,pyramiddrop] [--stages '[{"layer": 8, "keep": 0.2}]'] \\
    [--scenes 200 --seed 12345 | --jsonl refs.jsonl] [--json out.json] [--png out.png]
python -m feather_vllm.tools.evaluate --url ... --model demo --multi-turn \\
    [--presets ...] [--scenes 200 --pair-seed 54321] [--no-follow-ups] [--json out.json]

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

--multi-turn: what reusing a pruned image's KV across turns costs. Held-out
two-object scenes (`held_out_pairs`: different colours, different shapes,
different cells); turn 1 asks "Where is the {colour} {shape}?" about one
object, turn 2 (turn 1 with the image, the reply turn 1 got, then the new
question as text) about the other. Each setting's turn 1 is asked once and
turn 2 follows it: under `none`, and under each pruned setting with each
follow-up policy (`"follow_up"`: "reuse" turn 1's pruned KV and so its
kept set, chosen for the other object; "add_back", turn 1's pruned KV and
what the new question ranks highest of what turn 1 dropped; "reselect",
pruned again for the new question; "keep_both", pruned again keeping turn
1's kept set too), or as
the endpoint serves a follow-up where it refuses the field. Per setting and
turn: accuracy with its standard error and how often the reply names the
other object's cell; for turn 2 the paired difference to `none` and to the
same setting's reselect, and how many turns the report says were served
from a pruned cache (its `reused`) or kept turn 1's kept set (`united`).
The output also says how the model does unpruned on two-object scenes: a
model that cannot tell the two objects apart makes the differences between
settings mean little.
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

from feather_vllm.pruning.config import FOLLOW_UPS
from feather_vllm.tools.demo.scenes import CELLS, ROWS, held_out, held_out_pairs

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


def _image_question(image_url: str, question: str) -> dict[str, Any]:
    """A user message: the image, then the question."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": question}]}


async def _chat(client: httpx.AsyncClient, model: str, messages: list[dict[str, Any]],
                setting: dict[str, Any] | None, max_tokens: int) -> dict[str, Any]:
    """One greedy chat completion: its reply, id and `feather` report."""
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": messages}
    if setting is not None:
        body["feather"] = setting
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    return {"reply": data["choices"][0]["message"]["content"] or "", "id": data.get("id"),
            "feather": data.get("feather")}


async def _ask(client: httpx.AsyncClient, model: str, item: dict[str, Any], setting: dict[str, Any] | None,
               max_tokens: int) -> dict[str, Any]:
    if setting is not None and "image" in item:
        # Items drawn as kept-token maps ask the gateway for the kept indices.
        setting = {**setting, "return_kept": True}
    data = await _chat(client, model, [_image_question(item["image_url"], item["question"])], setting, max_tokens)
    reply = data["reply"]
    if "cell" in item:
        correct = parse_cell(reply) == item["cell"]
    else:
        box = parse_box(reply, *item["size"])
        correct = box is not None and iou(box, item["box"]) >= 0.5
    return {"reply": reply, "correct": correct, "feather": data["feather"]}


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


# -- multi-turn: a follow-up question about the same image --------------------

# A pruned setting's name + "+" + a follow-up policy (FOLLOW_UPS, the
# `feather.follow_up` field) names the setting with that policy on turn 2.
# Unpruned accuracy on two-object scenes below which the multi-turn figures
# are called weak: a model that finds an object, but not the one asked
# for, scores about 50%.
WEAK_BELOW = 0.8


def pair_items(n: int, seed: int) -> list[dict[str, Any]]:
    """Held-out two-object scenes: turn 1 asks about the first object, turn 2 about the second."""
    return [{"image_url": _data_url(p.image), "size": p.image.size,
             "turns": [{"question": o.question, "cell": o.cell, "row": o.row} for o in p.objects]}
            for p in held_out_pairs(n, seed)]


def _pruned(setting: dict[str, Any] | None) -> bool:
    return setting is not None and (bool(setting.get("stages")) or setting.get("preset") not in (None, "none"))


def multi_turn_settings(settings: dict[str, dict | None], follow_ups: bool) -> dict[str, dict | None]:
    """Turn-2 settings: each unpruned one as is; each pruned one with each
    follow-up policy (`follow_ups`), else as the endpoint serves it."""
    out: dict[str, dict | None] = {}
    for name, setting in settings.items():
        if follow_ups and _pruned(setting):
            for policy in FOLLOW_UPS:
                out[f"{name}+{policy}"] = {**setting, "follow_up": policy}  # type: ignore[dict-item]
        else:
            out[name] = setting
    return out


def _turn_1_setting(name: str) -> str:
    """The setting a turn-2 setting's turn 1 ran under."""
    return name.split("+")[0]


async def _accepts_follow_up(client: httpx.AsyncClient, model: str) -> bool:
    """Whether the endpoint takes `"follow_up"` (one text-only token; a
    400 or 422 that names the field refuses it)."""
    response = await client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}],
        "feather": {"preset": "feather", "follow_up": "keep_both"}})
    if response.status_code in (400, 422) and "follow_up" in response.text:
        return False
    response.raise_for_status()
    return True


def _turn(answer: dict[str, Any], turn: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """One turn's answer scored: right cell, or the other object's cell;
    and the report's `reused` and `united` (absent: None)."""
    cell = parse_cell(answer["reply"])
    report = answer["feather"] or {}
    return {"reply": answer["reply"], "id": answer["id"], "correct": cell == turn["cell"],
            "other": cell == other["cell"], "reused": report.get("reused"), "united": report.get("united")}


async def _conversation(client: httpx.AsyncClient, model: str, item: dict[str, Any], first: dict | None,
                        follow_ups: dict[str, dict | None], max_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Turn 1 under `first`; then, in order, turn 2 under each of
    `follow_ups` after turn 1 and its reply. Per follow-up name: both turns."""
    one, two = item["turns"]
    opening = [_image_question(item["image_url"], one["question"])]
    turn1 = await _chat(client, model, opening, first, max_tokens)
    history = [*opening, {"role": "assistant", "content": turn1["reply"]},
               {"role": "user", "content": [{"type": "text", "text": two["question"]}]}]
    out = {}
    for name, setting in follow_ups.items():
        turn2 = await _chat(client, model, history, setting, max_tokens)
        out[name] = [_turn(turn1, one, two), _turn(turn2, two, one)]
    return out


async def evaluate_multi_turn(url: str, model: str, items: list[dict[str, Any]], settings: dict[str, dict | None],
                              concurrency: int = 4, max_tokens: int = 8, api_key: str | None = None,
                              follow_ups: bool = True) -> tuple[dict[str, list], bool]:
    """Both turns per turn-2 setting (`multi_turn_settings`), item order
    preserved; and whether the follow-up policies ran (not where
    `follow_ups` is False or the endpoint refuses the field). Conversations
    run `concurrency` at a time, each turn after the one before; a
    setting's follow-ups are asked after its turn 1, one after another, in
    `FOLLOW_UPS` order: those that cut nothing (reuse, add_back) before
    those that cut (reselect, keep_both), whose cut of the same turn-2
    prompt a reusing policy would otherwise take (it is a decision for
    that very prompt) instead of turn 1's."""
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        if follow_ups and any(_pruned(s) for s in settings.values()):
            follow_ups = await _accepts_follow_up(client, model)
        turn_2 = multi_turn_settings(settings, follow_ups)
        bar = tqdm(total=len(items) * (len(settings) + len(turn_2)), desc="evaluating", unit="req")

        async def one(item, first, policies):
            async with semaphore:
                result = await _conversation(client, model, item, first, policies, max_tokens)
            bar.update(1 + len(policies))
            return result

        out: dict[str, list] = {}
        for name, setting in settings.items():
            policies = {n: s for n, s in turn_2.items() if _turn_1_setting(n) == name}
            results = await asyncio.gather(*(one(item, setting, policies) for item in items))
            for n in policies:
                out[n] = [r[n] for r in results]
    bar.close()
    return out, follow_ups


def summarize_multi_turn(answers: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per setting and turn: accuracy ± s.e., share naming the other
    object's cell, paired difference to `none`, turns served from a pruned
    cache; per reuse, add_back and keep_both setting, turn 2's paired
    difference to the same setting's reselect."""
    report: dict[str, Any] = {}
    for name, conversations in answers.items():
        turns = []
        for t in range(2):
            results = [c[t] for c in conversations]
            correct = [float(r["correct"]) for r in results]
            acc, se = _mean_se(correct)
            reused = [r["reused"] for r in results if r["reused"]]
            entry: dict[str, Any] = {
                "accuracy": acc, "se": se, "n": len(correct),
                "other_object": sum(r["other"] for r in results) / len(results),
                "reused": len(reused), "united": sum(bool(r["united"]) for r in results),
                "reused_tokens_mean": (sum(r.get("tokens", 0) for r in reused) / len(reused)) if reused else None}
            if t == 1:  # follow-ups that reused or kept too, by the report, what turn 1 kept
                entry["kept_from_turn1"] = sum(any((c[1][k] or {}).get("kept_from") == c[0]["id"]
                                                   for k in ("reused", "united")) for c in conversations)
            base = answers.get("none")
            if base is not None and name != "none":
                diff, diff_se = _mean_se([c - float(b[t]["correct"]) for c, b in zip(correct, base)])
                entry["vs_none"] = {"difference": diff, "se": diff_se}
            turns.append(entry)
        report[name] = {"turns": turns}
        reselected = answers.get(_turn_1_setting(name) + "+reselect")
        if reselected is not None and reselected is not conversations:
            diff, diff_se = _mean_se([float(a[1]["correct"]) - float(b[1]["correct"])
                                      for a, b in zip(conversations, reselected)])
            report[name]["vs_reselect"] = {"difference": diff, "se": diff_se}
    return report


def unpruned_note(report: dict[str, Any]) -> dict[str, Any]:
    """How the model does on two-object scenes unpruned, and whether that
    makes the comparison weak."""
    none = report.get("none")
    if none is None:
        return {"weak": None, "text": "no `none` setting: how the model does on two-object scenes unpruned "
                                      "is not measured, so the figures below cannot be judged"}
    t1, t2 = none["turns"]
    weak = min(t1["accuracy"], t2["accuracy"]) < WEAK_BELOW
    text = (f"unpruned on two-object scenes: turn 1 {100 * t1['accuracy']:.1f} ± {100 * t1['se']:.1f}%, "
            f"turn 2 {100 * t2['accuracy']:.1f} ± {100 * t2['se']:.1f}% (chance 11%; the other object's cell: "
            f"{100 * t1['other_object']:.0f}% / {100 * t2['other_object']:.0f}%). ")
    if weak:
        text += (f"WEAK MEASUREMENT: below {100 * WEAK_BELOW:.0f}%, the model does not reliably find the object "
                 "asked about when two are shown, even unpruned (the demo model is trained on one-object "
                 "scenes only), so differences between settings, reuse vs reselect included, say little "
                 "about what reuse costs.")
    else:
        text += "The model tells the two objects apart unpruned: the differences below measure the settings."
    return {"weak": weak, "text": text}


def print_multi_turn(report: dict[str, Any], follow_ups: bool) -> None:
    print(f"{'setting':<24} {'turn 1':>13} {'turn 2':>13} {'t2 vs none':>14} {'t2 vs reselect':>15} "
          f"{'other obj t1/t2':>16} {'reused/united t2':>17}")
    for name, e in report.items():
        t1, t2 = e["turns"]
        vs, rr = t2.get("vs_none"), e.get("vs_reselect")
        print(f"{name:<24} {100 * t1['accuracy']:>6.1f} ± {100 * t1['se']:>4.1f}"
              f" {100 * t2['accuracy']:>6.1f} ± {100 * t2['se']:>4.1f}"
              f" {'' if vs is None else '{:+6.1f} ± {:4.1f}'.format(100 * vs['difference'], 100 * vs['se']):>14}"
              f" {'' if rr is None else '{:+6.1f} ± {:4.1f}'.format(100 * rr['difference'], 100 * rr['se']):>15}"
              f" {'{:.0f}% / {:.0f}%'.format(100 * t1['other_object'], 100 * t2['other_object']):>16}"
              f" {'{}/{} of {}'.format(t2['reused'], t2['united'], t2['n']):>17}")
    print(unpruned_note(report)["text"])
    if not follow_ups:
        print("no follow-up policies: the endpoint refuses \"follow_up\" (or --no-follow-ups), so each pruned "
              "setting's turn 2 is as the endpoint serves it")
    reuse = [name for name in report if name.endswith("+reuse")]
    if reuse and not any(report[name]["turns"][1]["reused"] for name in reuse):
        print("no turn 2 was served from a pruned cache (no `reused` in the reports): the endpoint does not reuse, "
              "so the reuse settings measure re-pruning for the new question")


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
    parser.add_argument("--multi-turn", action="store_true",
                        help="two-turn chats about two-object scenes: the follow-up policies (reuse, add_back, "
                             "reselect, keep_both)")
    parser.add_argument("--pair-seed", type=int, default=54321, help="--multi-turn: held-out two-object scenes")
    parser.add_argument("--no-follow-ups", action="store_true",
                        help="--multi-turn: no follow-up policies (each pruned setting's turn 2 as served)")
    args = parser.parse_args(argv)
    if args.no_pruning_field:
        settings: dict[str, dict | None] = {"none": None}
    else:
        settings = {p: {"preset": p} for p in args.presets.split(",") if p}
        for i, stages in enumerate(args.stages):
            settings[f"stages{i + 1}"] = {"stages": json.loads(stages)}
    if args.multi_turn:
        if args.jsonl or args.png:
            parser.error("--multi-turn takes neither --jsonl nor --png")
        _multi_turn(args, settings)
        return
    items = jsonl_items(args.jsonl) if args.jsonl else builtin_items(args.scenes, args.seed, args.maps)
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


def _multi_turn(args: argparse.Namespace, settings: dict[str, dict | None]) -> None:
    items = pair_items(args.scenes, args.pair_seed)
    answers, follow_ups = asyncio.run(evaluate_multi_turn(args.url, args.model, items, settings, args.concurrency,
                                                          args.max_tokens, args.api_key, not args.no_follow_ups))
    report = summarize_multi_turn(answers)
    print_multi_turn(report, follow_ups)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "mode": "multi-turn", "items": len(items), "seed": args.pair_seed,
            "settings": multi_turn_settings(settings, follow_ups), "follow_ups": follow_ups, "report": report,
            "unpruned": unpruned_note(report),
            "questions": [[t["question"] for t in item["turns"]] for item in items],
            "answers": answers}, indent=2))


if __name__ == "__main__":
    main()
