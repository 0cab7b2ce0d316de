"""
The checks that need a CUDA GPU, in one command and under 8 minutes: `python bench.py --what gpu` (or `python
gpu_check.py`). Each is a row of one markdown table (gpu_check.md and stdout); every check is wrapped, so a failure
is a row and the others still run. Without CUDA it says so in one line and exits 0.

    the tests with a CUDA path (pytest -m device), on CUDA
    the tiny default with bf16 autocast, plain and with --fsdp=True under a one-rank torchrun (nccl)
    one update micro-batch of a real-geometry model (the 7B's text geometry, depth cut) and its peak memory
    the capture table at the 7B final layer's shape (bench.bench_layer), T = 4096 and 8192, time and peak memory
    rollout tokens/s under FSDP, gathering per token against gathered once
"""
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import ral
from bench import LiveBytes, bench_layer, mib, random_batch
from memory import QWEN25_VL, activation_memory
from model import policy_forward, prepare

# ----------------------------------------------------------------------------------------------------------------
# python bench.py --what gpu: one command that checks a CUDA GPU. Every check is wrapped, so a failure is a row of
# the table and the others still run.

def real_geometry(name="7B", layers=2, device="cuda"):
    """A random Qwen2.5-VL with the released `name` text geometry (attention shape, MLP, vocabulary) cut to `layers`
    decoder layers, a tiny vision tower, bf16 weights as FSDP gathers them on GPU, the capture kernel on."""
    text = dict(QWEN25_VL[name], num_hidden_layers=layers,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])
    config.eos_token_id, config.pad_token_id = 151645, 151643             # the released checkpoints' ids
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    return prepare(model)


def real_geometry_step(name="7B", layers=2, batch=2, seq=9344, rows=1024, device="cuda"):
    """One RL update micro-batch (policy_forward with the capture, Eq. 4's loss, backward) of real_geometry at the
    preset's shape, checkpointing on, a padded batch: the peak CUDA memory above weights and gradients, against
    activation_memory's peak for the cut model, and the measured peak scaled to the full depth (each further layer
    adds its checkpointed input)."""
    model = real_geometry(name, layers, device).train()
    model.activation_checkpointing_enable(dict(use_reentrant=False))
    text = dict(QWEN25_VL[name], num_hidden_layers=layers)
    b = random_batch(text["vocab_size"] - 1000, batch, seq)
    b["attention_mask"][0, :3] = 0
    b = {k: v.to(device) for k, v in b.items()}
    z = lambda *s: torch.zeros(*s, device=device)
    mb = dict(old_logp=z(batch, rows), ref_logp=z(batch, rows), adv=torch.ones(batch, device=device),
              mask=torch.ones(batch, rows, device=device), weight=torch.ones(batch, rows, device=device),
              old_p=torch.full((batch, rows, seq), 1.0 / seq, device=device))
    for w in model.parameters():
        w.grad = torch.zeros_like(w) if w.requires_grad else None
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    base, t0, meter = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter(), LiveBytes()
    with torch.autocast(device.split(":")[0], torch.bfloat16), meter if not cuda else nullcontext():
        logp, p, logprobs = policy_forward(model, b, rows, full=True)         # as ral.rl_loss calls it
        loss, _ = ral.rl_terms(logp, p, logprobs, mb, torch.tensor(float(batch * rows), device=device), 0.2, 0.04,
                               1.0)
        del logprobs
        loss.backward()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base if cuda else meter.peak
    counted = activation_memory(text, batch, seq, rows, 2, True)["peak"]
    full = peak + (QWEN25_VL[name]["num_hidden_layers"] - layers) * batch * seq * text["hidden_size"] * 2
    return (f"{name} geometry, {layers} layers, B {batch} x T {seq} (R {rows}): {time.perf_counter() - t0:.2f} s, "
            f"activation peak {peak / 1e9:.2f} GB (activation_memory counts {counted / 1e9:.2f}: ratio "
            f"{peak / counted:.2f}; the peak also holds weight gradients made in backward, up to V x H bf16 = "
            f"{text['vocab_size'] * text['hidden_size'] * 2 / 1e9:.2f} GB for the head or the embeddings); scaled to "
            f"{QWEN25_VL[name]['num_hidden_layers']} layers {full / 1e9:.2f} GB")


