"""eval.py: interval math on hand-computed cases, scoring with oracle and constant responders, attention maps,
a JSONL benchmark end to end, and the comparison table."""
import json
import math
import os
import subprocess
import sys

import matplotlib.axes
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import eval as ev
import runs
import model as policy

# ----------------------------------------------------------------------------------------------------------------
# Interval math


def test_wilson_hand_computed():
    # 8 of 10: center (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half 0.2266 -> [0.4902, 0.9433]
    lo, hi = ev.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: [0, z^2/(n + z^2)] = [0, 0.2775]; all of them mirrors it
    assert ev.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert ev.wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert ev.wilson(0, 0) == (0.0, 1.0)


@settings(deadline=None)   # a loaded CI machine must not turn slowness into a failure
@given(st.integers(1, 2000), st.data())
def test_wilson_contains_estimate_and_shrinks(n, draw):
    k = draw.draw(st.integers(0, n))
    lo, hi = ev.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo4, hi4 = ev.wilson(4 * k, 4 * n)  # same proportion, four times the data: a narrower interval
    assert hi4 - lo4 < hi - lo


def test_mean_ci_hand_computed():
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t(2) = 4.303 -> half 2.4843
    mean, half = ev.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), abs=1e-6)
    # two seeds 0.5, 0.7: sd 0.1414, se 0.1, t(1) = 12.706
    assert ev.mean_ci([0.5, 0.7])[1] == pytest.approx(1.2706, abs=1e-4)
    assert math.isnan(ev.mean_ci([0.3])[1]) and ev.mean_ci([0.3])[0] == 0.3


def test_t_critical_is_continuous_past_the_table():
    assert ev.t_critical(30) == 2.042
    assert ev.t_critical(31) == pytest.approx(2.040, abs=2e-3)
    assert ev.t_critical(60) == pytest.approx(2.000, abs=2e-3)
    assert ev.t_critical(120) == pytest.approx(1.980, abs=2e-3)
    assert all(ev.t_critical(d) > ev.t_critical(d + 1) > ev.Z95 for d in range(1, 200))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=10))
def test_mean_ci_scales_with_spread(values):
    mean, half = ev.mean_ci(values)
    assert min(values) - 1e-12 <= mean <= max(values) + 1e-12 and half >= 0
    assert ev.mean_ci([2 * v for v in values])[1] == pytest.approx(2 * half, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Grounding and attention rows


def test_grounding_hand_computed():
    # prompt of 5: positions 1-3 visual, 2 is the target; 0.6 on visual of which 0.3 on target -> 0.5
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.3], [0.1, 0.2, 0.3, 0.1, 0.3]])
    visual = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]]).bool()
    target = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()
    g = ev.grounding_scores(attn, visual, target)
    assert g[0] == pytest.approx(0.5) and g[1] is None  # no target: left out, not counted as zero
    assert ev.chance_grounding(visual, target)[0] == pytest.approx(1 / 3)  # uniform: 1 target of 3 visual tokens


def test_mean_rows_averages_only_real_tokens():
    p = torch.zeros(1, 3, 6)
    p[0, 0, 1], p[0, 1, 2], p[0, 2, 3] = 1.0, 1.0, 1.0   # third row is padding
    rows = torch.tensor([[1, 1, 0]])
    out = ev.mean_rows(p, rows, prompt_len=4)
    assert out.shape == (1, 4) and torch.allclose(out, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))


