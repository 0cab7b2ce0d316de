"""The objective's math against closed forms and numpy (docs/METHOD.md, Eq. 1, 3, 8)."""
import math

import numpy as np
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from ral import attention_loss, group_advantages, jsd, token_loss

LN2 = math.log(2)


def distributions(n=8, zeros=True):
    """Probability vectors, some with exact zeros and one-hot rows."""
    # weights below 1e-6 become exact zeros: denormals would break the numpy reference (m underflows to 0)
    w = arrays(np.float64, n, elements=st.floats(0, 10, allow_nan=False).map(lambda x: x if x > 1e-6 else 0.0))
    return w.filter(lambda x: x.sum() > 1e-3).map(lambda x: x / x.sum()) if zeros else \
        arrays(np.float64, n, elements=st.floats(0.01, 10)).map(lambda x: x / x.sum())


def jsd_numpy(p, q):
    m = (p + q) / 2
    kl = lambda a: sum(ai * math.log(ai / mi) for ai, mi in zip(a, m) if ai > 0)
    return 0.5 * kl(p) + 0.5 * kl(q)


@settings(max_examples=200, deadline=None)
@given(distributions(), distributions())
def test_jsd_matches_numpy_symmetric_bounded(p, q):
    tp, tq = torch.tensor(p), torch.tensor(q)
    d = jsd(tp, tq).item()
    assert math.isfinite(d)
    assert abs(d - jsd_numpy(p, q)) < 1e-10
    assert abs(d - jsd(tq, tp).item()) < 1e-12
    assert -1e-12 <= d <= LN2 + 1e-12


@settings(max_examples=100, deadline=None)
@given(distributions())
def test_jsd_zero_iff_equal(p):
    assert jsd(torch.tensor(p), torch.tensor(p)).item() == 0.0
    q = np.roll(p, 1)
    if not np.allclose(p, q):
        assert jsd(torch.tensor(p), torch.tensor(q)).item() > 0


def test_jsd_disjoint_support_is_ln2_and_one_hot_finite():
    p, q = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.5, 0.5])
    assert abs(jsd(p, q).item() - LN2) < 1e-7
    logits = torch.tensor([[5.0, -float("inf"), 0.0]], requires_grad=True)  # a masked key, as in the capture
    d = jsd(logits.softmax(-1), torch.tensor([[0.0, 0.0, 1.0]]))
    d.backward()
    assert torch.isfinite(logits.grad[:, [0, 2]]).all() and logits.grad[0, 1] == 0


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, 6, elements=st.floats(-5, 5)), st.floats(-3, 3))
def test_attention_term_gradient_is_zero_at_old_policy(logits, adv):
    """dJSD/dp = 1/2 ln(2p/(p+q)) = 0 at p = q: RAL's first step after a rollout has no attention gradient."""
    x = torch.tensor(logits, requires_grad=True)
    p = x.softmax(-1)
    loss, _ = attention_loss(p[None, None], p.detach()[None, None], torch.tensor([adv]), torch.ones(1, 1), 1)
    loss.backward()
    assert x.grad.abs().max().item() < 1e-12


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, 6, elements=st.floats(-3, 3)), distributions(6, zeros=False), st.sampled_from([1.0, -1.0]))
def test_gradient_step_direction_follows_advantage(logits, q, adv):
    """A small descent step on A * JSD lowers JSD for A > 0 (pull) and raises it for A < 0 (push)."""
    x = torch.tensor(logits, requires_grad=True)
    q = torch.tensor(q)
    before = jsd(x.softmax(-1), q)
    if before.item() < 1e-6:
        return
    grad, = torch.autograd.grad(adv * before, x)
    after = jsd((x - 1e-3 * grad).softmax(-1), q)
    assert (after < before).item() if adv > 0 else (after > before).item()


rewards = arrays(np.float64, st.sampled_from([8, 16, 24]), elements=st.floats(-100, 100, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(rewards, st.sampled_from([2, 4, 8]), st.floats(-50, 50), st.floats(0.1, 10))
def test_group_advantages_invariances(r, g, shift, scale):
    r = torch.tensor(r)
    a = group_advantages(r, g)
    assert torch.isfinite(a).all()
    assert a.view(-1, g).mean(1).abs().max() < 1e-4
    spread = (r.view(-1, g).max(1).values - r.view(-1, g).min(1).values)[:, None].expand(-1, g).reshape(-1)
    # float32 rounding of the rewards (relative 6e-8) matters only where the spread is tiny next to their size
    size = 1 + r.abs().max().item()
    ok = spread > 1e-3 * (size + abs(shift))
    assert torch.allclose(a[ok], group_advantages(r + shift, g)[ok], atol=1e-3)
    # scale: (s r - s mean) / (s std + eps) = (r - mean) / (std + eps / s): exact with the eps scaled too
    ok = spread > 1e-3 * size
    assert torch.allclose(group_advantages(r, g, eps=1e-6 / scale)[ok], group_advantages(r * scale, g)[ok], atol=1e-3)


def test_group_advantages_closed_form_and_equal_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1])
    a = group_advantages(r, 4)
    std = np.std([1, 0, 0, 0], ddof=1)
    expected = (np.array([1, 0, 0, 0]) - 0.25) / (std + 1e-6)
    assert np.allclose(a[:4].numpy(), expected, atol=1e-6)
    assert (a[4:] == 0).all()


def test_token_loss_closed_form():
    """Hand-computed: ratio e^0.5 clipped at 1.2 for A > 0, unclipped ratio used for A < 0 (min picks it)."""
    logp = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    old = torch.zeros(2, 2)
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clipped, kl = token_loss(logp, old, ref, adv, mask, norm=3, clip_eps=0.2, beta=0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    surr = [1.2 * 1, 1 * 1, -math.exp(0.5)]                    # per real token
    expected = (-(surr[0]) + 0.5 * k3 - surr[1] + (-surr[2]) + 0.5 * k3) / 3
    assert abs(loss.item() - expected) < 1e-6
    assert clipped.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_token_mean_is_independent_of_micro_batching():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 4, 6).unbind(0)
    adv, mask = torch.randn(4), (torch.rand(4, 6) > 0.3).float()
    n = mask.sum()
    whole, _, _ = token_loss(logp, old, ref, adv, mask, n)
    halves = sum(token_loss(logp[s], old[s], ref[s], adv[s], mask[s], n)[0] for s in (slice(0, 2), slice(2, 4)))
    assert torch.allclose(whole, halves)


def test_masked_positions_are_excluded_not_multiplied_by_zero():
    """An inf or nan at a padded position (a log-prob of a pad token, an attention row of nothing) must not reach
    the loss or its gradient: 0 * inf is nan, so the mask must select, not multiply."""
    logp = torch.tensor([[-0.5, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-0.4, -1.2, float("inf")]])
    ref = torch.tensor([[-0.6, -0.9, float("-inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _, _ = token_loss(logp, old, ref, torch.tensor([0.7]), mask, norm=2)
    expected, _, _ = token_loss(logp[:, :2], old[:, :2], ref[:, :2], torch.tensor([0.7]), mask[:, :2], norm=2)
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    p = torch.tensor([[[0.5, 0.5], [float("nan"), float("nan")]]])
    attn, _ = attention_loss(p, torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]), torch.tensor([1.0]),
                             torch.tensor([[1.0, 0.0]]), norm=1)
    assert torch.isfinite(attn)
