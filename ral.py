"""
Reinforced Attention Learning: GRPO on tokens plus an advantage-weighted JSD on the final layer's attention.

    python ral.py                                   # tiny offline default: SFT warm start, then RL, on CPU
    python ral.py config/qwen7b_8gpu.py --algo=grpo # a preset, then overrides
    torchrun --nproc_per_node=8 ral.py config/qwen7b_8gpu.py
    torchrun --nproc_per_node=8 ral.py config/qwen7b_8gpu.py --fsdp=True   # shard what does not fit (FSDP2)
    python ral.py --help                            # every option, its default and its meaning

The math (jsd, group_advantages, token_loss, attention_loss) is pure functions at the top; importing this file
starts nothing. Equation numbers refer to docs/METHOD.md.
"""
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import data
import eval as evaluation
import runs
import tasks
from cli import OPTIONS, UsageError, check, cli, import_function, parse, plan
from data import epoch_prompts, seed_for
from tasks import offline_stream
from model import concat_batches, encode_visuals_once, generate, masked_sum, policy_forward, stop_ids, take_rows, \
    to_device, token_entropy, with_responses
from scale import compute, gathered, save_checkpoint, setup_distributed, trainer_state
from sft import warm_start

# ----------------------------------------------------------------------------------------------------------------
# The objective (docs/METHOD.md, Eq. 1-4 and 8)


def jsd(p, q):
    """Jensen-Shannon divergence over the last dim, natural log: 0 <= JSD <= ln 2. Exact with zeros (0 log 0 = 0):
    the log's argument is made safe where p (or q) is 0, so neither value nor gradient sees a log 0."""
    m = 0.5 * (p + q)

    def kl_to_m(x):
        safe = torch.where(x > 0, x / torch.where(m > 0, m, 1.0), 1.0)
        return torch.where(x > 0, x * torch.log(safe), 0.0).sum(-1)

    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
    """Eq. 8: A_i = (r_i - mean) / (std + eps) within each group of G consecutive responses; scale=False keeps
    A_i = r_i - mean (Dr. GRPO: no division by the std). A group whose rewards are all equal gets exactly zero
    (no spread, no signal)."""
    r = rewards.float().view(-1, group_size)
    spread = r.max(1, keepdim=True).values > r.min(1, keepdim=True).values
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return torch.where(spread, adv, 0.0).view(-1)


def loss_weights(mask, loss_agg, max_new_tokens):
    """How per-token terms become the loss (--loss_agg): each token's term is multiplied by its weight, summed over
    the optimizer step's micro-batches and ranks, and divided by the step's sum of `norm` (update adds it up), so
    micro-batching and the rank count do not change the objective. Returns (weight B x R, this micro-batch's norm):
      token     mean over the step's response tokens (DAPO):  weight = mask,            norm = tokens
      sequence  each response's token mean, then the mean
                over the step's responses (GRPO):            weight = mask / |o_i|,     norm = responses
      constant  sum / (max_new_tokens x responses) (Dr. GRPO): weight = mask,           norm = max_new_tokens x responses
    A response with no token in the loss (--mask_truncated) counts in 'constant''s normalizer, not 'sequence''s."""
    if loss_agg == "token":
        return mask, mask.sum()
    length = mask.sum(1, keepdim=True)
    if loss_agg == "sequence":
        return mask / length.clamp_min(1), (length > 0).sum().float()
    return mask, torch.tensor(float(max_new_tokens * len(mask)))


def aggregate(x, weight, norm):
    """The micro-batch's share of the step's loss: sum of weight x per-token term over the positions in the loss,
    divided by the step's normalizer (loss_weights)."""
    return masked_sum(x * weight, weight) / norm


def token_loss(logp, old_logp, ref_logp, adv, weight, norm, clip_eps=0.2, beta=0.04, clip_eps_high=0.0):
    """Eq. 1 as a loss: -clipped surrogate + beta * KL_k3(pi || ref), aggregated by the per-token weights and the
    step's normalizer (loss_weights; for the token mean, weight is the 0/1 response mask and norm the step's token
    count). The ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher; 0 = clip_eps).
    Returns the loss and per-token stats (clip indicator: the ratio outside that range; the k3 KL) for logging."""
    high = clip_eps_high or clip_eps
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + high) * a)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1                 # k3 estimator, >= 0
    loss = aggregate(-surrogate + beta * kl, weight, norm)
    clipped = ((ratio - 1 > high) | (1 - ratio > clip_eps)).float()
    return loss, clipped, kl


