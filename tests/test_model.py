"""The policy: loading, freezing, and the attention capture (Eq. 2) against transformers' own eager attention."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

import model as M

R = 6  # response rows


@pytest.fixture(scope="module")
def tiny():
    return M.build_tiny(seed=0)


def image_batch(processor, seed=0):
    """Two prompts with images of different sizes, so the left padding differs, plus random response tokens."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (112, 168, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))]
    vis = processor.image_processor(images=images, return_tensors="pt")
    tok, texts = processor.tokenizer, []
    for k, grid in enumerate(vis["image_grid_thw"]):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which colour?" * (k + 1)}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4)))
    enc = tok(texts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0, "the second prompt must be left-padded"
    response = torch.randint(20, 200, (2, R), generator=torch.Generator().manual_seed(seed))
    response_mask = torch.ones_like(response)
    response_mask[1, -2:] = 0
    ids = torch.cat([enc["input_ids"], response], 1)
    return dict(input_ids=ids, attention_mask=torch.cat([enc["attention_mask"], response_mask], 1),
                mm_token_type_ids=(ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).long(),
                pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"])


def eager_policy(model, batch, rows=R):
    """The reference: eager attention of the whole model, last layer, head mean, self weight dropped, renormalized."""
    model.set_attn_implementation("eager")
    try:
        out = model(**batch, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("ral_sdpa")
    alpha = out.attentions[-1].mean(1)[:, -rows:].clone()
    T = alpha.shape[-1]
    for j in range(rows):
        alpha[:, j, T - rows + j] = 0
    return alpha / alpha.sum(-1, keepdim=True), out.logits


@pytest.mark.device
def test_capture_equals_eager_values_and_gradients(tiny, device):
    model, processor = tiny
    model = model if device == "cpu" else copy.deepcopy(model).to(device)
    batch = M.to_device(image_batch(processor), device)
    weights = torch.randn(2, R, batch["input_ids"].shape[1], generator=torch.Generator().manual_seed(1)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    _, p = M.policy_forward(model, batch, R)
    grads = torch.autograd.grad((p * weights).sum(), params, allow_unused=True)
    ref, _ = eager_policy(model, batch)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)

    assert p.shape == ref.shape
    assert (p - ref).abs().max() < 1e-5
    assert torch.allclose(p.sum(-1), torch.ones(2, R, device=device), atol=1e-6)
    T = p.shape[-1]
    for j in range(R):                                     # nothing on itself or the future
        assert (p[:, j, T - R + j:] == 0).all()
    pad = batch["attention_mask"] == 0
    assert (p[1][:, pad[1]] == 0).all()                    # padding keys carry zero mass
    used = [(g, r) for g, r in zip(grads, ref_grads) if r is not None]
    assert len(used) > 10
    for g, r in used:
        assert (g - r).abs().max() < 1e-5 * max(1.0, r.abs().max().item())


def test_logits_unchanged_and_logprobs_match(tiny):
    model, processor = tiny
    batch = image_batch(processor, seed=2)
    with torch.no_grad():
        logp, _ = M.policy_forward(model, batch, R)
        model.set_attn_implementation("sdpa")
        plain = model(**batch, use_cache=False).logits
        model.set_attn_implementation("ral_sdpa")
        with M.capturing():
            captured = model(**batch, use_cache=False).logits
    assert torch.equal(plain, captured)
    plain[..., M.suppressed_tokens(model.config)] = float("-inf")    # never sampled: outside the distribution
    ref = torch.gather(plain[:, -R - 1:-1].log_softmax(-1), 2, batch["input_ids"][:, -R:, None]).squeeze(-1)
    assert torch.allclose(logp, ref, atol=1e-6)


def test_generation_unaffected(tiny):
    """KV-cache generation with our kernel (capture off) gives the same tokens as plain SDPA."""
    model, processor = tiny
    batch = image_batch(processor)
    n = batch["input_ids"].shape[1] - R
    prompt = dict(batch, **{k: batch[k][:, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids")})
    ours, mask = M.generate(model, processor, prompt, 12, greedy=True)
    model.set_attn_implementation("sdpa")
    try:
        plain, _ = M.generate(model, processor, prompt, 12, greedy=True)
    finally:
        model.set_attn_implementation("ral_sdpa")
    assert torch.equal(ours, plain)
    assert mask[:, 0].all()
    vision = processor.tokenizer.convert_tokens_to_ids(M.VISION_TOKENS)
    assert not torch.isin(ours, torch.tensor(vision)).any()


def test_vision_frozen_language_trainable(tiny):
    model, _ = tiny
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_save_and_load_back_bit_exact(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = M.load(str(tmp_path))
    batch = image_batch(processor)
    assert torch.equal(batch["input_ids"], image_batch(proc2)["input_ids"])
    assert torch.equal(batch["pixel_values"], image_batch(proc2)["pixel_values"])
    with torch.no_grad():
        a, pa = M.policy_forward(model, batch, R)
        b, pb = M.policy_forward(loaded, batch, R)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert not any(p.requires_grad for p in loaded.model.visual.parameters())


def test_tiny_is_seeded():
    a, _ = M.build_tiny(seed=3)
    b, _ = M.build_tiny(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_capture_gradients_survive_gradient_checkpointing():
    """The captured p leaves the checkpointed layer as a side output; its gradient must still reach the weights."""
    model, processor = M.build_tiny(seed=4)
    batch = image_batch(processor)
    weights = torch.randn(2, R, batch["input_ids"].shape[1], generator=torch.Generator().manual_seed(2))
    params = [p for p in model.model.language_model.parameters()]
    model.train()

    def grads():
        logp, p = M.policy_forward(model, batch, R)
        return torch.autograd.grad((p * weights).sum() + logp.sum(), params)
    plain = grads()
    model.activation_checkpointing_enable(dict(use_reentrant=False))
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_head_mean_softmax_gradcheck():
    """The memory-lean head mean (recomputes each head's weights in backward) against finite differences."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g), torch.randn(2, 3, 7, 5, dtype=torch.float64,
                                                                                  generator=g)
    allowed = torch.rand(2, 4, 7, generator=g) > 0.3
    allowed[..., 0] = True                                  # every row keeps at least one key
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: M.HeadMeanSoftmax.apply(q, k, allowed, 0.4), (q, k))
    reference = torch.stack([M.head_softmax(q[:, h], k[:, h], allowed, 0.4) for h in range(3)]).mean(0)
    assert torch.allclose(M.HeadMeanSoftmax.apply(q, k, allowed, 0.4), reference)


@pytest.mark.device
def test_head_mean_softmax_grouped_query_heads(device):
    """Key heads shared by groups of query heads (6 query heads, 2 key heads), as the 7B's 28 and 4: the same values
    and gradients as the key heads repeated to 6 (transformers' repeat_kv), and finite differences agree."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=g), torch.randn(2, 2, 7, 5, dtype=torch.float64,
                                                                                  generator=g)
    allowed = torch.rand(2, 4, 7, generator=g) > 0.3
    allowed[..., 0] = True
    q, k, allowed = q.to(device).requires_grad_(), k.to(device).requires_grad_(), allowed.to(device)
    assert torch.autograd.gradcheck(lambda q, k: M.HeadMeanSoftmax.apply(q, k, allowed, 0.4), (q, k))
    repeated = lambda k: k.repeat_interleave(3, 1)                  # query head h reads key head h // 3
    ours = M.HeadMeanSoftmax.apply(q, k, allowed, 0.4)
    reference = torch.stack([M.head_softmax(q[:, h], repeated(k)[:, h], allowed, 0.4) for h in range(6)]).mean(0)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=g).to(device)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-12)
    grads = [torch.autograd.grad((x * w).sum(), (q, k)) for x in (ours, reference)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(*grads))


def test_float_mask_equals_boolean_mask():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    allowed[..., 0] = False                                 # a left-padded key
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    a, b = M.attention_policy(q, k, allowed, 3, 0.5), M.attention_policy(q, k, additive, 3, 0.5)
    assert torch.allclose(a, b) and (a[..., 0] == 0).all()
