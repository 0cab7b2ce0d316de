"""--fsdp=True (FSDP2 under torchrun, 2 gloo ranks): the capture and generation on a sharded model, a run equal to one
process with the same global batch, its checkpoint a normal save_pretrained folder, and exact resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ral
from model import build_tiny
from helpers import spread_reward
from test_ral import ROOT, SMALL, params_of

SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import ral
from helpers import spread_reward
ral.main(sys.argv[1:], reward_fn=spread_reward)
"""


def launch(script, args, world, tag, tmp_path, timeout=600):
    path = tmp_path / f"script{tag}.py"
    path.write_text(script)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] \
        if world > 1 else [sys.executable]       # --standalone: a free port, whatever else runs beside the suite
    proc = subprocess.run(launcher + [str(path)] + args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def train(tmp_path, name, world, *extra, tag=1):
    out = tmp_path / name
    args = [f"--out_dir={out}", "--eval_n=2", f"--warm_dir={tmp_path / 'warm'}",
            *[a for a in SMALL if not a.startswith("--eval_n")], *extra]
    launch(SCRIPT.format(root=ROOT), args, world, tag, tmp_path)
    return out


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """One process without FSDP and 2 FSDP ranks (one group each), 2 RL steps from the same warm start."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, train(tmp, "one", 1, "--rl_steps=2"), train(tmp, "fsdp", 2, "--rl_steps=2", "--fsdp=True")


def test_fsdp_two_ranks_match_one_and_checkpoint_loads(two_steps):
    """The gathered checkpoint is a from_pretrained folder (params_of loads it) with every weight, and the sharded
    run equals the single process within float tolerance."""
    tmp, one, fsdp = two_steps
    a, b, warm = params_of(str(one / "ckpt")), params_of(str(fsdp / "ckpt")), params_of(str(tmp / "warm"))
    assert set(a) == set(b)
    moved = max((a[k] - warm[k]).abs().max().item() for k in a)
    # k_proj.bias gets no gradient in exact arithmetic (softmax ignores a shift shared by all keys), so AdamW turns
    # the float noise of its gradient (reduce-scatter vs one process's sums) into full steps: measured 1.7e-5 here
    diff = max((a[k] - b[k]).abs().max().item() for k in a if "k_proj.bias" not in k)
    assert moved > 1e-4 and diff < 1e-3 * moved
    assert all(torch.equal(b[k], warm[k]) for k in b if "visual" in k)      # frozen under FSDP too
    state = torch.load(fsdp / "ckpt" / "trainer_state.pt", weights_only=True)
    trainable = sum(1 for k in a if "visual" not in k)
    assert len(state["optimizer"]["state"]) == trainable                     # the full optimizer state, by name
    assert (fsdp / "ckpt" / "eval.json").exists()                            # evaluated on the sharded model
    # the KL to the reference (sharded too under FSDP) as the one process computes it: measured 0.0333 and 0.0432
    # in both, equal to 3e-7
    kl = [[json.loads(line)["kl"] for line in open(run / "metrics.jsonl")] for run in (one, fsdp)]
    assert all(k > 0 for k in kl[0]) and all(abs(x - y) < 1e-3 * x for x, y in zip(*kl)), kl
    # the held-out set split over the ranks (the policy gathered once for it) scores as one process does
    results = [json.loads((run / "results.json").read_text()) for run in (one, fsdp)]
    for tag in ("before_rl", "after_rl"):
        a, b = results[0][tag], results[1][tag]
        assert a["n"] == b["n"] == 2 and a["accuracy"] == b["accuracy"] and abs(a["grounding"] - b["grounding"]) < 1e-4


def test_fsdp_resume_matches_uninterrupted(two_steps):
    """2 steps, then --resume=True to 4 (weights and optimizer state from the gathered checkpoint, re-sharded),
    against 4 steps in one go: bit-identical."""
    tmp, _, fsdp = two_steps
    split = tmp / "split"
    shutil.copytree(fsdp, split)
    whole = train(tmp, "whole", 2, "--rl_steps=4", "--ckpt_every=2", "--fsdp=True", tag=2)
    train(tmp, "split", 2, "--rl_steps=4", "--ckpt_every=2", "--fsdp=True", "--resume=True", tag=2)
    a, b = params_of(str(whole / "ckpt")), params_of(str(split / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [line for line in open(split / "metrics.jsonl")]
    assert len(rows) == 4


STOPPED = """
import os, sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
import ral, scale, sft
cfg = ral.configure(sys.argv[1:])
rank, world, device = scale.setup_distributed(cfg)
sft_samples = ral.load_samples(cfg)[0]
left, step = 3, torch.optim.AdamW.step
def step_then_stop(self, *args, **kwargs):     # both ranks stop after SFT's 3rd step (its checkpoint is at 2)
    global left
    out = step(self, *args, **kwargs)
    left -= 1
    if left == 0:
        raise KeyboardInterrupt
    return out
torch.optim.AdamW.step = step_then_stop
try:
    sft.warm_start(cfg, sft_samples, "zero" if cfg["zero"] else "think", device, rank, world)
    raise SystemExit("SFT was not interrupted")
except KeyboardInterrupt:
    pass
torch.optim.AdamW.step = step
sft.warm_start(cfg, sft_samples, "zero" if cfg["zero"] else "think", device, rank, world)    # again: SFT continues from its checkpoint
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_sft_interrupted_and_continued_matches_one_process(tmp_path):
    """SFT on 2 FSDP ranks, interrupted after its 3rd step and started again in the same processes
    (tests/test_ral.py kills -9 for real, in one process): the warm start equals a 1-process SFT of the same
    global batch within float tolerance. A continuation that lost the optimizer state or the sampler's position
    would be far outside it."""
    args = ["--sft_steps=4", "--sft_batch=4", "--sft_ckpt_every=2", "--sft_size=8", "--tiny_layers=1",
            "--tiny_hidden=64", "--rl_steps=0", "--eval_n=0", "--sft_val_every=3", "--sft_val_n=4"]   # one early-
    # stop check at step 3, its generates on the weights gathered once (scale.gathered), the same on both ranks
    ral.main([f"--out_dir={tmp_path / 'one' / 'run'}", *args], reward_fn=spread_reward)
    out = launch(STOPPED.format(root=ROOT), [f"--out_dir={tmp_path / 'fsdp' / 'run'}", *args, "--fsdp=True"], 2, 4,
                 tmp_path)
    assert "continuing SFT from" in out and "at step 2" in out
    (a,), (b,) = (tmp_path / "one").glob("warm-*"), (tmp_path / "fsdp").glob("warm-*")
    a, b, init = params_of(str(a)), params_of(str(b)), build_tiny(layers=1, hidden=64)[0].state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a if "k_proj.bias" not in k)   # see the test above
    # measured: moved 4.8e-4 (lr warmup), diff 2.3e-8
    assert moved > 1e-4 and diff < 1e-3 * moved, (moved, diff)


