"""Precision: fp32 master weights keep the small updates that pure bf16 weights round away; under bf16 autocast
the attention policy is still computed in float32; the memory table counts what the trainer holds."""
import copy

import pytest
import torch

import cli
import data
import model as policy
import ral
import scale
import tasks
from helpers import spread_reward
from model import build_tiny


def moved_share(weights_dtype, device="cpu", steps=2, lr=1e-5):
    """Share of the trainable weights that received a gradient and changed after `steps` AdamW steps at lr,
    with bf16 compute (autocast on `device`)."""
    model, processor = build_tiny(seed=1)
    model.to(device, weights_dtype)
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, mini_batches=steps, compute_dtype="bfloat16")
    autocast = scale.compute(cfg, device)
    torch.manual_seed(0)
    with autocast:
        micro_batches = ral.rollout(model, None, processor, tasks.search_task(2, seed=0, tokens=16), cfg, "think",
                                    0, 0, device, spread_reward)[0]
    trainable = [w for w in model.parameters() if w.requires_grad]
    before = [w.detach().clone() for w in trainable]
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    with autocast:
        ral.update(model, optimizer, micro_batches, ral.rl_loss(0.2, 0.0, 1.0), steps, 1, 1.0, world=1)
    touched = moved = 0
    for w, w0 in zip(trainable, before):
        got_grad = optimizer.state[w]["exp_avg"] != 0       # rows of unused token embeddings get no gradient
        touched += got_grad.sum().item()
        moved += ((w.detach() != w0) & got_grad).sum().item()
    return moved / touched


@pytest.mark.device
def test_fp32_master_weights_keep_small_updates(device):
    fp32, bf16 = moved_share(torch.float32, device), moved_share(torch.bfloat16, device)
    # measured: fp32 master weights 1.000 of the weights moved, pure bf16 weights about 0.15
    assert fp32 > 0.95 and bf16 < 0.5, (fp32, bf16)


@pytest.mark.device
def test_attention_policy_is_float32_under_bf16_autocast(monkeypatch, device):
    """The final layer's q and k as the kernel sees them (bf16 under autocast), then Eq. 2 by hand in float32."""
    model, processor = build_tiny(seed=2)
    model.to(device)
    seen = {}
    original = policy.attention_policy

    def recording(query, key, attention_mask, rows, scaling):
        seen.update(query=query.detach(), key=key.detach(), scaling=scaling)
        return original(query, key, attention_mask, rows, scaling)

    monkeypatch.setattr(policy, "attention_policy", recording)
    batch, _ = data.encode(tasks.search_task(1, seed=0, tokens=16), processor)
    full, _ = policy.append_responses(policy.to_device(batch, device), [[30, 40, 50, 60]],
                                      processor.tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast(device.split(":")[0], torch.bfloat16):
        _, p = policy.policy_forward(model, full, 4)
    assert p.dtype == torch.float32
    q, k = seen["query"].double(), seen["key"].double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)        # the kernel hands over the key heads unrepeated
    T, R = k.shape[2], 4
    scores = (q[:, :, T - R:] @ k.transpose(-1, -2)) * seen["scaling"]
    t = torch.arange(T - R, T, device=q.device)
    scores = scores.masked_fill(torch.arange(T, device=q.device)[None, :] > t[:, None], float("-inf"))   # causal; no padding here
    alpha = scores.softmax(-1).mean(1)
    alpha[:, torch.arange(R), t] = 0.0
    reference = alpha / alpha.sum(-1, keepdim=True)
    assert (p.double() - reference).abs().max() < 1e-6


def test_a_float64_model_keeps_its_attention_policy_and_log_probs_in_float64():
    """Eq. 2 by hand in float64 from the kernel's q and k: a float64 model's p matches it to 1e-12 (in float32 it
    would be off by about 1e-8), and its log-probs are float64 too."""
    model, processor = build_tiny(seed=2)
    model.double()
    seen = {}
    original = policy.attention_policy

    def recording(query, key, attention_mask, rows, scaling):
        seen.update(query=query.detach(), key=key.detach(), scaling=scaling)
        return original(query, key, attention_mask, rows, scaling)

    batch, _ = data.encode(tasks.search_task(1, seed=0, tokens=16), processor)
    batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}
    full, _ = policy.append_responses(batch, [[30, 40, 50, 60]], processor.tokenizer.pad_token_id)
    policy.attention_policy = recording
    try:
        with torch.no_grad():
            logp, p = policy.policy_forward(model, full, 4)
    finally:
        policy.attention_policy = original
    assert p.dtype == torch.float64 and logp.dtype == torch.float64 and seen["query"].dtype == torch.float64
    q, k = seen["query"], seen["key"]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)        # grouped-query: each key head serves H / K queries
    T, R = k.shape[2], 4
    scores = (q[:, :, T - R:] @ k.transpose(-1, -2)) * seen["scaling"]
    t = torch.arange(T - R, T)
    scores = scores.masked_fill(torch.arange(T)[None, :] > t[:, None], float("-inf"))
    alpha = scores.softmax(-1).mean(1)
    alpha[:, torch.arange(R), t] = 0.0
    assert (p - alpha / alpha.sum(-1, keepdim=True)).abs().max() < 1e-12


def test_memory_table_counts_master_weights_gradients_adam_and_reference():
    model, _ = build_tiny()
    trainable = sum(w.numel() for w in model.parameters() if w.requires_grad)
    frozen = sum(w.numel() for w in model.parameters() if not w.requires_grad)
    ddp = policy.training_memory(model, world=8)
    assert ddp["weights"] == 4 * trainable + 2 * frozen and ddp["gradients"] == 4 * trainable
    assert ddp["optimizer"] == 8 * trainable and ddp["reference"] == 2 * trainable    # the tower is shared
    fsdp = policy.training_memory(model, world=8, fsdp=True)
    assert fsdp["weights"] == 4 * trainable / 8 + 2 * frozen            # the frozen tower is replicated, not sharded
    state = ("weights", "gradients", "optimizer", "reference")
    assert all(abs(fsdp[k] - ddp[k] / 8) < 1e-6 for k in state[1:])
    # generating, a sharded policy holds its LLM whole in bf16 (scale.gathered; tests/test_fsdp.py measures it
    # there); the tower is a replica already
    assert ddp["generation"] == 0 and fsdp["generation"] == 2 * trainable
    assert all(abs(m["total"] - sum(m[k] for k in state + ("generation",))) < 1e-6 for m in (ddp, fsdp))
    assert "GiB" in scale.memory_report(copy.deepcopy(model), world=2)
