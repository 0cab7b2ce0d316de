"""The trainer: an end-to-end run, RAL == GRPO with one optimizer step per rollout, DDP on 2 processes, resume."""
import copy
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import cli
import data
import eval as evaluation
import runs
import ral
import scale
import sft
import tasks
from helpers import spread_reward
from model import build_tiny, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--sft_steps=0", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=6", "--eval_n=4",
         "--task_tokens=16", "--train_size=8", "--lr=1e-3"]


def params_of(folder):
    return {k: v.clone() for k, v in load(folder)[0].state_dict().items()}


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / "ral")
    results = ral.main([f"--out_dir={out}", "--rl_steps=2", "--ckpt_every=1", *SMALL], reward_fn=spread_reward)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in r.values())
        assert 0 <= r["attn_visual"] <= 1 and 0 <= r["attn_target"] <= r["attn_visual"]
    assert rows[1]["attn_jsd"] > 0                          # the policy moved away from the rollout's attention
    for r in rows:   # the first optimizer step of every rollout runs at the rollout weights: no attention term
        assert r["attn_jsd_step1"] < 1e-10 < r["attn_jsd_step2"] and "attn_jsd_step3" not in r
    warm, = tmp_path.glob("warm-tiny4x128-zero-sft0-s0-*")
    start, end = params_of(str(warm)), params_of(os.path.join(out, "ckpt"))
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed and all("visual" not in k for k in changed)   # the LLM trained, the vision tower did not
    for name in ("run_config.json", "results.json", "curves.png", "samples.jsonl", "ckpt/trainer_state.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    assert {"before_rl", "after_rl"} <= set(results)


def make_rollout(model, cfg, seed=0):
    torch.manual_seed(seed)
    prompts = tasks.search_task(2, seed=seed, tokens=16)
    return ral.rollout(model, None, build_tiny()[1], prompts, cfg, "think", 0, 0, "cpu", spread_reward)[0]


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_ral_equals_grpo_only_with_one_step_per_rollout(mini_batches):
    """The attention term's gradient is zero while the weights equal the rollout weights (docs/METHOD.md, section 3.4):
    with one optimizer step per rollout RAL == GRPO; with two, the second step sees a non-zero attention gradient."""
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, beta=0.0, mini_batches=mini_batches)
    model, _ = build_tiny(seed=1)
    micro_batches = make_rollout(model, cfg)
    assert any(mb["adv"].abs().sum() > 0 for mb in micro_batches)
    final = {}
    for algo, lambda_attn in (("grpo", 0.0), ("ral", 5.0)):
        m = copy.deepcopy(model)
        m.train()
        opt = torch.optim.SGD([w for w in m.parameters() if w.requires_grad], lr=0.5)
        ral.update(m, opt, micro_batches, ral.rl_loss(0.2, 0.0, lambda_attn), mini_batches, 1, 1.0, world=1)
        final[algo] = torch.cat([w.detach().flatten() for w in m.parameters() if w.requires_grad])
    moved = (final["grpo"] - torch.cat([w.flatten() for w in model.parameters() if w.requires_grad])).abs().max()
    gap = (final["ral"] - final["grpo"]).abs().max()
    assert moved > 1e-3
    # measured: 4e-7 x moved with one step (float rounding of p vs p_old), 3e-4 x moved with two
    assert (gap < 1e-5 * moved) if mini_batches == 1 else (gap > 1e-5 * moved)


def test_attention_term_is_logged_per_optimizer_step():
    """metrics.jsonl's attn_jsd averages every optimizer step of a rollout; attn_jsd_step<k> is step k's own. Step 1
    runs at the rollout weights, so its JSD (and its gradient) is 0; every later step has moved and sees one."""
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, mini_batches=2, epochs=2)
    model, processor = build_tiny(seed=1)
    torch.manual_seed(0)
    micro_batches, stats, _, _ = ral.rollout(model, None, processor, tasks.search_task(2, seed=0, tokens=16), cfg,
                                             "think", 0, 0, "cpu", spread_reward)
    model.train()
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-3)
    records = ral.update(model, opt, micro_batches, ral.rl_loss(0.2, 0.0, 1.0), 2, 2, 1.0, world=1)
    row = ral.reduce_stats(stats, records, 1, "cpu")
    steps = [row[f"attn_jsd_step{k}"] for k in (1, 2, 3, 4)]
    assert "attn_jsd_step5" not in row and steps[0] < 1e-10 and min(steps[1:]) > 1e-8
    for k, r in enumerate(records):                                   # each step's own token mean
        assert steps[k] == pytest.approx(r["attn_jsd"] / r["update_tokens"], rel=1e-12, abs=1e-15)
    tokens = [r["update_tokens"] for r in records]                    # and attn_jsd their token-weighted mean
    assert row["attn_jsd"] == pytest.approx(sum(s * t for s, t in zip(steps, tokens)) / sum(tokens), rel=1e-9)


