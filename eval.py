"""
Measuring: accuracy on the offline suites and on JSONL benchmarks, attention maps as pictures, results tables.

    python eval.py --ckpt out/ral --suite search-256          # one run, one suite -> out/ral/ckpt/eval.json
    python eval.py --ckpt tiny                                # a fresh random tiny model, every offline suite
    python eval.py --ckpt out/ral --suite my.jsonl --maps 4   # a benchmark, and 4 attention maps per suite
    python eval.py --compare out/grpo-s0 out/grpo-s1 out/ral-s0 out/ral-s1   # seeds grouped: mean ± 95% CI

A run is ral.py's output folder (weights in <run>/ckpt), any save_pretrained folder, or a hub id. Results are
cached in eval.json beside the weights, each under its suite and number of samples ("search-16 n=256"), so a
result on other samples never replaces one; --compare evaluates only what a run's eval.json lacks.

evaluate(model, processor, samples, ...) -> dict(n, accuracy, accuracy_ci, format, format_ci, grounding,
                                                grounding_answer_span, grounding_all_rows, grounding_chance)
suite(name, n=None, seed=None)            -> an offline suite ("search-256", "video-8", "video-8x64") or a .jsonl
attention_map(model, processor, sample, path) -> the answer's final-layer attention over the image, as a PNG

Decoding is greedy, so a checkpoint's score on a suite is deterministic; the interval of one run is the Wilson
interval of a proportion, the interval over seeds a t interval of the per-seed means.
"""
import argparse
import math
import os
import re
import sys
import textwrap

import numpy as np
import torch
import matplotlib.patches
import torch.distributed as dist
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
import model as policy
import tasks
from tasks import EVAL_N, EVAL_SEED
from cli import import_function
from runs import filed_as, method_name, reward_label, run_config, run_mode, save_eval, saved_results, \
    suite_of, weights_dir

SUITES = [name for task in tasks.TASKS.values() for name in task["suites"]]   # every task's standard suites
# The held-out draw (EVAL_N samples with EVAL_SEED) has one owner, tasks.py: ral.py's eval_n defaults to it too, so
# the trainer's result and this file's are on the same samples. A draw of n is not a prefix of a larger one (the
# answers are balanced over the whole draw), so eval.json files each result under its suite and n (filed_as).
THINK_TOKENS = 1024     # a <think> rationale and its answer (the presets' max_new_tokens); 64 cuts it off
ANSWER_TOKENS = 64      # <answer>...</answer> alone, and the random tiny model's smoke test
Z95 = 1.959964          # two-sided 95% normal quantile

# ----------------------------------------------------------------------------------------------------------------
# Intervals

def wilson(k, n, z=Z95):
    """95% Wilson score interval for k successes out of n. Unlike p ± z*se it stays inside [0, 1] and is not
    degenerate at 0/n or n/n, which is where small suites of an untrained or a perfect model land."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0/n and n/n the bound is exactly 0 or 1; say so rather than leave it to rounding
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


# Student t, 0.975 quantile, for 1..30 degrees of freedom (beyond: a Cornish-Fisher expansion around the normal).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_critical(df):
    if df <= len(T975):
        return T975[df - 1]
    z = Z95
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values):
    """Mean and the half-width of its 95% t interval (seeds are few, so t, not z). One value: half-width nan."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(t_critical(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


# ----------------------------------------------------------------------------------------------------------------
# Suites

def suite_problem(name):
    """Why `name` is not a suite (None if it is): a .json/.jsonl file that is not there, or an unknown name."""
    if name.endswith((".json", ".jsonl")):
        return None if os.path.isfile(name) else f"--suite: no such file: {name}"
    if tasks.parse_suite(name) is None:
        return (f"unknown suite {name!r}: use one of {', '.join(SUITES)} (or another size of a task in tasks.TASKS: "
                f"{', '.join(tasks.TASKS)}) or a path to a .json/.jsonl file")
    return None


