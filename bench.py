"""
Performance: what a step costs. Everything is measured side by side in one run, interleaved and repeated;
the tables report medians and paired ratios (CPU timings on a shared machine are noisy, ratios much less so).

    python bench.py                                   # both benchmarks at the default sizes
    python bench.py --what capture --seq 256,1024 --repeats 5 --sizes 4x128x4,8x512x8
    python bench.py --what step --step-size 8x512x8
    python bench.py --what memory                     # per GPU: training state (3B/7B/32B), the presets' whole step
    python bench.py --what layer                      # the capture vs the paper's last layer in eager, 7B shape
    python bench.py --what gpu                        # checks a CUDA GPU (under 8 minutes); one line without one

capture: forward + backward of one batch of random text (B x T, the last R rows are "the response") under
    sdpa     plain SDPA, loss on the response log-probs (what GRPO needs)
    capture  our "ral_sdpa" kernel, policy_forward(attention=True), loss on the log-probs and on p (what RAL needs)
    eager    the whole model in eager attention with output_attentions=True, loss on the log-probs and on the
             last layer's attentions turned into the same p (the obvious way to get the attention)
  reporting the step time, the activation memory saved for backward (exact: the bytes of every tensor autograd
  keeps, counted once per storage, parameters excluded) and, in a fresh process per cell, the peak RSS growth.
step: one GRPO step against one RAL step (ral.rollout + ral.update) on the offline search task, per phase.
rollout: one RAL step before (a generate call per prompt, the vision tower in every forward) and after (one
    batched generate per step, the tower once per prompt): rollout time, tokens/s, tower calls, step time.
layer: one attention layer at the 7B final layer's shape fed the same q, k, v: plain SDPA, our capture (and, as
    before, with the key heads repeated), and the paper's way (the last layer in eager, its T x T weights kept):
    bytes saved for backward, time, and on CUDA the peak memory.
memory (memory.py): per-GPU bytes of the training state (fp32 master weights, gradients, AdamW, bf16 reference) of the real
    Qwen2.5-VL configs built on the meta device (no weights, no download), in DDP and in FSDP over --gpus GPUs;
    then a step of each preset (config/qwen3b_8gpu.py, qwen7b) at its longest input, whole: activations
    (activation_memory, counted from the code and tested against a measured step), FSDP's units in flight, the
    rollout's gathered bf16 copy, KV cache and prefill, and the per-GPU peak against 80 GB.
gpu: the checks that need a CUDA GPU, each a row of one markdown table (gpu_check.md): gpu_check.py.
Results go to a markdown table on stdout and to bench.json.

Threads: the default is one torch thread. On a machine shared with other jobs, torch's default (one thread per
core) makes its threads wait on each other whenever one is descheduled: a 0.1 s step was measured taking 0.15-7 s.
On a quiet machine, --threads 0 measures what a run with all cores gets.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen2_5_VLConfig
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention, eager_attention_forward

import cli
import runs
import ral
import tasks
from memory import bench_memory, bench_memory_whole, print_memory_tables
from model import attention_policy, build_tiny, capturing, policy_forward, ral_sdpa

KERNEL = dict(sdpa="sdpa", capture="ral_sdpa", eager="eager")


def parse_size(text):
    layers, hidden, heads = (int(x) for x in text.split("x"))
    return dict(layers=layers, hidden=hidden, heads=heads, kv_heads=min(2, heads))


def random_batch(vocab, batch, seq, seed=0):
    ids = torch.randint(20, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def without_self(alpha):
    """Eq. 2 from full attention rows (B x R x T, the last R query positions): drop the self weight, renormalize."""
    R, T = alpha.shape[-2:]
    self_key = torch.arange(T - R, T)[:, None] == torch.arange(T)[None, :]
    alpha = alpha.masked_fill(self_key, 0.0)
    return alpha / alpha.sum(-1, keepdim=True)


def variant_loss(model, batch, rows, variant):
    """One forward under `variant` and a scalar loss that depends on everything that variant has to differentiate."""
    model.set_attn_implementation(KERNEL[variant])
    if variant != "eager":
        logp, p = policy_forward(model, batch, rows, attention=variant == "capture")
        return -logp.sum() + (p.square().sum() if p is not None else 0.0)
    out = model(**batch, output_attentions=True, logits_to_keep=rows + 1, use_cache=False)
    targets = batch["input_ids"][:, -rows:, None]
    logp = torch.gather(out.logits[:, :-1].float().log_softmax(-1), 2, targets).squeeze(-1)
    p = without_self(out.attentions[-1][:, :, -rows:].float().mean(1))
    return -logp.sum() + p.square().sum()


def timed_step(model, batch, rows, variant):
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    variant_loss(model, batch, rows, variant).backward()
    return time.perf_counter() - t0


def saved_bytes(model, batch, rows, variant):
    """Bytes autograd keeps for backward: every saved tensor's storage once, the parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    n = saved_bytes_of(lambda: variant_loss(model, batch, rows, variant), params)
    model.zero_grad(set_to_none=True)
    return n


