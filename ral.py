"""
Reinforced Attention Learning: GRPO on tokens plus an advantage-weighted JSD on the final layer's attention.

    python ral.py                                   # tiny offline default: SFT warm start, then RL, on CPU
    python ral.py config/qwen7b_8gpu.py --algo=grpo # a preset, then overrides
    torchrun --nproc_per_node=8 ral.py config/qwen7b_8gpu.py

The math (jsd, group_advantages, token_loss, attention_loss) is pure functions at the top; importing this file
starts nothing.
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------
# The objective (PAPER.md, Eq. 1-4 and 8)


def jsd(p, q):
    """Jensen-Shannon divergence over the last dim, natural log: 0 <= JSD <= ln 2. Exact with zeros (0 log 0 = 0):
    the log's argument is made safe where p (or q) is 0, so neither value nor gradient sees a log 0."""
    m = 0.5 * (p + q)

    def kl_to_m(x):
        safe = torch.where(x > 0, x / torch.where(m > 0, m, 1.0), 1.0)
        return torch.where(x > 0, x * torch.log(safe), 0.0).sum(-1)

    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


def group_advantages(rewards, group_size, eps=1e-6):
    """Eq. 8: A_i = (r_i - mean) / (std + eps) within each group of G consecutive responses. A group whose rewards
    are all equal gets exactly zero (no spread, no signal)."""
    r = rewards.float().view(-1, group_size)
    spread = r.max(1, keepdim=True).values > r.min(1, keepdim=True).values
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return torch.where(spread, adv, 0.0).view(-1)


def token_loss(logp, old_logp, ref_logp, adv, mask, n_tokens, clip_eps=0.2, beta=0.04):
    """Eq. 1 as a loss: -clipped surrogate + beta * KL_k3(pi || ref), summed over response tokens and divided by
    n_tokens, the response-token count of the whole optimizer step (so micro-batching does not change it).
    Returns the loss and per-token stats (clip indicator, k3 KL) for logging."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1                 # k3 estimator, >= 0
    loss = ((-surrogate + beta * kl) * mask).sum() / n_tokens
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, clipped, kl


def attention_loss(p, p_old, adv, mask, n_tokens):
    """Eq. 3: A_t * JSD(p_theta^t || p_old^t), summed over response tokens / n_tokens. p_old is a constant.
    Minimizing it pulls the attention toward the rollout's when A > 0 and pushes it away when A < 0."""
    d = jsd(p, p_old.detach())
    return (adv[:, None] * d * mask).sum() / n_tokens, d


# ----------------------------------------------------------------------------------------------------------------
# Configuration, nanoGPT style: defaults here, then a config file (python) and --key=value overrides.

DEFAULTS = dict(
    out_dir="out/ral",
    init_from="tiny",          # "tiny" (built offline), a save_pretrained folder, or a hub id
    tiny_layers=4, tiny_hidden=128,
    algo="ral",                # "grpo" (lambda_attn ignored, = 0) or "ral" (Eq. 4)
    zero=False,                # RAL-zero / GRPO-zero: no thinking block in SFT or RL, answer-only format reward
    task="search",             # offline task when no files are given: "search" or "video"
    task_tokens=16,            # visual tokens per image (search) or per frame (video)
    task_frames=8,
    train_size=2048,           # offline prompts generated for SFT and RL
    sft_file="", train_file="", eval_file="",   # data sets in data.py's (Video-R1) layout replace the tasks
    # stage 1: supervised warm start (the paper's SFT); reused when its checkpoint exists
    sft_steps=1500, sft_batch=16, sft_lr=2e-3, warm_dir="",   # "" -> out/warm-<task>-<mode>-s<seed>
    # stage 2: RL
    rl_steps=60, prompts_per_step=8, group_size=8, max_new_tokens=48, temperature=1.0,
    lr=5e-5, weight_decay=0.0, grad_clip=1.0,
    clip_eps=0.2, beta=0.04, lambda_attn=1.0,
    mini_batches=2, epochs=1,  # optimizer steps per rollout = mini_batches * epochs (>= 2, see PAPER.md)
    micro_batch=0,             # sequences per forward; 0 = a whole group
    eval_n=128, eval_every=0, ckpt_every=20, log_samples=2,
    seed=0, device="auto", dtype="auto",   # auto: bf16 weights on GPU, fp32 on CPU; GPU forwards also autocast bf16
    grad_checkpointing=False, resume=False,
)


