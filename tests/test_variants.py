"""The GRPO variants a researcher compares RAL against (--loss_agg, --scale_rewards, --clip_eps_high,
--mask_truncated, the logged token entropy), each against a hand computation on a small batch; and the defaults,
bit for bit, against a copy of the objective as it was before the variants existed."""
import copy
import math

import pytest
import torch

import cli
import model as policy
import ral
import tasks
from helpers import spread_reward
from model import build_tiny, masked_sum


def jsd_by_hand(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x, m) if xi > 0)
    return kl(p) / 2 + kl(q) / 2


# ----------------------------------------------------------------------------------------------------------------
# The formulas, by hand

def test_advantages_without_std_scaling_are_centred_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.9, 0.1, 0.2, 0.2])
    a = ral.group_advantages(r, 4, scale=False)
    expected = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0.55, -0.25, -0.15, -0.15]    # r - group mean
    assert torch.allclose(a, torch.tensor(expected), atol=1e-6) and (a[4:8] == 0).all()
    scaled = ral.group_advantages(r, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std().item()                                    # unbiased, as Eq. 8's
    assert abs(scaled[0].item() - 0.75 / (std + 1e-6)) < 1e-5


def test_clip_higher_closed_form():
    """clip_eps = 0.2, clip_eps_high = 0.28: the ratio is clipped to [0.8, 1.28]. Tokens (ratio, A):
    (1.35, +1) -> 1.28 (clipped above); (1.25, +1) -> 1.25 (inside [0.8, 1.28], though outside the symmetric 1.2);
    (0.7, -1) -> min(-0.7, -0.8) = -0.8 (clipped below); (0.7, +1) -> min(0.7, 0.8) = 0.7 (the min keeps it)."""
    ratio = torch.tensor([[1.35, 1.25], [0.7, 0.7]])
    logp, old = ratio.log(), torch.zeros(2, 2)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 2)
    mask[1, 1] = 0                                           # the last token is padding
    loss, clipped, _ = ral.token_loss(logp, old, logp, adv, mask, 3.0, clip_eps=0.2, beta=0.0, clip_eps_high=0.28)
    assert abs(loss.item() - (-(1.28 + 1.25 - 0.8) / 3)) < 1e-6
    assert clipped.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    symmetric, clipped_sym, _ = ral.token_loss(logp, old, logp, adv, mask, 3.0, clip_eps=0.2, beta=0.0)
    assert abs(symmetric.item() - (-(1.2 + 1.2 - 0.8) / 3)) < 1e-6 and clipped_sym.tolist() == [[1.0, 1.0], [1.0, 1.0]]


# two responses of 3 and 1 tokens (and padding), advantages 0.5 and -2, ratio 1 (logp = old): the token term is
# -A_i; the attention term A_i * JSD(p || q) with p, q given by hand
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([0.5, -2.0])
P = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], [[0.9, 0.1, 0.0], [1.0, 0, 0], [1.0, 0, 0]]],
                 dtype=torch.float64)
Q = torch.tensor([[[0.9, 0.1, 0.0], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]], [[0.6, 0.4, 0.0], [1.0, 0, 0], [1.0, 0, 0]]],
                 dtype=torch.float64)


@pytest.mark.parametrize("loss_agg", ["token", "sequence", "constant"])
def test_each_aggregation_closed_form(loss_agg):
    L = 5                                                            # max_new_tokens
    weight, norm = ral.loss_weights(MASK, loss_agg, L)
    zeros = torch.zeros(2, 3)
    loss, _, _ = ral.token_loss(zeros, zeros, zeros, ADV, weight, norm, beta=0.0)
    d = [[jsd_by_hand(P[i, t].tolist(), Q[i, t].tolist()) for t in range(3)] for i in range(2)]
    attn, _ = ral.attention_loss(P, Q, ADV.double(), *ral.loss_weights(MASK.double(), loss_agg, L))   # in float64
    if loss_agg == "token":       # sum over the 4 tokens / 4
        expected, expected_attn = -(3 * 0.5 - 2.0) / 4, (0.5 * sum(d[0]) - 2.0 * d[1][0]) / 4
    elif loss_agg == "sequence":  # each response's mean over its tokens, then the mean over the 2 responses
        expected, expected_attn = -(0.5 - 2.0) / 2, (0.5 * sum(d[0]) / 3 - 2.0 * d[1][0]) / 2
    else:                         # sum / (L x 2 responses)
        expected, expected_attn = -(3 * 0.5 - 2.0) / (L * 2), (0.5 * sum(d[0]) - 2.0 * d[1][0]) / (L * 2)
    assert abs(loss.item() - expected) < 1e-6
    assert abs(attn.item() - expected_attn) < 1e-12