def suite(name, n=None, seed=None, folder=None):
    """An offline suite by name (tasks.suite_name: "search-<visual tokens>", "video-<frames>", any task of
    tasks.TASKS), drawn with the held-out eval seed, or a Video-R1 style .json/.jsonl benchmark (its first n samples
    if n is given). folder: where a suite's media files go (default: a temporary folder)."""
    problem = suite_problem(name)
    if problem:
        raise ValueError(problem)
    if name.endswith((".json", ".jsonl")):
        samples = data.load_dataset(name)
        return samples[:n] if n else samples
    task, options = tasks.parse_suite(name)
    return tasks.TASKS[task]["make"](n or EVAL_N, EVAL_SEED if seed is None else seed, options, folder)


# ----------------------------------------------------------------------------------------------------------------
# Responding and measuring

@torch.no_grad()
def respond(model, processor, samples, mode="think", max_new_tokens=64, attention=True):
    """Greedy responses to a batch of samples. With attention=True, also one policy_forward over prompt + response
    (the same pass the trainer makes) for the final layer's attention policy p (Eq. 2, B x R x T; generation itself
    runs with the KV cache and no capture). Returns dict(texts, p (or None), batch (the model's prompt batch),
    visual, target (B x P masks from data.encode), response (ids, B x R), response_mask)."""
    batch, masks = data.encode(samples, processor, mode=mode)
    batch = policy.to_device(batch, model.device)
    response, response_mask = policy.generate(model, processor, batch, max_new_tokens, greedy=True)
    texts = processor.tokenizer.batch_decode(response, skip_special_tokens=True)
    p = policy.policy_forward(model, policy.with_responses(batch, response, response_mask),
                              response.shape[1])[1] if attention else None
    return dict(texts=texts, p=p, batch=batch, **masks, response=response, response_mask=response_mask)


def answer_tokens(tokenizer, response, mask):
    """0/1 over response positions: the tokens of the answer, the text inside the last <answer>...</answer> (as
    data.extract_answer reads it; an unclosed <answer>: the text after it); all zero if there is none."""
    ids = response[mask.bool()].tolist()
    prefixes = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    text = prefixes[-1]
    spans = [m.span(1) for m in re.finditer(r"<answer>(.*?)</answer>", text, re.S)]
    if not spans and "<answer>" in text:
        spans = [(text.rindex("<answer>") + len("<answer>"), len(text))]
    tokens = torch.zeros_like(mask)
    if spans:
        start, end = spans[-1]
        for k in range(len(ids)):   # token k covers the characters [len(prefix k), len(prefix k + 1))
            tokens[k] = int(len(prefixes[k]) < end and len(prefixes[k + 1]) > start)
    return tokens


def answer_rows(tokenizer, response, mask):
    """0/1 over response rows: the rows that choose the answer. Row k of p is the query at response token k
    (Eq. 2's literal reading), and that query predicts token k + 1, so the answer token k was chosen by row k - 1
    (for <answer>C</answer>, the row of the opening tag's '>'). All real rows if there is no answer; an answer
    token at k = 0 is chosen by the prompt's last position, which has no row in p."""
    tokens = answer_tokens(tokenizer, response, mask)
    rows = torch.zeros_like(mask)
    rows[:-1] = tokens[1:]
    return rows if rows.any() else mask


def answer_span_rows(tokenizer, response, mask):
    """0/1 over response rows: the rows of the answer span itself, every token after <answer> up to and
    including the closing tag's last token (for <answer>C</answer>: the rows of C, </, answer, >). These come
    after the answer was chosen; this is what answer_rows took before it read the rows that choose it, and is
    kept as grounding_answer_span. All real rows if there is no <answer>."""
    ids = response[mask.bool()].tolist()
    prefixes = [tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids))]
    rows = torch.zeros_like(mask)
    for k, text in enumerate(prefixes):
        rows[k] = int("<answer>" in text and "</answer>" not in text)
    return rows if rows.any() else mask


# Which attention rows a grounding figure averages (None: every response row).
GROUNDING_ROWS = dict(grounding=answer_rows,                  # the rows that choose the answer tokens
                      grounding_answer_span=answer_span_rows,  # the answer's own rows, through </answer>
                      grounding_all_rows=None)                 # the whole response (what was reported until issue 21)


def mean_rows(p, rows, prompt_len):
    """Average the attention rows selected by `rows` (B x R, 0/1) and keep the prompt's keys: B x P."""
    w = rows.float().to(p.device)
    return ((p * w[:, :, None]).sum(1) / w.sum(1).clamp(min=1)[:, None])[:, :prompt_len].cpu()


