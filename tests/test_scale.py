"""Running at scale (scale.py) on gloo ranks: ranks whose batches hold different media (image + video, two images,
text alone) stay in step under FSDP, in SFT and RL; resume hands each rank only its shard of the optimizer state;
the process group's timeout; and 8 ranks at once, DDP and FSDP, equal to one process."""
import itertools
import json

import torch

import data
import tasks
from test_fsdp import SCRIPT, launch
from model import build_tiny
from test_ral import ROOT, params_of

MEDIA = """
import copy, os, sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from torch.distributed.tensor import DTensor
import data, model as M, scale, tasks
dist.init_process_group("gloo")
rank = dist.get_rank()
model, processor = M.build_tiny(seed=0)
plain = copy.deepcopy(model)
image = tasks.search_task(2, seed=1, tokens=16)
video = dict(image[0], id="video", image=None, video={video!r})
text = dict(image[1], id="text", image=None)
# rank 0: an image and a video in one batch (two tower calls), rank 1: text alone (none)
mixes = [[image[0], video], [text, text]]
weights = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(1))

def loss(m, samples):
    batch, _ = data.encode(samples, processor, "zero")
    full, mask = M.append_responses(batch, [[20, 21, 22]] * len(samples), processor.tokenizer.pad_token_id)
    logp, p = M.policy_forward(m, full, 3)
    return logp.sum() + (p * weights[:, :, :p.shape[2]]).sum()

sum(loss(plain, mix) for mix in mixes).backward()       # FSDP averages the ranks' gradients: the mean of both
scale.wrap(model, dict(fsdp=True), 2, "cpu")
loss(model, mixes[rank]).backward()
for (n, a), b in zip(plain.named_parameters(), model.parameters()):
    if a.grad is not None:
        g = b.grad.full_tensor() if isinstance(b.grad, DTensor) else b.grad
        assert (g - a.grad / 2).abs().max() < 1e-5 * max(1.0, a.grad.abs().max().item()), n
assert not isinstance(model.model.visual.patch_embed.proj.weight, DTensor)     # the tower stays a plain replica
# greedy generation on each rank's own mix equals the unsharded model's
batch, _ = data.encode(mixes[rank], processor, "zero")
ours, mask = M.generate(model, processor, batch, 6, greedy=True)
reference, ref_mask = M.generate(plain, processor, batch, 6, greedy=True)
assert torch.equal(mask, ref_mask) and torch.equal(ours[mask.bool()], reference[ref_mask.bool()])
dist.barrier()
print(f"ok {{rank}}", flush=True)   # one string: the ranks share stdout, and separate words interleave
dist.barrier()
dist.destroy_process_group()   # torn down before exit: gloo's threads left running abort the process
"""


def test_fsdp_ranks_with_different_media_stay_in_step(tmp_path):
    """On 2 FSDP ranks, one forward + backward each where rank 0's batch holds an image and a video and rank 1's
    only text: the sharded gradients equal the unsharded model's mean over both batches, and generation on each
    rank's own batch equals the unsharded model's. A sharded tower would be gathered twice on rank 0 and never on
    rank 1 (gloo: "Received data size doesn't match expected size")."""
    video, = tasks.video_task(1, seed=2, frames=4, folder=str(tmp_path / "videos"), tokens_per_frame=16, hold=1)
    out = launch(MEDIA.format(root=ROOT, video=video["video"]), [], 2, "media", tmp_path, timeout=300)
    assert "ok 0" in out and "ok 1" in out


