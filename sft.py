"""
Stage 1, the supervised warm start (the paper's SFT): the rationale + answer learned by next-token loss on the same
forward as RL, and the folder RL starts from, named by its recipe.

    warm_start(cfg, sft_samples, mode, device, rank, world) -> the folder RL starts from (made once per recipe)
    sft(model, processor, samples, cfg, mode, ...)          -> the supervised steps, with an early stop
    sampled_accuracy(model, processor, samples, cfg, ...)   -> what RL will see: accuracy of sampled responses

ral.py runs it before RL; the options are ral.py's (sft_*). A warm start is a function of its recipe, so a run
that finds one reuses it, and one that finds a partial SFT checkpoint of its recipe continues it exactly.
"""
import hashlib
import inspect
import json
import math
import os
import shutil
from contextlib import nullcontext

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import data
import runs
import tasks
from cli import UsageError
from data import seed_for
from tasks import offline_stream
from model import append_responses, build_tiny, end_ids, generate, load, masked_sum, policy_forward, to_device
from scale import compute, gathered, load_optimizer, load_trainer_state, newest_checkpoint, save_checkpoint, wrap

VAL_SEED = 20_000     # the early stop's validation draws: neither the held-out seed nor the streams' (data.py)


def sampled_accuracy(model, processor, samples, cfg, mode, check, reward_fn=data.reward):
    """Accuracy of one response per sample drawn as RL draws them (temperature, seeded per sample and check). The
    greedy accuracy of a half-trained model can sit far above what it samples (a flat answer distribution whose
    argmax happens to be right), and RL learns from what it samples. reward_fn scores, as in RL."""
    hits = []
    for i in range(0, len(samples), 16):
        chunk = samples[i:i + 16]
        batch, _ = data.encode(chunk, processor, mode)
        seeds = [seed_for(cfg["seed"], 2, check, i + k) for k in range(len(chunk))]
        response, _ = generate(model, processor, to_device(batch, model.device), cfg["max_new_tokens"],
                               cfg["temperature"], seeds=seeds)
        texts = processor.tokenizer.batch_decode(response, skip_special_tokens=True)
        hits += [reward_fn(t, s, mode)["accuracy"] for t, s in zip(texts, chunk)]
    return sum(hits) / len(hits)