def test_answer_span_rows_are_the_old_span():
    _, processor = policy.build_tiny()
    tok = processor.tokenizer
    ids = tok("<think>look</think><answer>B</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    response, mask = torch.tensor(ids), torch.ones(len(ids), dtype=torch.long)
    rows = ev.answer_span_rows(tok, response, mask)
    picked = tok.decode([i for i, r in zip(ids, rows) if r])
    assert picked == "B</answer>" and 0 < rows.sum() < len(ids)     # after the answer was chosen
    no_tags = torch.tensor(tok("look left", add_special_tokens=False)["input_ids"])
    assert torch.equal(ev.answer_span_rows(tok, no_tags, torch.ones_like(no_tags)), torch.ones_like(no_tags))


def hand_built(tok, pieces, pad=2):
    """A response written token by token (each piece one token of the tiny tokenizer), EOS, then padding."""
    ids = [tok.convert_tokens_to_ids(piece) for piece in pieces] + [tok.eos_token_id]
    assert tok.decode(ids[:-1]) == "".join(pieces)
    return torch.tensor(ids + [tok.pad_token_id] * pad), torch.tensor([1] * len(ids) + [0] * pad)


def test_grounding_counts_the_row_that_predicts_the_answer():
    """<answer>C</answer>: C is response token 3, and the row that chose it is row 2, the query at the opening
    tag's '>' (row k's query predicts token k + 1). Each row of a hand-built p looks at one key of its own, so the
    grounding of each selection says which rows it averaged."""
    _, processor = policy.build_tiny()
    tok = processor.tokenizer
    response, mask = hand_built(tok, ["<", "answer", ">", "C", "</", "answer", ">"])
    assert ev.answer_tokens(tok, response, mask).tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert ev.answer_rows(tok, response, mask).tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert ev.answer_span_rows(tok, response, mask).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    # p over a prompt of 10 visual keys: row k puts all its mass on key k; the star covers key 2 only
    R, P = len(response), 10
    p = torch.zeros(1, R, P + R)
    for k in range(R):
        p[0, k, k] = 1.0
    visual, target = torch.ones(1, P, dtype=torch.bool), torch.zeros(1, P, dtype=torch.bool)
    target[0, 2] = True
    score = lambda rows: ev.grounding_scores(ev.mean_rows(p, rows[None], P), visual, target)[0]
    assert score(ev.answer_rows(tok, response, mask)) == 1.0                     # only the row that chose C
    assert score(ev.answer_span_rows(tok, response, mask)) == 0.0                 # rows 3-6: keys 3-6
    assert score(mask) == pytest.approx(1 / 8)                                    # 8 real rows, one of them row 2


def test_answer_rows_of_a_longer_answer_and_without_one():
    _, processor = policy.build_tiny()
    tok = processor.tokenizer
    ids = tok("<think>look</think><answer>C. red</answer>", add_special_tokens=False)["input_ids"]
    response, mask = torch.tensor(ids), torch.ones(len(ids), dtype=torch.long)
    tokens, rows = ev.answer_tokens(tok, response, mask), ev.answer_rows(tok, response, mask)
    assert tok.decode([i for i, t in zip(ids, tokens) if t]) == "C. red"
    assert rows.tolist() == tokens.tolist()[1:] + [0]                             # each one row earlier
    assert tok.decode([i for i, r in zip(ids, rows) if r]).startswith(">")        # the first: '>' chose C
    unclosed = torch.tensor(tok("<answer>B", add_special_tokens=False)["input_ids"])
    assert ev.answer_tokens(tok, unclosed, torch.ones_like(unclosed)).tolist()[-1] == 1
    no_tags = torch.tensor(tok("look left", add_special_tokens=False)["input_ids"])
    assert torch.equal(ev.answer_rows(tok, no_tags, torch.ones_like(no_tags)), torch.ones_like(no_tags))


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def test_unpatchify_inverts_the_image_processor():
    _, processor = policy.build_tiny()
    ip = processor.image_processor
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (112, 168, 3), dtype=np.uint8))  # already a multiple of 28
    out = ip(images=[image], return_tensors="pt")
    frames = ev.unpatchify(out["pixel_values"], out["image_grid_thw"][0], ip)
    assert frames.shape == (2, 112, 168, 3)
    assert np.abs(frames[0].astype(int) - np.asarray(image).astype(int)).max() <= 1
    assert np.array_equal(frames[0], frames[1])  # a still image is repeated along the temporal patch


def test_overlay_has_the_image_size_and_marks_hot_cells():
    image = Image.new("RGB", (200, 120), (128, 128, 128))
    heat = np.zeros((3, 5))
    heat[0, 0] = 1.0
    out = np.asarray(ev.overlay(image, heat)).astype(int)
    assert out.shape == (120, 200, 3)
    assert out[5, 5, 0] > out[110, 190, 0]  # hot corner: red in jet; cold corner: blue


# ----------------------------------------------------------------------------------------------------------------
# Runs and tables (eval.json fixtures, no model)