@pytest.mark.parametrize("mini_batches", [1, 2, 3, 4])
def test_every_mini_batch_count_trains_one_record_per_step(mini_batches):
    """Every M from 1 to G splits each group into M slices (sizes differ by at most one): each sequence is in
    exactly one mini-batch, every mini-batch trains, and update returns one record per optimizer step."""
    slices = ral.mini_batch_slices(4, mini_batches)
    assert len(slices) == mini_batches and [i for a, b in slices for i in range(a, b)] == [0, 1, 2, 3]
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, mini_batches=mini_batches, micro_batch=1)
    model, _ = build_tiny(seed=1)
    micro_batches = make_rollout(model, cfg)
    model.train()
    opt = torch.optim.SGD([w for w in model.parameters() if w.requires_grad], lr=0.1)
    records = ral.update(model, opt, micro_batches, ral.rl_loss(0.2, 0.04, 1.0), mini_batches, 2, 1.0, world=1)
    assert len(records) == 2 * mini_batches and all(r["opt_steps"] == 1 and r["grad_norm"] > 0 for r in records)
    rollout_tokens = sum(mb["mask"].sum().item() for mb in micro_batches)
    assert sum(r["update_tokens"] for r in records) == 2 * rollout_tokens     # every token, once per epoch
    with pytest.raises(ral.UsageError):
        ral.configure(["--group_size=4", f"--mini_batches={5}"])