FSDP_GENERATE = """
import contextlib, os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import gpu_check, model as M, scale
from torch.distributed.fsdp import MixedPrecisionPolicy
device = {device!r}
dist.init_process_group("nccl" if device == "cuda" else "gloo")
if device == "cuda":
    torch.cuda.set_device(0)
sync = torch.cuda.synchronize if device == "cuda" else lambda: None
policy = gpu_check.real_geometry("7B", {layers}, device).float().eval()
_, processor = M.build_tiny()
policy.config.eos_token_id = policy.generation_config.eos_token_id = processor.tokenizer.eos_token_id
policy.config.pad_token_id = policy.generation_config.pad_token_id = processor.tokenizer.pad_token_id
scale.shard(policy, 1, device, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
ids = torch.randint(1000, 100000, ({batch}, {prompt}), device=device)
batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
def run(gather_once):     # gathered once: scale.gathered, as rollouts and evaluation run under FSDP
    with scale.gathered(policy) if gather_once else contextlib.nullcontext():
        sync(); t0 = time.perf_counter()
        out, mask = M.generate(policy, processor, batch, {new}, greedy=True)
        sync(); dt = time.perf_counter() - t0
    return mask.sum().item() / dt, out
for warm in (True, False):
    per_token, a = run(False)
    once, b = run(True)
print(f"RESULT per-token gathers {{per_token:.1f}} tokens/s, gathered once {{once:.1f}} tokens/s "
      f"({{once / per_token:.2f}}x), same tokens {{torch.equal(a, b)}}")
dist.barrier()
dist.destroy_process_group()   # torn down before exit: gloo's threads left running abort the process
"""


def gpu_check(out_path, limit_s=460):
    """Runs each check on one CUDA GPU within about limit_s seconds; returns the rows (check, ok, detail) and
    writes them as one markdown table to out_path."""
    root, started, rows = os.path.dirname(os.path.abspath(__file__)), time.time(), []
    tmp = os.path.join(root, "out", "gpu_check")

    def check(name, fn):
        if time.time() - started > limit_s:
            return rows.append((name, "skipped", f"past the {limit_s} s budget"))
        t0 = time.time()
        try:
            rows.append((name, "ok", f"{fn()} ({time.time() - t0:.0f} s)"))
        except Exception as e:                         # one failure is a row; the rest still run
            rows.append((name, "FAILED", f"{type(e).__name__}: {str(e)[-300:]}".replace("|", "/").replace("\n", " ")))
        print(f"  gpu check: {rows[-1][0]}: {rows[-1][1]}", file=sys.stderr)

    def command(args, timeout, env=None):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=root,
                              env=dict(os.environ, OMP_NUM_THREADS="4", **(env or {})))
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")
        return proc.stdout

    def tiny_run(tag, launcher):
        args = ["ral.py", "--sft_steps=100", "--sft_stop=0", "--rl_steps=2", "--prompts_per_step=4", "--eval_n=16",
                f"--out_dir={tmp}/{tag}", f"--warm_dir={tmp}/warm", "--device=auto"]
        command(launcher + args + (["--fsdp=True"] if tag == "fsdp" else []), 240)
        with open(os.path.join(tmp, tag, "metrics.jsonl")) as f:
            last = json.loads(f.readlines()[-1])
        return ", ".join(f"{k} {last[k]:.3g}" for k in ("reward", "accuracy", "kl", "attn_jsd", "grad_norm", "time_step"))

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    device = torch.cuda.get_device_name(0)
    check("tests with a CUDA path (pytest -m device, RAL_TEST_DEVICE=cuda)", lambda: command(
        [sys.executable, "-m", "pytest", "-q", "-m", "device", "tests"], 240,
        dict(RAL_TEST_DEVICE="cuda")).strip().splitlines()[-1])
    check("tiny default, bf16 autocast (python ral.py, small settings)", lambda: tiny_run("plain", [sys.executable]))
    check("tiny default, --fsdp=True, one-rank torchrun (nccl)", lambda: tiny_run("fsdp", torchrun))
    check("one RL update micro-batch, 7B geometry cut to 2 layers, peak memory", real_geometry_step)
    for T in (4096, 8192):
        check(f"capture at the 7B final layer, T = {T}, bf16: ours / last layer eager / sdpa", lambda: "; ".join(
            f"{r['variant']} {r['time_s'] * 1e3:.1f} ms, peak {mib(r['peak_bytes'])} MiB, saved "
            f"{mib(r['saved_bytes'])} MiB" for r in bench_layer([T], 1024, 1, 3, "cuda", torch.bfloat16)))
    script = os.path.join(tmp, "fsdp_generate.py")
    os.makedirs(tmp, exist_ok=True)
    with open(script, "w") as f:
        f.write(FSDP_GENERATE.format(root=root, layers=4, batch=8, prompt=512, new=128, device="cuda"))
    check("rollout tokens/s under FSDP (one rank, 7B geometry cut to 4 layers, 8 x 512 prompt, 128 new tokens): "
          "per-token gathers vs gathered once (FSDP2's unshard/reshard)",
          lambda: command(torchrun + [script], 240).split("RESULT ")[-1].strip())
    table = [f"### GPU check: {device}, torch {torch.__version__}, {time.time() - started:.0f} s\n",
             "| check | result | detail |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print("\n".join(table))
    with open(out_path, "w") as f:
        f.write("\n".join(table) + "\n")
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device here: python bench.py --what gpu checks a GPU and needs one")
    else:
        gpu_check("gpu_check.md")