def video_r1_file(folder, kinds):
    """A Video-R1 layout JSONL written with the offline tasks' writers (tasks.py): search images (PNG) and needle
    videos (mp4), in the order of kinds ('image' / 'video'), with rationales for SFT."""
    folder.mkdir(parents=True, exist_ok=True)
    images = tasks.search_task(len(kinds), seed=5, tokens=16)
    videos = tasks.video_task(len(kinds), seed=5, frames=4, folder=str(folder), tokens_per_frame=16,
                              hold=1)   # the draws this tolerance was set on: the layout is what is tested
    rows = []
    for i, kind in enumerate(kinds):
        s = images[i] if kind == "image" else videos[i]
        if kind == "image":
            s["image"].save(folder / f"image{i}.png")
        rows.append(dict(problem_id=i, problem=s["question"].split("\n")[0], data_type=kind,
                         problem_type="multiple choice", options=s["options"],
                         solution=f"<answer>{s['answer']}</answer>",
                         path=f"image{i}.png" if kind == "image" else s["video"].rsplit("/", 1)[1],
                         process=f"<think>{s['rationale']}</think>"))
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_layout(n, sft_steps, sft_batch, rl_steps, prompts_per_step, world=2):
    """A seed and the kinds of n records for which, at every SFT and RL step, rank 0's share holds an image and a
    video and rank 1's only images. SFT draws its global batch as sft.py does (torch.randint from a generator
    seeded by --seed), RL through data.epoch_prompts; each rank takes its slice."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        batches = [torch.randint(n, (sft_batch,), generator=g).tolist() for _ in range(sft_steps)]
        batches += [data.epoch_prompts(n, step, prompts_per_step, seed) for step in range(rl_steps)]
        for kinds in itertools.product(("image", "video"), repeat=n):
            shares = [[kinds[i] for i in b[r * len(b) // world:(r + 1) * len(b) // world]] for b in batches
                      for r in range(world)]
            mixed, images = shares[0::2], shares[1::2]                       # rank 0's, rank 1's
            if all(set(s) == {"image", "video"} for s in mixed) and all(set(s) == {"image"} for s in images):
                return seed, list(kinds)
    raise AssertionError("no such layout")


def test_mixed_media_sft_and_rl_on_two_fsdp_ranks_match_one_process(tmp_path):
    """SFT (2 steps) then RL (1 step, the tower called in generate and every forward: --vision_cache=False) on a
    Video-R1 file of images and videos, where rank 0 always holds an image and a video and rank 1 two images: on 2
    FSDP ranks it completes, and its warm start and RL checkpoint equal one process's within float tolerance."""
    seed, kinds = mixed_layout(4, sft_steps=2, sft_batch=4, rl_steps=1, prompts_per_step=4)
    path = video_r1_file(tmp_path / "data", kinds)
    args = [f"--seed={seed}", f"--sft_file={path}", f"--train_file={path}", "--sft_stop=0", "--sft_steps=2",
            "--sft_batch=4", "--sft_lr=1e-2", "--rl_steps=1", "--prompts_per_step=4", "--group_size=2",
            "--mini_batches=2",
            "--max_new_tokens=4", "--eval_n=0", "--vision_cache=False", "--tiny_layers=1", "--tiny_hidden=64",
            "--lr=1e-3", "--task_frames=4"]
    runs = {}
    for name, world, extra in (("one", 1, []), ("fsdp", 2, ["--fsdp=True"])):
        out = tmp_path / name / "run"
        launch(SCRIPT.format(root=ROOT), [f"--out_dir={out}", *args, *extra], world, name, tmp_path)
        (warm,) = (tmp_path / name).glob("warm-*")
        runs[name] = params_of(str(warm)), params_of(str(out / "ckpt"))
    init = build_tiny(layers=1, hidden=64, seed=seed)[0].state_dict()
    for stage, start in ((0, init), (1, runs["one"][0])):          # the warm start from init, RL from the warm start
        a, b = runs["one"][stage], runs["fsdp"][stage]
        moved = max((a[k] - start[k]).abs().max().item() for k in a)
        # k_proj.bias: the float noise of a zero gradient, turned into steps by AdamW (tests/test_fsdp.py)
        diff = max((a[k] - b[k]).abs().max().item() for k in a if "k_proj.bias" not in k)
        assert moved > 1e-4 and diff < 1e-3 * moved, (stage, moved, diff)


RESUME = """
import os, sys, time, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from torch.distributed.tensor import DTensor
import data, model as M, ral, scale, tasks
cfg = ral.configure(["--fsdp=True", "--dist_timeout=1234", "--prompts_per_step=2", "--out_dir={out}"])
rank, world, device = scale.setup_distributed(cfg)
timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout    # gloo's default is 30 minutes
assert timeout.total_seconds() == 1234, timeout
model, processor = M.build_tiny(layers=1, hidden=64, seed=0)
scale.wrap(model, cfg, world, device)
params = [w for w in model.parameters() if w.requires_grad]
trained = torch.optim.AdamW(params, lr=1e-3)
batch, _ = data.encode(tasks.search_task(2, seed=rank, tokens=16), processor, "zero")
full, mask = M.append_responses(batch, [[20, 21, 22]] * 2, processor.tokenizer.pad_token_id)
M.policy_forward(model, full, 3, attention=False)[0].sum().backward()
trained.step()
trained.zero_grad(set_to_none=True)     # as the trainer leaves it
scale.save_checkpoint("{out}/ckpt", model, processor, trained, dict(step=1), rank)
dist.barrier()

calls, load = [], torch.load
torch.load = lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs)
state = scale.load_trainer_state("{out}/ckpt", rank, fsdp=True)
torch.load = load
# on the CPU, memory-mapped (a tensor is read from the file when it is broadcast), never on the training device
assert [(c["map_location"], c["mmap"]) for c in calls] == [("cpu", True)], calls
if rank == 0:
    saved = [v for s in state["optimizer"]["state"].values() for v in s.values() if v.dim()]
    assert all(v.device.type == "cpu" for v in saved)
    whole = torch.tensor(float(sum(v.numel() * v.element_size() for v in saved)))
else:           # the others read none of it
    assert state["optimizer"] is None
    whole = torch.tensor(0.0)
dist.broadcast(whole, 0)
resumed = torch.optim.AdamW(params, lr=1e-3)
scale.load_optimizer(model, resumed, state["optimizer"], fsdp=True)
mine = 0
for w in params:    # each rank holds exactly its own shards of the trained optimizer state, and no more
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = trained.state[w][key], resumed.state[w][key]
        assert isinstance(b, DTensor) and torch.equal(a.to_local(), b.to_local())
        mine += b.to_local().numel() * b.element_size()
total = torch.tensor(float(mine))
dist.all_reduce(total)
assert total == whole and abs(mine - whole / world) < 0.05 * whole, (mine, whole.item())
print(f"rank {{rank}} holds {{mine}} of {{int(whole)}} optimizer bytes")

dist.barrier()
dist.destroy_process_group()   # torn down before exit: gloo's threads left running abort the process
"""