def attention_loss(p, p_old, adv, weight, norm):
    """Eq. 3: A_t * JSD(p_theta^t || p_old^t), aggregated as the token terms are (loss_weights). p_old is a
    constant. Minimizing it pulls the attention toward the rollout's when A > 0 and pushes it away when A < 0."""
    d = jsd(p, p_old.detach())
    return aggregate(adv[:, None] * d, weight, norm), d


# ----------------------------------------------------------------------------------------------------------------
# The command line: cli.py's options table, then config files, then --key=value; every check before anything runs

def configure(argv, options=OPTIONS, doc=__doc__):
    """Defaults, then config files, then --key=value (cli.parse), then every check, before anything is written."""
    cfg = parse(argv, options, doc)
    check(cfg)
    if cfg["algo"] == "grpo":
        cfg["lambda_attn"] = 0.0                    # GRPO is Eq. 4 without the attention term, settled here once
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: RL. A rollout becomes a list of micro-batches (a few sequences of one group, each tagged with the
# mini-batch it belongs to) holding everything the update needs: the sequences, response mask, advantages, and
# the rollout policy's log-probs and attention.

def mini_batch_slices(group_size, mini_batches):
    """Mini-batch k takes sequences [G k / M, G (k+1) / M) of every group: sizes differ by at most one, so every M
    from 1 to G works, and the contents do not depend on how groups are spread over ranks."""
    bounds = [group_size * k // mini_batches for k in range(mini_batches + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def rollout(model, ref_model, processor, prompts, cfg, mode, step, first_group, device, reward_fn=data.reward):
    """G responses per prompt, sampled in batched generate calls (generate_batch sequences each; every sequence
    seeded by (seed, step, group, index), so the draw does not depend on batching or ranks); rewards (reward_fn(
    text, sample, mode) -> dict(reward, accuracy, format)) and Eq. 8 advantages; then, group by group, old
    log-probs and old attention from the training model's own forward and reference log-probs from the frozen
    initial model. Returns (micro_batches, stats: sums for the log, samples_log, times)."""
    G, tok = cfg["group_size"], processor.tokenizer
    t0 = time.time()
    groups = [data.encode([sample] * G, processor, mode) for sample in prompts]
    cache = encode_visuals_once if cfg["vision_cache"] else lambda model, batch: batch
    groups = [(cache(model, to_device(batch, device)), masks) for batch, masks in groups]
    per_call = max(1, (cfg["generate_batch"] or G * len(prompts)) // G)      # whole groups per generate call
    responses = []
    for first in range(0, len(prompts), per_call):
        batch = concat_batches([b for b, _ in groups[first:first + per_call]], tok.pad_token_id)
        seeds = [seed_for(cfg["seed"], step, first_group + k, j)
                 for k in range(first, min(first + per_call, len(prompts))) for j in range(G)]
        response, response_mask = generate(model, processor, batch, cfg["max_new_tokens"], cfg["temperature"],
                                           seeds=seeds)
        responses += [(response[k * G:(k + 1) * G], response_mask[k * G:(k + 1) * G]) for k in range(len(seeds) // G)]
    times = dict(generate=time.time() - t0, score=0.0)
    micro_batches, samples_log = [], []
    stats = dict(groups=0, responses=0, no_spread=0.0)
    add = lambda **kv: stats.update({k: stats.get(k, 0.0) + v for k, v in kv.items()})
    for sample, (batch, masks), (response, response_mask) in zip(prompts, groups, responses):
        t1 = time.time()
        R = int(response_mask.sum(1).max())                  # a group's own longest response
        response, response_mask = response[:, :R], response_mask[:, :R]
        texts = tok.batch_decode(response, skip_special_tokens=True)
        scores = [reward_fn(t, sample, mode) for t in texts]
        rewards = torch.tensor([s["reward"] for s in scores])
        adv = group_advantages(rewards, G, scale=cfg["scale_rewards"] == "group").to(device)
        # a response that reached max_new_tokens without its end token was cut off; --mask_truncated keeps its
        # tokens out of the loss (its reward still counts in the group's advantages and in the log)
        ended = torch.isin(response, torch.tensor(stop_ids(model, tok), device=response.device)).any(1)
        in_loss = ended | (not cfg["mask_truncated"])
        full, P = with_responses(batch, response, response_mask), batch["input_ids"].shape[1]
        for mb, (first, last) in enumerate(mini_batch_slices(G, cfg["mini_batches"])):
            for i in range(first, last, cfg["micro_batch"] or last - first):
                j = min(i + (cfg["micro_batch"] or last - first), last)
                rows = take_rows(full, i, j)
                logp, p = policy_forward(model, rows, R, temperature=cfg["temperature"])   # the sampled distribution
                ref_logp = policy_forward(ref_model, rows, R, attention=False, temperature=cfg["temperature"])[0] \
                    if ref_model is not None else logp
                mask = response_mask[i:j].float()
                loss_mask = mask * in_loss[i:j, None]
                weight, norm = loss_weights(loss_mask, cfg["loss_agg"], cfg["max_new_tokens"])
                micro_batches.append(dict(batch=rows, response_len=R, mask=loss_mask, weight=weight, norm=norm,
                                          adv=adv[i:j], old_logp=logp, old_p=p, ref_logp=ref_logp, mini_batch=mb))
                # where the rollout policy looks (response rows, over the prompt's visual and target tokens)
                vis, tgt = masks["visual"][i:j].to(p)[:, None], masks["target"][i:j].to(p)[:, None]
                entropy = -(torch.where(p > 0, p * p.clamp_min(1e-30).log(), 0.0)).sum(-1)
                add(tokens=mask.sum().item(), attn_entropy=masked_sum(entropy, mask).item(),
                    attn_visual=masked_sum((p[..., :P] * vis).sum(-1), mask).item(),
                    attn_target=masked_sum((p[..., :P] * tgt).sum(-1), mask).item())
        add(reward=rewards.sum().item(), accuracy=sum(s["accuracy"] for s in scores),
            format=sum(s["format"] for s in scores), responses=G, groups=1, truncated=(~ended).sum().item(),
            no_spread=float(bool((rewards == rewards[0]).all())), response_len=response_mask.sum().item())
        samples_log.append(dict(step=step + 1, id=sample.get("id"), question=sample["question"],
                                answer=sample["answer"], responses=texts[:cfg["log_samples"]],
                                rewards=rewards[:cfg["log_samples"]].tolist()))
        times["score"] += time.time() - t1
    return micro_batches, stats, samples_log, times


def rl_terms(logp, p, logprobs, mb, norm, clip_eps, beta, lambda_attn, clip_eps_high=0.0):
    """Eq. 4 on one micro-batch, from the forward's log-probs, log-softmax over the vocabulary (for the policy's
    entropy, logged) and attention: -clipped surrogate + beta KL + lambda A JSD, each aggregated by mb's weights
    and the step's normalizer. Returns the loss and per-token sums for logging."""
    m, w = mb["mask"], mb["weight"]
    loss, clipped, kl = token_loss(logp, mb["old_logp"], mb["ref_logp"], mb["adv"], w, norm, clip_eps, beta,
                                   clip_eps_high)
    stats = dict(kl=masked_sum(kl, m).item(), clip=masked_sum(clipped, m).item(), attn_jsd=0.0,
                 entropy=masked_sum(token_entropy(logprobs), m).item())
    if lambda_attn > 0:
        attn, d = attention_loss(p, mb["old_p"], mb["adv"], w, norm)
        loss = loss + lambda_attn * attn
        stats["attn_jsd"] = masked_sum(d, m).item()
    return loss, stats


def rl_loss(clip_eps, beta, lambda_attn, temperature=1.0, clip_eps_high=0.0):
    """Eq. 4 as `loss_fn(model, micro_batch, norm) -> (loss, stats)`: the per-micro-batch objective that update
    minimizes, norm being the step's normalizer (loss_weights; distill.py builds Eq. 6 the same way). Log-probs at
    the rollout's sampling temperature, so the ratio compares the same distributions."""
    def loss_fn(model, mb, norm):
        logp, p, logprobs = policy_forward(model, mb["batch"], mb["response_len"], attention=lambda_attn > 0,
                                           full=True, temperature=temperature)
        return rl_terms(logp, p, logprobs, mb, norm, clip_eps, beta, lambda_attn, clip_eps_high)
    return loss_fn


def grad_probe(clip_eps, beta, lambda_attn, temperature=1.0, clip_eps_high=0.0):
    """The mechanism, measured (METHOD.md, "The gradient probe"): `probe(model, micro_batch, norm) -> stats`,
    the gradients w.r.t. the trainable weights of Eq. 4's token terms (surrogate + KL) and of its attention term
    (Eq. 3, unweighted) taken separately on one micro-batch, never accumulated into .grad: their norms, the
    attention term's share of the update lambda |g_attn| / (lambda |g_attn| + |g_tok|), and their cosine. Per
    parameter sums only (no flat copy of the gradient), so it costs one forward and two backwards."""
    def probe(model, mb, norm):
        model = getattr(model, "module", model)            # DDP's module: a local gradient, no all-reduce
        params = [w for w in model.parameters() if w.requires_grad]
        logp, p, logprobs = policy_forward(model, mb["batch"], mb["response_len"], full=True, temperature=temperature)
        token = rl_terms(logp, p, logprobs, mb, norm, clip_eps, beta, 0.0, clip_eps_high)[0]
        attn = attention_loss(p, mb["old_p"], mb["adv"], mb["weight"], norm)[0]
        g_tok = torch.autograd.grad(token, params, retain_graph=True, allow_unused=True)
        g_attn = torch.autograd.grad(attn, params, allow_unused=True)
        tt = at = ta = 0.0
        for a, b in zip(g_tok, g_attn):
            a, b = (x.double() if x is not None else None for x in (a, b))
            tt += (a * a).sum().item() if a is not None else 0.0
            at += (b * b).sum().item() if b is not None else 0.0
            ta += (a * b).sum().item() if a is not None and b is not None else 0.0
        tok_norm, attn_norm = math.sqrt(tt), math.sqrt(at)
        weighted = lambda_attn * attn_norm
        return dict(probes=1, grad_tok=tok_norm, grad_attn=attn_norm,
                    attn_share=weighted / (weighted + tok_norm) if weighted + tok_norm > 0 else 0.0,
                    attn_cos=ta / (tok_norm * attn_norm) if tok_norm * attn_norm > 0 else 0.0)
    return probe


def update(model, optimizer, micro_batches, loss_fn, mini_batches, epochs, grad_clip, world, probe=None):
    """mini_batches x epochs optimizer steps over one rollout, each on loss_fn summed over its micro-batches, whose
    terms are divided by the global normalizer of the mini-batch (the sum of its micro-batches' norm over ranks;
    loss_weights). Returns one stats record per optimizer step. probe (grad_probe): measured before the last
    optimizer step, on its first micro-batch whose advantages are not all zero (a group without spread has no
    signal in either term)."""
    # the optimizer's parameters: after a no_grad forward FSDP leaves the root unsharded, and model.parameters()
    # would then list plain tensors that never get a gradient instead of the sharded ones
    params = [w for group in optimizer.param_groups for w in group["params"]]
    records = []
    for epoch in range(epochs):
        for k in range(mini_batches):
            mbs = [mb for mb in micro_batches if mb["mini_batch"] == k]
            local = float(sum(mb["norm"] for mb in mbs))
            norm = torch.tensor(local, device=mbs[0]["mask"].device)
            if world > 1:
                dist.all_reduce(norm)
            norm = norm.clamp_min(1.0)    # a step whose every response left the loss (--mask_truncated): 0, not 0/0
            optimizer.zero_grad(set_to_none=True)
            record = dict(update_tokens=sum(mb["mask"].sum().item() for mb in mbs), norm=local, opt_steps=1)
            if probe is not None and (epoch, k) == (epochs - 1, mini_batches - 1):   # the weights furthest from the
                signal = [mb for mb in mbs if mb["adv"].abs().sum() > 0] or mbs      # rollout's, where Eq. 3 acts
                record.update(probe(model, signal[0], norm))                        # most; a group with spread
            for j, mb in enumerate(mbs):
                sync = j == len(mbs) - 1 or world == 1 or not hasattr(model, "no_sync")  # FSDP reduce-scatters
                with nullcontext() if sync else model.no_sync():          # each micro-batch's into its shards
                    loss, s = loss_fn(model, mb, norm)
                    (loss * world).backward()     # DDP averages gradients over ranks; the loss is a global sum
                for key, v in dict(s, loss=loss.item() * norm.item()).items():
                    record[key] = record.get(key, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            record["grad_norm"] = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
            optimizer.step()
            records.append(record)
    return records


# What metrics.jsonl holds, by what each sum is divided by, and what each is (the axis labels of curves.png).
PER_RESPONSE = ("reward", "accuracy", "format", "response_len", "truncated")
PER_ROLLOUT_TOKEN = ("attn_entropy", "attn_visual", "attn_target")
PER_UPDATE_TOKEN = ("kl", "clip", "attn_jsd", "entropy")
METRICS = dict(
    reward="reward per response (Eq. 8's r)", accuracy="share of responses right (sampled)",
    format="share of responses in format", response_len="tokens per response",
    truncated="share of responses cut at max_new_tokens", no_spread_groups="share of groups with equal rewards",
    attn_entropy="attention entropy (nats per rollout token)", attn_visual="attention on visual tokens",
    attn_target="attention on the target's tokens", kl="k3 KL to the reference per update token",
    clip="share of update tokens outside the ratio clip", attn_jsd="JSD(p || p_old) per update token (Eq. 3)",
    entropy="token entropy (nats per update token)", loss="loss (Eq. 4), mean over optimizer steps",
    grad_norm="gradient norm before clipping")
PER_PROBE = ("grad_tok", "grad_attn", "attn_share", "attn_cos")     # only on the steps grad_probe_every picks


def reduce_stats(rollout_stats, update_records, world, device, per_token=()):
    """Sum the rollout's and every optimizer step's sums over ranks, then divide: per response, per rollout token,
    per update token, per group, per optimizer step; the loss by the steps' normalizers (the mean over steps,
    weighted by them: for --loss_agg=token, per update token). `per_token`: extra update-token means (distill.py's
    terms). attn_jsd is the mean over all the rollout's optimizer steps; attn_jsd_step1, attn_jsd_step2, ... are
    each step's own (step 1 runs at the rollout weights, where the JSD and its gradient are 0: METHOD.md, Eq. 3)."""
    sums = dict(rollout_stats)
    for i, record in enumerate(update_records):
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        if "attn_jsd" in record:   # the attention term per optimizer step of the rollout: the first is at the
            sums[f"attn_jsd_step{i + 1}"] = record["attn_jsd"]               # rollout weights, where it is 0
            sums[f"update_tokens_step{i + 1}"] = record["update_tokens"]
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    out = {k: t[k] / t["responses"] for k in PER_RESPONSE}
    out["no_spread_groups"] = t["no_spread"] / t["groups"]
    out.update({k: t[k] / t["tokens"] for k in PER_ROLLOUT_TOKEN})
    # max(., 1): a step whose every response left the loss (--mask_truncated) has no update token
    out.update({k: t[k] / max(t["update_tokens"], 1.0) for k in PER_UPDATE_TOKEN + tuple(per_token)})
    out.update({f"attn_jsd_step{i}": t[f"attn_jsd_step{i}"] / max(t[f"update_tokens_step{i}"], 1.0)
                for i in range(1, len(update_records) + 1) if f"attn_jsd_step{i}" in t})
    out["loss"] = t["loss"] / max(t["norm"], 1.0)
    out["grad_norm"] = t["grad_norm"] / t["opt_steps"]
    if t.get("probes"):
        out.update({k: t[k] / t["probes"] for k in PER_PROBE})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The trainer, as plain steps: configure, setup_distributed, load_samples, warm_start (sft.py), train.

def read_samples(path):
    try:
        samples = data.load_dataset(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"{path}: no records")
    return samples


def load_samples(cfg):
    """SFT, RL and held-out samples (data sets in data.py's layout, or the offline task; None for an endless
    stream) and the held-out suite's name, under which its results are filed in eval.json."""
    task = tasks.TASKS[cfg["task"]]
    make = lambda n: task["make"](n, cfg["seed"], tasks.task_options(cfg["task"], cfg),
                                  os.path.join(cfg["out_dir"], "media"))
    # a size of 0 is the endless stream (None here); equal sizes are the same set (a media file is a function of
    # its name, so ranks drawing the same set at once write the same bytes)
    sft_set, rl_set = (make(n) if n else None for n in (cfg["sft_size"], cfg["train_size"]))
    sft_samples = read_samples(cfg["sft_file"]) if cfg["sft_file"] else sft_set
    train = read_samples(cfg["train_file"]) if cfg["train_file"] else rl_set
    name = cfg["eval_file"] or tasks.suite_name(cfg["task"], tasks.task_options(cfg["task"], cfg))
    if cfg["eval_file"]:      # a file given is always evaluated: its first eval_n samples, or all of it (eval_n=0)
        held_out = read_samples(cfg["eval_file"])[:cfg["eval_n"] or None]
    else:
        held_out = evaluation.suite(name, n=cfg["eval_n"]) if cfg["eval_n"] else []
    return sft_samples, train, held_out, name


def step_prompts(cfg, train_samples, rank, world):
    """prompts(step) -> this rank's prompts: every rank computes the same global prompts of the step (the offline
    stream's, or the prompt file's seeded epochs) and takes its own share of whole groups."""
    per_rank = cfg["prompts_per_step"] // world
    if train_samples is None:
        stream = offline_stream(cfg, 1)
        return lambda step: stream(step * cfg["prompts_per_step"] + rank * per_rank, per_rank)

    def prompts(step):
        idx = epoch_prompts(len(train_samples), step, cfg["prompts_per_step"], cfg["seed"])
        return [train_samples[i] for i in idx[rank * per_rank:(rank + 1) * per_rank]]
    return prompts


def train(cfg, start, train_samples, held_out, suite, rank, world, device, loss_fn, name, extra_stats=(),
          reward_fn=data.reward, probe_fn=None):
    """RL from the folder `start`: rollouts, then mini_batches x epochs optimizer steps on loss_fn each step
    (rl_loss's Eq. 4, or distill.py's Eq. 6), logs, evaluations and checkpoints in cfg['out_dir']. probe_fn
    (grad_probe) runs every grad_probe_every steps."""
    if cfg["rl_epochs"] and train_samples is not None:   # passes over the prompts, as the paper's one epoch over 51.2k
        cfg = dict(cfg, rl_steps=math.ceil(cfg["rl_epochs"] * len(train_samples) / cfg["prompts_per_step"]))
    out, mode, ckpt = cfg["out_dir"], "zero" if cfg["zero"] else "think", os.path.join(cfg["out_dir"], "ckpt")
    if rank == 0:
        runs.write_json(cfg, os.path.join(out, "run_config.json"))
    t_start = time.time()
    torch.manual_seed(cfg["seed"] + rank)
    autocast = compute(cfg, device)
    model, processor, ref_model, train_model, optimizer, step, results, resumed = trainer_state(cfg, start, rank,
                                                                                                world, device)
    metrics_path, samples_path, run = runs.open_logs(cfg, step, resumed, rank)
    prompts_of = step_prompts(cfg, train_samples, rank, world)

    def evaluate(tag):   # every rank scores its share of the held-out samples; under FSDP with the weights
        if held_out:     # gathered once (scale.gathered), so the ranks' forwards need not stay in step
            with gathered(model):
                r = evaluation.evaluate(model, processor, held_out, mode=mode, max_new_tokens=cfg["max_new_tokens"],
                                        reward_fn=reward_fn, rank=rank, world=world)
            results[tag] = r
            if rank == 0:
                print(f"{tag}: accuracy {r['accuracy']:.3f}  format {r['format']:.3f}  (n={r['n']})")
            if run is not None:
                run.log({f"eval/{tag}/accuracy": r["accuracy"]}, step=step)

    if "before_rl" not in results:
        evaluate("before_rl")
    bar = tqdm(range(step, cfg["rl_steps"]), desc=name, disable=rank != 0, initial=step, total=cfg["rl_steps"])
    for step in bar:
        t0 = time.time()
        with autocast:
            # rollout: G responses per prompt, rewards, advantages, the rollout policy's log-probs and attention
            # a sharded policy is gathered once for it (not once per new token), so each rank decodes its own
            # prompts alone; the sharded reference's forwards gather in each, as many on every rank
            model.eval()
            first_group = rank * (cfg["prompts_per_step"] // world)
            with gathered(model):
                micro_batches, stats, samples_log, times = rollout(model, ref_model, processor, prompts_of(step), cfg,
                                                                   mode, step, first_group, device, reward_fn)
            # update: mini_batches x epochs optimizer steps on the loss (Eq. 4)
            model.train()
            for group in optimizer.param_groups:       # a function of the step alone, so a resume needs no state
                group["lr"] = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
            t1 = time.time()
            probe = probe_fn if probe_fn and cfg["grad_probe_every"] and step % cfg["grad_probe_every"] == 0 else None
            records = update(train_model, optimizer, micro_batches, loss_fn, cfg["mini_batches"], cfg["epochs"],
                             cfg["grad_clip"], world, probe)
        # log: one row per step, sums over ranks turned into means
        row = dict(step=step + 1, **reduce_stats(stats, records, world, device, extra_stats),
                   time_generate=times["generate"], time_score=times["score"], time_update=time.time() - t1,
                   time_step=time.time() - t0)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(samples_path, "a") as f:
                f.write(json.dumps(samples_log[0]) + "\n")
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.3f}")
            if run is not None:
                run.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        # evaluate and checkpoint
        if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0 and step + 1 < cfg["rl_steps"]:
            evaluate(f"step_{step + 1}")
        if (step + 1) % cfg["ckpt_every"] == 0 or step + 1 == cfg["rl_steps"]:
            save_checkpoint(ckpt, model, processor, optimizer,
                            dict(step=step + 1, results=json.dumps(results), ref_from=start), rank)
            if world > 1:
                dist.barrier()
    evaluate("after_rl")
    if rank == 0:
        results["wall_time_s"] = time.time() - t_start
        runs.write_json(results, os.path.join(out, "results.json"))
        if os.path.getsize(metrics_path):
            runs.plot_curves(metrics_path, os.path.join(out, "curves.png"), {**METRICS, **dict(extra_stats)})
        if held_out:
            runs.save_eval(ckpt, mode, {suite: results["after_rl"]})
            b, a = results["before_rl"]["accuracy"], results["after_rl"]["accuracy"]
            print(f"held-out accuracy {b:.3f} -> {a:.3f} after {name}")
        print(f"results, curves and samples in {out}/, checkpoint in {ckpt}/ ({results['wall_time_s']:.0f} s)")
        if run is not None:
            run.finish()
    if dist.is_initialized():
        # tear down in order: every rank done, the DDP wrapper (its reducer holds the process group) freed, then
        # the group; a rank that tore down while the other still held DDP was seen to hang at exit
        dist.barrier()
        del train_model
        gc.collect()
        dist.destroy_process_group()
    return results


def main(argv, reward_fn=data.reward):
    cfg = configure(argv)
    reward_fn = import_function(cfg["reward"]) if cfg["reward"] else reward_fn
    rank, world, device = setup_distributed(cfg)
    sft_samples, train_samples, held_out, suite = load_samples(cfg)
    if rank == 0:   # before SFT: --resume=True then knows a run killed before its first checkpoint
        runs.write_json(cfg, os.path.join(cfg["out_dir"], "run_config.json"))
        print(plan(cfg, suite))
    start = warm_start(cfg, sft_samples, "zero" if cfg["zero"] else "think", device, rank, world, reward_fn)
    name = cfg["algo"] + ("-zero" if cfg["zero"] else "")
    return train(cfg, start, train_samples, held_out, suite, rank, world, device,
                 rl_loss(cfg["clip_eps"], cfg["beta"], cfg["lambda_attn"], cfg["temperature"], cfg["clip_eps_high"]),
                 name, reward_fn=reward_fn,
                 probe_fn=grad_probe(cfg["clip_eps"], cfg["beta"], cfg["lambda_attn"], cfg["temperature"],
                                     cfg["clip_eps_high"]))


if __name__ == "__main__":
    cli(main, sys.argv[1:])