@pytest.mark.parametrize("loss_agg", ["token", "sequence", "constant"])
def test_each_aggregation_is_one_objective_whatever_the_micro_batching_and_ranks(loss_agg):
    """A mini-batch of 6 sequences as one micro-batch, or as 2 ranks x 2 micro-batches (norms summed over all four,
    as update and its all_reduce do): the same loss. One sequence has no token in the loss (--mask_truncated)."""
    torch.manual_seed(0)
    logp, old, ref = (0.3 * torch.randn(6, 5) for _ in range(3))
    adv, mask = torch.randn(6), (torch.rand(6, 5) > 0.3).float()
    mask[:, 0], mask[4] = 1.0, 0.0
    whole_w, whole_norm = ral.loss_weights(mask, loss_agg, 5)
    whole, _, _ = ral.token_loss(logp, old, ref, adv, whole_w, whole_norm)
    parts = [slice(0, 1), slice(1, 3), slice(3, 5), slice(5, 6)]   # rank 0: the first two, rank 1: the others
    shares = [ral.loss_weights(mask[s], loss_agg, 5) for s in parts]
    norm = sum(n for _, n in shares)
    assert norm == whole_norm
    total = sum(ral.token_loss(logp[s], old[s], ref[s], adv[s], w, norm)[0] for s, (w, _) in zip(parts, shares))
    assert torch.allclose(whole, total, atol=1e-7)
    if loss_agg == "sequence":    # 5 sequences in the loss, each weighing 1 / its length
        assert whole_norm == 5 and torch.allclose(whole_w.sum(1), torch.tensor([1.0, 1, 1, 1, 0, 1]))


def test_token_entropy_by_hand():
    """-sum p log p of softmax(logits): [0, ln 2, -inf] -> p = [1/3, 2/3, 0]; uniform over 4 -> ln 4."""
    logits = torch.tensor([[[0.0, math.log(2), -float("inf"), -float("inf")], [1.0, 1.0, 1.0, 1.0]]])
    h = policy.token_entropy(logits.log_softmax(-1))
    assert h.shape == (1, 2)
    assert abs(h[0, 0].item() - -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))) < 1e-6
    assert abs(h[0, 1].item() - math.log(4)) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# In the trainer

@pytest.fixture(scope="module")
def rollout_of():
    model, processor = build_tiny(seed=1)

    def make(reward_fn=spread_reward, **options):
        cfg = dict(cli.DEFAULTS, **dict(dict(group_size=4, max_new_tokens=6, beta=0.04), **options))
        torch.manual_seed(0)
        ref = copy.deepcopy(model).eval()
        return ral.rollout(model, ref, processor, tasks.search_task(2, seed=0, tokens=16), cfg, "think", 0, 0, "cpu",
                           reward_fn)
    return model, processor, make


def test_logged_entropy_is_the_sampled_distributions(rollout_of):
    """The update's entropy stat, against the entropy of softmax(logits / T) over the vocabulary without the vision
    tokens, from a plain forward, at the response positions."""
    model, _, make = rollout_of
    mb = make()[0][0]
    T = 0.7
    with torch.no_grad():
        _, stats = ral.rl_loss(0.2, 0.04, 1.0, temperature=T)(model, mb, mb["mask"].sum())
        logits = model(**mb["batch"]).logits[:, -mb["response_len"] - 1:-1].double() / T
    logits[..., policy.suppressed_tokens(model.config)] = -float("inf")
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    assert abs(stats["entropy"] - (entropy * mb["mask"]).sum().item()) < 1e-3 * mb["mask"].sum().item()
    assert stats["entropy"] > 0


