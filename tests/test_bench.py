"""bench.py at toy sizes: the benchmarks run and report what they promise. Structure only, never timings."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import bench
import memory
import ral
from model import policy_forward, prepare

SAME_THREADS = ["--threads", str(torch.get_num_threads())]  # bench.main must not change the session's


def test_capture_reports_every_variant_and_eager_saves_more(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(["--what", "capture", "--sizes", "2x64x4", "--seq", "48", "--rows", "8", "--repeats", "1",
                          "--no-rss", "--out", str(out)] + SAME_THREADS)
    rows = results["capture"]
    assert [r["variant"] for r in rows] == ["sdpa", "capture", "eager"]
    for r in rows:
        assert r["time_s"] > 0 and r["time_vs_sdpa"] > 0 and r["saved_bytes"] > 0
    saved = {r["variant"]: r["saved_bytes"] for r in rows}
    # deterministic byte counts: capture keeps more than plain SDPA (its B x H x R x T scores), eager more still
    # (every layer's B x H x T x T weights)
    assert saved["sdpa"] < saved["capture"] < saved["eager"]
    assert json.loads(out.read_text())["capture"][0]["T"] == 48


def test_saved_bytes_counts_the_attention_matrix():
    model, processor = bench.build_tiny(layers=2, hidden=64, heads=4, kv_heads=2)
    b = lambda T: bench.random_batch(len(processor.tokenizer), 1, T)
    # eager keeps at least one fp32 H x T x T matrix per layer: growth from T to 2T is at least 3 * layers * H * T^2 * 4
    grow = bench.saved_bytes(model, b(64), 8, "eager") - bench.saved_bytes(model, b(32), 8, "eager")
    assert grow >= 3 * 2 * 4 * 32 * 32 * 4
    model.set_attn_implementation("ral_sdpa")


def test_step_phases(tmp_path):
    results = bench.main(["--what", "step", "--prompts", "1", "--group", "2", "--new-tokens", "4", "--repeats", "1",
                          "--out", str(tmp_path / "b.json")] + SAME_THREADS)
    phases = results["step"]["phases"]
    assert set(phases) == {"generate", "score", "update", "total"}
    for p in phases.values():
        assert p["grpo_s"] > 0 and p["ral_s"] > 0 and p["ral_vs_grpo"] > 0
    assert results["step"]["response_tokens"] > 0


def test_memory_table_from_the_real_configs():
    """Meta-device Qwen2.5-VL configs: the 7B has 8.29 B parameters (7.62 B trainable in the LLM); with fp32 master
    weights its training state does not fit an 80 GB GPU in DDP and does in FSDP over 8, with the bf16 copy of the
    LLM that FSDP gathers for generation."""
    rows = {(r["model"], r["mode"]): r for r in memory.bench_memory(8)}
    ddp, fsdp = rows["Qwen2.5-VL-7B", "DDP"], rows["Qwen2.5-VL-7B", "FSDP"]
    assert abs(ddp["params"] / 1e9 - 8.29) < 0.01 and abs(ddp["gradients"] / 4e9 - 7.62) < 0.01
    trainable = ddp["gradients"] / 4
    tower = 2 * (ddp["params"] - trainable)            # bf16, one replica per GPU in both modes
    assert ddp["generation"] == 0 and fsdp["generation"] == 2 * trainable
    sharded = fsdp["total"] - fsdp["generation"] - tower
    assert ddp["total"] > 80e9 > fsdp["total"] and abs(sharded * 8 + tower - ddp["total"]) < 1e3


def test_rollout_before_and_after(tmp_path):
    r = bench.main(["--what", "rollout", "--prompts", "2", "--group", "2", "--new-tokens", "4", "--repeats", "1",
                    "--visual-tokens", "16", "--out", str(tmp_path / "b.json")] + SAME_THREADS)["rollout"]
    # before: generate + old + ref + (2 mini-batches x 1 epoch) forwards, per prompt, re-encode; after: once a prompt
    assert r["after"]["tower_calls"] == 2 and r["before"]["tower_calls"] == 2 * (1 + 2 + 2 + 2)
    assert r["before"]["tokens_per_s"] > 0 and r["speedup"]["step_s"] > 0


def measured_step(layers, hidden, heads, kv_heads, intermediate, B, T, R, dtype, checkpointing):
    """One RAL micro-batch of a small model (policy_forward with the attention policy, Eq. 4's loss, backward) on a
    padded batch: bytes alive after the forward and the peak (bench.LiveBytes), and activation_memory's count."""
    model, processor = bench.build_tiny(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads)
    config = copy.deepcopy(model.config)
    config.text_config.intermediate_size = intermediate                  # build_tiny's is 2 x hidden
    torch.manual_seed(0)
    model = prepare(Qwen2_5_VLForConditionalGeneration(config)).train().to(dtype)
    if checkpointing:
        model.activation_checkpointing_enable(dict(use_reentrant=False))
    batch = bench.random_batch(len(processor.tokenizer), B, T)
    batch["attention_mask"][0, :3] = 0                                     # padding: the dense mask
    mb = dict(old_logp=torch.zeros(B, R), ref_logp=torch.zeros(B, R), adv=torch.ones(B), mask=torch.ones(B, R),
              weight=torch.ones(B, R), old_p=torch.full((B, R, T), 1.0 / T))
    for w in model.parameters():     # gradients exist from an earlier micro-batch: the training state, not counted
        w.grad = torch.zeros_like(w) if w.requires_grad else None
    with bench.LiveBytes() as live:
        logp, p, logprobs = policy_forward(model, batch, R, full=True)     # as ral.rl_loss calls it
        loss, _ = ral.rl_terms(logp, p, logprobs, mb, torch.tensor(float(B * R)), 0.2, 0.04, 1.0)
        del logprobs                     # the graph keeps the log-softmax for backward; the loss function keeps no more
        held = live.live()
        loss.backward()
    t = config.text_config
    sizes = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=t.vocab_size)
    return held, live.peak, memory.activation_memory(sizes, B, T, R, 2 if dtype == torch.bfloat16 else 4,
                                                    checkpointing)


