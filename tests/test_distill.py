"""On-Policy Attention Distillation (Eq. 5 and 6): the reverse KL, the attention term's gradient at the first step,
JSD going down, gamma_attn = 0 being exactly the KD baseline, the teacher/student pair check, and a run that resumes."""
import copy
import json
import os

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import cli
import distill
import ral
import tasks
from helpers import spread_reward
from model import Processor, build_tiny, build_tokenizer, load, policy_forward

SMALL = ["--sft_steps=0", "--teacher_sft_steps=0", "--teacher_layers=2", "--tiny_layers=1", "--tiny_hidden=64",
         "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=6", "--eval_n=2", "--task_tokens=16",
         "--train_size=8"]


@pytest.fixture(scope="module")
def pair():
    """A 1-layer student and a 2-layer teacher whose final layer attends sharply (random models look almost
    uniformly, so the two attention policies would nearly agree), on one fixed rollout of the student."""
    student, processor = build_tiny(layers=1, hidden=64, seed=1)
    teacher, _ = build_tiny(layers=2, hidden=64, seed=2)
    with torch.no_grad():
        teacher.model.language_model.layers[-1].self_attn.q_proj.weight.mul_(20)
    teacher.eval().requires_grad_(False)
    cfg = dict(cli.DEFAULTS, algo="grpo", group_size=4, max_new_tokens=6, beta=0.0, mini_batches=2)
    torch.manual_seed(0)
    micro_batches = ral.rollout(student, None, processor, tasks.search_task(2, seed=0, tokens=16), cfg, "think", 0, 0,
                                "cpu")[0]
    return student, teacher, processor, cfg, micro_batches


def mean_jsd(student, teacher, mbs):
    with torch.no_grad():
        total = sum((ral.jsd(policy_forward(student, pc["batch"], pc["response_len"])[1],
                             distill.teacher_forward(teacher, pc, "cpu")[1]) * pc["mask"]).sum() for pc in mbs)
    return (total / sum(pc["mask"].sum() for pc in mbs)).item()


def distill_loss(teacher, mu, gamma_attn):
    """Eq. 6 with GRPO's token loss and no reference KL, as the pair's config has it."""
    return distill.distill_loss(teacher, mu, gamma_attn, clip_eps=0.2, beta=0.0, lambda_attn=0.0)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def test_reverse_kl_is_kl_student_to_teacher():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11).log_softmax(-1), torch.randn(3, 5, 11).log_softmax(-1)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=s),
                                                 torch.distributions.Categorical(logits=t))
    assert torch.allclose(distill.reverse_kl(s, t), expected, atol=1e-6)
    assert distill.reverse_kl(s, s).abs().max() < 1e-6
    assert not torch.allclose(distill.reverse_kl(s, t), distill.reverse_kl(t, s), atol=1e-3)   # not symmetric
    # a teacher head padded with 2 extra rows (e.g. Qwen2.5-VL-3B vs 7B) is cut and renormalized
    padded = torch.cat([t, torch.randn(3, 5, 2)], -1).log_softmax(-1)
    assert torch.allclose(distill.reverse_kl(s, padded), expected, atol=1e-5)


def test_attention_distillation_gradient_is_nonzero_at_the_first_step(pair):
    """RAL's JSD to p_old has zero gradient while the weights equal the rollout's; Eq. 5's JSD to the teacher
    does not."""
    student, teacher, _, _, mbs = pair
    mb = mbs[0]
    n = mb["mask"].sum()
    grads = {}
    for name in ("ral", "distill"):
        student.zero_grad(set_to_none=True)
        _, p = policy_forward(student, mb["batch"], mb["response_len"])
        target = mb["old_p"] if name == "ral" else distill.teacher_forward(teacher, mb, "cpu")[1]
        ((ral.jsd(p, target) * mb["mask"]).sum() / n).backward()
        grads[name] = torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None]).norm()
    student.zero_grad(set_to_none=True)
    assert grads["distill"] > 1e-4
    assert grads["ral"] < 1e-3 * grads["distill"]


def test_a_few_steps_lower_the_attention_jsd(pair):
    """Attention distillation alone (mu = 0; the fixed rollout's rewards are all 0, so no RL signal)."""
    student, teacher, _, cfg, mbs = pair
    assert all(pc["adv"].abs().sum() == 0 for pc in mbs)
    model = copy.deepcopy(student).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = mean_jsd(model, teacher, mbs)
    for _ in range(4):
        ral.update(model, opt, mbs, distill_loss(teacher, mu=0.0, gamma_attn=1.0), 2, 1, 1.0, world=1)
    after = mean_jsd(model, teacher, mbs)
    assert before > 1e-3 and after < 0.7 * before, (before, after)