def test_resume_hands_each_fsdp_rank_only_its_optimizer_shard(tmp_path):
    """On 2 FSDP ranks, after one AdamW step and a checkpoint: trainer_state.pt is read memory-mapped on the CPU,
    rank 1 keeps no optimizer state from it, and after load_optimizer each rank holds exactly its own shards of
    the trained state (half the bytes of the whole). The process group has --dist_timeout's timeout."""
    out = launch(RESUME.format(root=ROOT, out=tmp_path / "run"), [], 2, "resume", tmp_path, timeout=300)
    assert "rank 0 holds" in out and "rank 1 holds" in out, out


# The tiny default with small settings, from a short SFT that leaves the model sometimes right (measured: 6 of 8
# groups with reward spread under the real reward), so the RL step's gradient is not zero.
EIGHT = ["--sft_steps=40", "--sft_batch=8", "--sft_lr=3e-3", "--sft_stop=0", "--rl_steps=1", "--prompts_per_step=8",
         "--group_size=4", "--max_new_tokens=12", "--eval_n=0"]
REAL_REWARD = """
import os, sys
sys.path[:0] = [{root!r}]
import ral
ral.main(sys.argv[1:])
"""


def test_eight_ranks_ddp_and_fsdp_match_one_process(tmp_path):
    """torchrun --nproc_per_node=8 (one group per rank), DDP and FSDP, one RL step of the tiny default with the real
    reward from a shared warm start: some groups have reward spread and the gradient is not zero (metrics.jsonl),
    and both runs' weights equal one process's with the same global batch within float tolerance."""
    warm = tmp_path / "warm"
    runs = {}
    for name, world, extra in (("one", 1, []), ("ddp", 8, []), ("fsdp", 8, ["--fsdp=True"])):
        out = tmp_path / name
        launch(REAL_REWARD.format(root=ROOT), [f"--out_dir={out}", f"--warm_dir={warm}", *EIGHT, *extra], world,
               name, tmp_path)
        row, = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert row["no_spread_groups"] < 1 and row["grad_norm"] > 0, (name, row)
        runs[name] = params_of(str(out / "ckpt")), row
    start, (one, row) = params_of(str(warm)), runs["one"]
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    for name in ("ddp", "fsdp"):
        other, other_row = runs[name]
        assert other_row["no_spread_groups"] == row["no_spread_groups"]       # the same rollouts, spread over ranks
        diff = max((one[k] - other[k]).abs().max().item() for k in one if "k_proj.bias" not in k)   # see test_fsdp
        assert moved > 1e-4 and diff < 1e-3 * moved, (name, moved, diff)


def test_sft_tower_lr_on_two_ddp_ranks_matches_one_process(tmp_path):
    """--sft_tower_lr under DDP: the tower's gradients are averaged over the ranks like the LLM's, so 2 SFT steps on
    2 ranks give one process's warm start, tower included, within float tolerance."""
    args = ["--sft_steps=2", "--sft_stop=0", "--sft_batch=4", "--sft_lr=1e-2", "--sft_tower_lr=1e-2", "--rl_steps=0",
            "--eval_n=0", "--tiny_layers=1", "--tiny_hidden=64"]
    warm = {}
    for name, world in (("one", 1), ("ddp", 2)):
        launch(SCRIPT.format(root=ROOT), [f"--out_dir={tmp_path / name / 'run'}", *args], world, name, tmp_path)
        (folder,) = (tmp_path / name).glob("warm-*")
        warm[name] = params_of(str(folder))
    init = build_tiny(layers=1, hidden=64, seed=0)[0].state_dict()
    a, b = warm["one"], warm["ddp"]
    for part in (lambda k: ".visual." in k, lambda k: ".visual." not in k and "k_proj.bias" not in k):
        keys = [k for k in a if part(k)]
        moved = max((a[k] - init[k]).abs().max().item() for k in keys)
        diff = max((a[k] - b[k]).abs().max().item() for k in keys)
        assert moved > 1e-4 and diff < 1e-3 * moved, (moved, diff)