def test_resume_matches_uninterrupted_run(tmp_path):
    common = [*SMALL, "--rl_steps=4", "--ckpt_every=2", f"--warm_dir={tmp_path / 'warm'}"]
    ral.main([f"--out_dir={tmp_path / 'whole'}", *common], reward_fn=spread_reward)
    ral.main([f"--out_dir={tmp_path / 'split'}", *common[:-3], "--rl_steps=2", "--ckpt_every=2",
              f"--warm_dir={tmp_path / 'warm'}"], reward_fn=spread_reward)
    ral.main([f"--out_dir={tmp_path / 'split'}", *common, "--resume=True"], reward_fn=spread_reward)
    a, b = params_of(str(tmp_path / "whole" / "ckpt")), params_of(str(tmp_path / "split" / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_an_interrupted_checkpoint_swap_is_recovered(tmp_path):
    """A kill between save_checkpoint's two renames leaves ckpt.old and a complete ckpt.tmp and no ckpt/; resume
    must find the newest complete one instead of starting over."""
    model, processor = build_tiny(layers=1, hidden=64)
    ckpt = str(tmp_path / "ckpt")
    scale.save_checkpoint(ckpt, model, processor, None, dict(step=1))
    scale.save_checkpoint(ckpt + ".tmp", model, processor, None, dict(step=2))
    os.replace(ckpt, ckpt + ".old")                                  # the state right after the first rename
    assert scale.recover_checkpoint(ckpt) == ckpt
    assert torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)["step"] == 2
    assert not os.path.exists(ckpt + ".tmp")


KILLED = """
import os, signal, sys, torch
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import ral
from helpers import spread_reward
left, step = int(os.environ.get("KILL_AFTER", "0")), torch.optim.AdamW.step
def step_then_die(self, *args, **kwargs):      # kill -9 right after the KILL_AFTER-th optimizer step (SFT or RL)
    global left
    out = step(self, *args, **kwargs)
    left -= 1
    if left == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
torch.optim.AdamW.step = step_then_die
ral.main(sys.argv[1:], reward_fn=spread_reward)
"""
# 4 SFT steps (checkpoints every 2), then 4 RL steps of 2 optimizer steps each (checkpoints every 2): 12 in all
CRASH = [a for a in SMALL if not a.startswith(("--sft_steps", "--eval_n"))] + [
    "--sft_steps=4", "--sft_batch=2", "--sft_ckpt_every=2", "--tiny_layers=1", "--tiny_hidden=64", "--eval_n=0",
    "--rl_steps=4", "--ckpt_every=2", "--sft_size=8"]


def run_killed(folder, args, kill_after):
    """The run as a command, killed with SIGKILL right after its kill_after-th optimizer step."""
    (folder / "run.py").write_text(KILLED.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AFTER=str(kill_after))
    proc = subprocess.run([sys.executable, str(folder / "run.py"), f"--out_dir={folder / 'run'}", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]


def run_here(folder, args):
    """The same run in this process, on one thread as the command runs (results differ bit-wise between thread
    counts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ral.main([f"--out_dir={folder / 'run'}", *args], reward_fn=spread_reward)
    finally:
        torch.set_num_threads(threads)


def without_times(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in open(path)]


def test_kills_at_random_points_then_resume_continues_exactly(tmp_path):
    """kill -9 after a seeded random number of SFT steps (1-4; SFT checkpoints every 2), then --resume=True killed
    again after a random number of RL optimizer steps (1-7; RL checkpoints every 2 steps of 2), then --resume=True
    to the end: the warm start, the final weights and metrics.jsonl (rows after the checkpoint cut away) equal an
    uninterrupted run's. Wherever a kill lands, before a stage's first checkpoint too, this must hold."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    run_here(whole, CRASH)
    draw = random.Random(0)         # SFT killed after step 4 (checkpoint at 2), RL in step 4 (checkpoint at 2)
    run_killed(split, CRASH, draw.randint(1, 4))
    assert not list(split.glob("warm-*[!l]/config.json"))            # no warm start yet (only its .partial)
    sft_left = 2 if list(split.glob("warm-*.partial")) else 4        # SFT's checkpoint at step 2, or none yet
    run_killed(split, [*CRASH, "--resume=True"], sft_left + draw.randint(1, 7))
    assert list(split.glob("warm-*[!l]/config.json")) and not list(split.glob("warm-*.partial*"))
    run_here(split, [*CRASH, "--resume=True"])
    for name in ("warm-*[!l]", "run/ckpt"):          # the warm start (not its .partial), then RL's last checkpoint
        (a,), (b,) = whole.glob(name), split.glob(name)
        a, b = params_of(str(a)), params_of(str(b))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert without_times(split / "run" / "metrics.jsonl") == without_times(whole / "run" / "metrics.jsonl")


WRAPPER = """
import os, sys, torch
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import ral
import tasks
from helpers import spread_reward
update = ral.update
def checked_update(model, *args, **kwargs):
    stats = update(model, *args, **kwargs)
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    with open(os.path.join({out!r}, "params-rank%s.txt" % os.environ.get("RANK", "0")), "a") as f:
        f.write(repr(flat.double().sum().item()) + " " + repr(flat.abs().double().sum().item()) + "\\n")
    return stats
ral.update = checked_update
ral.main(sys.argv[1:], reward_fn=spread_reward)
"""


def test_torchrun_two_ranks_match_one(tmp_path):
    """2 gloo ranks, one group each, against 1 process with both groups: identical across ranks, and equal to the
    single process within float tolerance (whole groups per rank, global token normalization, seeded rollouts)."""
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        script = tmp_path / f"run{world}.py"
        script.write_text(WRAPPER.format(root=ROOT, out=str(out)))
        args = [f"--out_dir={out}", "--rl_steps=2", "--eval_n=2", f"--warm_dir={tmp_path / 'warm'}",
                *[a for a in SMALL if not a.startswith("--eval_n")]]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if world == 2 else [sys.executable]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(launcher + [str(script)] + args, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[world] = params_of(str(out / "ckpt"))
        sums = [open(out / f"params-rank{r}.txt").read() for r in range(world)]
        assert all(s == sums[0] for s in sums)               # every rank holds the same parameters
    diffs = [(runs[1][k] - runs[2][k]).abs().max().item() for k in runs[1]]
    warm = params_of(str(tmp_path / "warm"))
    moved = max((runs[1][k] - warm[k]).abs().max().item() for k in runs[1])
    assert moved > 1e-4 and max(diffs) < 1e-3 * moved


def test_data_set_files_replace_the_offline_tasks(tmp_path):
    """SFT on a file with rationales, RL on a file of prompts, evaluation on a held-out file (Video-R1 layout),
    mixing images and a video."""
    for i, s in enumerate(tasks.search_task(4, seed=5, tokens=16)):
        s["image"].save(tmp_path / f"{i}.png")
    video = tasks.video_task(1, frames=2, folder=str(tmp_path))[0]["video"]
    record = dict(problem="What colour is the star?", data_type="image", problem_type="multiple choice",
                  options=["A. red", "B. green", "C. blue", "D. yellow"], solution="<answer>B</answer>",
                  data_source="test", process="<think>The star is green.</think>")
    records = [dict(record, problem_id=i, path=f"./{i}.png") for i in range(4)]
    records.append(dict(record, problem_id=4, data_type="video", path="./" + os.path.basename(video)))
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "run"
    results = ral.main([f"--out_dir={out}", f"--sft_file={path}", f"--train_file={path}", f"--eval_file={path}",
                        "--sft_steps=2", "--sft_batch=4", "--rl_steps=2", "--prompts_per_step=2", "--group_size=2",
                        "--mini_batches=2", "--max_new_tokens=4", "--eval_n=3", "--zero=False", "--sft_stop=0"],
                       reward_fn=spread_reward)
    assert results["after_rl"]["n"] == 3
    assert len(list(tmp_path.glob("warm-tiny4x128-think-sft2-s0-*"))) == 1
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("world", [1, 2])
def test_prompts_come_in_epochs_without_replacement(world):
    """Every prompt exactly once per epoch, whatever the ranks (each takes its slice of the same global list) and
    across a resume (a function of the step alone); epochs are shuffled differently."""
    n, per_step = 10, 4
    used = []
    for step in range(5):                                              # 20 prompts: two epochs
        idx = data.epoch_prompts(n, step, per_step, seed=3)
        shares = [idx[r * per_step // world:(r + 1) * per_step // world] for r in range(world)]
        used += [i for share in shares for i in share]
    assert sorted(used[:10]) == list(range(10)) and sorted(used[10:]) == list(range(10))
    assert used[:10] != used[10:]
    assert data.epoch_prompts(n, 3, per_step, seed=3) == used[12:16]   # a resumed run at step 3 sees the same


def test_the_endless_stream_never_repeats_and_ignores_ranks():
    """Item i of a stage's stream is the same however it is taken (whole, or in rank shares, or after a resume);
    no prompt repeats, SFT's and RL's streams differ, and none is a held-out sample."""
    cfg = dict(cli.DEFAULTS, task_tokens=16, seed=3)
    rl = tasks.offline_stream(cfg, 1)
    whole = [s["id"] for s in rl(0, 150)]
    shares = [s["id"] for start in range(0, 150, 5) for s in tasks.offline_stream(cfg, 1)(start, 5)]
    assert whole == shares and len(set(whole)) == 150
    assert [s["answer"] for s in rl(0, 64)].count("C") == 16                 # each block of 64 is balanced
    sft_ids = {s["id"] for s in tasks.offline_stream(cfg, 0)(0, 150)}
    held_out = {s["id"] for s in evaluation.suite("search-16", n=256)}
    assert not sft_ids & set(whole) and not held_out & (sft_ids | set(whole))
    images = {s["image"].tobytes() for s in rl(0, 150)}
    assert len(images) == 150


def test_the_video_stream_writes_its_files_under_the_run(tmp_path):
    """The video needle streams too: each block's mp4s are written once, under the run's media folder, named by
    their draw, so a second take (another rank, a resume) reads the same files."""
    cfg = dict(cli.DEFAULTS, task="video", task_frames=2, out_dir=str(tmp_path), seed=1)
    taken = tasks.offline_stream(cfg, 1)(60, 6)                      # across a block boundary
    again = tasks.offline_stream(cfg, 1)(60, 6)
    assert [s["video"] for s in taken] == [s["video"] for s in again] and len({s["id"] for s in taken}) == 6
    assert all(os.path.dirname(s["video"]) == str(tmp_path / "media") and os.path.getsize(s["video"]) > 0
               for s in taken)
    assert not {s["id"] for s in taken} & {s["id"] for s in tasks.offline_stream(cfg, 0)(60, 6)}


def test_two_ranks_drawing_one_video_block_at_once_write_the_files_one_rank_would(tmp_path):
    """Two ranks take their shares of the same stream block at the same moment, so both write its 64 mp4s into the
    one media folder: each file ends whole, byte for byte what a single process writes, and no temporary is left."""
    draw = ("import sys, cli, tasks; cfg = dict(cli.DEFAULTS, task='video', task_frames=2, out_dir=sys.argv[1], "
            "seed=1); tasks.offline_stream(cfg, 1)(int(sys.argv[2]) * 32, 32)")
    ranks = [subprocess.Popen([sys.executable, "-c", draw, str(tmp_path / "run"), str(rank)], cwd=ROOT)
             for rank in (0, 1)]
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0]
    subprocess.run([sys.executable, "-c", draw, str(tmp_path / "solo"), "0"], cwd=ROOT, check=True)
    shared, solo = (sorted(os.listdir(tmp_path / name / "media")) for name in ("run", "solo"))
    assert shared == solo and len(solo) == 64 and all(f.endswith(".mp4") and ".tmp" not in f for f in solo)
    for f in solo:
        assert (tmp_path / "run" / "media" / f).read_bytes() == (tmp_path / "solo" / "media" / f).read_bytes()


def test_an_endless_run_draws_fresh_prompts(tmp_path):
    out = tmp_path / "fresh"
    ral.main([f"--out_dir={out}", "--rl_steps=2", "--log_samples=1", *SMALL, "--train_size=0"],
             reward_fn=spread_reward)
    asked = [json.loads(line)["id"] for line in open(out / "samples.jsonl")]
    stream = tasks.offline_stream(ral.configure([*SMALL]), 1)
    assert asked == [stream(0, 1)[0]["id"], stream(2, 1)[0]["id"]]      # step s starts at s * prompts_per_step


def test_warmup_raises_the_lr_linearly(tmp_path, monkeypatch):
    seen, real = [], ral.update
    monkeypatch.setattr(ral, "update", lambda model, optimizer, *args: seen.append(optimizer.param_groups[0]["lr"])
                        or real(model, optimizer, *args))
    ral.main([f"--out_dir={tmp_path / 'w'}", "--rl_steps=3", *SMALL, "--warmup=4", "--eval_n=0"],
             reward_fn=spread_reward)
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4])          # --lr=1e-3 times (step + 1) / 4


def test_sft_stops_at_the_first_check_that_samples_the_target(monkeypatch):
    """sft_stop: validation every sft_val_every steps; the first sampled accuracy >= the target stops the checks
    there, and sft_cooldown more steps take the rate linearly from where the schedule had it down to zero."""
    seen = iter([0.1, 0.3, 0.5, 0.9])
    monkeypatch.setattr(sft, "sampled_accuracy", lambda *args: next(seen))
    rates, real_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a: rates.append(self.param_groups[0]["lr"])
                        or real_step(self, *a))
    model, processor = build_tiny(layers=1, hidden=64, seed=0)
    cfg = dict(cli.DEFAULTS, sft_steps=50, sft_batch=2, sft_stop=0.45, sft_val_every=3, sft_val_n=4, sft_size=0,
               task_tokens=16, sft_cooldown=4)
    log = sft.sft(model, processor, None, cfg, "zero", "cpu")
    assert log == dict(steps=13, stopped_at=9, checks=[dict(step=3, sampled_accuracy=0.1),
                                                       dict(step=6, sampled_accuracy=0.3),
                                                       dict(step=9, sampled_accuracy=0.5)])
    schedule = [cfg["sft_lr"] * min(1, (k + 1) / 20) * 0.5 * (1 + math.cos(math.pi * k / 50)) for k in range(13)]
    assert rates == pytest.approx(schedule[:9] + [schedule[k] * (13 - k) / 4 for k in range(9, 13)])
    # without a cooldown SFT ends at the stop, as before
    seen = iter([0.1, 0.3, 0.5, 0.9])
    assert sft.sft(model, processor, None, dict(cfg, sft_cooldown=0), "zero", "cpu")["steps"] == 9


def test_sft_killed_in_its_cooldown_continues_exactly(tmp_path, monkeypatch):
    """SFT that dies inside the cooldown (the stop fired at step 3, its checkpoint is at step 4) and is started
    again continues from the checkpoint with the stop's step, so the cooled-down rates and the weights equal an
    uninterrupted SFT's; no check runs after the stop."""
    checks = []
    monkeypatch.setattr(sft, "sampled_accuracy", lambda model, processor, val, cfg, mode, check, *a:
                        checks.append(check) or (0.5 if check >= 3 else 0.1))
    cfg = dict(cli.DEFAULTS, sft_steps=50, sft_batch=2, sft_stop=0.45, sft_val_every=3, sft_val_n=2, sft_size=0,
               task_tokens=16, tiny_layers=1, tiny_hidden=64, sft_cooldown=4, sft_ckpt_every=2)
    whole = sft.warm_start(dict(cfg, out_dir=str(tmp_path / "a" / "run")), None, "zero", "cpu", 0, 1)
    assert checks == [3] and json.load(open(os.path.join(whole, "sft_log.json")))["steps"] == 7
    real_step, done = torch.optim.AdamW.step, []

    def dies_after_five(self, *args):
        real_step(self, *args)
        done.append(1)
        if len(done) == 5:
            raise RuntimeError("killed")
    monkeypatch.setattr(torch.optim.AdamW, "step", dies_after_five)
    split_cfg = dict(cfg, out_dir=str(tmp_path / "b" / "run"))
    with pytest.raises(RuntimeError, match="killed"):
        sft.warm_start(split_cfg, None, "zero", "cpu", 0, 1)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    split = sft.warm_start(split_cfg, None, "zero", "cpu", 0, 1)
    assert checks == [3, 3]                                         # the continued run did not check again
    a, b = params_of(whole), params_of(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_accuracy_at_a_tiny_temperature_is_the_greedy_accuracy():
    """The validation sampler is RL's (Gumbel noise on logits / T): as T -> 0 it returns the greedy answers, so its
    accuracy is eval.py's greedy one, computed independently."""
    model, processor = build_tiny(layers=2, hidden=64, seed=1)
    model.eval()
    samples = tasks.search_task(24, seed=5, tokens=16)
    cfg = dict(cli.DEFAULTS, temperature=1e-6, max_new_tokens=8)
    texts = [t for i in range(0, 24, 8) for t in evaluation.respond(model, processor, samples[i:i + 8], "zero", 8,
                                                                    attention=False)["texts"]]
    greedy = sum(data.reward(t, s, "zero")["accuracy"] for t, s in zip(texts, samples)) / 24
    assert sft.sampled_accuracy(model, processor, samples, cfg, "zero", check=0) == greedy
    hot = sft.sampled_accuracy(model, processor, samples, dict(cfg, temperature=1.0), "zero", check=0)
    assert hot == sft.sampled_accuracy(model, processor, samples, dict(cfg, temperature=1.0), "zero", check=0)


def test_sft_loss_does_not_depend_on_micro_batching(monkeypatch):
    """SFT's loss is the token mean over the global batch: micro-batches of 3 sequences give the same gradient as one
    batch (SGD in place of AdamW, so the gradient's scale shows, not only its direction)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    samples = tasks.search_task(8, seed=0, tokens=16)
    finals = []
    for micro_batch in (0, 3):
        model, processor = build_tiny(layers=1, hidden=64, seed=0)
        cfg = dict(cli.DEFAULTS, sft_steps=2, sft_batch=7, sft_lr=20.0, micro_batch=micro_batch, grad_clip=1e9)
        sft.sft(model, processor, samples, cfg, "think", "cpu")
        finals.append(torch.cat([w.detach().flatten() for w in model.parameters() if w.requires_grad]))
    start = torch.cat([w.detach().flatten() for w in build_tiny(layers=1, hidden=64, seed=0)[0].parameters()
                       if w.requires_grad])
    moved = (finals[0] - start).abs().max()
    assert moved > 1e-3 and (finals[0] - finals[1]).abs().max() < 1e-4 * moved


@pytest.mark.parametrize("lambda_attn", [1.0, 30.0])
def test_grad_probe_against_separate_backwards(lambda_attn):
    """--grad_probe_every: the token and attention gradients' norms, the share lambda|g_a| / (lambda|g_a| + |g_t|)
    and the cosine, against .backward() of each term alone on a copy of the model (numpy for the statistics); the
    two gradients add up to the full loss's (Eq. 4 is linear in its terms)."""
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, beta=0.04, mini_batches=2)
    model, _ = build_tiny(seed=1)
    micro_batches = make_rollout(model, cfg)
    model.train()
    opt = torch.optim.SGD([w for w in model.parameters() if w.requires_grad], lr=0.5)
    seen = []
    probe = ral.grad_probe(0.2, 0.04, lambda_attn)
    records = ral.update(model, opt, micro_batches, ral.rl_loss(0.2, 0.04, lambda_attn), 2, 1, 1.0, world=1,
                         probe=lambda m, mb, n: seen.append((copy.deepcopy(m), mb, n)) or probe(m, mb, n))
    assert "probes" not in records[0] and records[1]["probes"] == 1      # the last optimizer step, once
    at, mb, n_tokens = seen[0]                                           # the weights the probe saw
    params = [w for w in at.parameters() if w.requires_grad]

    def grad_of(term):
        at.zero_grad(set_to_none=True)
        logp, p, logprobs = ral.policy_forward(at, mb["batch"], mb["response_len"], full=True)
        loss = {"token": lambda: ral.token_loss(logp, mb["old_logp"], mb["ref_logp"], mb["adv"], mb["weight"],
                                                n_tokens, 0.2, 0.04)[0],
                "attn": lambda: ral.attention_loss(p, mb["old_p"], mb["adv"], mb["weight"], n_tokens)[0],
                "full": lambda: ral.rl_terms(logp, p, logprobs, mb, n_tokens, 0.2, 0.04, lambda_attn)[0]}[term]()
        loss.backward()
        return np.concatenate([(w.grad if w.grad is not None else torch.zeros_like(w)).double().numpy().ravel()
                               for w in params])
    g_t, g_a, g_full = grad_of("token"), grad_of("attn"), grad_of("full")
    assert np.allclose(g_t + lambda_attn * g_a, g_full, atol=1e-7)
    t, a = np.linalg.norm(g_t), np.linalg.norm(g_a)
    assert a > 0 and t > 0                              # one step from the rollout's weights: Eq. 3 acts
    r = records[1]
    assert r["grad_tok"] == pytest.approx(t, rel=1e-5) and r["grad_attn"] == pytest.approx(a, rel=1e-5)
    assert r["attn_share"] == pytest.approx(lambda_attn * a / (lambda_attn * a + t), rel=1e-5)
    assert r["attn_cos"] == pytest.approx(g_t @ g_a / (t * a), rel=1e-4, abs=1e-6)
    rollout_sums = dict(dict.fromkeys(ral.PER_RESPONSE + ral.PER_ROLLOUT_TOKEN, 0.0), responses=1, no_spread=0,
                        groups=1, tokens=1)
    out = ral.reduce_stats(rollout_sums, records, 1, "cpu")
    assert out["grad_attn"] == pytest.approx(a, rel=1e-5)                 # one probe: its own values


def test_grad_probe_runs_every_few_steps(tmp_path):
    out = tmp_path / "run"
    ral.main([f"--out_dir={out}", "--rl_steps=3", "--grad_probe_every=2", *SMALL, "--eval_n=0"],
             reward_fn=spread_reward)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert ["grad_attn" in r for r in rows] == [True, False, True]          # steps 1 and 3
    assert all(r["grad_tok"] > 0 and r["grad_attn"] > 0 and 0 < r["attn_share"] < 1 for r in rows[::2])


def file_of_searches(tmp_path, n):
    for i, s in enumerate(tasks.search_task(n, seed=5, tokens=16)):
        s["image"].save(tmp_path / f"{i}.png")
    records = [dict(problem_id=i, problem="What colour is the star?", data_type="image",
                    problem_type="multiple choice", options=s["options"], solution=f"<answer>{s['answer']}</answer>",
                    path=f"./{i}.png") for i, s in enumerate(tasks.search_task(n, seed=5, tokens=16))]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(records))
    return path


