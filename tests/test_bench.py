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