def fake_generate(responses, eos, pad):
    """generate's stand-in: the same hand-written responses for every call (a list of token lists; one that ends
    has eos last, one without eos ran to max_new_tokens)."""
    def generate(model, processor, batch, max_new_tokens, temperature=1.0, greedy=False, seeds=None):
        n = len(batch["input_ids"])
        rows = [responses[i % len(responses)] for i in range(n)]
        ids = torch.full((n, max_new_tokens), pad)
        mask = torch.zeros(n, max_new_tokens, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return ids, mask
    return generate


def test_mask_truncated_takes_only_the_cut_off_responses_out_of_the_loss(rollout_of, monkeypatch):
    """Of 4 responses (max_new_tokens = 3): two end (eos), two run to the limit. With --mask_truncated the two cut
    off have an all-zero loss mask; the others keep theirs; every advantage, log-prob and reward is unchanged (the
    group's advantages are still computed over all 4), and the log counts 2 truncated responses."""
    _, processor, make = rollout_of
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    responses = [[30, 31, eos], [32, eos], [33, 34, 35], [36, 37, 38]]
    monkeypatch.setattr(ral, "generate", fake_generate(responses, eos, pad))
    by_length = lambda text, sample, mode: dict(reward=float(len(text)), accuracy=0.0, format=0.0)
    out = {}
    for flag in (False, True):
        out[flag] = make(by_length, max_new_tokens=3, mini_batches=1, mask_truncated=flag)
    (plain, plain_stats), (masked, masked_stats) = (out[False][:2]), (out[True][:2])
    assert plain_stats["truncated"] == masked_stats["truncated"] == 4       # 2 of 4 in each of the 2 groups
    assert masked_stats["reward"] == plain_stats["reward"] and masked_stats["responses"] == 8
    assert plain[0]["adv"].abs().sum() > 0
    for a, b in zip(plain, masked):
        assert torch.equal(a["adv"], b["adv"]) and torch.equal(a["old_logp"], b["old_logp"])
        assert a["mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
        assert b["mask"].tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]]
        assert torch.equal(b["weight"], b["mask"]) and b["norm"] == 5
    # the loss: the token mean over the 5 tokens left, as if the cut-off responses were not there
    model = build_tiny(seed=1)[0].train()
    loss_fn = ral.rl_loss(0.2, 0.04, 0.0)
    mb = masked[0]
    loss, _ = loss_fn(model, mb, mb["norm"])
    kept = dict(mb, batch=policy.take_rows(mb["batch"], 0, 2), mask=mb["mask"][:2], weight=mb["weight"][:2],
                adv=mb["adv"][:2], old_logp=mb["old_logp"][:2], ref_logp=mb["ref_logp"][:2], old_p=mb["old_p"][:2])
    alone, _ = loss_fn(model, kept, 5.0)
    assert torch.allclose(loss, alone, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The defaults leave the objective as it was, bit for bit

def old_token_loss(logp, old_logp, ref_logp, adv, mask, n_tokens, clip_eps=0.2, beta=0.04):
    """token_loss before the variants (commit 86e6bc1), copied."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    loss = masked_sum(-surrogate + beta * kl, mask) / n_tokens
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, clipped, kl


def old_group_advantages(rewards, group_size, eps=1e-6):
    r = rewards.float().view(-1, group_size)
    spread = r.max(1, keepdim=True).values > r.min(1, keepdim=True).values
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return torch.where(spread, adv, 0.0).view(-1)


def old_rl_loss(clip_eps, beta, lambda_attn):
    """rl_loss and rl_terms before the variants, copied (the loss only)."""
    def loss_fn(model, mb, n_tokens):
        logp, p = policy.policy_forward(model, mb["batch"], mb["response_len"], attention=lambda_attn > 0)
        m = mb["mask"]
        loss = old_token_loss(logp, mb["old_logp"], mb["ref_logp"], mb["adv"], m, n_tokens, clip_eps, beta)[0]
        if lambda_attn > 0:
            loss = loss + lambda_attn * masked_sum(mb["adv"][:, None] * ral.jsd(p, mb["old_p"].detach()), m) / n_tokens
        return loss
    return loss_fn


def test_default_formulas_are_bit_identical_to_before():
    torch.manual_seed(0)
    logp = (0.3 * torch.randn(4, 6)).requires_grad_()
    old, ref = 0.3 * torch.randn(4, 6), 0.3 * torch.randn(4, 6)
    adv, mask = torch.randn(4), (torch.rand(4, 6) > 0.3).float()
    ref[0, 5] = float("-inf")                                     # a padded position's junk stays out
    mask[0, 5] = 0.0
    weight, norm = ral.loss_weights(mask, cli.DEFAULTS["loss_agg"], cli.DEFAULTS["max_new_tokens"])
    new = ral.token_loss(logp, old, ref, adv, weight, norm, cli.DEFAULTS["clip_eps"], cli.DEFAULTS["beta"],
                         cli.DEFAULTS["clip_eps_high"])
    before = old_token_loss(logp, old, ref, adv, mask, mask.sum(), 0.2, 0.04)
    assert all(torch.equal(a, b) for a, b in zip(new, before))
    g_new, = torch.autograd.grad(new[0], logp)
    g_old, = torch.autograd.grad(before[0], logp)
    assert torch.equal(g_new, g_old)
    # the clip indicator at the clip's edges: ratios within a few float32 steps of 1.2 and 0.8
    edges = torch.log(torch.tensor([1.2, 0.8]))[:, None] + torch.arange(-40, 40) * 3e-8
    zero = torch.zeros_like(edges)
    new = ral.token_loss(edges, zero, zero, torch.ones(2), torch.ones_like(edges), 160.0, 0.2, 0.04, 0.0)
    before = old_token_loss(edges, zero, zero, torch.ones(2), torch.ones_like(edges), 160.0, 0.2, 0.04)
    assert torch.equal(new[1], before[1]) and 0 < new[1].sum() < 160
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3, 0.7, 0.1, 0.9, 0.2])
    assert torch.equal(ral.group_advantages(rewards, 4, scale=cli.DEFAULTS["scale_rewards"] == "group"),
                       old_group_advantages(rewards, 4))


def test_default_update_is_bit_identical_to_before(rollout_of):
    """One rollout of the default trainer, then two optimizer steps (its default mini_batches) with today's loss
    and with the copy of the old one: the same losses and the same weights, bit for bit."""
    model, _, make = rollout_of
    micro_batches = make()[0]
    finals, losses = [], []
    for loss_fn in (ral.rl_loss(0.2, 0.04, 1.0), old_rl_loss(0.2, 0.04, 1.0)):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW([w for w in m.parameters() if w.requires_grad], lr=1e-3)
        seen = []
        for k in range(2):
            mbs = [mb for mb in micro_batches if mb["mini_batch"] == k]
            n = torch.tensor(float(sum(mb["mask"].sum() for mb in mbs)))      # the old update's normalizer
            opt.zero_grad()
            for mb in mbs:
                loss = loss_fn(m, mb, n)
                loss = loss[0] if isinstance(loss, tuple) else loss
                loss.backward()
                seen.append(loss.item())
            opt.step()
        finals.append(torch.cat([w.detach().flatten() for w in m.parameters() if w.requires_grad]))
        losses.append(seen)
    assert losses[0] == losses[1] and torch.equal(finals[0], finals[1])
    assert (finals[0] - torch.cat([w.detach().flatten() for w in model.parameters() if w.requires_grad])).abs().max() > 0
    # and update() hands the loss the same normalizer the old one computed
    normalizers = []
    ral.update(copy.deepcopy(model).train(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0),
               micro_batches, lambda m, mb, norm: (normalizers.append((mb["mini_batch"], norm.item())) or
                                                   torch.zeros((), requires_grad=True), {}), 2, 1, 1.0, 1)
    assert len(normalizers) == len(micro_batches)
    for k, norm in normalizers:
        assert norm == sum(mb["mask"].sum().item() for mb in micro_batches if mb["mini_batch"] == k)


@pytest.mark.parametrize("variant", [["--loss_agg=sequence", "--mask_truncated=True"], ["--loss_agg=constant"]])
def test_the_variants_run_through_the_trainer(tmp_path, variant):
    """ral.py with the variants on. The random tiny model never ends a response within 6 tokens, so with
    --mask_truncated every response leaves the loss: the step logs finite numbers, a zero loss, every response
    truncated, and the weights stay those of the warm start (AdamW's first step on zero gradients moves nothing);
    without it, the same responses train the model."""
    import json
    import os
    from test_ral import SMALL, params_of
    out = str(tmp_path / "ral")
    ral.main([f"--out_dir={out}", "--rl_steps=1", *SMALL, "--scale_rewards=none", "--clip_eps_high=0.28", *variant],
             reward_fn=spread_reward)
    row, = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(math.isfinite(v) for v in row.values())
    assert row["truncated"] == 1.0 and row["reward"] > 0
    warm, = tmp_path.glob("warm-*")
    start, end = params_of(str(warm)), params_of(os.path.join(out, "ckpt"))
    unchanged = all(torch.equal(start[k], end[k]) for k in start)
    if "--mask_truncated=True" in variant:
        assert row["loss"] == row["entropy"] == 0.0 and unchanged      # no update token: the means are 0
    else:
        assert row["loss"] != 0.0 and row["entropy"] > 0 and not unchanged
