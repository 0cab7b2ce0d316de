"""
How the tiny model's greedy answer swings during SFT at the peak rate (docs/study/issue20.md, section 8): the
default SFT of a task, with the early stop's validation set scored every 10 steps from step 100 to 250, both as
the stop scores it (sampled at RL's temperature, sft.sampled_accuracy) and greedily (what the study reads). The
stop never fires here (target 1.0), so the steps and rates are those of a run that has not stopped yet.

    python docs/study/sft_swing.py --out_dir=/tmp/swing --seeds=0,1,2,3,4 [--task=count]

Writes swing.json (one row per seed and check) and swing.png in out_dir.
"""
import argparse
import json
import os
import sys

from matplotlib.figure import Figure

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data      # noqa: E402  (the project's modules, from the repository root)
import eval as evaluation   # noqa: E402
import ral       # noqa: E402
import sft       # noqa: E402

FIRST, LAST, EVERY = 100, 250, 10


class Done(Exception):
    pass


def greedy_accuracy(model, processor, samples, cfg, mode):
    texts = [t for i in range(0, len(samples), 16) for t in evaluation.respond(
        model, processor, samples[i:i + 16], mode, cfg["max_new_tokens"], attention=False)["texts"]]
    return sum(data.reward(t, s, mode)["accuracy"] for t, s in zip(texts, samples)) / len(samples)


def trace(task, seed, out_dir):
    """SFT of the default recipe for one seed, read at every EVERY-th step from FIRST to LAST."""
    cfg = ral.configure([f"--task={task}", f"--seed={seed}", f"--out_dir={os.path.join(out_dir, f'{task}-s{seed}')}",
                         f"--sft_val_every={EVERY}", "--sft_stop=1.0"])
    rows, sampled = [], sft.sampled_accuracy

    def read(model, processor, samples, cfg, mode, check, reward_fn=data.reward):
        if check >= FIRST:
            rows.append(dict(seed=seed, step=check, sampled=sampled(model, processor, samples, cfg, mode, check),
                             greedy=greedy_accuracy(model, processor, samples, cfg, mode)))
            print(rows[-1], flush=True)
            if check >= LAST:
                raise Done
        return 0.0
    sft.sampled_accuracy = read
    try:
        sft.warm_start(cfg, ral.load_samples(cfg)[0], "zero", "cpu", 0, 1)
    except Done:
        pass
    finally:
        sft.sampled_accuracy = sampled
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--task", default="count")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    rows = [r for seed in map(int, args.seeds.split(",")) for r in trace(args.task, seed, args.out_dir)]
    with open(os.path.join(args.out_dir, "swing.json"), "w") as f:
        json.dump(rows, f, indent=1)
    fig = Figure(figsize=(9, 3.4))
    seeds = sorted({r["seed"] for r in rows})
    for ax, key in zip(fig.subplots(1, 2, sharey=True), ("greedy", "sampled")):
        for seed in seeds:
            mine = [r for r in rows if r["seed"] == seed]
            ax.plot([r["step"] for r in mine], [100 * r[key] for r in mine], marker=".", label=f"seed {seed}")
        ax.set(title=f"{args.task}: {key} validation accuracy (n=128)", xlabel="SFT step", ylim=(0, 100))
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("%")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "swing.png"), dpi=110)


if __name__ == "__main__":
    main()