def test_gamma_zero_is_exactly_the_kd_baseline(pair):
    """With gamma_attn = 0 the update is L_RL + mu * reverse KL, written out here on its own (no attention
    capture), to float rounding: distill_loss goes through the capturing forward, whose reductions may round
    differently on another CPU (seen: the logged loss off by 2e-8); gamma_attn > 0 changes it by far more."""
    student, teacher, processor, cfg, _ = pair
    torch.manual_seed(0)
    mbs = ral.rollout(student, None, processor, tasks.search_task(2, seed=1, tokens=16), cfg, "think", 0, 0,
                         "cpu", spread_reward)[0]
    assert any(pc["adv"].abs().sum() > 0 for pc in mbs)
    mu = 0.7

    def kd(model, mb, n_tokens):
        logp, _, logprobs = policy_forward(model, mb["batch"], mb["response_len"], attention=False, full=True)
        loss, stats = ral.rl_terms(logp, None, logprobs, mb, n_tokens, clip_eps=0.2, beta=0.0, lambda_attn=0.0)
        kl = distill.reverse_kl(logprobs, distill.teacher_forward(teacher, mb, "cpu")[0])
        return loss + mu * (kl * mb["mask"]).sum() / n_tokens, stats

    final, losses = {}, {}
    for name, loss in (("kd", kd), ("gamma0", distill_loss(teacher, mu, 0.0)), ("gamma", distill_loss(teacher, mu, 0.5))):
        model = copy.deepcopy(student).train()
        opt = torch.optim.SGD([w for w in model.parameters() if w.requires_grad], lr=0.5)
        records = ral.update(model, opt, mbs, loss, 2, 1, 1.0, world=1)
        final[name], losses[name] = params(model), [r["loss"] for r in records]
    assert (final["kd"] - params(student)).abs().max() > 1e-3
    loss_gap = lambda name: max(abs(a - b) for a, b in zip(losses[name], losses["kd"]))
    param_gap = lambda name: (final[name] - final["kd"]).abs().max().item()
    assert loss_gap("gamma0") < 1e-6 and param_gap("gamma0") < 1e-7, (loss_gap("gamma0"), param_gap("gamma0"))
    assert loss_gap("gamma") > 1e-2 and param_gap("gamma") > 1e-6, (loss_gap("gamma"), param_gap("gamma"))


def test_teacher_on_another_dtype(pair):
    student, teacher, _, cfg, mbs = pair
    n = mbs[0]["mask"].sum()
    stats = {}
    for name, t in (("fp32", teacher), ("bf16", copy.deepcopy(teacher).to(torch.bfloat16))):
        with torch.no_grad():
            loss, stats[name] = distill_loss(t, 1.0, 0.5)(student, mbs[0], n)
        assert torch.isfinite(loss)
    assert abs(stats["bf16"]["rkl"] - stats["fp32"]["rkl"]) < 0.05 * stats["fp32"]["rkl"]


def test_pair_check_names_what_differs():
    student, processor = build_tiny(layers=1, hidden=64)
    teacher, _ = build_tiny(layers=2, hidden=128)
    assert distill.pair_problems(processor, teacher.config, processor, student.config) == []   # depth/width may differ
    ip = processor.image_processor
    other_tok = Processor(build_tokenizer(vocab_size=400), ip)
    assert "tokenizer vocabularies differ" in distill.pair_problems(other_tok, teacher.config, processor,
                                                                    student.config)[0]
    other_ip = Processor(processor.tokenizer, Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5, 0.5, 0.5]))
    problems = " ".join(distill.pair_problems(other_ip, teacher.config, processor, student.config))
    assert "patch_size: teacher 16, student 14" in problems and "image_mean" in problems
    config = copy.deepcopy(teacher.config)
    config.vision_config.spatial_merge_size, config.image_token_id = 4, 7
    problems = " ".join(distill.pair_problems(processor, config, processor, student.config))
    assert "spatial_merge_size: teacher 4, student 2" in problems and "image_token_id: teacher 7" in problems


def test_mismatched_pair_fails_before_training(tmp_path):
    model, processor = build_tiny(layers=1, hidden=64)
    Processor(build_tokenizer(vocab_size=400), processor.image_processor).save_pretrained(tmp_path / "teacher")
    model.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="do not share tokenization.*tokenizer vocabularies differ"):
        distill.main([f"--out_dir={out}", f"--teacher={tmp_path / 'teacher'}", "--rl_steps=1", *SMALL])
    assert not os.path.exists(out / "metrics.jsonl") and not os.path.exists(out / "ckpt")


def test_run_logs_checkpoints_and_resumes(tmp_path):
    """ral.py's trainer with the distillation loss: metrics carry the reverse KL and the attention JSD, a split
    run resumed from its checkpoint ends where the whole run does."""
    common = [*SMALL, "--ckpt_every=1", f"--warm_dir={tmp_path / 'student'}"]
    results = distill.main([f"--out_dir={tmp_path / 'whole'}", "--rl_steps=2", *common], spread_reward)
    distill.main([f"--out_dir={tmp_path / 'split'}", "--rl_steps=1", *common], spread_reward)
    distill.main([f"--out_dir={tmp_path / 'split'}", "--rl_steps=2", "--resume=True", *common], spread_reward)
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["rkl"] > 0 and r["distill_jsd"] > 0 for r in rows)
    assert {"before_rl", "after_rl"} <= set(results)
    a, b = saved_params(tmp_path / "whole"), saved_params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.exists(tmp_path / "whole" / "curves.png")


def saved_params(run):
    return {k: v.clone() for k, v in load(str(run / "ckpt"))[0].state_dict().items()}


def test_reverse_kl_over_suppressed_tokens_is_finite():
    """The suppressed vision tokens have log-prob -inf for student and teacher: they add 0, value and gradient."""
    logits = torch.randn(2, 3, 7, requires_grad=True)
    masked = logits.masked_fill(torch.arange(7) == 5, float("-inf"))
    s, t = masked.log_softmax(-1), torch.randn(2, 3, 7).masked_fill(torch.arange(7) == 5, float("-inf")).log_softmax(-1)
    kl = distill.reverse_kl(s, t)
    expected = distill.reverse_kl(s[..., [0, 1, 2, 3, 4, 6]], t[..., [0, 1, 2, 3, 4, 6]])
    assert torch.allclose(kl, expected, atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