def grounding_scores(attn, visual_mask, target_mask):
    """Per sample: the share of the attention on visual tokens that lands on the target's tokens (None when the
    sample has no target or no visual tokens)."""
    visual = (attn * visual_mask).sum(1)
    target = (attn * (target_mask & visual_mask)).sum(1)
    has = target_mask.any(1) & (visual > 0)
    return [float(t / v) if h else None for t, v, h in zip(target, visual, has)]


def chance_grounding(visual_mask, target_mask):
    """What uniform attention over the visual tokens would score: the target's share of them."""
    return grounding_scores(torch.ones(visual_mask.shape), visual_mask, target_mask)


def evaluate(model, processor, samples, mode="think", batch_size=16, max_new_tokens=64, responder=None,
             progress=True, desc="eval", reward_fn=data.reward, rank=0, world=1):
    """Accuracy and format rate (with 95% Wilson intervals) of greedy responses, and the mean grounding on each of
    GROUNDING_ROWS' rows: `grounding` on the rows that choose the answer (docs/METHOD.md, "Grounding").
    `responder(samples) -> texts` replaces the model (tests use an oracle and a constant answer); reward_fn scores.
    Under torchrun (world > 1) each rank scores samples[rank::world] and the per-sample results are gathered, so
    every rank returns what one process would, and none idles. The ranks' forwards differ in number, so a sharded
    (FSDP) model must be whole for it (scale.gathered), as ral.train has it.
    grounding_chance is the grounding of uniform attention, the level a model that does not look would get."""
    acc, fmt, chance, ground = [], [], [], {key: [] for key in GROUNDING_ROWS}
    training = model is not None and model.training
    if model is not None:
        model.eval()
    order = list(range(rank, len(samples), world))
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress or rank != 0, leave=False):
        chunk = [samples[k] for k in order[i:i + batch_size]]
        if responder is not None:
            texts = list(responder(chunk))
        else:
            out = respond(model, processor, chunk, mode, max_new_tokens)
            texts, visual, target = out["texts"], out["visual"], out["target"]
            for key, select in GROUNDING_ROWS.items():
                rows = torch.stack([select(processor.tokenizer, r, m) for r, m in
                                    zip(out["response"], out["response_mask"])]) if select else out["response_mask"]
                ground[key] += grounding_scores(mean_rows(out["p"], rows, visual.shape[1]), visual, target)
            chance += chance_grounding(visual, target)
        for sample, text in zip(chunk, texts):
            r = reward_fn(text, sample, mode)
            acc.append(float(r["accuracy"]))
            fmt.append(float(r["format"]))
    if training:  # the trainer calls this mid-run: hand the model back as it came
        model.train()
    columns = [acc, fmt, chance or [None] * len(order)] + [g or [None] * len(order) for g in ground.values()]
    if world > 1:   # every rank's per-sample results, back in sample order
        shares = [None] * world
        dist.all_gather_object(shares, list(zip(order, *columns)))
        rows = sorted(row for share in shares for row in share)
        columns = [[row[c + 1] for row in rows] for c in range(len(columns))]
    acc, fmt, chance, n = columns[0], columns[1], columns[2], len(columns[0])
    mean = lambda xs: float(np.mean([x for x in xs if x is not None])) if any(x is not None for x in xs) else None
    return dict(n=n, accuracy=sum(acc) / max(n, 1), accuracy_ci=wilson(sum(acc), n),
                format=sum(fmt) / max(n, 1), format_ci=wilson(sum(fmt), n), grounding_chance=mean(chance),
                **{key: mean(g) for key, g in zip(GROUNDING_ROWS, columns[3:])},
                **({"reward": reward_label(reward_fn)} if reward_fn is not data.reward else {}))


# ----------------------------------------------------------------------------------------------------------------
# Attention maps

