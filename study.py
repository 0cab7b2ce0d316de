"""
The study: the paper's claims (docs/METHOD.md, "What the small-scale replication asks") tested on the offline
tasks, with seeds and intervals.

    python study.py --quick                      # every part at a toy budget, 2 seeds: a few minutes
    python study.py                              # the core comparison: RAL vs GRPO, 5 seeds (about an hour, 2 cores)
    python study.py --parts core,think,sizes,lambda,distill,tasks   # the whole study (a few hours)
    python study.py --seeds 3 --rl_steps=40      # any other --key=value is passed to every arm
    torchrun --nproc_per_node=4 study.py --parts ...            # arms split over ranks (or machines)

Parts: core (RAL vs GRPO, the tiny default: answer only, so RAL-zero vs GRPO-zero), think (the same with the paper's
<think> rationale), sizes (the lead as visual tokens grow: search at 64 and 256 tokens, the video needle at 4
frames; at 8 it is the tasks part's video arm), lambda (lambda_attn 10 and 100, and
4 mini-batches x 2 epochs so the policy drifts within a rollout), distill (KD + attention distillation vs KD), tasks
(RAL vs GRPO on every other task family of tasks.TASKS, at its default options and recipe), mechanism (the
gradient probe on every step: optimizer steps per rollout 2 / 4 / 8, lambda_attn 1 / 10 / 100, the policy's layer
final vs first, depth 1 / 2 / 4; the report's last column is the attention term's mean share of the update).
Every arm is one `python ral.py` (or `distill.py`) run in out_dir/<arm>-s<seed>, from the warm start of its seed
shared by all arms of the same task; an arm whose results.json exists is never re-run and one killed mid-RL
continues from its last checkpoint (--resume=True), so an interrupted study resumes. The report is written from the
runs' own results.json and metrics.jsonl: report.md (the tables), accuracy_vs_tokens.png, grounding.png and
curves.png in out_dir.
"""
import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import torch.distributed as dist
from matplotlib.figure import Figure
from tqdm import tqdm

import cli
import data
import eval as evaluation
import model as policy
import ral
import runs
import sft
import tasks
from scale import load_trainer_state

ROOT = os.path.dirname(os.path.abspath(__file__))
QUICK = ["--sft_steps=40", "--sft_val_every=20", "--sft_val_n=8", "--rl_steps=3", "--eval_n=16",
         "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=24", "--train_size=64", "--sft_size=64"]


def arms(parts):
    """(part, setting, method, script, options) for every arm; the setting is what the methods are compared at."""
    out = []
    pair = lambda part, setting, extra, suffix="": [
        (part, setting, "grpo" + suffix, "ral.py", ["--algo=grpo", *extra]), (part, setting, "ral" + suffix, "ral.py", extra)]
    if "core" in parts:
        out += pair("core", "search-16", [])
    if "think" in parts:
        out += pair("think", "search-16", ["--zero=False"], "-think")
    if "sizes" in parts:
        for tokens in (64, 256):
            out += pair("sizes", f"search-{tokens}", [f"--task_tokens={tokens}"])
        out += pair("sizes", "video-8", ["--task=video", "--task_frames=8"])   # 4 frames: the tasks part's video
    if "tasks" in parts:    # every other family of tasks.TASKS, at its default options (and its own recipe)
        for task in tasks.TASKS:
            if task != "search":
                setting = tasks.suite_name(task, tasks.task_options(task, cli.DEFAULTS))
                out += pair("tasks", setting, [f"--task={task}"])
    if "lambda" in parts:
        drift = ["--mini_batches=4", "--epochs=2"]
        out += [("lambda", "search-16 drift", "grpo", "ral.py", ["--algo=grpo", *drift])]
        out += [("lambda", "search-16 drift", f"ral-l{lam}", "ral.py", [f"--lambda_attn={lam}", *drift])
                for lam in (1, 10, 100)]
    if "mechanism" in parts:   # what sets the attention term's share of the update (METHOD.md, "The gradient probe")
        probe = ["--grad_probe_every=1"]
        out += pair("mechanism", "search-16 probe", probe)
        out += [("mechanism", "search-16 probe", method, "ral.py", [*probe, *options]) for method, options in (
            ("ral-steps4", ["--mini_batches=4"]), ("ral-steps8", ["--mini_batches=4", "--epochs=2"]),
            ("ral-l10", ["--lambda_attn=10"]), ("ral-l100", ["--lambda_attn=100"]),
            ("ral-layer0", ["--attn_layer=0"]), ("ral-layer0-l100", ["--attn_layer=0", "--lambda_attn=100"]))]
        for depth in (1, 2):    # another depth is another model: its own warm start and GRPO baseline
            out += pair("mechanism", f"search-16 depth {depth}", [*probe, f"--tiny_layers={depth}"])
    if "distill" in parts:
        out += [("distill", "search-16", "kd", "distill.py", ["--gamma_attn=0"]),
                ("distill", "search-16", "kd+attn", "distill.py", [])]
    return out


