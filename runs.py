"""
A run's folder on disk: JSON written atomically, where its weights are, the trainer's config beside them, and
eval.json, the results stored beside the weights, each under its suite and number of samples ("search-16 n=256").

ral.py writes a run as <run>/ckpt (weights, eval.json) beside run_config.json, results.json, metrics.jsonl (opened
by open_logs) and curves.png (plot_curves: metrics.jsonl as a picture); eval.py, study.py and the notebooks read runs back through these functions, and accept any save_pretrained folder
(or hub id) as well.
"""
import json
import math
import os
import re

import numpy as np
from matplotlib.figure import Figure

import data


def read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    """Atomic: a crash mid-write never leaves a half-written eval.json behind for --compare to read."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def weights_dir(path):
    """ral.py's run folder keeps its weights in <run>/ckpt; accept either the run folder or the weights folder."""
    inner = os.path.join(path, "ckpt")
    return inner if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(inner) else path


def run_config(path):
    """The trainer's run_config.json, beside the weights or one folder up ({} for other checkpoints)."""
    folder = weights_dir(path)
    return read_json(os.path.join(folder, "run_config.json")) or read_json(
        os.path.join(os.path.dirname(os.path.normpath(folder)), "run_config.json"))


def run_mode(path):
    """RAL-zero checkpoints answer without thinking: the trainer's config says so, else the folder name."""
    cfg = run_config(path)
    if "zero" in cfg:
        return "zero" if cfg["zero"] else "think"
    mode = read_json(os.path.join(weights_dir(path), "eval.json")).get("mode")
    if mode in ("think", "zero"):
        return mode
    return "zero" if "zero" in os.path.basename(os.path.normpath(path)) else "think"


def method_name(path):
    """out/ral-s1 -> ral: seeds of one method share a name up to a trailing -s<digits>."""
    return re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(path)))


def filed_as(name, n, reward=None):
    """The key of a result in eval.json: its suite, its number of samples and, if not data.reward, its reward.
    Results on other samples (another n) or scored otherwise sit beside each other; none replaces another."""
    return f"{name} n={n}" + (f" reward={reward}" if reward else "")


def reward_label(reward_fn):
    """How a result names the reward that scored it: None for data.reward, else module.function."""
    return None if reward_fn is data.reward else f"{reward_fn.__module__}.{reward_fn.__qualname__}"


def suite_of(key):
    return key.rpartition(" n=")[0] or key


def stored_suites(path):
    """The results in an eval.json, keyed by filed_as (an older file, keyed by suite alone, is read the same)."""
    suites = read_json(path).get("suites", {})
    return {k if " n=" in k else filed_as(k, r["n"]): r for k, r in suites.items()}


def saved_results(path):
    """eval.json beside the weights: dict(ckpt, mode, suites={filed_as(name, n): evaluate's result}), or {}."""
    out = os.path.join(weights_dir(path), "eval.json")
    return dict(read_json(out), suites=stored_suites(out)) if os.path.isfile(out) else {}


def save_eval(path, mode, suites, out=None):
    """Add results ({suite name: evaluate's result}) to eval.json (default: beside the weights at path), each under
    filed_as(name, its n): the one writer of its schema, used by the trainer and by this file."""
    out = out or os.path.join(weights_dir(path), "eval.json")
    new = {filed_as(name, r["n"], r.get("reward")): r for name, r in suites.items()}
    write_json(dict(ckpt=path, mode=mode, suites={**stored_suites(out), **new}), out)


def open_logs(cfg, step, resumed, rank):
    """metrics.jsonl and samples.jsonl (cut back to the step a resume goes on from) and, if asked, a wandb run.
    Returns (metrics_path, samples_path, run or None)."""
    out = cfg["out_dir"]
    paths = [os.path.join(out, f) for f in ("metrics.jsonl", "samples.jsonl")]
    if rank == 0:
        for path in paths:
            rows = open(path).readlines() if resumed and os.path.exists(path) else []
            with open(path, "w") as f:
                f.writelines(r for r in rows if json.loads(r)["step"] <= step)
    run = None
    if cfg["wandb_log"] and rank == 0:
        import wandb    # optional: only when asked
        run = wandb.init(project=cfg["wandb_project"], name=os.path.basename(out.rstrip("/")), config=cfg, dir=out,
                         resume="allow")
    return *paths, run


def smooth(y, width):
    """Centered moving average over `width` points (fewer at the ends), so the first and last points stay put."""
    y, half = np.asarray(y, dtype=float), width // 2
    return np.array([y[max(0, i - half):i + half + 1].mean() for i in range(len(y))])


def plot_curves(metrics_path, png_path, labels, results=None):
    """The trainer's metrics.jsonl as one picture: a panel per metric (labels: name -> what it is, the y axis; ral.
    METRICS and any extra) that the log has, each curve smoothed over a tenth of the run (3 steps at least), the raw
    one faint beneath; on the accuracy panel, the held-out accuracy (greedy) before RL, at each evaluation and after
    (results: results.json's dict; default: the results.json beside metrics.jsonl, if any). Returns the figure."""
    rows = [json.loads(line) for line in open(metrics_path)]
    results = read_json(os.path.join(os.path.dirname(metrics_path), "results.json")) if results is None else results
    keys = [k for k in labels if any(k in r for r in rows)]
    cols = min(4, len(keys))
    fig = Figure(figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)))
    axes = fig.subplots(math.ceil(len(keys) / cols), cols, squeeze=False).flat
    steps = [r["step"] for r in rows]
    for k, ax in zip(keys, axes):
        y = [r.get(k, float("nan")) for r in rows]
        ax.plot(steps, y, color="C0", alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(y, max(3, len(y) // 10) if len(y) >= 6 else 1), color="C0", linewidth=2)
        ax.set_title(k, fontsize=10)
        ax.set_ylabel(labels[k] or k, fontsize=8)
        ax.set_xlabel("RL step")
        if k == "accuracy":
            held = [(0, r) for tag, r in results.items() if tag == "before_rl"] + \
                   [(int(tag[5:]), r) for tag, r in results.items() if re.fullmatch(r"step_\d+", tag)] + \
                   [(steps[-1], r) for tag, r in results.items() if tag == "after_rl"]
            if held:
                ax.plot(*zip(*[(x, r["accuracy"]) for x, r in sorted(held, key=lambda h: h[0])]), "o--", color="C3",
                        label="held-out (greedy)")
                ax.plot([], [], color="C0", label="rollouts (sampled)")
                ax.legend(fontsize=7)
    for ax in axes:   # the grid's unused panels
        ax.remove()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    return fig
