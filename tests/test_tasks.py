"""The task registry (tasks.TASKS): suite names round-trip, and a new offline task family is one entry, with nothing
else to edit: the trainer, the SFT early stop, eval.py's suites and study.py's task part all find it there."""
import json

import pytest
from PIL import Image, ImageDraw

import eval as evaluation
import runs
import ral
import sft
import study
import tasks
from test_ral import SMALL


def test_suite_names_round_trip_through_the_registry():
    for task in tasks.TASKS:
        for name in tasks.TASKS[task]["suites"]:
            parsed = tasks.parse_suite(name)
            assert parsed and parsed[0] == task and tasks.suite_name(*parsed) == name
    assert tasks.parse_suite("video-8x64") == ("video", dict(task_frames=8, task_tokens=64))
    assert tasks.suite_name("video", dict(task_frames=8, task_tokens=16)) == "video-8"
    for bad in ("search-x", "nosuch-3", "video-", "search-16x2", "search"):
        assert tasks.parse_suite(bad) is None, bad
    with pytest.raises(ValueError, match="unknown suite"):
        evaluation.suite("nosuch-16")


def tally_task(n, seed, options, folder=None):
    """A family the project does not have: how many red squares (1 to 4) are in the image."""
    side = int(options["task_tokens"] ** 0.5) * tasks.CELL
    samples = []
    for i in range(n):
        k = (seed + i) % 4 + 1
        img = Image.new("RGB", (side, side), tasks.BACKGROUND)
        for j in range(k):
            ImageDraw.Draw(img).rectangle([4 + 26 * j, 4, 20 + 26 * j, 20], fill=(220, 30, 30))
        question = "How many red squares are there? Options: A. 1 B. 2 C. 3 D. 4"
        samples.append(dict(id=f"tally-{seed}-{i}", question=question, options=["A. 1", "B. 2", "C. 3", "D. 4"],
                            answer="ABCD"[k - 1], problem_type="multiple choice", image=img, video=None,
                            target=None, rationale=f"There are {k} red squares.", source="tally"))
    return samples


def test_a_new_task_family_is_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "tally", dict(make=tally_task, options=(("task_tokens", None),),
                                                  suites=("tally-16",), about="tally the red squares"))
    drawn = []
    real = sft.sampled_accuracy
    monkeypatch.setattr(sft, "sampled_accuracy", lambda model, processor, samples, *a, **k:
                        drawn.extend(samples) or real(model, processor, samples, *a, **k))
    out = tmp_path / "tally"
    results = ral.main([f"--out_dir={out}", "--task=tally", *SMALL, "--sft_steps=3", "--sft_stop=0.99",
                        "--sft_val_every=2", "--sft_val_n=4", "--rl_steps=1", "--sft_size=0", "--train_size=0"])
    assert {"before_rl", "after_rl"} <= set(results)
    asked = [json.loads(line)["id"] for line in open(out / "samples.jsonl")]
    assert asked and all(i.startswith("tally-") for i in asked)                  # RL's prompts: the new family
    assert drawn and all(s["source"] == "tally" for s in drawn)                 # SFT's early stop validates on it
    saved = runs.saved_results(str(out))["suites"]
    assert list(saved) == ["tally-16 n=4"] and saved["tally-16 n=4"]["n"] == 4  # the held-out suite, by name and n
    held_out = evaluation.suite("tally-16", n=4)
    assert [s["id"] for s in held_out] == [f"tally-{evaluation.EVAL_SEED}-{i}" for i in range(4)]
    assert "tally-16" in [name for t in tasks.TASKS.values() for name in t["suites"]]
    assert ("tasks", "tally-16", "ral") in [arm[:3] for arm in study.arms(["tasks"])]
    with pytest.raises(ral.UsageError, match="--task must be one of"):
        ral.configure(["--task=nosuch"])