def test_sft_tower_lr_trains_the_tower_at_its_own_rate_and_rl_freezes_it(tmp_path):
    """--sft_tower_lr: the tower and merger join SFT in a param group of their own. AdamW's first step moves every
    weight with a gradient by the step's rate (m/sqrt(v) = g/|g|), 1/20 of the peak in warmup: so the largest move
    is 0.05 x sft_lr in the LLM and 0.05 x sft_tower_lr in the tower. Reloaded for RL, the tower is frozen again;
    at the default 0 it never moves."""
    moved = {}
    for tower_lr in (0.0, 1e-3):
        cfg = ral.configure([f"--out_dir={tmp_path / f'run{tower_lr}'}", "--tiny_layers=1", "--tiny_hidden=64",
                             "--sft_steps=1", "--sft_stop=0", "--sft_lr=1e-2", f"--sft_tower_lr={tower_lr}"])
        path = sft.warm_start(cfg, None, "zero", "cpu", 0, 1)
        start = dict(build_tiny(layers=1, hidden=64, seed=cfg["seed"])[0].named_parameters())
        model = load(path, "cpu")[0]
        assert not any(w.requires_grad for w in model.model.visual.parameters())
        delta = {n: (w.detach() - start[n].detach()).abs().max().item() for n, w in model.named_parameters()}
        moved[tower_lr] = (max(d for n, d in delta.items() if ".visual." not in n),
                           max(d for n, d in delta.items() if ".visual." in n))
    assert moved[0.0][1] == 0.0
    for llm, _ in moved.values():
        assert llm == pytest.approx(0.05 * 1e-2, rel=1e-3), moved
    assert moved[1e-3][1] == pytest.approx(0.05 * 1e-3, rel=1e-3), moved
    with pytest.raises(ral.UsageError, match="--sft_tower_lr"):
        ral.configure([f"--out_dir={tmp_path / 'x'}", "--sft_tower_lr=1e-4", "--fsdp=True"])