def fake_result(acc, n=64):
    k = round(acc * n)
    return dict(n=n, accuracy=k / n, accuracy_ci=list(ev.wilson(k, n)), format=1.0, format_ci=[0.94, 1.0],
                grounding=0.3)


def test_compare_groups_seeds_into_mean_and_t_interval(tmp_path):
    accuracies = {"grpo-s0": 0.5, "grpo-s1": 0.75, "ral-s0": 0.625, "ral-s1": 0.75, "ral-s2": 0.875, "base": 0.25}
    for name, acc in accuracies.items():
        runs.write_json(dict(mode="think", suites={"search-64": fake_result(acc)}), str(tmp_path / name / "eval.json"))
    paths = [str(tmp_path / name) for name in accuracies]
    text = ev.compare(paths, ["search-64"], n=64)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()[2:]}
    assert list(rows) == ["grpo", "ral", "base"]
    assert rows["grpo"] == ["2", f"62.5 ± {100 * 12.706 * 0.125:.1f}"]          # sd 0.1768, se 0.125, t(1)
    assert rows["ral"] == ["3", f"75.0 ± {100 * 4.303 * 0.125 / math.sqrt(3):.1f}"]  # sd 0.125, t(2)
    lo, hi = ev.wilson(16, 64)                                                   # one seed: Wilson half-width
    assert rows["base"] == ["1", f"25.0 ± {100 * (hi - lo) / 2:.1f}"]


def test_method_name_and_mode():
    assert runs.method_name("out/ral-s12/") == "ral" and runs.method_name("out/ral-zero-s0") == "ral-zero"
    assert runs.method_name("out/kd-attn") == "kd-attn"
    assert runs.run_mode("out/does-not-exist/ral-zero-s1") == "zero" and runs.run_mode("out/nothing/grpo") == "think"


def test_reads_the_trainers_run_folder(tmp_path):
    # ral.py: <run>/run_config.json, weights and eval.json (its held-out result, filed by save_eval) in <run>/ckpt
    run = tmp_path / "ral-zero-s0"
    runs.write_json(dict(task="search", task_tokens=256, zero=True, eval_file=""), str(run / "run_config.json"))
    (run / "ckpt").mkdir()
    (run / "ckpt" / "config.json").write_text("{}")
    runs.save_eval(str(run / "ckpt"), "zero", {ev.tasks.suite_name("search", dict(task_tokens=256)): fake_result(0.5, n=128)})
    assert runs.weights_dir(str(run)) == str(run / "ckpt") and runs.run_mode(str(run)) == "zero"
    saved = runs.saved_results(str(run))
    assert saved["suites"]["search-256 n=128"]["n"] == 128
    assert ev.compare([str(run)], ["search-256"], n=128).splitlines()[2].startswith("| ral-zero | 1 | 50.0 ± ")


@pytest.mark.parametrize("bad", ["serch-64", "search-", "search-8x4", "video-x16", "video-8x"])
def test_unknown_suite_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown suite"):
        ev.suite(bad)


def test_video_suite_with_tokens_per_frame():
    assert ev.suite("video-4x64", n=1)[0]["id"].startswith("video-64-")
    assert ev.suite("video-4", n=1)[0]["id"].startswith("video-16-")


# ----------------------------------------------------------------------------------------------------------------
# Scoring with responders (no model): an oracle is perfect, a constant answer is at chance on a balanced suite


def oracle(mode):
    think = "<think>The star is there.</think>" if mode == "think" else ""
    return lambda samples: [f"{think}<answer>{s['answer']}</answer>" for s in samples]


@pytest.mark.parametrize("name,mode", [("search-16", "think"), ("search-256", "zero"), ("video-4", "think")])
def test_oracle_is_perfect_and_constant_is_chance(name, mode):
    samples = ev.suite(name, n=16)
    assert len(samples) == 16 and all(s["answer"] in "ABCD" for s in samples)
    r = ev.evaluate(None, None, samples, mode=mode, batch_size=5, responder=oracle(mode), progress=False)
    assert r["n"] == 16 and r["accuracy"] == 1.0 and r["format"] == 1.0 and r["grounding"] is None
    assert r["grounding_chance"] is None  # a responder has no attention
    assert r["accuracy_ci"] == pytest.approx(ev.wilson(16, 16))
    constant = ev.evaluate(None, None, samples, mode=mode, responder=lambda ss: ["<answer>A</answer>"] * len(ss),
                           progress=False)
    assert constant["accuracy"] == 0.25                     # balanced answers: exactly chance
    assert constant["format"] == (1.0 if mode == "zero" else 0.0)  # no thinking block: only RAL-zero's format


