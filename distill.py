"""
On-Policy Attention Distillation (docs/METHOD.md, Eq. 5 and 6): the student samples its own responses, a frozen teacher
runs on the same sequences, and the student learns from three terms:

    L = L_RL  +  mu * KL(pi_student || pi_teacher)  +  gamma_attn * JSD(p_student^t || p_teacher^t)
        (GRPO)   (per-token reverse KL, full vocab)    (final-layer attention, Eq. 5, no advantage)

gamma_attn=0 is the on-policy knowledge-distillation baseline (KD); the default adds attention distillation.

    python distill.py                                # tiny default: 4-layer teacher -> 2-layer student, on CPU
                                                     # (the teacher: ral.py's tiny model after all 1500 SFT steps,
                                                     # no early stop; not the warm start `python ral.py` makes)
    python distill.py --gamma_attn=0                 # the KD baseline, same seed
    python distill.py --teacher=out/ral --init_from=Qwen/Qwen2.5-VL-7B-Instruct ...
    torchrun --nproc_per_node=8 distill.py config/my_preset.py
    python distill.py --help                         # every option, its default and its meaning

Everything else (rollouts, the update loop, DDP, checkpoints and resume, logs, evaluation) is ral.py's: this file
adds the teacher, the pair check, and the per-micro-batch loss that ral.update minimizes, and runs ral's steps.
"""
import os
import sys

import torch
from transformers import AutoConfig

import data
import runs
import ral
import scale
import sft
from cli import DEFAULTS, OPTIONS, UsageError, cli, import_function
from model import check_source, load, load_processor, masked_sum, policy_forward, to_device

meaning = lambda key: OPTIONS[key][1]
OPTIONS = dict(
    OPTIONS,
    out_dir=("out/distill", meaning("out_dir")),
    algo=("grpo", "L_RL of Eq. 6: 'grpo' (GRPO's token loss) or 'ral' (adds Eq. 3 as well)"),
    mu=(1.0, "weight of the per-token reverse KL to the teacher (L_GKD of Eq. 6)"),
    gamma_attn=(0.5, "weight of the attention JSD to the teacher (Eq. 5); 0 = the on-policy KD baseline"),
    teacher=("", "a save_pretrained folder, a ral.py run folder or a hub id; '' = the tiny warm start below"),
    teacher_layers=(DEFAULTS["tiny_layers"], "the tiny teacher's layers (teacher=''): ral.py's model, trained "
                                                 "to the end of its SFT (no early stop), reused if it exists"),
    teacher_sft_steps=(DEFAULTS["sft_steps"], "the tiny teacher's SFT steps (teacher='')"),
    teacher_device=("", "the teacher's device; '' = the student's"),
    teacher_dtype=("", "the teacher's dtype; '' = load()'s default (bf16 on GPU, fp32 on CPU)"),
    tiny_layers=(2, "decoder layers of the tiny student (fewer than the teacher's)"),
    sft_steps=(300, "the student's warm-start SFT steps (shorter than the teacher's; it also stops early at "
                    "--sft_stop, as ral.py's does)"),
    rl_steps=(40, meaning("rl_steps")),
    lr=(1e-4, meaning("lr")),
)
STATS = dict(rkl="reverse KL to the teacher per update token",      # per-token means added to metrics.jsonl
             distill_jsd="JSD to the teacher's attention per update token")


# ----------------------------------------------------------------------------------------------------------------
# The terms of Eq. 6 beyond L_RL

def reverse_kl(logprobs, teacher_logprobs):
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)) per position, over the full vocabulary.
    Heads padded to different sizes (Qwen2.5-VL-3B vs 7B) are cut to the shared part and renormalized."""
    V = min(logprobs.shape[-1], teacher_logprobs.shape[-1])
    if logprobs.shape[-1] != teacher_logprobs.shape[-1]:
        logprobs, teacher_logprobs = logprobs[..., :V].log_softmax(-1), teacher_logprobs[..., :V].log_softmax(-1)
    # tokens the student never samples (log-prob -inf: the suppressed vision tokens) add exactly 0, and are kept
    # out of both branches, so neither the value nor the gradient sees -inf - -inf
    keep = logprobs > -float("inf")
    s, t = torch.where(keep, logprobs, 0.0), torch.where(keep, teacher_logprobs, 0.0)
    return torch.where(keep, s.exp() * (s - t), 0.0).sum(-1)


@torch.no_grad()
def teacher_forward(teacher, mb, device):
    """The frozen teacher on the student's sequences (same ids, same pixels): full log-softmax B x R x V and
    attention policy B x R x T, brought back to the student's device as float32."""
    _, p, logprobs = policy_forward(teacher, to_device(mb["batch"], teacher.device), mb["response_len"], full=True)
    return logprobs.to(device, torch.float32), p.to(device, torch.float32)


def distill_loss(teacher, mu, gamma_attn, clip_eps, beta, lambda_attn, temperature=1.0, clip_eps_high=0.0):
    """Eq. 6 as ral.update's `loss_fn(model, micro_batch, norm) -> (loss, stats)`. Each term is aggregated as Eq.
    4's are (ral.loss_weights: by default summed over response tokens and divided by the step's global token
    count). The attention term has no advantage and no p_old: its gradient is non-zero from the first step, unlike
    RAL's."""
    def loss_fn(model, mb, norm):
        logp, p, logprobs = policy_forward(model, mb["batch"], mb["response_len"], attention=True, full=True,
                                           temperature=temperature)
        loss, stats = ral.rl_terms(logp, p, logprobs, mb, norm, clip_eps, beta, lambda_attn, clip_eps_high)  # L_RL
        t_logprobs, t_p = teacher_forward(teacher, mb, logp.device)
        m, w = mb["mask"], mb["weight"]
        kl, d = reverse_kl(logprobs, t_logprobs), ral.jsd(p, t_p)
        loss = loss + mu * ral.aggregate(kl, w, norm)                    # + mu L_GKD: the KD baseline
        if gamma_attn > 0:
            loss = loss + gamma_attn * ral.aggregate(d, w, norm)        # + gamma L_AttnDistill (Eq. 5)
        return loss, dict(stats, rkl=masked_sum(kl, m).item(), distill_jsd=masked_sum(d, m).item())
    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# Teacher and student must see the same sequences: same tokens, same visual tokens

