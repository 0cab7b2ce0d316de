"""bench.py at toy sizes: the benchmarks run and report what they promise. Structure only, never timings."""
import json

import torch

import bench

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
    whole policy that FSDP gathers for generation."""
    rows = {(r["model"], r["mode"]): r for r in bench.bench_memory(8)}
    ddp, fsdp = rows["Qwen2.5-VL-7B", "DDP"], rows["Qwen2.5-VL-7B", "FSDP"]
    assert abs(ddp["params"] / 1e9 - 8.29) < 0.01 and abs(ddp["gradients"] / 4e9 - 7.62) < 0.01
    assert ddp["generation"] == 0 and fsdp["generation"] == 2 * fsdp["params"]
    assert ddp["total"] > 80e9 > fsdp["total"] and abs((fsdp["total"] - fsdp["generation"]) * 8 - ddp["total"]) < 1e3


def test_rollout_before_and_after(tmp_path):
    r = bench.main(["--what", "rollout", "--prompts", "2", "--group", "2", "--new-tokens", "4", "--repeats", "1",
                    "--visual-tokens", "16", "--out", str(tmp_path / "b.json")] + SAME_THREADS)["rollout"]
    # before: generate + old + ref + (2 mini-batches x 1 epoch) forwards, per prompt, re-encode; after: once a prompt
    assert r["after"]["tower_calls"] == 2 and r["before"]["tower_calls"] == 2 * (1 + 2 + 2 + 2)
    assert r["before"]["tokens_per_s"] > 0 and r["speedup"]["step_s"] > 0