def test_suites_are_held_out_and_deterministic():
    a, b = ev.suite("search-64", n=8), ev.suite("search-64", n=8)
    assert [s["answer"] for s in a] == [s["answer"] for s in b] and len(ev.suite("search-16")) == ev.EVAL_N
    train = {s["id"] for s in ev.tasks.search_task(8, seed=0, tokens=64)}
    assert not train & {s["id"] for s in a}


# ----------------------------------------------------------------------------------------------------------------
# The tiny model end to end


@pytest.fixture(scope="module")
def tiny():
    return policy.build_tiny()


def test_evaluate_tiny_model_reports_grounding(tiny):
    model, processor = tiny
    model.train()
    r = ev.evaluate(model, processor, ev.suite("search-16", n=6), batch_size=4, max_new_tokens=8, progress=False)
    assert model.training  # handed back to the trainer as it came
    model.eval()
    assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
    # the target covers a few of the 16 cells; a random model spreads its attention: a share strictly inside (0, 1)
    assert all(0 < r[key] < 1 for key in ev.GROUNDING_ROWS) and 0 < r["grounding_chance"] < 1


def test_heatmap_has_the_image_size(tiny, tmp_path):
    model, processor = tiny
    sample = ev.suite("search-64", n=1)[0]
    out = ev.attention_map(model, processor, sample, str(tmp_path / "maps" / "a.png"), max_new_tokens=8)
    assert Image.open(out["path"]).size == sample["image"].size and 0 < out["grounding"] < 1
    small = dict(sample, image=sample["image"].resize((150, 100)), target=None)   # any size, no target
    out = ev.attention_map(model, processor, small, str(tmp_path / "b.png"), max_new_tokens=8)
    assert Image.open(out["path"]).size == (150, 100) and out["grounding"] is None


def test_video_strip_has_one_tile_per_token_group(tiny, tmp_path):
    model, processor = tiny
    sample = ev.suite("video-8", n=1)[0]
    out = ev.attention_map(model, processor, sample, str(tmp_path / "v.png"), max_new_tokens=8)
    assert Image.open(out["path"]).size == (4 * 112, 112)  # 8 frames / temporal patch 2, frames of 112 px


def write_benchmark(folder, n=8):
    """A Video-R1 style JSONL benchmark with real image files, made here."""
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "bench.jsonl"), "w") as f:
        for i in range(n):
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (56 + 28 * (i % 3), 84, 3), dtype=np.uint8)).save(folder / name)
            f.write(json.dumps(dict(problem_id=i, problem="What colour is the star?", data_type="image",
                                    problem_type="multiple choice", options=["A. red", "B. green", "C. blue", "D. gray"],
                                    solution=f"<answer>{'ABCD'[i % 4]}</answer>", path=name)) + "\n")
    return str(folder / "bench.jsonl")


def test_jsonl_benchmark_end_to_end(tmp_path, capsys):
    path = write_benchmark(tmp_path)
    samples = ev.suite(path)
    assert len(samples) == 8 and ev.evaluate(None, None, samples, responder=oracle("think"))["accuracy"] == 1.0
    out = str(tmp_path / "result.json")
    ev.main(["--ckpt", "tiny", "--suite", path, "--out", out, "--max_new_tokens", "8", "--batch_size", "3"])
    result = json.load(open(out))["suites"][f"{path} n=8"]
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1 and result["grounding"] is None  # no targets
    assert f"| {path} | 8 |" in capsys.readouterr().out


