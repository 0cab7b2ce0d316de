"""
On-Policy Attention Distillation (PAPER.md, Eq. 5 and 6): the student samples its own responses, a frozen teacher
runs on the same sequences, and the student learns from three terms:

    L = L_RL  +  mu * KL(pi_student || pi_teacher)  +  gamma_attn * JSD(p_student^t || p_teacher^t)
        (GRPO)   (per-token reverse KL, full vocab)    (final-layer attention, Eq. 5, no advantage)

gamma_attn=0 is the on-policy knowledge-distillation baseline (KD); the default adds attention distillation.

    python distill.py                                # tiny default: 4-layer teacher -> 2-layer student, on CPU
    python distill.py --gamma_attn=0                 # the KD baseline, same seed
    python distill.py --teacher=out/ral --init_from=Qwen/Qwen2.5-VL-7B-Instruct ...
    torchrun --nproc_per_node=8 distill.py config/my_preset.py

Everything else (rollouts, the update loop, DDP, checkpoints and resume, logs, evaluation) is ral.py's: this file
only adds the teacher, the pair check, and the per-piece loss that ral.update minimizes.
"""
import os
import sys

import torch

import ral
from model import load, load_processor, policy_forward, to_device

DEFAULTS = dict(
    ral.DEFAULTS,
    out_dir="out/distill",
    algo="grpo",               # L_RL of Eq. 6: GRPO's token loss ("ral" would add Eq. 3 as well)
    mu=1.0,                    # weight of the per-token reverse KL to the teacher (L_GKD)
    gamma_attn=0.5,            # weight of the attention JSD to the teacher (Eq. 5); 0 = the KD baseline
    teacher="",                # a save_pretrained folder, a ral.py run folder or a hub id; "" = the tiny warm start
    teacher_layers=ral.DEFAULTS["tiny_layers"], teacher_sft_steps=ral.DEFAULTS["sft_steps"],  # the tiny
    # teacher (teacher=""): exactly the warm start `python ral.py` makes, reused if it exists
    teacher_device="", teacher_dtype="",       # "" = the student's device, load()'s default dtype
    tiny_layers=2, sft_steps=100,              # the tiny student: fewer layers, a shorter warm start
    rl_steps=40, lr=1e-4,
)
STATS = ("rkl", "distill_jsd")   # per-token means added to metrics.jsonl


# ----------------------------------------------------------------------------------------------------------------
# The terms of Eq. 6 beyond L_RL

def reverse_kl(logprobs, teacher_logprobs):
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)) per position, over the full vocabulary.
    Heads padded to different sizes (Qwen2.5-VL-3B vs 7B) are cut to the shared part and renormalized."""
    V = min(logprobs.shape[-1], teacher_logprobs.shape[-1])
    if logprobs.shape[-1] != teacher_logprobs.shape[-1]:
        logprobs, teacher_logprobs = logprobs[..., :V].log_softmax(-1), teacher_logprobs[..., :V].log_softmax(-1)
    return (logprobs.exp() * (logprobs - teacher_logprobs)).sum(-1)


@torch.no_grad()
def teacher_forward(teacher, piece, device):
    """The frozen teacher on the student's sequences (same ids, same pixels): full log-softmax B x R x V and
    attention policy B x R x T, brought back to the student's device as float32."""
    _, p, logprobs = policy_forward(teacher, to_device(piece["batch"], teacher.device), piece["R"], full=True)
    return logprobs.to(device, torch.float32), p.to(device, torch.float32)


def distill_loss(teacher, mu, gamma_attn):
    """ral.update's per-piece objective for Eq. 6. Each term is summed over response tokens and divided by the
    step's global token count, like Eq. 4's. The attention term has no advantage and no p_old: its gradient is
    non-zero from the first step, unlike RAL's."""
    def piece_loss(model, piece, cfg, n_tokens):
        logp, p, logprobs = policy_forward(model, piece["batch"], piece["R"], attention=True, full=True)
        loss, stats = ral.rl_terms(logp, p, piece, cfg, n_tokens)          # L_RL (GRPO, or RAL if algo=ral)
        t_logprobs, t_p = teacher_forward(teacher, piece, logp.device)
        m = piece["mask"]
        kl, d = reverse_kl(logprobs, t_logprobs), ral.jsd(p, t_p)
        loss = loss + mu * (kl * m).sum() / n_tokens                         # + mu L_GKD: the KD baseline
        if gamma_attn > 0:
            loss = loss + gamma_attn * (d * m).sum() / n_tokens              # + gamma L_AttnDistill (Eq. 5)
        return loss, dict(stats, rkl=(kl * m).sum().item(), distill_jsd=(d * m).sum().item())
    return piece_loss


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
    from transformers import AutoConfig
    problems = pair_problems(load_processor(teacher_path), AutoConfig.from_pretrained(teacher_path),
                             load_processor(student_path), AutoConfig.from_pretrained(student_path))
    if problems:
        raise ValueError(f"teacher {teacher_path} and student {student_path} do not share tokenization, so their "
                         "positions and tokens would not align: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# The run: ral.main with a teacher

def setup(cfg, sft_samples, mode, device, rank, world):
    """ral.main's hook: make or find the teacher and the student's starting point, check the pair, load the
    frozen teacher, and hand back Eq. 6 as the loss."""
    import eval as evaluation
    if cfg["mu"] < 0 or cfg["gamma_attn"] < 0:
        raise ValueError("mu and gamma_attn must be >= 0")
    if cfg["teacher"]:
        teacher_path = evaluation.weights_dir(cfg["teacher"]) if os.path.isdir(cfg["teacher"]) else cfg["teacher"]
    else:   # the warm start `python ral.py` makes (or reuses) at the same path
        teacher_path = ral.warm_start(dict(cfg, init_from="tiny", tiny_layers=cfg["teacher_layers"], warm_dir="",
                                           sft_steps=cfg["teacher_sft_steps"]), sft_samples, mode, device, rank, world)
    if cfg["init_from"] != "tiny":
        check_pair(teacher_path, cfg["init_from"])             # a real pair fails before any training
    start = ral.warm_start(cfg, sft_samples, mode, device, rank, world)
    check_pair(teacher_path, start)
    dtype = getattr(torch, cfg["teacher_dtype"]) if cfg["teacher_dtype"] else None
    teacher = load(teacher_path, cfg["teacher_device"] or device, dtype)[0].eval().requires_grad_(False)
    if rank == 0:
        print(f"teacher {teacher_path} ({teacher.config.text_config.num_hidden_layers} layers) -> student {start}")
    name = ("kd+attn" if cfg["gamma_attn"] > 0 else "kd") + ("-zero" if cfg["zero"] else "")
    return dict(start=start, piece_loss=distill_loss(teacher, cfg["mu"], cfg["gamma_attn"]), stats=STATS, name=name)


def main(argv):
    return ral.main(argv, DEFAULTS, setup)


if __name__ == "__main__":
    main(sys.argv[1:])
