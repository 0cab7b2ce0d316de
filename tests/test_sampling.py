"""Rollouts are the policy: whatever generation_config a checkpoint ships, responses are sampled from
softmax(logits / T) with the vision tokens suppressed, and policy_forward's log-probs (old_logp, the ratio) are
exactly those of that distribution."""
import pytest
import torch

import data
import model as policy


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
def test_rollouts_sample_softmax_logits_over_t(instruct_like, temperature):
    model, processor = instruct_like
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.top_k == 1
    batch, _ = data.encode(data.search_task(1, seed=0, tokens=16) * 6, processor)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, generation_config=policy.sampling_config(model, 8, temperature),
                             return_dict_in_generate=True, output_scores=True)
    P = batch["input_ids"].shape[1]
    response = out.sequences[:, P:]
    eos = processor.tokenizer.eos_token_id
    ended = (response == eos).long().cumsum(1)
    mask = (ended == 0) | ((ended == 1) & (response == eos))
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)            # what generate sampled from
    sampled = torch.gather(scores, 2, response[..., None]).squeeze(-1)
    with torch.no_grad():
        logp, _ = policy.policy_forward(model, policy.with_responses(batch, response, mask.long()), response.shape[1],
                                        attention=False, temperature=temperature)
    assert (logp - sampled)[mask].abs().max() < 1e-5
    assert len({tuple(r.tolist()) for r in response}) > 1             # top_k=1 from the checkpoint did not apply
    assert not torch.isin(response, torch.tensor(policy.suppressed_tokens(model.config))).any()