def pair_problems(teacher_processor, teacher_config, student_processor, student_config):
    """What differs between teacher and student that would misalign positions or tokens ([] if nothing)."""
    problems = []
    tv, sv = teacher_processor.tokenizer.get_vocab(), student_processor.tokenizer.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        problems.append(f"tokenizer vocabularies differ ({len(tv)} vs {len(sv)} tokens; e.g. {diff})")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        t, s = getattr(teacher_processor.tokenizer, name), getattr(student_processor.tokenizer, name)
        if t != s:
            problems.append(f"tokenizer {name}: teacher {t}, student {s}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        t, s = getattr(teacher_config, name, None), getattr(student_config, name, None)
        if t != s:
            problems.append(f"model {name}: teacher {t}, student {s}")
    for name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "rescale_factor"):
        t, s = getattr(teacher_processor.image_processor, name), getattr(student_processor.image_processor, name)
        if list(t if isinstance(t, (list, tuple)) else [t]) != list(s if isinstance(s, (list, tuple)) else [s]):
            problems.append(f"image processor {name}: teacher {t}, student {s}")
    for name in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        t, s = getattr(teacher_config.vision_config, name), getattr(student_config.vision_config, name)
        if t != s:
            problems.append(f"vision encoder {name}: teacher {t}, student {s}")
    return problems


def check_pair(teacher_path, student_path):
    """Fail with a message naming every difference (the paper pairs Qwen2.5-VL-32B with 7B: same tokenization)."""
    problems = pair_problems(load_processor(teacher_path), AutoConfig.from_pretrained(teacher_path),
                             load_processor(student_path), AutoConfig.from_pretrained(student_path))
    if problems:
        raise UsageError(f"teacher {teacher_path} and student {student_path} do not share tokenization, so their "
                         "positions and tokens would not align: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# The run: ral.py's steps, with a teacher and Eq. 6 as the loss

def teacher_and_student(cfg, sft_samples, mode, device, rank, world, reward_fn=data.reward):
    """Make or find the teacher and the student's starting point (warm starts, reused when their recipe matches),
    and check that the pair shares tokenization before any training."""
    if cfg["teacher"]:
        teacher_path = runs.weights_dir(cfg["teacher"]) if os.path.isdir(cfg["teacher"]) else cfg["teacher"]
        problem = check_source(teacher_path)
        if problem:
            raise UsageError(f"--teacher: {problem}")
    else:   # ral.py's tiny model after all teacher_sft_steps of SFT, no early stop: a recipe (and folder) of its
            # own beside out_dir, not the early-stopped warm start `python ral.py` makes; made once, then reused
        teacher_path = sft.warm_start(dict(cfg, init_from="tiny", tiny_layers=cfg["teacher_layers"], warm_dir="",
                                           sft_steps=cfg["teacher_sft_steps"], sft_stop=0.0), sft_samples, mode, device, rank, world)
    if cfg["init_from"] != "tiny":
        check_pair(teacher_path, cfg["init_from"])             # a real pair fails before any training
    start = sft.warm_start(cfg, sft_samples, mode, device, rank, world, reward_fn)
    check_pair(teacher_path, start)
    return teacher_path, start


def main(argv, reward_fn=data.reward):
    cfg = ral.configure(argv, OPTIONS, __doc__)
    reward_fn = import_function(cfg["reward"]) if cfg["reward"] else reward_fn
    if cfg["mu"] < 0 or cfg["gamma_attn"] < 0:
        raise UsageError("--mu and --gamma_attn must be >= 0")
    rank, world, device = scale.setup_distributed(cfg)
    sft_samples, train_samples, held_out, suite = ral.load_samples(cfg)
    if rank == 0:   # before SFT, as ral.main: --resume=True then knows a run killed before its first checkpoint
        runs.write_json(cfg, os.path.join(cfg["out_dir"], "run_config.json"))
    mode = "zero" if cfg["zero"] else "think"
    teacher_path, start = teacher_and_student(cfg, sft_samples, mode, device, rank, world, reward_fn)
    dtype = getattr(torch, cfg["teacher_dtype"]) if cfg["teacher_dtype"] else None
    teacher = load(teacher_path, cfg["teacher_device"] or device, dtype)[0].eval().requires_grad_(False)
    if rank == 0:
        print(f"teacher {teacher_path} ({teacher.config.text_config.num_hidden_layers} layers) -> student {start}")
    name = ("kd+attn" if cfg["gamma_attn"] > 0 else "kd") + ("-zero" if cfg["zero"] else "")
    loss_fn = distill_loss(teacher, cfg["mu"], cfg["gamma_attn"], cfg["clip_eps"], cfg["beta"], cfg["lambda_attn"],
                           cfg["temperature"], cfg["clip_eps_high"])
    return ral.train(cfg, start, train_samples, held_out, suite, rank, world, device, loss_fn, name, STATS,
                     reward_fn)


if __name__ == "__main__":
    cli(main, sys.argv[1:])