def saved_bytes_of(loss_fn, exclude=()):
    """Bytes of the tensors autograd saves for backward while loss_fn() runs (each storage once, those whose
    data_ptr is in `exclude` not counted); then runs the backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


class LiveBytes(TorchDispatchMode):
    """Inside the block, the bytes of every storage an operation made that is still alive (live()), and their peak
    after any operation (peak): what a forward keeps for backward, whoever keeps it (autograd, a checkpoint, a
    Python reference), and the working set, on any device. Storages made before the block (weights, inputs) are
    not counted."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:   # views are not new
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self):
        self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
        return sum(n for _, n in self.storages.values())


def peak_rss_growth(size, seq, batch, rows, variant):
    """Peak RSS growth (bytes) of one step of `variant`, in a fresh process so earlier peaks do not hide it."""
    args = [sys.executable, os.path.abspath(__file__), "--_rss", json.dumps([size, seq, batch, rows, variant]),
            "--threads", str(torch.get_num_threads())]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=os.path.dirname(args[1]))
    return int(out.stdout.strip().splitlines()[-1])


def _rss_child(spec):
    size, seq, batch, rows, variant = json.loads(spec)
    model, processor = build_tiny(**parse_size(size))
    timed_step(model, random_batch(len(processor.tokenizer), batch, 16), 8, variant)  # one-time setup, not counted
    b = random_batch(len(processor.tokenizer), batch, seq)
    before = peak_rss()
    timed_step(model, b, rows, variant)
    print(peak_rss() - before)