@pytest.mark.parametrize("dtype,checkpointing", [(torch.bfloat16, True), (torch.bfloat16, False),
                                                 (torch.float32, True)])
def test_activation_rows_against_a_measured_step(dtype, checkpointing):
    """The memory table's activation rows, counted from the code, against the bytes a real forward + backward keeps
    (every storage an operation made, whoever holds it). Measured: held within 0.5%, peak within 8% (the peak's
    gradient working set is the one fitted term); asserted: 2% and 12%."""
    for geometry in [(3, 96, 6, 2, 480, 3, 80, 12), (2, 128, 8, 2, 600, 2, 200, 64)]:
        held, peak, m = measured_step(*geometry, dtype, checkpointing)
        assert abs(held / m["held"] - 1) < 0.02, (geometry, held, m)
        assert abs(peak / m["peak"] - 1) < 0.12, (geometry, peak, m)
        if checkpointing:    # what checkpointing keeps of the layers is their inputs, not their activations
            assert m["layers"] == 0 and m["layer_inputs"] == geometry[0] * geometry[5] * geometry[6] * geometry[1] * \
                (2 if dtype == torch.bfloat16 else 4)


def test_memory_whole_for_the_presets():
    """The 7B preset (micro-batch 2, 1024 new tokens, the longest video: 64 temporal patches x 128 tokens) by hand:
    the checkpointed layer inputs are 28 x B x T x 3584 bf16 values, the mask B x T^2 booleans, the gathered copy
    2 bytes per LLM parameter (the tower is a replica); the per-GPU peak is under 80 GB."""
    rows = {p["model"]: p for p in memory.bench_memory_whole(8)}
    p = rows["Qwen2.5-VL-7B"]
    T = 8192 + memory.PROMPT_TEXT_TOKENS + 1024
    assert p["T"] == T and p["micro_batch"] == 2 and p["checkpointing"] and p["sequences"] == 8
    r = p["rows"]
    assert r["act_layer_inputs"] == 28 * 2 * T * 3584 * 2 and r["act_mask"] == 2 * T * T
    assert r["act_logits"] == 4 * 2 * 1024 * 152064 and abs(r["generate_copy"] / 2e9 - 7.62) < 0.01
    assert r["peak"] == max(r["update_peak"], r["generate_peak"]) < 80e9


def test_layer_table_capture_equals_eager_and_keeps_less():
    """The one-layer table at a small shape: our capture and the last layer in eager compute the same loss (the same
    attention output and p), and keep for backward: ours < ours with repeated key heads < eager (which keeps every
    head's T x T weights)."""
    shape = dict(heads=4, kv_heads=2, head_dim=8)
    rows = {r["variant"]: r for r in bench.bench_layer([48], 12, 2, 1, shape=shape)}
    assert set(rows) == set(bench.LAYER_VARIANTS)
    layer = bench.attention_layer(**shape)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 48, 8, generator=g), torch.randn(2, 2, 48, 8, generator=g), torch.randn(2, 2, 48, 8,
                                                                                                      generator=g)
    weights = (torch.randn(2, 48, 4, 8, generator=g), torch.randn(2, 12, 48, generator=g))
    causal = torch.full((48, 48), torch.finfo(torch.float32).min).triu(1)[None, None]
    loss = {variant: bench.layer_loss(layer, q, k, v, 12, variant, weights, causal).item()
            for variant in ("capture", "capture_repeat_kv", "eager_last_layer")}
    assert abs(loss["capture"] - loss["eager_last_layer"]) < 1e-4 * abs(loss["eager_last_layer"])
    assert loss["capture"] == pytest.approx(loss["capture_repeat_kv"], rel=1e-6)
    saved = {v: r["saved_bytes"] for v, r in rows.items()}
    assert saved["sdpa"] <= saved["capture"] < saved["capture_repeat_kv"] < saved["eager_last_layer"]
    assert rows["eager_last_layer"]["saved_beyond_sdpa"] >= 2 * 4 * 48 * 48 * 4      # the weights, B x H x T x T


def test_gpu_check_without_cuda_says_so_and_exits_0():
    """Where no CUDA device is visible, `python bench.py --what gpu` is one line and exit status 0 (the check itself
    runs only on a GPU machine, where it is the README's GPU command)."""
    proc = subprocess.run([sys.executable, "bench.py", "--what", "gpu"], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "no CUDA device here: python bench.py --what gpu checks a GPU and needs one"