def test_sft_file_early_stop_holds_out_a_slice_never_trained_on(tmp_path, monkeypatch):
    """--sft_stop with --sft_file: the early stop validates on min(sft_val_n, 10% of the file) of its records,
    a fixed slice, and SFT never trains on them; the stop fires at the first check that reaches the target."""
    path = file_of_searches(tmp_path, 40)
    samples = data.load_dataset(str(path))
    trained, validated = [], []
    real_target = data.sft_target
    monkeypatch.setattr(data, "sft_target", lambda s, mode: trained.append(s["id"]) or real_target(s, mode))
    seen = iter([0.2, 0.6])
    monkeypatch.setattr(sft, "sampled_accuracy", lambda model, processor, val, *a: validated.append(
        [s["id"] for s in val]) or next(seen))
    model, processor = build_tiny(layers=1, hidden=64, seed=0)
    cfg = dict(cli.DEFAULTS, sft_file=str(path), sft_steps=50, sft_batch=8, sft_stop=0.5, sft_val_every=3,
               sft_val_n=128, sft_cooldown=2)
    log = sft.sft(model, processor, samples, cfg, "zero", "cpu")
    assert [c["sampled_accuracy"] for c in log["checks"]] == [0.2, 0.6]               # the stop fired
    assert log["stopped_at"] == 6 and log["steps"] == 8                                 # and the cooldown ran
    assert len(validated) == 2 and validated[0] == validated[1] and len(validated[0]) == 4      # 10% of 40
    assert trained and not set(trained) & set(validated[0])                 # never trained on
    assert len(set(trained)) > 20                                           # the other 36 are
    assert len(sft.validation_split(samples, 2)[1]) == 2                     # min(sft_val_n, 10%)
    with pytest.raises(ral.UsageError, match="--sft_stop"):
        sft.validation_split(samples[:1], 128)


