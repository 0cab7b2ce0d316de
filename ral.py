"""
Reinforced Attention Learning: GRPO on tokens plus an advantage-weighted JSD on the final layer's attention.

    python ral.py                                   # tiny offline default: SFT warm start, then RL, on CPU
    python ral.py config/qwen7b_8gpu.py --algo=grpo # a preset, then overrides
    torchrun --nproc_per_node=8 ral.py config/qwen7b_8gpu.py

The math (jsd, group_advantages, token_loss, attention_loss) is pure functions at the top; importing this file
starts nothing.
"""
import torch

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