def peak_rss():
    """This process's peak resident set (bytes), VmHWM. Not getrusage's ru_maxrss: that one survives fork + exec,
    so a child spawned by a large parent starts with the parent's peak and shows no growth."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def bench_capture(sizes, seqs, batch, rows, repeats, rss):
    """Per (size, T): median step time and paired ratios of the three variants, saved bytes, RSS growth."""
    results = []
    for size in sizes:
        model, processor = build_tiny(**parse_size(size))
        model.train()
        for seq in seqs:
            R = min(rows, seq // 2)
            b = random_batch(len(processor.tokenizer), batch, seq)
            times = {v: [] for v in KERNEL}
            for rep in range(repeats + 1):                       # repetition 0 is the warm-up
                order = list(KERNEL) if rep % 2 else list(KERNEL)[::-1]
                for v in order:
                    t = timed_step(model, b, R, v)
                    if rep:
                        times[v].append(t)
            for v in KERNEL:
                row = dict(size=size, T=seq, B=batch, R=R, variant=v, time_s=statistics.median(times[v]),
                           time_vs_sdpa=statistics.median(a / s for a, s in zip(times[v], times["sdpa"])),
                           saved_bytes=saved_bytes(model, b, R, v))
                results.append(row)
            for r in results[-3:]:
                r["saved_vs_sdpa"] = r["saved_bytes"] / results[-3]["saved_bytes"]
            model.set_attn_implementation("ral_sdpa")
            print(f"  capture {size} T={seq}: " + ", ".join(f"{r['variant']} {r['time_s']:.3f}s"
                                                            for r in results[-3:]), file=sys.stderr)
    if rss:   # after all timing, one process at a time, so the subprocesses never run beside a timed step
        for r in results:
            r["rss_growth_bytes"] = peak_rss_growth(r["size"], r["T"], r["B"], r["R"], r["variant"])
    return results


# The paper takes the attention by running the last layer alone in eager attention (docs/METHOD.md): every head's
# B x H x T x T weights are then saved for backward. Ours runs SDPA and keeps q and the key heads (policy_forward).
# One attention layer at the 7B final layer's shape, fed the same q, k, v, so the difference is the capture alone.
LAYER_7B = dict(heads=28, kv_heads=4, head_dim=128)
LAYER_VARIANTS = ("sdpa", "capture", "capture_repeat_kv", "eager_last_layer")


def attention_layer(heads, kv_heads, head_dim):
    """Qwen2.5-VL's text attention module with this shape, as the last layer of its model (its projections on the
    meta device: the kernels read only its attributes)."""
    text = dict(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                num_hidden_layers=1)
    with torch.device("meta"):
        layer = Qwen2_5_VLAttention(Qwen2_5_VLConfig(text_config=text).text_config, layer_idx=0)
    return layer.train()


def layer_loss(layer, q, k, v, rows, variant, weights, causal):
    """One attention layer's output and, except under sdpa, the attention policy p of the last `rows` query rows
    (Eq. 2), dotted with fixed random weights: a scalar whose backward needs everything the variant keeps.
    Causal, no padding: SDPA and our kernel get no mask (is_causal), eager the additive causal mask `causal`."""
    w_out, w_p = weights
    if variant == "eager_last_layer":
        out, alpha = eager_attention_forward(layer, q, k, v, causal, scaling=layer.scaling)
        p = without_self(alpha[:, :, -rows:].float().mean(1))
    else:
        with capturing() as c:
            out = ral_sdpa(layer, q, k, v, None, scaling=layer.scaling)[0]
        if variant == "sdpa":
            return (out.float() * w_out).sum()
        key = repeat_kv(c["key"], layer.num_key_value_groups) if variant == "capture_repeat_kv" else c["key"]
        p = attention_policy(c["query"], key, c["mask"], rows, c["scaling"])
    return (out.float() * w_out).sum() + (p * w_p).sum()


def bench_layer(seqs, rows, batch, repeats, device="cpu", dtype=torch.float32, shape=LAYER_7B):
    """Per T: bytes saved for backward (machine-independent), median forward + backward time and, on CUDA, the peak
    memory above the inputs, of the four variants at one attention layer of `shape`, interleaved."""
    layer, results = attention_layer(**shape), []
    H, K, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    for T in seqs:
        R = min(rows, T - 1)                                    # the first response row keeps one other key
        g = torch.Generator(device).manual_seed(T)
        leaf = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype).requires_grad_()
        q, k, v = leaf(batch, H, T, d), leaf(batch, K, T, d), leaf(batch, K, T, d)
        weights = (torch.randn(batch, T, H, d, generator=g, device=device), torch.randn(batch, R, T, generator=g,
                                                                                          device=device))
        causal = torch.full((T, T), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]
        inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, causal, *weights)}
        step = lambda variant: layer_loss(layer, q, k, v, R, variant, weights, causal)
        times, peaks = {v: [] for v in LAYER_VARIANTS}, {}
        for rep in range(repeats + 1):                          # repetition 0 is the warm-up
            for variant in (LAYER_VARIANTS if rep % 2 else LAYER_VARIANTS[::-1]):
                q.grad = k.grad = v.grad = None
                if device.startswith("cuda"):
                    sync(), torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                step(variant).backward()
                sync()
                if rep:
                    times[variant].append(time.perf_counter() - t0)
                if device.startswith("cuda"):
                    peaks[variant] = torch.cuda.max_memory_allocated() - base
        for variant in LAYER_VARIANTS:
            results.append(dict(T=T, B=batch, R=R, variant=variant, device=device, dtype=str(dtype).split(".")[-1],
                                time_s=statistics.median(times[variant]),
                                time_vs_sdpa=statistics.median(a / b for a, b in zip(times[variant], times["sdpa"])),
                                saved_bytes=saved_bytes_of(lambda: step(variant), inputs), peak_bytes=peaks.get(variant)))
        sdpa = results[-len(LAYER_VARIANTS)]["saved_bytes"]
        for r in results[-len(LAYER_VARIANTS):]:
            r["saved_beyond_sdpa"] = r["saved_bytes"] - sdpa
        print(f"  layer T={T}: " + ", ".join(f"{r['variant']} {r['time_s']:.3f}s"
                                            for r in results[-len(LAYER_VARIANTS):]), file=sys.stderr)
        del q, k, v, weights, causal
    return results


def bench_step(size, prompts, group, new_tokens, repeats):
    """GRPO vs RAL: the same model, the same prompts and seeds (so the same rollouts), interleaved. Each step
    starts from the same weights and a fresh optimizer. rollout computes old log-probs and old attention for both
    algorithms (the trainer logs where the policy looks), so only the update differs."""
    model, processor = build_tiny(**parse_size(size))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    init = copy.deepcopy(model.state_dict())
    prompts_list = tasks.search_task(prompts, seed=0, tokens=cli.DEFAULTS["task_tokens"])
    times = dict(grpo=[], ral=[])
    for rep in range(repeats + 1):
        for algo in (("grpo", "ral") if rep % 2 else ("ral", "grpo")):
            cfg = dict(cli.DEFAULTS, group_size=group, prompts_per_step=prompts, max_new_tokens=new_tokens)
            loss_fn = ral.rl_loss(cfg["clip_eps"], cfg["beta"], cfg["lambda_attn"] if algo == "ral" else 0.0)
            model.load_state_dict(init)
            optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=cfg["lr"])
            model.eval()
            t0 = time.perf_counter()
            micro_batches, stats, _, phases = ral.rollout(model, ref, processor, prompts_list, cfg, "think", 0, 0,
                                                          "cpu")
            model.train()
            t1 = time.perf_counter()
            ral.update(model, optimizer, micro_batches, loss_fn, cfg["mini_batches"], cfg["epochs"], cfg["grad_clip"],
                       world=1)
            t2 = time.perf_counter()
            if rep:
                tokens = stats["response_len"]
                times[algo].append(dict(generate=phases["generate"], score=phases["score"], update=t2 - t1,
                                        total=t2 - t0, response_tokens=tokens))
    out = dict(size=size, prompts=prompts, group_size=group, max_new_tokens=new_tokens, phases={})
    for phase in ("generate", "score", "update", "total"):
        g, r = ([t[phase] for t in times[a]] for a in ("grpo", "ral"))
        out["phases"][phase] = dict(grpo_s=statistics.median(g), ral_s=statistics.median(r),
                                    ral_vs_grpo=statistics.median(b / a for a, b in zip(g, r)))
    out["response_tokens"] = times["ral"][0]["response_tokens"]
    return out


def bench_rollout(size, prompts, group, new_tokens, repeats, tokens):
    """One RAL step (rollout + update) as before (a generate call per prompt, the vision tower re-encoding the
    image in every forward) and after (one batched generate per step, the tower once per prompt), interleaved, from
    the same weights and seeds, so the same responses: rollout time, generated tokens/s, tower calls, step time."""
    model, processor = build_tiny(**parse_size(size))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    init = copy.deepcopy(model.state_dict())
    calls = []
    for m in (model, ref):
        m.model.visual.register_forward_hook(lambda *args: calls.append(1))
    prompts_list = tasks.search_task(prompts, seed=0, tokens=tokens)
    variants = dict(before=dict(generate_batch=group, vision_cache=False), after=dict(generate_batch=0, vision_cache=True))
    runs = {k: [] for k in variants}
    for rep in range(repeats + 1):
        for name in (("before", "after") if rep % 2 else ("after", "before")):
            cfg = dict(cli.DEFAULTS, group_size=group, max_new_tokens=new_tokens, **variants[name])
            model.load_state_dict(init)
            optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=cfg["lr"])
            calls.clear()
            model.eval()
            t0 = time.perf_counter()
            micro_batches, stats, _, phases = ral.rollout(model, ref, processor, prompts_list, cfg, "think", 0, 0, "cpu")
            model.train()
            ral.update(model, optimizer, micro_batches, ral.rl_loss(cfg["clip_eps"], cfg["beta"], cfg["lambda_attn"]),
                       cfg["mini_batches"], cfg["epochs"], cfg["grad_clip"], world=1)
            if rep:
                runs[name].append(dict(generate_s=phases["generate"], step_s=time.perf_counter() - t0,
                                       tokens_per_s=stats["response_len"] / phases["generate"], tower_calls=len(calls)))
    out = dict(size=size, prompts=prompts, group_size=group, max_new_tokens=new_tokens, visual_tokens=tokens)
    for name in variants:
        out[name] = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
    out["speedup"] = {k: statistics.median(b[k] / a[k] for a, b in zip(runs["after"], runs["before"]))
                      for k in ("generate_s", "step_s")}
    return out


def mib(n):
    return f"{n / 2 ** 20:.1f}"


def print_tables(results):
    if "capture" in results:
        rss = "rss_growth_bytes" in results["capture"][0]
        print("\n### Capture cost: forward + backward, one batch (medians; ratios paired per repetition)\n")
        print("| model | T | B x R | variant | step s | vs sdpa | saved for backward MiB | vs sdpa |"
              + (" peak RSS growth MiB |" if rss else ""))
        print("|---|---|---|---|---|---|---|---|" + ("---|" if rss else ""))
        for r in results["capture"]:
            print(f"| {r['size']} | {r['T']} | {r['B']} x {r['R']} | {r['variant']} | {r['time_s']:.3f} | "
                  f"{r['time_vs_sdpa']:.2f} | {mib(r['saved_bytes'])} | {r['saved_vs_sdpa']:.2f} |"
                  + (f" {mib(r['rss_growth_bytes'])} |" if rss else ""))
    if "layer" in results:
        rows = results["layer"]
        print(f"\n### The capture against the paper's last layer in eager: one attention layer of the 7B's shape "
              f"({LAYER_7B['heads']} query heads, {LAYER_7B['kv_heads']} key heads, head dim {LAYER_7B['head_dim']}), "
              f"forward + backward, {rows[0]['dtype']} on {rows[0]['device']}; saved: the tensors autograd keeps beyond "
              f"the inputs q, k, v; causal, no padding\n")
        cuda = rows[0]["peak_bytes"] is not None
        print("| T | B x R | variant | saved for backward MiB | beyond sdpa MiB | step s | vs sdpa |"
              + (" peak memory MiB |" if cuda else ""))
        print("|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
        for r in rows:
            print(f"| {r['T']} | {r['B']} x {r['R']} | {r['variant']} | {mib(r['saved_bytes'])} | "
                  f"{mib(r['saved_beyond_sdpa'])} | {r['time_s']:.3f} | {r['time_vs_sdpa']:.2f} |"
                  + (f" {mib(r['peak_bytes'])} |" if cuda else ""))
    if "step" in results:
        s = results["step"]
        print(f"\n### One GRPO step vs one RAL step ({s['size']}, {s['prompts']} prompts x {s['group_size']}, "
              f"max {s['max_new_tokens']} new tokens, {s['response_tokens']} response tokens)\n")
        print("| phase | GRPO s | RAL s | RAL / GRPO |\n|---|---|---|---|")
        for phase, p in s["phases"].items():
            print(f"| {phase} | {p['grpo_s']:.3f} | {p['ral_s']:.3f} | {p['ral_vs_grpo']:.2f} |")
    if "rollout" in results:
        r = results["rollout"]
        print(f"\n### Rollouts before vs after ({r['size']}, {r['prompts']} prompts x {r['group_size']}, "
              f"{r['visual_tokens']} visual tokens, max {r['max_new_tokens']} new tokens; one RAL step)\n")
        print("| | rollout s | generated tokens/s | vision-tower calls per step | whole step s |\n|---|---|---|---|---|")
        for name in ("before", "after"):
            v = r[name]
            print(f"| {name} | {v['generate_s']:.3f} | {v['tokens_per_s']:.0f} | {v['tower_calls']:.0f} | "
                  f"{v['step_s']:.3f} |")
        print(f"| before / after | {r['speedup']['generate_s']:.2f} | | | {r['speedup']['step_s']:.2f} |")
    if "memory" in results:
        print_memory_tables(results)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--what", default="capture,layer,step,rollout,memory",
                    help="capture, layer, step, rollout, memory (comma-separated); gpu: the GPU check")
    ap.add_argument("--visual-tokens", type=int, default=64, help="visual tokens per image for the rollout benchmark")
    ap.add_argument("--gpus", type=int, default=8, help="devices for the memory table")
    ap.add_argument("--seq", default="256,1024", help="total sequence lengths T for the capture benchmark")
    ap.add_argument("--sizes", default="4x128x4,8x512x8", help="tiny models as layers x hidden x heads")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rows", type=int, default=128, help="response rows R (at most T/2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the fresh-process peak RSS column")
    ap.add_argument("--layer-seq", default="1024,2048,4096", help="T for the one-layer capture table (--what layer)")
    ap.add_argument("--layer-rows", type=int, default=1024, help="response rows R of the one-layer table")
    ap.add_argument("--step-size", default="4x128x4")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, 0 = torch's default (see the docstring)")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--gpu-out", default="gpu_check.md", help="where --what gpu writes its table")
    ap.add_argument("--_rss", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._rss:
        return _rss_child(args._rss)
    what = args.what.split(",")
    if "gpu" in what:
        if not torch.cuda.is_available():
            print("no CUDA device here: python bench.py --what gpu checks a GPU and needs one")
            return None
        import gpu_check      # the GPU's own checks, beside this file; they use its benchmarks
        return gpu_check.gpu_check(args.gpu_out)
    results = dict(env=dict(torch=torch.__version__, threads=torch.get_num_threads(),
                            load_avg_start=os.getloadavg()[0], cuda=torch.cuda.is_available()))
    if "capture" in what:
        results["capture"] = bench_capture(args.sizes.split(","), [int(s) for s in args.seq.split(",")], args.batch,
                                           args.rows, args.repeats, args.rss)
    if "layer" in what:
        results["layer"] = bench_layer([int(t) for t in args.layer_seq.split(",")], args.layer_rows, 1, args.repeats)
    if "step" in what:
        results["step"] = bench_step(args.step_size, args.prompts, args.group, args.new_tokens, args.repeats)
    if "rollout" in what:
        results["rollout"] = bench_rollout(args.step_size, args.prompts, args.group, args.new_tokens, args.repeats,
                                           args.visual_tokens)
    if "memory" in what:
        results["memory"] = bench_memory(args.gpus)
        results["memory_whole"] = bench_memory_whole(args.gpus)
    results["env"]["load_avg_end"] = os.getloadavg()[0]
    print_tables(results)
    if args.out:
        runs.write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