def test_a_data_file_run_with_the_default_stop_is_not_refused(tmp_path):
    """`python ral.py --sft_file=my.json --train_file=...` with every other option at its default runs."""
    path = file_of_searches(tmp_path, 12)
    cfg = ral.configure([f"--sft_file={path}", f"--train_file={path}", f"--out_dir={tmp_path / 'x'}"])
    assert cfg["sft_stop"] == cli.DEFAULTS["sft_stop"] > 0
    results = ral.main([f"--out_dir={tmp_path / 'run'}", f"--sft_file={path}", f"--train_file={path}",
                        f"--eval_file={path}", "--sft_steps=4", "--sft_val_every=2", "--sft_batch=4", "--rl_steps=1",
                        "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6", "--eval_n=2"],
                       reward_fn=spread_reward)
    warm, = tmp_path.glob("warm-tiny4x128-zero-sft4-s0-*")
    assert [c["step"] for c in json.load(open(warm / "sft_log.json"))["checks"]] == [2]   # validated on the file
    assert results["after_rl"]["n"] == 2


def test_video_sft_validates_on_video_samples(tmp_path, monkeypatch):
    """The SFT early stop validates on the task's own samples (tasks.TASKS), not on search images."""
    seen = []
    monkeypatch.setattr(sft, "sampled_accuracy", lambda model, processor, samples, *args: seen.append(samples) or 1.0)
    model, processor = build_tiny(layers=1, hidden=64, seed=0)
    cfg = dict(cli.DEFAULTS, task="video", task_frames=2, task_tokens=16, sft_steps=3, sft_batch=1, sft_val_every=1,
               sft_val_n=2, sft_size=2, train_size=2, out_dir=str(tmp_path / "run"))
    samples = tasks.video_task(2, frames=2, folder=str(tmp_path / "videos"))
    sft.sft(model, processor, samples, cfg, "zero", "cpu")
    assert seen and all(s["video"] is not None and s.get("image") is None for s in seen[0])