def test_compare_evaluates_checkpoints_without_eval_json(tiny, tmp_path, capsys):
    model, processor = tiny
    for name in ("grpo-s0", "grpo-s1"):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    runs = [str(tmp_path / "grpo-s0"), str(tmp_path / "grpo-s1")]
    ev.main(["--compare", *runs, "--suite", "search-16", "--n", "4", "--max_new_tokens", "8"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| method | seeds | search-16 |" and lines[2].startswith("| grpo | 2 | ")
    saved = [json.load(open(os.path.join(r, "eval.json")))["suites"]["search-16 n=4"] for r in runs]
    assert saved[0] == saved[1]  # same weights, greedy decoding: the same result; eval.json cached for next time


def test_default_response_length_is_the_runs_own_or_fits_the_format(tiny, tmp_path, monkeypatch):
    """eval.py without --max_new_tokens: a run's own max_new_tokens (its run_config.json), else 1024 for a
    think-format checkpoint (the old 64 cut a <think> rationale off) and 64 for zero; --max_new_tokens wins."""
    model, processor = tiny
    folders = {}
    for name, run_config in (("ral", dict(max_new_tokens=5, zero=False)), ("grpo", dict(max_new_tokens=7, zero=True)),
                             ("plain", None)):
        weights = tmp_path / name / "ckpt" if run_config else tmp_path / name
        model.save_pretrained(weights)
        processor.save_pretrained(weights)
        if run_config:
            runs.write_json(run_config, str(tmp_path / name / "run_config.json"))
        folders[name] = str(tmp_path / name)
    asked, generate = [], policy.generate
    monkeypatch.setattr(policy, "generate", lambda m, p, batch, n, **kw: asked.append(n) or generate(m, p, batch, 2,
                                                                                                        **kw))
    one = ["--suite", "search-16", "--n", "1"]
    for argv in (["--ckpt", folders["ral"]], ["--ckpt", folders["plain"]], ["--ckpt", folders["plain"], "--mode",
                 "zero"], ["--ckpt", folders["ral"], "--max_new_tokens", "3"], ["--compare", folders["grpo"]]):
        ev.main(argv + one)
    assert asked == [5, ev.THINK_TOKENS, ev.ANSWER_TOKENS, 3, 7] and ev.THINK_TOKENS >= 1024


SHARDED = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
import eval as ev
import model as policy
dist.init_process_group("gloo")
torch.set_num_threads(1)
model, processor = policy.build_tiny(seed=4)
r = ev.evaluate(model, processor, ev.suite("search-16", n=7), max_new_tokens=6, batch_size=2, progress=False,
                rank=dist.get_rank(), world=dist.get_world_size())
json.dump(r, open(os.path.join({out!r}, "rank%d.json" % dist.get_rank()), "w"))
dist.destroy_process_group()
"""


def test_sharded_evaluation_equals_one_process(tmp_path):
    """2 gloo ranks each score their share (4 and 3 of 7 samples); both return exactly the 1-process result."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     out=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                       # the ranks' float arithmetic
    model, processor = policy.build_tiny(seed=4)
    alone = ev.evaluate(model, processor, ev.suite("search-16", n=7), max_new_tokens=6, batch_size=2, progress=False)
    torch.set_num_threads(threads)
    alone = json.loads(json.dumps(alone))                          # tuples become lists, as in the ranks' files
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == 7
        for key in ("accuracy", "format", "accuracy_ci"):
            assert got[key] == alone[key], key
        for key in ev.GROUNDING_ROWS:
            assert got[key] == pytest.approx(alone[key], abs=1e-6), key


def test_attention_figure_before_and_after(tmp_path, monkeypatch):
    """Two runs side by side on one sample: a PNG of the figure's size, with the star's box drawn in cyan; each
    title names the model's own answer and the gold one."""
    sample = ev.suite("search-64", n=1)[0]
    runs = [(name, *policy.build_tiny(seed=seed)) for name, seed in (("before RL", 0), ("after RL", 1))]
    titles, set_title = [], matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, text, **kw: titles.append(text) or
                        set_title(ax, text, **kw))
    path = ev.attention_figure(sample, runs, str(tmp_path / "fig.png"), max_new_tokens=6)
    for (name, model, processor), title in zip(runs, titles):
        said = ev.data.extract_answer(ev.answer_attention(model, processor, sample, max_new_tokens=6)["text"])
        assert title.startswith(f"{name}: answered {'nothing' if said is None else repr(said)}, gold "
                                f"{sample['answer']} (")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape[:2] == (520, 840)
    cyan = (img[..., 0] < 60) & (img[..., 1] > 200) & (img[..., 2] > 200)
    assert cyan.sum() > 100                                       # the two boxes' outlines
    a = ev.answer_attention(runs[0][1], runs[0][2], sample, max_new_tokens=6)
    assert a["heat"].shape == (8, 8) and abs(a["heat"].sum() - 1) < 1    # mass on the 64 visual tokens, <= 1


def test_curves_are_smoothed_labelled_and_mark_the_held_out_accuracy(tmp_path):
    """One panel per logged metric (none empty, a metric the log lacks has none), each with its axes named, the
    smoothed curve over the raw one; the accuracy panel also shows the held-out accuracy before and after RL."""
    rows = [dict(step=s, reward=float(s % 3), accuracy=0.1 * (s % 4), loss=1.0 / s) for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs.write_json(dict(before_rl=dict(accuracy=0.4), after_rl=dict(accuracy=0.7)), str(tmp_path / "results.json"))
    labels = dict(reward="reward per response", accuracy="share right", kl="k3 KL", loss="the loss")
    fig = runs.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"), labels)
    assert os.path.getsize(tmp_path / "curves.png") > 0
    assert [ax.get_title() for ax in fig.axes] == ["reward", "accuracy", "loss"]       # no kl: not in the log
    assert [ax.get_ylabel() for ax in fig.axes] == ["reward per response", "share right", "the loss"]
    assert all(ax.get_xlabel() == "RL step" for ax in fig.axes)
    raw, smoothed = fig.axes[0].lines[:2]
    y = [float(s % 3) for s in range(1, 13)]
    assert list(raw.get_ydata()) == y and list(smoothed.get_ydata()) == list(runs.smooth(y, 3))
    assert smoothed.get_ydata()[1] == pytest.approx(sum(y[:3]) / 3) and smoothed.get_ydata()[0] == (y[0] + y[1]) / 2
    held = fig.axes[1].lines[2]
    assert list(held.get_xdata()) == [0, 12] and list(held.get_ydata()) == [0.4, 0.7]


def test_a_missing_suite_file_is_one_line_before_any_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(ev, "load_model", lambda *a: pytest.fail("the model loaded before the suites were checked"))
    for suite, words in (("missing.jsonl", "--suite: no such file: missing.jsonl"), ("serch-64", "unknown suite")):
        with pytest.raises(SystemExit) as stop:
            ev.main(["--ckpt", "tiny", "--suite", "search-16", suite])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and words in err, err
    with pytest.raises(ValueError, match="no such file"):
        ev.suite("missing.jsonl")


def test_eval_json_keeps_the_trainers_result(tiny, tmp_path):
    """The trainer files its held-out result (n = eval_n); eval.py on another n files its own beside it, and a
    later --compare at the trainer's n reads the trainer's result instead of one on other samples."""
    model, processor = tiny
    run = tmp_path / "ral-s0"
    model.save_pretrained(run / "ckpt")
    processor.save_pretrained(run / "ckpt")
    runs.write_json(dict(task="search", task_tokens=16, zero=True, eval_file=""), str(run / "run_config.json"))
    trainers = fake_result(0.625, n=8)                     # a value eval.py would not get: it must survive as it is
    runs.save_eval(str(run / "ckpt"), "zero", {"search-16": trainers})
    ev.main(["--ckpt", str(run), "--suite", "search-16", "--n", "4", "--max_new_tokens", "6"])
    suites = runs.saved_results(str(run))["suites"]
    assert suites["search-16 n=8"] == json.loads(json.dumps(trainers)) and suites["search-16 n=4"]["n"] == 4
    assert "| ral | 1 | 62.5 ± " in ev.compare([str(run)], ["search-16"], n=8)


def test_one_owner_of_the_held_out_draw(tmp_path):
    """ral.py's eval_n is eval.py's EVAL_N, and both draw the same samples: eval.py's default re-scores the
    trainer's held-out set, not another one."""
    import ral
    cfg = ral.configure([f"--out_dir={tmp_path / 'r'}"])
    assert cfg["eval_n"] == ev.EVAL_N
    _, _, held_out, name = ral.load_samples(cfg)
    assert [s["id"] for s in held_out] == [s["id"] for s in ev.suite(name)]
    assert [s["answer"] for s in held_out] == [s["answer"] for s in ev.suite(name)]