def validation_split(samples, n):
    """The early stop's validation set for a data file (--sft_file): min(n, 10% of the file, at least 1) records,
    chosen by a fixed seed (the same for every run seed, so seeds compare on one slice), held out of training.
    Returns (train, validation)."""
    if len(samples) < 2:
        raise UsageError(f"--sft_stop > 0 holds out part of --sft_file for its early stop, but the file has "
                         f"{len(samples)} record: give more, or --sft_stop=0")
    k = min(n, max(1, len(samples) // 10))
    held = set(torch.randperm(len(samples), generator=torch.Generator().manual_seed(VAL_SEED))[:k].tolist())
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def sft(model, processor, samples, cfg, mode, device, rank=0, world=1, ckpt=None, state=None, reward_fn=data.reward):
    """Supervised steps on the rationale + answer (samples; None: the offline task's endless stream). With
    sft_stop, stops at the first validation check that samples at least that accuracy (then, with sft_cooldown,
    that many more steps at a rate falling linearly to zero): on sft_val_n draws of the
    offline task with their own seed, or, with --sft_file, on validation_split's slice of the file, never trained
    on. Returns the log of checks.
    ckpt: where to checkpoint every sft_ckpt_every steps; state: the trainer state of one to continue from (the
    model already holds its weights). reward_fn scores the stop's samples."""
    tok = processor.tokenizer
    raw = getattr(model, "module", model)     # DDP's replica (FSDP shards in place)
    tower = {id(w) for w in raw.model.visual.parameters()}
    params = [w for w in model.parameters() if w.requires_grad]
    # the tower (trained only with --sft_tower_lr) has its own peak rate, on the same schedule
    groups = [dict(params=[w for w in params if id(w) not in tower], peak=cfg["sft_lr"]),
              dict(params=[w for w in params if id(w) in tower], peak=cfg["sft_tower_lr"])]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["sft_lr"], weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(cfg["seed"])
    per_rank = max(1, cfg["sft_batch"] // world)
    stream = offline_stream(cfg, 0) if samples is None else None
    val = None
    if cfg["sft_stop"] and cfg["sft_file"]:
        samples, val = validation_split(samples, cfg["sft_val_n"])
        if rank == 0:
            print(f"sft: {len(val)} of the {len(samples) + len(val)} records of {cfg['sft_file']} held out for the "
                  f"early stop (never trained on)")
    elif cfg["sft_stop"]:
        val = tasks.TASKS[cfg["task"]]["make"](cfg["sft_val_n"], VAL_SEED, tasks.task_options(cfg["task"], cfg),
                                              os.path.join(cfg["out_dir"], "media"))
    log, first = dict(steps=cfg["sft_steps"], checks=[]), 0
    if state:   # everything else SFT draws is a function of the step (lr, stream, validation seeds)
        load_optimizer(raw, opt, state["optimizer"], cfg["fsdp"])
        g.set_state(state["sampler"])
        first, log = state["step"], json.loads(state["log"])
    bar = tqdm(range(first, cfg["sft_steps"]), desc="sft", disable=rank != 0, initial=first, total=cfg["sft_steps"])
    for step in bar:
        if step == log["steps"]:      # the cooldown after the stop is done
            break
        if val and "stopped_at" not in log and step and step % cfg["sft_val_every"] == 0:   # same on every rank
            raw.eval()
            with gathered(raw):     # FSDP: the weights gathered once for the check's generates, not per token
                accuracy = sampled_accuracy(raw, processor, val, cfg, mode, step, reward_fn)
            raw.train()
            log["checks"].append(dict(step=step, sampled_accuracy=accuracy))
            if rank == 0:
                bar.write(f"sft: step {step}, sampled validation accuracy {accuracy:.3f} (stop at {cfg['sft_stop']})")
            if accuracy >= cfg["sft_stop"]:
                log["stopped_at"], log["steps"] = step, min(cfg["sft_steps"], step + cfg["sft_cooldown"])
                if step == log["steps"]:
                    break
                bar.total = log["steps"]
        # each lr step: linear warmup then cosine decay, so the small model settles; after a stop, the cooldown
        # takes it linearly to zero (at the peak rate a half-trained model's greedy answer swings by tens of points
        # from one check to the next: docs/study/issue20.md, section 8)
        scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg["sft_steps"]))
        if "stopped_at" in log:
            scale *= (log["steps"] - step) / (log["steps"] - log["stopped_at"])
        for group in opt.param_groups:
            group["lr"] = group["peak"] * scale
        if stream:
            chosen = stream(step * per_rank * world + rank * per_rank, per_rank)
        else:
            idx = torch.randint(len(samples), (per_rank * world,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
            chosen = [samples[i] for i in idx]
        targets = [tok(data.sft_target(s, mode), add_special_tokens=False)["input_ids"] + end_ids(raw)[:1]
                   for s in chosen]   # the checkpoint's own end of a turn (Qwen2.5-VL Instruct: <|im_end|>)
        # the token mean over the whole global batch: the same objective for any ranks and micro-batches
        n_tokens = torch.tensor(float(sum(map(len, targets))), device=device)
        if world > 1:
            dist.all_reduce(n_tokens)
        opt.zero_grad(set_to_none=True)
        size, loss = cfg["micro_batch"] or len(chosen), 0.0
        for i in range(0, len(chosen), size):
            batch, _ = data.encode(chosen[i:i + size], processor, mode)
            full, mask = append_responses(to_device(batch, device), targets[i:i + size], tok.pad_token_id)
            sync = i + size >= len(chosen) or world == 1
            with nullcontext() if sync else getattr(model, "no_sync", nullcontext)(), compute(cfg, device):
                logp, _ = policy_forward(model, full, mask.shape[1], attention=False)
                part = masked_sum(-logp, mask.to(logp.device)) / n_tokens
                (part * world).backward()        # DDP averages gradients over ranks; the loss is a global sum
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        bar.set_postfix(loss=f"{loss:.3f}")
        if ckpt and cfg["sft_ckpt_every"] and (step + 1) % cfg["sft_ckpt_every"] == 0 and step + 1 < log["steps"]:
            save_checkpoint(ckpt, raw, processor, opt, dict(stage="sft", step=step + 1, sampler=g.get_state(),
                                                            log=json.dumps(log),
                                                            recipe=json.dumps(warm_recipe(cfg, reward_fn))),
                            rank)
    if rank == 0 and cfg["sft_stop"]:
        stopped = f"did not reach it in {log['steps']} steps" if "stopped_at" not in log else \
            f"stopped at step {log['stopped_at']}" + (f", cooled down to step {log['steps']}"
                                                      if log["steps"] > log["stopped_at"] else "")
        print(f"sft: sampled validation accuracy {log['checks'][-1]['sampled_accuracy'] if log['checks'] else 0:.3f}"
              f" (target {cfg['sft_stop']}), {stopped}")
    return log


# Every option that changes what SFT produces; with the task's own options (tasks.TASKS), the data file's
# content and the code (code_hash), they name the warm start.
WARM_KEYS = ("init_from", "tiny_layers", "tiny_hidden", "zero", "task", "sft_size", "sft_file", "sft_steps",
             "sft_batch", "sft_lr", "sft_tower_lr", "sft_stop", "weight_decay", "grad_clip", "seed", "dtype",
             "compute_dtype")
STOP_KEYS = ("sft_val_every", "sft_val_n", "sft_cooldown", "temperature", "max_new_tokens")   # only with sft_stop


# The code SFT's result depends on: the offline tasks (tasks.py), data sets, prompts and batches (data.py), the model
# and its forward (model.py), SFT itself (this file), autocast and the DDP/FSDP wrapper (scale.py). An edit to any of them, or another torch or
# transformers, names another warm start: a stale one is never reused. Whole files, not single functions: an
# edit that cannot change SFT (a docstring, the JSONL loader) costs one SFT run, a missed dependency would cost
# a silently wrong warm start.
CODE_FILES = ("tasks.py", "data.py", "model.py", "sft.py", "scale.py")


def code_hash(files=CODE_FILES, root=os.path.dirname(os.path.abspath(__file__))):
    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for name in files:
        with open(os.path.join(root, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def reward_name(reward_fn):
    """A custom reward as the recipe names it: module.function and, where Python can read it, its source's hash."""
    try:
        source = hashlib.sha256(inspect.getsource(reward_fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        source = "no source"
    return f"{reward_fn.__module__}.{reward_fn.__qualname__} ({source})"


def warm_recipe(cfg, reward_fn=data.reward):
    recipe = {k: cfg[k] for k in WARM_KEYS + (STOP_KEYS if cfg["sft_stop"] else ())}
    recipe["code_sha256"] = code_hash()
    if cfg["sft_stop"] and reward_fn is not data.reward:   # the stop scores its samples with it
        recipe["reward"] = reward_name(reward_fn)
    recipe.update(tasks.task_options(cfg["task"], cfg))
    if cfg["sft_file"]:
        with open(cfg["sft_file"], "rb") as f:
            recipe["sft_file_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return recipe


def warm_path(cfg, recipe):
    """Beside out_dir, so runs that differ only in RL share it: a readable name plus a hash of the whole recipe."""
    base = f"tiny{cfg['tiny_layers']}x{cfg['tiny_hidden']}" if cfg["init_from"] == "tiny" else \
        os.path.basename(cfg["init_from"].rstrip("/"))
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(os.path.dirname(cfg["out_dir"].rstrip("/")) or ".",
                        f"warm-{base}-{'zero' if cfg['zero'] else 'think'}-sft{cfg['sft_steps']}-s{cfg['seed']}-{key}")


def warm_start(cfg, sft_samples, mode, device, rank, world, reward_fn=data.reward):
    """The RL starting point, as a folder: the SFT checkpoint of this recipe if it exists, else build or load the
    model, run SFT (sft_steps > 0) and save it there with its recipe. A real checkpoint with sft_steps=0 is used
    as it is. SFT checkpoints into path.partial (no config.json at path until SFT is done) and continues from one
    of the same recipe by itself: SFT is a function of its recipe, so continuing gives what starting over would."""
    if cfg["init_from"] != "tiny" and cfg["sft_steps"] == 0:
        return cfg["init_from"]
    recipe = warm_recipe(cfg, reward_fn)
    path = cfg["warm_dir"] or warm_path(cfg, recipe)
    if os.path.exists(os.path.join(path, "config.json")):
        saved = runs.read_json(os.path.join(path, "recipe.json"))
        if cfg["warm_dir"] and saved and saved != recipe:
            changed = sorted(k for k in recipe if saved.get(k) != recipe[k])
            raise UsageError(f"--warm_dir={path} holds a warm start of another recipe (differs in {changed})")
        if rank == 0:
            print(f"reusing the warm start {path}: same recipe ({', '.join(f'{k}={v}' for k, v in recipe.items())})")
        return path
    partial, state = path + ".partial", None
    if cfg["sft_steps"] and newest_checkpoint(partial, rank, world):
        state = load_trainer_state(partial, rank, cfg["fsdp"])
        state = state if json.loads(state["recipe"]) == recipe else None      # another recipe's: start over
        if rank == 0:
            print(f"continuing SFT from {partial} at step {state['step']}" if state else f"ignoring {partial}: "
                  "another recipe's")
    dtype = torch.float32 if cfg["init_from"] == "tiny" else getattr(torch, cfg["dtype"])     # as build_tiny's
    place = "cpu" if cfg["fsdp"] else device     # FSDP: to the device shard by shard (scale.shard)
    if state:
        model, processor = load(partial, place, dtype)
    elif cfg["init_from"] == "tiny":
        model, processor = build_tiny(layers=cfg["tiny_layers"], hidden=cfg["tiny_hidden"], seed=cfg["seed"])
        model.to(place)
    else:
        model, processor = load(cfg["init_from"], place, dtype)
    if cfg["sft_steps"]:
        model.model.visual.requires_grad_(cfg["sft_tower_lr"] > 0)    # prepare froze it; RL's load freezes it again
        if cfg["grad_checkpointing"]:
            model.activation_checkpointing_enable(dict(use_reentrant=False))
        model = wrap(model, cfg, world, device)
        log = sft(model, processor, sft_samples, cfg, mode, device, rank, world, partial, state, reward_fn)
        model = getattr(model, "module", model)     # DDP's replica (FSDP shards in place)
    save_checkpoint(path, model, processor, None, dict(stage="sft"), rank)
    if rank == 0:
        runs.write_json(recipe, os.path.join(path, "recipe.json"))
        if cfg["sft_steps"]:
            runs.write_json(log, os.path.join(path, "sft_log.json"))
        for folder in (partial, partial + ".tmp", partial + ".old"):
            shutil.rmtree(folder, ignore_errors=True)
        print(f"warm start saved to {path}")
    if world > 1:
        dist.barrier()
    return path
