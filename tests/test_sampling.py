"""Rollouts are the policy: whatever generation_config a checkpoint ships, responses are sampled from
softmax(logits / T) with the vision tokens suppressed, and policy_forward's log-probs (old_logp, the ratio) are
exactly those of that distribution; batching generate calls changes no response."""
import pytest
import torch

import cli
import data
import model as policy
import ral
import tasks
from helpers import spread_reward


@pytest.fixture(scope="module")
def instruct_like(tmp_path_factory):
    """A tiny checkpoint whose saved generation_config does what Qwen2.5-VL Instruct's does, and more."""
    model, processor = policy.build_tiny(seed=3)
    model.generation_config.update(do_sample=True, repetition_penalty=1.3, top_k=1, top_p=0.5, temperature=0.2)
    folder = str(tmp_path_factory.mktemp("instruct"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return policy.load(folder)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollouts_sample_softmax_logits_over_t(instruct_like, temperature, monkeypatch):
    """The scores the sampler draws from, divided by T, give exactly policy_forward's log-probs."""
    model, processor = instruct_like
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.top_k == 1
    seen = []
    draw = policy.GumbelSampler.__call__
    monkeypatch.setattr(policy.GumbelSampler, "__call__",
                        lambda self, ids, scores: seen.append(scores.float() / self.temperature) or draw(self, ids, scores))
    batch, _ = data.encode(tasks.search_task(1, seed=0, tokens=16) * 6, processor)
    response, mask = policy.generate(model, processor, batch, 8, temperature, seeds=range(6))
    sampled = torch.gather(torch.stack(seen[:response.shape[1]], 1).log_softmax(-1), 2, response[..., None])[..., 0]
    with torch.no_grad():
        logp, _ = policy.policy_forward(model, policy.with_responses(batch, response, mask), response.shape[1],
                                        attention=False, temperature=temperature)
    m = mask.bool()
    assert (logp - sampled)[m].abs().max() < 1e-5
    assert len({tuple(r.tolist()) for r in response}) > 1             # top_k=1 from the checkpoint did not apply
    assert not torch.isin(response[m], torch.tensor(policy.suppressed_tokens(model.config))).any()


def test_gumbel_sampler_draws_from_the_softmax():
    scores = torch.tensor([[1.0, 0.0, -1.0, 2.0, float("-inf")]])
    sampler = policy.GumbelSampler(0.7, [0])
    counts = torch.bincount(torch.stack([sampler(None, scores).argmax(-1)[0] for _ in range(20000)]), minlength=5)
    expected = (scores / 0.7).softmax(-1)[0]
    assert counts[4] == 0 and (counts / 20000 - expected).abs().max() < 0.015   # 3+ standard errors


def test_batched_rollouts_equal_one_prompt_at_a_time():
    model, processor = policy.build_tiny(seed=1)
    prompts = tasks.search_task(3, seed=4, tokens=16)
    out = {}
    for per_call in (0, 4):         # all 3 groups in one generate call, or one group per call
        cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=8, generate_batch=per_call)
        out[per_call] = ral.rollout(model, None, processor, prompts, cfg, "think", 5, 2, "cpu", spread_reward)[0]
    assert len(out[0]) == len(out[4])
    for a, b in zip(out[0], out[4]):
        assert torch.equal(a["batch"]["input_ids"], b["batch"]["input_ids"])       # the same responses
        assert (a["old_logp"] - b["old_logp"]).abs().max() < 1e-6 and (a["old_p"] - b["old_p"]).abs().max() < 1e-6


def count_tower_calls(model):
    calls = []
    model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["image", "video"])
def test_vision_cache_is_exact(kind, tmp_path):
    """Visual embeddings computed once (mm_encoder_outputs) give the uncached forward's log-probs and attention
    policy to 1e-6, and the same generation."""
    model, processor = policy.build_tiny(seed=2)
    sample = tasks.search_task(1, seed=0, tokens=16)[0] if kind == "image" else \
        tasks.video_task(1, frames=4, folder=str(tmp_path))[0]
    batch, _ = data.encode([sample] * 3, processor)
    cached = policy.encode_visuals_once(model, batch)
    assert "pixel_values" not in cached and "pixel_values_videos" not in cached
    response, mask = policy.generate(model, processor, batch, 6, seeds=[1, 2, 3])
    again, _ = policy.generate(model, processor, cached, 6, seeds=[1, 2, 3])
    assert torch.equal(response, again)
    with torch.no_grad():
        for i, j in ((0, 3), (1, 2)):                                  # the whole group and a slice of it
            a = policy.policy_forward(model, policy.take_rows(policy.with_responses(batch, response, mask), i, j), 6)
            b = policy.policy_forward(model, policy.take_rows(policy.with_responses(cached, response, mask), i, j), 6)
            assert (a[0] - b[0]).abs().max() < 1e-6 and (a[1] - b[1]).abs().max() < 1e-6


def test_the_tower_runs_once_per_prompt_per_step():
    model, processor = policy.build_tiny(seed=1)
    calls = count_tower_calls(model)
    cfg = dict(cli.DEFAULTS, group_size=4, max_new_tokens=6, mini_batches=2, epochs=2, micro_batch=1)
    ref = policy.build_tiny(seed=1)[0].eval()
    ref_calls = count_tower_calls(ref)
    micro_batches = ral.rollout(model, ref, processor, tasks.search_task(2, seed=0, tokens=16), cfg, "think", 0, 0,
                                "cpu", spread_reward)[0]
    model.train()
    opt = torch.optim.SGD([w for w in model.parameters() if w.requires_grad], lr=0.1)
    ral.update(model, opt, micro_batches, ral.rl_loss(0.2, 0.04, 1.0), 2, 2, 1.0, world=1)
    assert len(calls) == 2 and len(ref_calls) == 0     # 2 prompts; 8 micro-batches x (old, ref, 2 epochs) reuse it


def test_generation_sets_only_what_applies_and_takes_nothing_from_the_checkpoint(instruct_like, monkeypatch):
    """generate fills what sampling_config leaves unset from the checkpoint's generation_config: nothing that
    decoding reads comes from it (greedy search, no repetition penalty, no top-k), and transformers finds no flag
    to warn about ("not valid and may be ignored") with this checkpoint or the tiny one."""
    from transformers.generation import configuration_utils
    warnings = []
    monkeypatch.setattr(configuration_utils.logger, "warning_once", lambda message, *a, **k: warnings.append(message))
    model, processor = instruct_like
    batch, _ = data.encode(tasks.search_task(1, seed=0, tokens=16) * 2, processor)
    for m in (model, policy.build_tiny(seed=3)[0]):
        policy.generate(m, processor, batch, 4, seeds=[0, 1])
        policy.generate(m, processor, batch, 4, greedy=True)
    assert warnings == []
    prepared, _ = model._prepare_generation_config(policy.sampling_config(model, 4))
    assert str(prepared.get_generation_mode()) == "GenerationMode.GREEDY_SEARCH"
    assert prepared.repetition_penalty == 1.0 and prepared.top_k != 1 and prepared.top_p == 1.0
    assert prepared.temperature == 1.0 and not prepared.do_sample