def run_arm(out_dir, arm, seed, extra):
    """One arm and seed as its own process (one torch thread: the arms are many and the cores few). Returns its
    folder; skipped when results.json exists."""
    part, setting, method, script, options = arm
    folder = os.path.join(out_dir, f"{part}-{setting.replace(' ', '-')}-{method}-s{seed}")
    if os.path.exists(os.path.join(folder, "results.json")):
        return folder
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if script == "distill.py":   # the teacher is ral.py's warm start of the same budget, shared with the other arms
        extra = extra + [a.replace("--sft_steps=", "--teacher_sft_steps=") for a in extra if a.startswith("--sft_steps=")]
    argv = [sys.executable, os.path.join(ROOT, script), f"--out_dir={folder}", f"--seed={seed}", *options, *extra]
    if os.path.exists(os.path.join(folder, "ckpt", "trainer_state.pt")):   # killed mid-RL: continue exactly
        argv.append("--resume=True")
    with open(folder + ".log", "w") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"arm {folder} failed (exit {proc.returncode}); see {folder}.log")
    return folder


SAMPLED_CHECK = 1_000_000   # the sampling seeds' check index, apart from those of SFT's early stop (0, 1, ...)
COLD = 0.25     # the warm start sampled colder: what sharpening alone gives, the control of RL's sampled gain


def sampled_readings(folder):
    """The held-out accuracy of one response per sample drawn as RL draws them (sft.sampled_accuracy: the run's
    temperature, a seed per sample), of the warm start and of the weights after RL: what RL maximizes, beside the
    greedy accuracy the study is judged by; and of the warm start at temperature COLD (before_cold): RL lowers the
    policy's entropy, and a colder warm start shows how much of the gain that alone would give. Each computed
    once, then read from the arm's sampled.json."""
    path = os.path.join(folder, "sampled.json")
    out = runs.read_json(path)
    ckpt = os.path.join(folder, "ckpt")
    cfg = runs.read_json(os.path.join(folder, "run_config.json"))
    todo = {key: (weights, temperature) for key, weights, temperature in (
        ("before", None, cfg["temperature"]), ("after", ckpt, cfg["temperature"]), ("before_cold", None, COLD))
        if key not in out}
    if todo:
        held_out = ral.load_samples(cfg)[2]
        reward_fn = cli.import_function(cfg["reward"]) if cfg["reward"] else data.reward
        out.update(n=len(held_out), check=SAMPLED_CHECK)
        for key, (weights, temperature) in todo.items():
            model, processor = policy.load(weights or load_trainer_state(ckpt)["ref_from"])
            out[key] = sft.sampled_accuracy(model.eval(), processor, held_out, dict(cfg, temperature=temperature),
                                            "zero" if cfg["zero"] else "think", SAMPLED_CHECK, reward_fn)
        runs.write_json(out, path)
    return out


def collect(out_dir, all_arms, seeds, sampled=False):
    """Per arm and seed: held-out accuracy and grounding before and after RL, from the run's results.json (and,
    with sampled, sampled_readings)."""
    rows = []
    for arm in all_arms:
        for seed in seeds:
            folder = os.path.join(out_dir, f"{arm[0]}-{arm[1].replace(' ', '-')}-{arm[2]}-s{seed}")
            r = runs.read_json(os.path.join(folder, "results.json"))
            if "after_rl" in r:
                probed = [m["attn_share"] for m in map(json.loads, open(os.path.join(folder, "metrics.jsonl")))
                          if "attn_share" in m]
                rows.append(dict(part=arm[0], setting=arm[1], method=arm[2], seed=seed, folder=folder,
                                 share=float(np.mean(probed)) if probed else None,
                                 before=r["before_rl"]["accuracy"], after=r["after_rl"]["accuracy"],
                                 ground_before=r["before_rl"]["grounding"], ground_after=r["after_rl"]["grounding"],
                                 chance=r["after_rl"]["grounding_chance"]))
                if sampled:
                    readings = sampled_readings(folder)
                    rows[-1].update(sampled_before=readings["before"], sampled_after=readings["after"],
                                    sampled_cold=readings["before_cold"])
    return rows