def unpatchify(pixel_values, thw, image_processor):
    """Undo Qwen2.5-VL's patch layout (grid_t, h/m, w/m, m, m, C, temporal, p, p) and normalization: the frames the
    model saw, as uint8 (grid_t * temporal) x H x W x 3."""
    t, h, w = (int(v) for v in thw)
    p, m, tp = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    x = pixel_values.float().cpu().reshape(t, h // m, w // m, m, m, 3, tp, p, p)
    x = x.permute(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(t * tp, h * p, w * p, 3)
    x = x * torch.tensor(image_processor.image_std) + torch.tensor(image_processor.image_mean)
    return (x.clamp(0, 1) * 255).round().byte().numpy()


def overlay(image, heat, box=None, alpha=0.5, normalize=True):
    """Blend a 2-D heat array, upsampled to the image's own size, over the image (PIL RGB); outline the box."""
    heat = np.asarray(heat, dtype=float)
    if normalize:  # min-max: the map shows where attention goes, not how peaked it is
        heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
    up = Image.fromarray((heat * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    colored = Image.fromarray((colormaps["jet"](np.asarray(up) / 255.0)[..., :3] * 255).astype(np.uint8))
    out = Image.blend(image.convert("RGB"), colored, alpha)
    if box is not None:
        ImageDraw.Draw(out).rectangle([int(v) for v in box], outline=(255, 255, 255), width=2)
    return out


@torch.no_grad()
def answer_attention(model, processor, sample, mode="think", max_new_tokens=64, reward_fn=data.reward):
    """Where the answer looks: the greedy response and the final-layer attention (Eq. 2's p) of the rows that chose
    its answer tokens (answer_rows, averaged over them) on the visual tokens, as a (frames x) rows x cols grid of token cells. Returns dict(heat, text,
    correct, grounding, out=respond's dict)."""
    out = respond(model, processor, [sample], mode, max_new_tokens)
    rows = answer_rows(processor.tokenizer, out["response"][0], out["response_mask"][0])[None]
    attn = mean_rows(out["p"], rows, out["visual"].shape[1])
    merge = processor.image_processor.merge_size
    t, h, w = (int(v) for v in (out["batch"].get("image_grid_thw", out["batch"].get("video_grid_thw")))[0])
    heat = attn[0][out["visual"][0]].numpy().reshape(t, h // merge, w // merge)
    return dict(heat=heat if "video_grid_thw" in out["batch"] else heat[0], text=out["texts"][0], out=out,
                correct=bool(reward_fn(out["texts"][0], sample, mode)["accuracy"]),
                grounding=grounding_scores(attn, out["visual"], out["target"])[0])


def attention_figure(sample, runs, path, mode="think", max_new_tokens=64):
    """A figure a person can read: for each (label, model, processor) in runs, the image with the attention of the
    answer over it (one colour scale per panel, in attention mass per visual token), the star's box, the response,
    the model's answer, the gold one, whether it was right and the grounding; the question on top. Same sample for every run (before vs after)."""
    image, box = data.load_image(sample["image"]), (sample.get("target") or {}).get("box")
    fig = Figure(figsize=(4.2 * len(runs), 5.2))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (label, model, processor) in zip(axes, runs):
        a = answer_attention(model, processor, sample, mode, max_new_tokens)
        ax.imshow(image)
        shown = ax.imshow(a["heat"], cmap="inferno", alpha=0.55, extent=(0, image.width, image.height, 0),
                          interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention mass per visual token")
        if box:
            x0, y0, x1, y1 = box
            ax.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan",
                                                      linewidth=2))
        ground = "–" if a["grounding"] is None else f"{a['grounding']:.2f}"
        said = data.extract_answer(a["text"])
        ax.set_title(f"{label}: answered {'nothing' if said is None else repr(said)}, gold {sample['answer']} "
                     f"({'right' if a['correct'] else 'wrong'})\ngrounding {ground}", fontsize=9)
        ax.set_xlabel(textwrap.fill(a["text"][:160] or "(empty response)", 48), fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(sample["question"].split("\n")[0] + "   (cyan: the star's box)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@torch.no_grad()
def attention_map(model, processor, sample, path, mode="think", max_new_tokens=64):
    """Render the final-layer attention of the rows that chose the answer (answer_rows: Eq. 2's p) over the image as a
    heatmap PNG of the image's size, or over a video as a strip with one frame per temporal token group.
    Returns dict(path, text, grounding)."""
    a = answer_attention(model, processor, sample, mode, max_new_tokens)
    batch, heat = a["out"]["batch"], a["heat"]
    ip, target = processor.image_processor, sample.get("target")
    if "image_grid_thw" in batch:
        picture = overlay(data.load_image(sample["image"]), heat, box=target and target.get("box"))
    else:
        thw = batch["video_grid_thw"][0]
        t, h, w = (int(v) for v in thw)
        frames = unpatchify(batch["pixel_values_videos"], thw, ip)
        shown = [frames[g * ip.temporal_patch_size] for g in range(t)]  # one frame per token group: its first
        hit = None
        if target and target.get("frame") is not None and target["frame"] < len(frames):
            hit = target["frame"] // ip.temporal_patch_size  # (offline videos are 1 fps: frame = sampled index)
            shown[hit] = frames[target["frame"]]             # the group holding the needle shows the needle frame
        heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)  # one colour scale for the whole strip
        tiles = [overlay(Image.fromarray(f), hm, normalize=False) for f, hm in zip(shown, heat)]
        picture = Image.new("RGB", (sum(tile.width for tile in tiles), tiles[0].height))
        for i, tile in enumerate(tiles):
            if i == hit:  # the group holding the needle frame gets a white border
                ImageDraw.Draw(tile).rectangle([0, 0, tile.width - 1, tile.height - 1], outline="white", width=3)
            picture.paste(tile, (i * tile.width, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    picture.save(path)
    return dict(path=path, text=a["text"], grounding=a["grounding"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, runs and tables


def load_model(ckpt, device="cpu"):
    """'tiny' -> a fresh random tiny model (smoke tests); else a save_pretrained folder, a run folder, a hub id."""
    if ckpt == "tiny":
        return policy.build_tiny()
    path = weights_dir(ckpt) if os.path.isdir(ckpt) else ckpt
    problem = policy.check_source(path)
    if problem:
        raise ValueError(f"--ckpt: {problem}")
    return policy.load(path, device=device)


def response_tokens(path, mode):
    """eval.py's default response length: the run's own max_new_tokens (run_config.json: what it trained and was
    evaluated with), else one that fits the format."""
    return run_config(path).get("max_new_tokens") or (THINK_TOKENS if mode == "think" and path != "tiny" else
                                                      ANSWER_TOKENS)


def find_result(results, name, n=None, reward_fn=data.reward):
    """The result in `results` (stored_suites' keys) on the samples suite(name, n) draws, scored by reward_fn, or
    None."""
    count = len(suite(name, n)) if name.endswith((".json", ".jsonl")) else n or EVAL_N
    return results.get(filed_as(name, count, reward_label(reward_fn)))


def evaluate_suites(model, processor, names, n=None, mode="think", batch_size=16, max_new_tokens=64,
                    maps=0, maps_dir=None, reward_fn=data.reward):
    results = {}
    for name in tqdm(names, desc="suites", disable=len(names) < 2):
        samples = suite(name, n=n)
        results[name] = evaluate(model, processor, samples, mode, batch_size, max_new_tokens, desc=name,
                                 reward_fn=reward_fn)
        for i, sample in enumerate(samples[:maps]):
            if sample.get("image") is not None or sample.get("video") is not None:
                out = os.path.join(maps_dir, f"{os.path.basename(name)}-{i}.png")
                attention_map(model, processor, sample, out, mode, max_new_tokens)
    return results


def run_results(path, names, n=None, device="cpu", mode=None, **kw):
    """A run folder's results on the suites: from its eval.json where present, the missing ones evaluated now
    (and added to eval.json)."""
    saved = saved_results(path).get("suites", {})
    results = {s: find_result(saved, s, n, kw.get("reward_fn", data.reward)) for s in names}
    missing = [s for s, r in results.items() if r is None]
    if missing:
        mode = mode or run_mode(path)
        kw = dict(kw, max_new_tokens=kw.get("max_new_tokens") or response_tokens(path, mode))
        model, processor = load_model(path, device)
        results.update(evaluate_suites(model, processor, missing, n=n, mode=mode, **kw))
        save_eval(path, mode, {s: results[s] for s in missing})
    return results


def cell(results, metric="accuracy"):
    """'mean ± ci' in percent over one method's seeds: a t interval across seeds, a Wilson half-width for one."""
    values = [r[metric] for r in results if r.get(metric) is not None]
    if not values:
        return "–"
    mean, half = mean_ci(values)
    if len(values) == 1 and metric + "_ci" in results[0]:
        lo, hi = results[0][metric + "_ci"]
        half = (hi - lo) / 2
    return f"{100 * mean:.1f}" if math.isnan(half) else f"{100 * mean:.1f} ± {100 * half:.1f}"


def compare(paths, names, metric="accuracy", **kw):
    """A table like the paper's Tables 2 and 3: rows = methods (seeds grouped), columns = suites."""
    groups = {}
    for path in paths:
        groups.setdefault(method_name(path), []).append(run_results(path, names, **kw))
    header = f"| method | seeds | {' | '.join(names)} |\n|---|---|{'---|' * len(names)}\n"
    lines = [f"| {m} | {len(runs)} | " + " | ".join(cell([r[s] for r in runs], metric) for s in names) + " |"
             for m, runs in groups.items()]
    return header + "\n".join(lines)


def table(results):
    """One checkpoint: a row per suite."""
    fmt = lambda v, ci: f"{100 * v:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    lines = ["| suite | n | accuracy % [95% CI] | format % [95% CI] | grounding (rows that choose the answer) | "
             "grounding (all response rows) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        g = "–" if r["grounding"] is None else f"{r['grounding']:.3f}" + (
            f" (uniform {r['grounding_chance']:.3f})" if r.get("grounding_chance") is not None else "")
        every = "–" if r.get("grounding_all_rows") is None else f"{r['grounding_all_rows']:.3f}"
        lines.append(f"| {name} | {r['n']} | {fmt(r['accuracy'], r['accuracy_ci'])} | "
                     f"{fmt(r['format'], r['format_ci'])} | {g} | {every} |")
    return "\n".join(lines)


def fail(message):
    """A user's mistake: one line on stderr, exit status 2."""
    print(f"eval.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.error = fail
    ap.add_argument("--ckpt", default="tiny", help="a save_pretrained folder, a hub id, or 'tiny' (random, offline)")
    ap.add_argument("--compare", nargs="+", metavar="RUN", help="run folders to tabulate side by side")
    ap.add_argument("--suite", nargs="+", default=None, help=f"{' '.join(SUITES)} or .json/.jsonl files")
    ap.add_argument("--n", type=int, default=None, help=f"samples per offline suite (default {EVAL_N})")
    ap.add_argument("--mode", choices=["think", "zero"], default=None, help="default: from the run folder")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's own (run_config.json), "
                    f"else {THINK_TOKENS} for the think format, {ANSWER_TOKENS} for zero (and --ckpt tiny)")
    ap.add_argument("--maps", type=int, default=0, help="attention-map PNGs per suite")
    ap.add_argument("--metric", default="accuracy", choices=["accuracy", "format", "grounding"])
    ap.add_argument("--out", default=None, help="JSON output (default: <ckpt>/eval.json for a folder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reward", default="", help="module:function (or file.py:function) scoring the responses, as "
                                                  "ral.py's --reward (default: data.reward)")
    args = ap.parse_args(argv)
    problems = [suite_problem(name) for name in args.suite or []]   # fail now, not after a model has loaded
    if any(problems):
        fail(next(filter(None, problems)))
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
              reward_fn=import_function(args.reward) if args.reward else data.reward)
    if args.compare:
        names = args.suite or sorted({suite_of(k) for p in args.compare for k in saved_results(p).get("suites", {})
                                      }) or SUITES
        print(compare(args.compare, names, args.metric, n=args.n, device=args.device, mode=args.mode, **kw))
        return
    names = args.suite or SUITES
    folder = os.path.isdir(args.ckpt)
    out = args.out or (os.path.join(weights_dir(args.ckpt), "eval.json") if folder else None)
    mode = args.mode or (run_mode(args.ckpt) if folder else "think")
    kw["max_new_tokens"] = args.max_new_tokens or response_tokens(args.ckpt, mode)
    maps_dir = os.path.join(os.path.dirname(os.path.abspath(out)) if out else "out", "maps")
    model, processor = load_model(args.ckpt, args.device)
    results = evaluate_suites(model, processor, names, args.n, mode, maps=args.maps, maps_dir=maps_dir, **kw)
    if out:
        save_eval(args.ckpt, mode, results, out)
    print(table(results))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:     # bad suites, files, checkpoints: named in the message
        fail(e)