def configure(defaults, argv):
    """Resolve a config: defaults, then any config/*.py file (plain assignments), then --key=value."""
    import ast
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            scope = {}
            exec(open(arg).read(), {}, scope)
            unknown = set(scope) - set(cfg)
            if unknown:
                raise ValueError(f"{arg}: unknown config keys {sorted(unknown)}")
            cfg.update(scope)
            continue
        key, _, value = arg[2:].partition("=")
        if key not in cfg:
            raise ValueError(f"unknown option --{key} (known: {', '.join(sorted(cfg))})")
        try:
            value = ast.literal_eval(value)              # numbers, True/False, lists; otherwise a plain string
        except (ValueError, SyntaxError):
            pass
        if not isinstance(value, type(cfg[key])) and not (isinstance(cfg[key], float) and type(value) is int):
            raise ValueError(f"--{key}: expected {type(cfg[key]).__name__}, got {value!r}")
        cfg[key] = value
    if cfg["algo"] not in ("grpo", "ral"):
        raise ValueError(f"--algo must be grpo or ral, got {cfg['algo']!r}")
    if not 1 <= cfg["mini_batches"] <= cfg["group_size"]:
        raise ValueError("mini_batches must be between 1 and group_size: each mini-batch takes a slice of every group")
    if cfg["mini_batches"] * cfg["epochs"] < 2 and cfg["algo"] == "ral":
        print("warning: one optimizer step per rollout: the attention term has zero gradient (RAL == GRPO)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Batches: a group's sequences, sliced for mini- and micro-batches

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def take_rows(batch, i, j):
    """Sequences i..j-1 of a group (G sequences sharing one prompt); the visual tensors hold the same number of
    rows for every sequence, so they slice evenly."""
    n = batch["input_ids"].shape[0]
    return {k: v[i * (len(v) // n):j * (len(v) // n)] if k in VISUAL_KEYS else v[i:j] for k, v in batch.items()}


def seed_for(*parts):
    """A deterministic seed from (seed, step, group): the rollout does not depend on rank count or resumption."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 62)
    return h


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: supervised warm start (the paper's SFT), on the same forward as RL.

def sft(model, processor, samples, cfg, mode, device, rank=0, world=1):
    import data
    from model import append_responses, policy_forward, to_device
    from tqdm import tqdm
    tok = processor.tokenizer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["sft_lr"], weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(cfg["seed"])
    per_rank = max(1, cfg["sft_batch"] // world)
    bar = tqdm(range(cfg["sft_steps"]), desc="sft", disable=rank != 0)
    for step in bar:
        # each lr step: linear warmup then cosine decay, so the small model settles
        lr = cfg["sft_lr"] * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / cfg["sft_steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(samples), (per_rank * world,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        chosen = [samples[i] for i in idx]
        batch = data.encode(chosen, processor, mode)
        batch.pop("visual_mask"), batch.pop("target_mask")
        targets = [tok(data.sft_target(s, mode), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for s in chosen]
        full, mask = append_responses(to_device(batch, device), targets, tok.pad_token_id)
        logp, _ = policy_forward(model, full, mask.shape[1], attention=False)
        mask = mask.to(logp.device)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: RL. A rollout is a list of pieces (a few sequences of one group) with everything the update needs.

@torch.no_grad()
def rollout(model, ref_model, processor, prompts, cfg, mode, step, first_group, device):
    """Per prompt: G responses by KV-cache sampling, rewards, Eq. 8 advantages, then old log-probs and old
    attention from the training model's own forward and reference log-probs from the frozen initial model."""
    import data
    from model import generate, policy_forward, to_device, with_responses
    G, tok = cfg["group_size"], processor.tokenizer
    pieces, stats, samples_log, times = [], [], [], dict(generate=0.0, score=0.0)
    for k, sample in enumerate(prompts):
        t0 = time.time()
        torch.manual_seed(seed_for(cfg["seed"], step, first_group + k))
        batch = data.encode([sample] * G, processor, mode)
        visual, target = batch.pop("visual_mask"), batch.pop("target_mask")
        batch = to_device(batch, device)
        response, response_mask = generate(model, processor, batch, cfg["max_new_tokens"], cfg["temperature"])
        texts = tok.batch_decode(response, skip_special_tokens=True)
        scores = [data.reward(t, sample, mode) for t in texts]
        rewards = torch.tensor([s["reward"] for s in scores])
        adv = group_advantages(rewards, G).to(device)
        t1 = time.time()
        full = with_responses(batch, response, response_mask)
        P = batch["input_ids"].shape[1]
        # mini-batch k takes the k-th slice of every group, so its contents do not depend on how groups are spread
        # over ranks; micro_batch splits a slice further to bound memory
        chunk = math.ceil(G / cfg["mini_batches"])
        for mb, first in enumerate(range(0, G, chunk)):
            for i in range(first, min(first + chunk, G), cfg["micro_batch"] or chunk):
                j = min(i + (cfg["micro_batch"] or chunk), first + chunk, G)
                piece, R = take_rows(full, i, j), response.shape[1]
                logp, p = policy_forward(model, piece, R)
                ref_logp = policy_forward(ref_model, piece, R, attention=False)[0] if cfg["beta"] > 0 else logp
                mask, vis, tgt = response_mask[i:j].float(), visual[i:j].to(p), target[i:j].to(p)
                pieces.append(dict(batch=piece, R=R, mask=mask, adv=adv[i:j], old_logp=logp, old_p=p,
                                   ref_logp=ref_logp, mb=mb))
                # where the rollout policy looks (response rows, over the prompt's visual and target tokens)
                entropy = -(torch.where(p > 0, p * p.clamp_min(1e-30).log(), 0.0)).sum(-1)
                stats.append(dict(tokens=mask.sum().item(), attn_entropy=(entropy * mask).sum().item(),
                                  attn_visual=((p[..., :P] * vis[:, None]).sum(-1) * mask).sum().item(),
                                  attn_target=((p[..., :P] * tgt[:, None]).sum(-1) * mask).sum().item()))
        stats.append(dict(reward=rewards.sum().item(), accuracy=sum(s["accuracy"] for s in scores),
                          format=sum(s["format"] for s in scores), responses=G,
                          no_spread=float(bool((rewards == rewards[0]).all())), groups=1,
                          response_len=response_mask.sum().item()))
        samples_log.append(dict(step=step + 1, question=sample["question"], answer=sample["answer"],
                                responses=texts[:cfg["log_samples"]], rewards=rewards[:cfg["log_samples"]].tolist()))
        times["generate"] += t1 - t0
        times["score"] += time.time() - t1
    return pieces, stats, samples_log, times


def rl_terms(logp, p, piece, cfg, n_tokens):
    """Eq. 4 on one piece, from the forward's log-probs and attention: -clipped surrogate + beta KL + lambda A JSD.
    Returns the loss and per-token sums for logging."""
    lam = cfg["lambda_attn"] if cfg["algo"] == "ral" else 0.0
    m = piece["mask"]
    loss, clipped, kl = token_loss(logp, piece["old_logp"], piece["ref_logp"], piece["adv"], m, n_tokens,
                                   cfg["clip_eps"], cfg["beta"])
    stats = dict(kl=(kl * m).sum().item(), clip=(clipped * m).sum().item(), update_tokens=m.sum().item(),
                 attn_jsd=0.0)
    if lam > 0:
        attn, d = attention_loss(p, piece["old_p"], piece["adv"], m, n_tokens)
        loss = loss + lam * attn
        stats["attn_jsd"] = (d * m).sum().item()
    return loss, stats


def rl_loss(model, piece, cfg, n_tokens):
    """One piece's forward and its Eq. 4 loss (the default `piece_loss` of update)."""
    from model import policy_forward
    attention = cfg["algo"] == "ral" and cfg["lambda_attn"] > 0
    logp, p = policy_forward(model, piece["batch"], piece["R"], attention=attention)
    return rl_terms(logp, p, piece, cfg, n_tokens)


def update(model, optimizer, pieces, cfg, world, piece_loss=rl_loss):
    """mini_batches x epochs optimizer steps over one rollout: -clipped surrogate + beta KL + lambda A JSD (Eq. 4),
    each a token mean over the global response-token count of its mini-batch. `piece_loss(model, piece, cfg,
    n_tokens) -> (loss, stats)` is the per-piece objective (distill.py passes Eq. 6)."""
    params = [p for p in model.parameters() if p.requires_grad]
    stats = []
    for _ in range(cfg["epochs"]):
        for mb in [[p for p in pieces if p["mb"] == k] for k in range(cfg["mini_batches"])]:
            n_tokens = torch.tensor(float(sum(p["mask"].sum() for p in mb)), device=mb[0]["mask"].device)
            if world > 1:
                dist.all_reduce(n_tokens)
            optimizer.zero_grad(set_to_none=True)
            for j, piece in enumerate(mb):
                sync = j == len(mb) - 1 or world == 1
                with nullcontext() if sync else model.no_sync():
                    loss, s = piece_loss(model, piece, cfg, n_tokens)
                    (loss * world).backward()     # DDP averages gradients over ranks; the loss is a global sum
                stats.append(dict(s, loss=loss.item() * n_tokens.item()))
            stats.append(dict(grad_norm=torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]).item(), opt_steps=1))
            optimizer.step()
    return stats


def reduce_stats(stats, world, device, per_token=()):
    """Sum every stat over pieces and ranks, then turn sums into means per token / response / group. `per_token`:
    extra keys (sums over update tokens) to report as token means."""
    keys = sorted({k for s in stats for k in s})
    totals = torch.tensor([sum(s.get(k, 0.0) for s in stats) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    out = {k: t[k] / t["responses"] for k in ("reward", "accuracy", "format", "response_len")}
    out.update({k: t[k] / t["tokens"] for k in ("attn_entropy", "attn_visual", "attn_target")})
    out.update({k: t[k] / t["update_tokens"] for k in ("kl", "clip", "attn_jsd", "loss", *per_token)})
    out["no_spread_groups"] = t["no_spread"] / t["groups"]
    out["grad_norm"] = t["grad_norm"] / t["opt_steps"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a save_pretrained folder plus trainer_state.pt, swapped in atomically.

def save_checkpoint(path, model, processor, optimizer, state):
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(state, optimizer=optimizer.state_dict() if optimizer else None, rng=rng),
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The trainer

def setup_distributed(cfg):
    """torchrun sets RANK: then one process per device, gloo on CPU, nccl on GPU. Otherwise a single process."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = cfg["device"]
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return rank, world, device


def load_samples(cfg):
    """SFT, RL and held-out samples: data sets in data.py's layout, or the offline task."""
    import data
    import eval as evaluation
    if cfg["task"] == "search":
        offline = data.search_task(cfg["train_size"], seed=cfg["seed"], tokens=cfg["task_tokens"])
        suite = f"search-{cfg['task_tokens']}"
    elif cfg["task"] == "video":
        folder = os.path.join(cfg["out_dir"], "videos")
        offline = data.video_task(cfg["train_size"], seed=cfg["seed"], frames=cfg["task_frames"], folder=folder,
                                  tokens_per_frame=cfg["task_tokens"])
        suite = f"video-{cfg['task_frames']}x{cfg['task_tokens']}"
    else:
        raise ValueError(f"--task must be search or video, got {cfg['task']!r}")
    sft_samples = data.load_dataset(cfg["sft_file"]) if cfg["sft_file"] else offline
    train = data.load_dataset(cfg["train_file"]) if cfg["train_file"] else offline
    held_out = data.load_dataset(cfg["eval_file"])[:cfg["eval_n"] or None] if cfg["eval_file"] else \
        evaluation.suite(suite, n=cfg["eval_n"]) if cfg["eval_n"] else []
    return sft_samples, train, held_out


def warm_path(cfg):
    """Where the warm start of this recipe lives, beside out_dir: runs that differ only in RL reuse it."""
    base = f"tiny{cfg['tiny_layers']}x{cfg['tiny_hidden']}" if cfg["init_from"] == "tiny" else \
        os.path.basename(cfg["init_from"].rstrip("/"))
    data_tag = os.path.basename(cfg["sft_file"]) if cfg["sft_file"] else f"{cfg['task']}{cfg['task_tokens']}"
    return os.path.join(os.path.dirname(cfg["out_dir"].rstrip("/")) or ".", f"warm-{base}-{data_tag}-"
                        f"{'zero' if cfg['zero'] else 'think'}-sft{cfg['sft_steps']}-s{cfg['seed']}")


def warm_start(cfg, sft_samples, mode, device, rank, world):
    """The RL starting point, as a folder: the SFT checkpoint if it exists, else build or load the model, run SFT
    (sft_steps > 0) and save it there. A real checkpoint with sft_steps=0 is used as it is."""
    from model import build_tiny, load
    if cfg["init_from"] != "tiny" and cfg["sft_steps"] == 0:
        return cfg["init_from"]
    path = cfg["warm_dir"] or warm_path(cfg)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if cfg["init_from"] == "tiny":
        model, processor = build_tiny(layers=cfg["tiny_layers"], hidden=cfg["tiny_hidden"], seed=cfg["seed"])
        model.to(device)
    else:
        model, processor = load(cfg["init_from"], device)
    if cfg["sft_steps"]:
        sft(torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model, processor,
            sft_samples, cfg, mode, device, rank, world)
    if rank == 0:
        save_checkpoint(path, model, processor, None, dict(stage="sft"))
        print(f"warm start saved to {path}")
    if world > 1:
        dist.barrier()
    return path


def main(argv, defaults=DEFAULTS, setup=None):
    """The RL run. distill.py reuses it: `defaults` adds its options and `setup(cfg, sft_samples, mode, device,
    rank, world)` returns dict(start=the student's starting folder, piece_loss=its objective for update,
    stats=extra per-token metric keys, name=the run's label); the default is the warm start and Eq. 4."""
    import eval as evaluation
    from model import load
    from tqdm import tqdm
    cfg = configure(defaults, argv)
    rank, world, device = setup_distributed(cfg)
    if cfg["prompts_per_step"] % world:
        raise ValueError(f"prompts_per_step={cfg['prompts_per_step']} must divide among {world} ranks")
    mode = "zero" if cfg["zero"] else "think"
    out = cfg["out_dir"]
    torch.manual_seed(cfg["seed"] + rank)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        json.dump(cfg, open(os.path.join(out, "config.json.tmp"), "w"), indent=1)
        os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "run_config.json"))
    t_start = time.time()

    sft_samples, train, held_out = load_samples(cfg)
    hooks = setup(cfg, sft_samples, mode, device, rank, world) if setup else \
        dict(start=warm_start(cfg, sft_samples, mode, device, rank, world))
    start, name = hooks["start"], hooks.get("name", cfg["algo"] + ("-zero" if cfg["zero"] else ""))
    ckpt = os.path.join(out, "ckpt")
    resume = cfg["resume"] and os.path.exists(os.path.join(ckpt, "trainer_state.pt"))
    dtype = None if cfg["dtype"] == "auto" else getattr(torch, cfg["dtype"])
    model, processor = load(ckpt if resume else start, device, dtype)
    ref_model = load(start, device, dtype)[0].eval().requires_grad_(False) if cfg["beta"] > 0 else None
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else nullcontext()
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(dict(use_reentrant=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, results = 0, {}
    if resume:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        step, results = state["step"], json.loads(state["results"])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def evaluate(tag):
        if rank == 0 and held_out:
            r = evaluation.evaluate(model, processor, held_out, mode=mode, max_new_tokens=cfg["max_new_tokens"])
            results[tag] = r
            print(f"{tag}: accuracy {r['accuracy']:.3f}  format {r['format']:.3f}  (n={r['n']})")
        if world > 1:
            dist.barrier()

    if "before_rl" not in results:
        evaluate("before_rl")
    per_rank = cfg["prompts_per_step"] // world
    metrics_path = os.path.join(out, "metrics.jsonl")
    for path in (metrics_path, os.path.join(out, "samples.jsonl")):
        if rank == 0:   # start fresh, or keep only the steps the checkpoint holds (a crash may have logged more)
            rows = [r for r in open(path)] if resume and os.path.exists(path) else []
            with open(path, "w") as f:
                f.writelines(r for r in rows if json.loads(r)["step"] <= step)
    bar = tqdm(range(step, cfg["rl_steps"]), desc=name, disable=rank != 0,
               initial=step, total=cfg["rl_steps"])
    for step in bar:
        # every rank draws the same global prompts for this step and takes its own share of whole groups
        g = torch.Generator().manual_seed(seed_for(cfg["seed"], step))
        idx = torch.randint(len(train), (cfg["prompts_per_step"],), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        t0 = time.time()
        model.eval()
        with autocast:
            pieces, stats, samples_log, times = rollout(model, ref_model, processor, [train[i] for i in idx], cfg,
                                                        mode, step, rank * per_rank, device)
            model.train()
            t1 = time.time()
            stats += update(train_model, optimizer, pieces, cfg, world, hooks.get("piece_loss", rl_loss))
        row = dict(step=step + 1, **reduce_stats(stats, world, device, hooks.get("stats", ())),
                   time_generate=times["generate"], time_score=times["score"], time_update=time.time() - t1,
                   time_step=time.time() - t0)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(os.path.join(out, "samples.jsonl"), "a") as f:
                f.write(json.dumps(samples_log[0]) + "\n")
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
        if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0 and step + 1 < cfg["rl_steps"]:
            evaluate(f"step_{step + 1}")
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["rl_steps"]:
            if rank == 0:
                save_checkpoint(ckpt, model, processor, optimizer,
                                dict(step=step + 1, results=json.dumps(results), ref_from=start))
            if world > 1:
                dist.barrier()
    evaluate("after_rl")
    if rank == 0:
        results["wall_time_s"] = time.time() - t_start
        json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
        if os.path.getsize(metrics_path):
            evaluation.plot_curves(metrics_path, os.path.join(out, "curves.png"), hooks.get("stats", ()))
        if held_out:
            json.dump(results["after_rl"], open(os.path.join(ckpt, "eval.json"), "w"), indent=1)
            b, a = results["before_rl"]["accuracy"], results["after_rl"]["accuracy"]
            print(f"held-out accuracy {b:.3f} -> {a:.3f} after {name}")
        print(f"results, curves and samples in {out}/, checkpoint in {ckpt}/ ({results['wall_time_s']:.0f} s)")
    if world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