CAPTURE = """
import copy, os, sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from torch.distributed.tensor import DTensor
import model as M, ral, scale
from test_model import R, image_batch
dist.init_process_group("gloo")
rank = dist.get_rank()
model, processor = M.build_tiny(seed=0)
batch = image_batch(processor)
weights = torch.randn(2, R, batch["input_ids"].shape[1], generator=torch.Generator().manual_seed(1))
plain = copy.deepcopy(model)

def capture(m):
    logp, p = M.policy_forward(m, batch, R)
    ((p * weights).sum() + logp.sum()).backward()
    full = lambda g: g.full_tensor() if isinstance(g, DTensor) else g
    return p.detach(), logp.detach(), {{n: full(w.grad) for n, w in m.named_parameters() if w.grad is not None}}

p0, logp0, g0 = capture(plain)
scale.wrap(model, dict(fsdp=True), 2, "cpu")
p1, logp1, g1 = capture(model)
assert (p1 - p0).abs().max() < 1e-6 and (logp1 - logp0).abs().max() < 1e-5, ((p1 - p0).abs().max())
assert g0.keys() == g1.keys() and len(g0) > 10
for n in g0:   # both ranks ran the same batch, so FSDP's rank average is the same gradient
    assert (g1[n] - g0[n]).abs().max() < 1e-5 * max(1.0, g0[n].abs().max().item()), n

# generation, as in a rollout (one prompt G times): on rank 0 the first greedy token is made the end token, so
# it is done after one step while rank 1 runs all 8; without synced_gpus the ranks' all-gathers fall out of step
import data
import tasks
prompt, _ = data.encode(tasks.search_task(1, seed=3, tokens=16) * 2, processor)
proc = copy.deepcopy(processor)
first, _ = M.generate(plain, proc, prompt, 1, greedy=True)
if rank == 0:
    proc.tokenizer.eos_token = proc.tokenizer.convert_ids_to_tokens(int(first[0, 0]))
ours, mask = M.generate(model, proc, prompt, 8, greedy=True)
reference, ref_mask = M.generate(plain, proc, prompt, 8, greedy=True)
assert torch.equal(mask, ref_mask) and torch.equal(ours[mask.bool()], reference[ref_mask.bool()])
assert (mask.sum(1) == 1 if rank == 0 else mask.sum(1) == 8).all(), mask
dist.barrier()
print(f"ok {{rank}}", flush=True)   # one string: the ranks share stdout, and separate words interleave
dist.barrier()
dist.destroy_process_group()   # torn down before exit: gloo's threads left running abort the process
"""