def interval(values):
    mean, half = evaluation.mean_ci(values)
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if half == half else f"{100 * mean:.1f}"


def arm_cells(rows, key, before="before", after="after"):
    """One arm's (part, setting, method) seeds and its cells: seeds, before, after, the gain, and the paired
    difference to its setting's baseline (its first arm: grpo, grpo-think or kd), each a mean ± 95% t interval."""
    part, setting, method = key
    baseline = next(r["method"] for r in rows if (r["part"], r["setting"]) == (part, setting))
    mine = {r["seed"]: r for r in rows if (r["part"], r["setting"], r["method"]) == key}
    base = {r["seed"]: r for r in rows if (r["part"], r["setting"], r["method"]) == (part, setting, baseline)}
    paired = [mine[s][after] - base[s][after] for s in mine if s in base]
    values = lambda f: interval([f(r) for r in mine.values()])
    return mine, [str(len(mine)), values(lambda r: r[before]), values(lambda r: r[after]),
                  values(lambda r: r[after] - r[before]),
                  "–" if method == baseline or not paired else interval(paired)]


def report(rows, out_dir, command):
    """report.md: per setting and method, accuracy before and after (mean ± 95% t interval over seeds), the gain,
    the paired difference to the setting's baseline (its first arm), and grounding before and after vs uniform; the
    sampled accuracy the same way where collect read it."""
    lines = [f"# Study report\n\nMade by `{command}`; every number is the mean over seeds ± the half-width of its 95% t "
             "interval, from the runs' results.json (held-out accuracy in %, greedy; grounding: the share of the "
             "visual attention of the rows that choose the answer that lands on the target's tokens, "
             "docs/METHOD.md).\n",
             "| part | setting | method | seeds | before RL | after RL | gain | vs baseline (paired) | grounding before "
             "-> after (uniform) | attention share (probe) |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["part"], r["setting"], r["method"]) for r in rows))
    for key in keys:
        mine, cells = arm_cells(rows, key)
        g = lambda field: np.mean([r[field] for r in mine.values() if r[field] is not None] or [np.nan])
        share = "–" if np.isnan(g("share")) else f"{g('share'):.2g}"
        lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} | "
                     f"{g('ground_before'):.3f} -> {g('ground_after'):.3f} ({g('chance'):.3f}) | {share} |")
    if any("sampled_after" in r for r in rows):   # what RL maximizes: one sampled response per held-out sample
        lines += ["\n**Sampled accuracy** (%): one response per held-out sample drawn as RL draws them (its "
                  f"temperature, seeded), before and after RL; the last column is the gain over the warm start "
                  f"sampled at temperature {COLD}, what sharpening alone gives\n",
                  "| part | setting | method | seeds | before RL | after RL | gain | vs baseline (paired) | "
                  f"gain over the warm start at T={COLD} |", "|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            mine, cells = arm_cells(rows, key, "sampled_before", "sampled_after")
            cold = interval([r["sampled_after"] - r["sampled_cold"] for r in mine.values()])
            lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} | {cold} |")
    for part, setting in dict.fromkeys(k[:2] for k in keys):   # the evidence behind each mean: one row per seed
        methods = [m for p, s, m in keys if (p, s) == (part, setting)]
        at = {(r["method"], r["seed"]): r for r in rows if (r["part"], r["setting"]) == (part, setting)}
        lines += [f"\n**{part}, {setting}**, held-out accuracy (%) per seed\n",
                  "| seed | warm start | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
        for seed in sorted({seed for _, seed in at}):
            first = next(at[m, seed] for m in methods if (m, seed) in at)
            lines.append(f"| {seed} | {100 * first['before']:.1f} | " + " | ".join(
                f"{100 * at[m, seed]['after']:.1f}" if (m, seed) in at else "–" for m in methods) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    plots(rows, out_dir)
    return text


def plots(rows, out_dir):
    """Accuracy vs visual tokens per method (search settings), grounding before/after per arm, reward curves."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    search = [r for r in rows if r["setting"].startswith("search-") and r["part"] in ("core", "sizes")]
    for method in dict.fromkeys(r["method"] for r in search):
        sizes = sorted({int(r["setting"].split("-")[1]) for r in search if r["method"] == method})
        stats = [evaluation.mean_ci([r["after"] for r in search if r["method"] == method
                                     and r["setting"] == f"search-{n}"]) for n in sizes]
        ax.errorbar(sizes, [100 * m for m, _ in stats], yerr=[100 * np.nan_to_num(h) for _, h in stats],
                    marker="o", capsize=4, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("held-out accuracy after RL, % (95% CI over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_tokens.png"), dpi=100)

    keys = list(dict.fromkeys((r["part"], r["setting"], r["method"]) for r in rows))
    fig = Figure(figsize=(max(6, 0.9 * len(keys)), 4))
    ax = fig.subplots()
    for i, key in enumerate(keys):
        mine = [r for r in rows if (r["part"], r["setting"], r["method"]) == key]
        for shift, field, colour in ((-0.2, "ground_before", "gray"), (0.2, "ground_after", "tab:blue")):
            ax.bar(i + shift, np.mean([r[field] or 0 for r in mine]), width=0.4, color=colour,
                   label=("before RL" if field == "ground_before" else "after RL") if i == 0 else None)
        ax.plot([i - 0.4, i + 0.4], [np.mean([r["chance"] or 0 for r in mine])] * 2, "k:",
                label="uniform attention" if i == 0 else None)
    ax.set_xticks(range(len(keys)), [f"{s}\n{m}" for _, s, m in keys], fontsize=7, rotation=30)
    ax.set_ylabel("grounding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "grounding.png"), dpi=100)

    fig = Figure(figsize=(6 * 2, 4))
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "attn_jsd")):
        for key in keys:
            curves = [[json.loads(line)[metric] for line in open(os.path.join(r["folder"], "metrics.jsonl"))]
                      for r in rows if (r["part"], r["setting"], r["method"]) == key]
            length = min(map(len, curves))
            ax.plot(range(1, length + 1), np.mean([c[:length] for c in curves], 0), label=" ".join(key[1:]))
        ax.set_xlabel("RL step")
        ax.set_title(f"{metric} (training rollouts, mean over seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--parts", default=None, help="comma-separated: core, think, sizes, lambda, distill, tasks, "
                                                  "mechanism (default: "
                                                  "core; with --quick: all)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a toy budget (every part, 2 seeds) to see it work")
    ap.add_argument("--out_dir", default="out/study")
    ap.add_argument("--report_only", action="store_true", help="start no arm: the report of those already run (a "
                                                               "part run in pieces, or one still running)")
    ap.add_argument("--sampled", action="store_true", help="also held-out accuracy sampled as RL samples, before "
                                                           "and after RL (computed once per arm: sampled.json)")
    args, passed = ap.parse_known_args(argv)           # any other --key=value goes to every arm (ral.py's options)
    parts = args.parts.split(",") if args.parts else ["core", "think", "sizes", "lambda", "distill", "tasks",
                                                      "mechanism"] if args.quick \
        else ["core"]
    seeds = list(range(2 if args.quick and args.seeds == 5 else args.seeds))
    extra = (QUICK if args.quick else []) + passed
    out_dir = args.out_dir + ("-quick" if args.quick and args.out_dir == "out/study" else "")
    os.makedirs(out_dir, exist_ok=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # a rank runs whole seeds: the arms of one seed share warm starts, which one process must write
    todo = [] if args.report_only else [(arm, seed) for seed in seeds if seed % world == rank for arm in arms(parts)]
    for arm, seed in tqdm(todo, desc=f"arms (rank {rank} of {world})" if world > 1 else "arms", disable=rank != 0):
        run_arm(out_dir, arm, seed, extra)
    if world > 1:   # the report once every rank's arms are done: wait for their results.json files (ranks
        dist.init_process_group("gloo", timeout=timedelta(days=1))   # with one seed more may finish hours later)
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        text = report(collect(out_dir, arms(parts), seeds, args.sampled), out_dir, "python study.py " + " ".join(argv or sys.argv[1:]))
        print(text)
        print(f"report and plots in {out_dir}/")
    return out_dir


if __name__ == "__main__":
    main()