def test_a_custom_reward_reaches_the_sft_stop():
    """sft's early stop scores its samples with the reward it is given: one that calls everything right stops SFT at
    the first check, and sees the validation samples."""
    seen = []

    def always_right(text, sample, mode="think"):
        seen.append(sample["id"])
        return dict(reward=1.0, accuracy=1.0, format=1.0)

    model, processor = build_tiny(layers=1, hidden=64, seed=0)
    cfg = dict(cli.DEFAULTS, sft_steps=50, sft_batch=2, sft_val_every=2, sft_val_n=3, sft_size=0, task_tokens=16,
               max_new_tokens=4, sft_cooldown=0)
    log = sft.sft(model, processor, None, cfg, "zero", "cpu", reward_fn=always_right)
    assert log == dict(steps=2, stopped_at=2, checks=[dict(step=2, sampled_accuracy=1.0)]) and len(seen) == 3
    assert sft.warm_recipe(cfg, always_right) != sft.warm_recipe(cfg)     # another stop: another warm start


REWARDS = """
def always_right(text, sample, mode="think"):
    return dict(reward=1.0, accuracy=1.0, format=1.0)
"""


def test_reward_option_reaches_sft_rl_and_eval(tmp_path, capsys):
    """--reward=file.py:function is the one reward of a run (the SFT stop, RL, its evaluations) and of eval.py;
    a wrong one is a one-line error before anything runs."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    spec = f"--reward={tmp_path / 'rewards.py'}:always_right"
    out = tmp_path / "run"
    results = ral.main([f"--out_dir={out}", *SMALL[1:], "--sft_steps=5", "--sft_batch=2", "--sft_val_every=2",
                        "--sft_val_n=2", "--sft_cooldown=2", "--rl_steps=1", "--eval_n=3", spec])
    warm, = tmp_path.glob("warm-*")
    log = json.load(open(warm / "sft_log.json"))
    assert log["stopped_at"] == 2 and log["steps"] == 4       # stopped at the first check, then 2 cooldown steps
    assert results["before_rl"]["accuracy"] == results["after_rl"]["accuracy"] == 1.0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[0]["accuracy"] == 1.0
    suites = runs.saved_results(str(out))["suites"]
    assert suites["search-16 n=3 reward=rewards.always_right"]["accuracy"] == 1.0
    evaluation.main(["--ckpt", str(out), "--suite", "search-16", "--n", "2", "--max_new_tokens", "4",
                     spec.replace("=", " ", 1).split()[0], spec.split("=", 1)[1]])
    assert runs.saved_results(str(out))["suites"]["search-16 n=2 reward=rewards.always_right"]["accuracy"] == 1
    for bad in ("nocolon", f"{tmp_path / 'rewards.py'}:missing", "no_such_module_xyz:f"):
        with pytest.raises(ral.UsageError, match="--reward"):
            ral.main([f"--out_dir={tmp_path / 'x'}", f"--reward={bad}"])
    assert not (tmp_path / "x").exists()