def test_capture_and_generation_under_fsdp(tmp_path):
    """On 2 ranks: p, log-probs and their gradients from the sharded model equal the unsharded model's; greedy
    generation equals it too while one rank finishes after one token and the other keeps going (synced_gpus)."""
    launch(CAPTURE.format(root=ROOT), [], 2, 3, tmp_path, timeout=300)     # out of step, it hangs


GATHER = """
import copy, os, sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
import data, eval as evaluation, model as M, scale, tasks


class Collectives(TorchDispatchMode):
    # every collective torch.distributed issues inside the block, as c10d ops: FSDP's all-gathers, generate's
    # synced_gpus all-reduces, all_gather_object's
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {{}}))

    def gathers(self, start=0):
        return sum("allgather" in op or "all_gather" in op for op in self.ops[start:])


dist.init_process_group("gloo")
rank = dist.get_rank()
model, processor = M.build_tiny(seed=0)
plain = copy.deepcopy(model)
scale.wrap(model, dict(fsdp=True), 2, "cpu")
units = sum(isinstance(m, scale.FSDPModule) for m in model.modules())
layers = len(model.model.language_model.layers)

# a rollout's generate: each rank its own prompt G times, the image encoded once, one seed per response
G = 4
prompt, _ = data.encode(tasks.search_task(1, seed=10 + rank, tokens=16) * G, processor)
prompt = M.encode_visuals_once(plain, prompt)
seeds = [100 * rank + j for j in range(G)]
counts, tokens = {{}}, {{}}
for N in (8, 32):
    with Collectives() as c:
        with scale.gathered(model):
            assert not any(isinstance(w, DTensor) for w in model.parameters())
            entry = len(c.ops)
            tokens[N] = M.generate(model, processor, prompt, N, seeds=seeds)
            inside = c.ops[entry:]
    assert inside == [], inside                  # no collective inside generate: each rank decodes alone
    assert tokens[N][1].sum(1).max() == N        # it ran all N steps
    counts[N] = c.gathers()
    # resharded after it (the frozen tower is never sharded: scale.replicate_tower)
    assert all(isinstance(w, DTensor) == ("visual" not in n) for n, w in model.named_parameters())
for N in (8, 32):
    once, mask = tokens[N]
    model.reshard()                              # the root too: every unit in shards, as gathered found them
    with Collectives() as c:                     # the per-token path (outside gathered: synced_gpus)
        per_token, per_token_mask = M.generate(model, processor, prompt, N, seeds=seeds)
    counts[f"per_token_{{N}}"] = c.gathers()
    alone, alone_mask = M.generate(plain, processor, prompt, N, seeds=seeds)
    assert torch.equal(once, per_token) and torch.equal(once, alone), (once, per_token, alone)
    assert torch.equal(mask, per_token_mask) and torch.equal(mask, alone_mask)
# once per unit, whatever N; per token, every decoder layer again at every step (and the root once)
assert counts[8] == counts[32] == units, counts
assert counts["per_token_8"] == layers * 8 + 1 and counts["per_token_32"] == layers * 32 + 1, counts

# after it, a training forward gathers layer by layer again (reshard_after_forward restored; the root keeps its
# weights after the first), and its log-probs and gradients are the unsharded model's
full = M.with_responses(prompt, once, mask)
model.reshard()
grads = []
for m in (model, plain):
    with Collectives() as c:
        logp, p = M.policy_forward(m, full, 32)
        first = c.gathers()
        M.policy_forward(m, full, 32, attention=False)
        second = c.gathers() - first
    (logp.sum() + p.sum()).backward()
    grads.append({{n: (w.grad.full_tensor() if isinstance(w.grad, DTensor) else w.grad) for n, w in m.named_parameters()
                   if w.grad is not None}})
    if m is model:
        assert first == layers + 1 and second == layers, (first, second)
assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
for n in grads[1]:        # FSDP's gradient is the mean of the ranks' own (each rank had its own prompt)
    dist.all_reduce(grads[1][n])
    grads[1][n] /= 2
    assert (grads[0][n] - grads[1][n]).abs().max() < 1e-5 * max(1.0, grads[1][n].abs().max().item()), n

# evaluation split over the ranks inside gathered: rank 0 has 3 samples (2 batches), rank 1 has 2 (1 batch), and the
# only collectives inside are all_gather_object's; the results equal one process's on all 5
samples = tasks.search_task(5, seed=7, tokens=16)
reward = lambda text, sample, mode: dict(reward=0.0, accuracy=float(sample["answer"] in "AB"),   # a random model
                                         format=float(text.startswith("f")))                     # scores 0 on both
kw = dict(mode="zero", batch_size=2, max_new_tokens=8, reward_fn=reward, progress=False)
with Collectives() as c:
    dist.all_gather_object([None, None], [(0, 1.0, 0.0, 0.5, 0.25)])
results_gather = c.ops
with scale.gathered(model):
    with Collectives() as c:
        sharded = evaluation.evaluate(model, processor, samples, rank=rank, world=2, **kw)
assert c.ops == results_gather, c.ops
one = evaluation.evaluate(plain, processor, samples, **kw)
assert sharded["n"] == one["n"] == 5 and 0 < one["accuracy"] < 1 and 0 < one["format"] < 1, (sharded, one)
for k in one:
    assert abs(sharded[k] - one[k]) < 1e-5 if isinstance(one[k], float) else sharded[k] == one[k], (k, sharded, one)

# the memory term: every sharded weight held whole on every rank while gathered, in the dtype FSDP gathers (on
# GPU, wrap's bf16 policy: here on CPU too)
bf16 = scale.shard(copy.deepcopy(plain), 2, "cpu", MixedPrecisionPolicy(param_dtype=torch.bfloat16))
for m, dtype in ((model, torch.float32), (bf16, torch.bfloat16)):
    sharded = {{n for n, w in m.named_parameters() if isinstance(w, DTensor)}}
    with scale.gathered(m):
        whole = [w for n, w in m.named_parameters() if n in sharded]
        assert {{w.dtype for w in whole}} == {{dtype}} and not any(isinstance(w, DTensor) for w in whole)
        held = sum(w.numel() * w.element_size() for w in whole)
    expected = M.training_memory(plain, 2, fsdp=True, gathered_bytes=dtype.itemsize)["generation"]
    assert held == expected > 0, (held, expected)
dist.barrier()
print("counts", rank, counts)
dist.barrier()
dist.destroy_process_group()   # torn down before exit: gloo's threads left running abort the process
"""


def test_generation_gathers_once_and_evaluation_splits_under_fsdp(tmp_path):
    """On 2 ranks, each with its own prompts: inside scale.gathered a rollout's generate makes no collective, the
    all-gathers are one per FSDP unit for 8 and for 32 new tokens (per token outside it: 4 N + 1), and its tokens
    equal the per-token path's and one process's; a training forward afterwards gathers per layer again with the
    unsharded model's gradients; evaluation split over the ranks (uneven batches) equals one process; the
    gathered copy is training_memory's `generation` row (fp32 here, bf16 under wrap's GPU policy)."""
    out = launch(GATHER.format(root=ROOT), [], 2, 5, tmp_path, timeout=300)
    print(out)
