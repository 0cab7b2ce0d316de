"""Tests of data.py: offline tasks, the loader, video patches, batches, rewards, bad input."""
import json
import os
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import data
import tasks
import model


@pytest.fixture(scope="module")
def tiny():
    return model.build_tiny()


def pixels(img):
    return np.asarray(img, dtype=np.int16)


# ---------------------------------------------------------------------------------------------------------------
# Offline tasks

def test_search_task_is_deterministic_from_the_seed():
    a, b, c = tasks.search_task(6, seed=3), tasks.search_task(6, seed=3), tasks.search_task(6, seed=4)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
        assert np.array_equal(pixels(x["image"]), pixels(y["image"]))
    assert any(not np.array_equal(pixels(x["image"]), pixels(z["image"])) for x, z in zip(a, c))


def test_video_task_is_deterministic_from_the_seed(tmp_path):
    a = tasks.video_task(2, seed=5, frames=4, folder=str(tmp_path / "a"))
    b = tasks.video_task(2, seed=5, frames=4, folder=str(tmp_path / "b"))
    for x, y in zip(a, b):
        assert (x["question"], x["answer"], x["target"]) == (y["question"], y["answer"], y["target"])
        fx, fy = data.read_video(x["video"])[0], data.read_video(y["video"])[0]
        assert all(np.array_equal(pixels(p), pixels(q)) for p, q in zip(fx, fy))


def test_answers_are_balanced():
    for samples in (tasks.search_task(40, seed=1), tasks.video_task(8, seed=1, frames=2)):
        counts = Counter(s["answer"] for s in samples)
        assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 1


def test_question_text_does_not_give_the_answer():
    samples = tasks.search_task(40, seed=2, tokens=64)
    # the stem is the same for all; the options are 4 distinct palette colours, the answer one of them
    assert {s["question"].split("\n")[0] for s in samples} == {"What colour is the star?"}
    for s in samples:
        colours = [o.split(". ")[1] for o in s["options"]]
        assert len(set(colours)) == 4 and set(colours) <= set(tasks.PALETTE)
        # every option colour appears in the picture outside the star: only the star itself tells
        img = pixels(s["image"]).copy()
        x0, y0, x1, y1 = s["target"]["box"]
        img[y0:y1, x0:x1] = 255
        for c in colours:
            assert (img == tasks.PALETTE[c]).all(-1).any(), (s["id"], c)
    # the answer colour is not predictable from the options' positions
    answer_colours = Counter(s["options"]["ABCD".index(s["answer"])].split(". ")[1] for s in samples)
    assert len(answer_colours) >= 4


def test_sft_targets_and_rationale_locate_the_target():
    s = tasks.search_task(1, seed=0, tokens=64)[0]
    colour = s["options"]["ABCD".index(s["answer"])].split(". ")[1]
    assert s["rationale"].startswith("The star is in the ") and s["rationale"].endswith(f"It is {colour}.")
    think, zero = data.sft_target(s, "think"), data.sft_target(s, "zero")
    assert think == f"<think>{s['rationale']}</think><answer>{s['answer']}</answer>"
    assert zero == f"<answer>{s['answer']}</answer>"
    assert data.reward(think, s, "think") == dict(reward=1.0, accuracy=1.0, format=1.0)
    assert data.reward(zero, s, "zero") == dict(reward=1.0, accuracy=1.0, format=1.0)
    assert data.reward(think, s, "zero")["format"] == 0.0


@pytest.mark.parametrize("tokens", [16, 64, 256, 1024])
def test_target_tokens_agree_with_image_geometry(tiny, tokens):
    _, processor = tiny
    side = int(tokens ** 0.5) * 28
    for s in tasks.search_task(3, seed=7, tokens=tokens):
        assert s["image"].size == (side, side)
        batch, masks = data.encode([s], processor)
        assert batch["image_grid_thw"].tolist() == [[1, side // 14, side // 14]]   # not resized
        assert int(masks["visual"].sum()) == tokens
        mask = masks["target"][0, masks["visual"][0]].reshape(side // 28, side // 28)
        # independent: the cells holding the star's own pixels (its colour, inside its box)
        x0, y0, x1, y1 = s["target"]["box"]
        colour = tasks.PALETTE[s["options"]["ABCD".index(s["answer"])].split(". ")[1]]
        star = np.zeros((side, side), bool)
        star[y0:y1, x0:x1] = (pixels(s["image"])[y0:y1, x0:x1] == colour).all(-1)
        ys, xs = np.nonzero(star)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)  # the box is the star's extent
        star_cells = {(y // 28, x // 28) for y, x in zip(ys, xs)}
        box_cells = {(r, c) for r in range(side // 28) for c in range(side // 28)
                     if c * 28 < x1 and (c + 1) * 28 > x0 and r * 28 < y1 and (r + 1) * 28 > y0}
        marked = {tuple(rc) for rc in mask.nonzero().tolist()}
        assert marked == box_cells and star_cells <= marked and len(marked) >= 4


def test_resized_image_scales_the_target(tiny):
    _, processor = tiny
    s = tasks.search_task(1, seed=0, tokens=256)[0]          # 448 px
    batch, masks = data.encode([s], processor, image_pixels=224 * 224)
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    mask = masks["target"][0, masks["visual"][0]].reshape(8, 8)
    x0, y0, x1, y1 = (v / 2 for v in s["target"]["box"])
    expect = {(r, c) for r in range(8) for c in range(8)
              if c * 28 < x1 and (c + 1) * 28 > x0 and r * 28 < y1 and (r + 1) * 28 > y0}
    assert {tuple(rc) for rc in mask.nonzero().tolist()} == expect


# ---------------------------------------------------------------------------------------------------------------
# The relational families: counting and left-of

def extent(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.mark.parametrize("make", [tasks.count_task, tasks.left_task])
def test_relational_tasks_are_balanced_and_deterministic(make):
    a, b, c = make(40, seed=3), make(40, seed=3), make(40, seed=4)
    counts = Counter(s["answer"] for s in a)
    assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 1
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "image"} == {k: v for k, v in y.items() if k != "image"}
        assert np.array_equal(pixels(x["image"]), pixels(y["image"]))
    assert any(not np.array_equal(pixels(x["image"]), pixels(z["image"])) for x, z in zip(a, c))
    assert len({s["question"] for s in a}) == 1          # one question for all: only the image tells


@pytest.mark.parametrize("tokens", [16, 64])
def test_count_task_target_boxes_are_the_counted_shapes(tokens):
    for s in tasks.count_task(24, seed=5, tokens=tokens):
        img = pixels(s["image"])
        red = (img == tasks.PALETTE[tasks.COUNTED]).all(-1)
        k = "ABCD".index(s["answer"]) + 1
        assert s["options"][k - 1] == f"{s['answer']}. {k}" and len(s["target"]["boxes"]) == k
        inside = np.zeros_like(red)
        for x0, y0, x1, y1 in s["target"]["boxes"]:
            assert extent(red[y0:y1, x0:x1]) == (0, 0, x1 - x0, y1 - y0)      # the box is a red shape's extent
            inside[y0:y1, x0:x1] = True
        assert red.any() and not (red & ~inside).any()                      # no red outside the boxes
        # k separate red shapes: the boxes do not touch, and every non-white pixel is a palette colour
        boxes = s["target"]["boxes"]
        assert not any(tasks._overlap(p, q) for i, p in enumerate(boxes) for q in boxes[i + 1:])
        # each red shape inside its own visual token (28 px cell), so the count is the number of red tokens
        cells = [(x0 // 28, y0 // 28) for x0, y0, x1, y1 in boxes]
        assert all(((x1 - 1) // 28, (y1 - 1) // 28) == c for (x0, y0, x1, y1), c in zip(boxes, cells))
        assert len(set(cells)) == k
        colours = {tuple(v) for v in img.reshape(-1, 3)}
        assert colours <= {tasks.BACKGROUND} | set(tasks.PALETTE.values())


def test_left_task_target_boxes_are_the_leftmost_pair():
    for s in tasks.left_task(24, seed=6):
        img = pixels(s["image"])
        answer = tasks.OPTION_COLOURS["ABCD".index(s["answer"])]
        extents = {c: extent((img == tasks.PALETTE[c]).all(-1)) for c in tasks.OPTION_COLOURS}   # one shape each
        by_x = sorted(extents, key=lambda c: extents[c][0])
        assert by_x[0] == answer and (extents[answer][2] - 1) // 28 < extents[by_x[1]][0] // 28   # a column apart
        assert [tuple(b) for b in s["target"]["boxes"]] == [extents[by_x[0]], extents[by_x[1]]]
        assert s["rationale"] == f"The leftmost shape is {answer}."


def test_target_mask_covers_every_box(tiny):
    _, processor = tiny
    for s in tasks.count_task(8, seed=7, tokens=64):
        _, masks = data.encode([s], processor)
        marked = {tuple(rc) for rc in masks["target"][0, masks["visual"][0]].reshape(8, 8).nonzero().tolist()}
        red = (pixels(s["image"]) == tasks.PALETTE[tasks.COUNTED]).all(-1)
        ys, xs = np.nonzero(red)
        red_cells = {(y // 28, x // 28) for y, x in zip(ys, xs)}
        boxes = s["target"]["boxes"]
        box_cells = {(r, c) for r in range(8) for c in range(8) for x0, y0, x1, y1 in boxes
                     if c * 28 < x1 and (c + 1) * 28 > x0 and r * 28 < y1 and (r + 1) * 28 > y0}
        assert marked == box_cells and red_cells <= marked


# ---------------------------------------------------------------------------------------------------------------
# Video

def test_mp4_round_trip(tmp_path):
    samples = tasks.video_task(4, seed=0, frames=5, folder=str(tmp_path))
    for s in samples:
        frames, index, fps, size = data.read_video(s["video"], fps=1.0)
        assert index == [0, 1, 2, 3, 4, 4] and fps == 1.0 and size == (112, 112)  # padded to even
        assert all(f.size == (112, 112) for f in frames)
        colour = np.array(tasks.PALETTE[s["options"]["ABCD".index(s["answer"])].split(". ")[1]])
        x0, y0, x1, y1 = s["target"]["box"]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        first = s["target"]["frame"]
        assert first % 2 == 0   # scenes are held 2 frames: the star's scene starts a temporal patch
        for f, img in enumerate(frames[:5]):
            centre = pixels(img)[cy - 3:cy + 3, cx - 3:cx + 3].reshape(-1, 3).mean(0)
            if f in (first, first + 1):   # the star's body survives lossy coding, in both frames of its scene
                assert np.abs(centre - colour).max() < 40
            if f % 2 == 1:                # the second frame of a scene is its first again
                assert np.abs(pixels(img) - pixels(frames[f - 1])).max() < 40
        # frame-rate sampling: at 0.5 fps every other frame
        assert data.read_video(s["video"], fps=0.5)[1] == [0, 2, 4, 4]
        assert len(data.read_video(s["video"], fps=1.0, max_frames=2)[0]) == 2


def test_video_patches_match_the_image_processor(tiny):
    _, processor = tiny
    ip = processor.image_processor
    still = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    patches, grid = data.video_patches([still, still], ip)
    ref = ip(images=[still], do_resize=False, return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    assert torch.allclose(patches, ref["pixel_values"], atol=1e-5)
    # two different frames: the temporal index is the second factor of each row (channel, time, 14, 14)
    other = Image.fromarray(np.zeros((56, 84, 3), np.uint8))
    p2, _ = data.video_patches([still, other], ip)
    rows = p2.reshape(-1, 3, 2, 14, 14)
    assert torch.allclose(rows[:, :, 0], ref["pixel_values"].reshape(-1, 3, 2, 14, 14)[:, :, 0], atol=1e-5)
    zero = ip(images=[other], do_resize=False, return_tensors="pt")["pixel_values"].reshape(-1, 3, 2, 14, 14)
    assert torch.allclose(rows[:, :, 1], zero[:, :, 1], atol=1e-5)


def test_video_batch_drives_the_tiny_model(tiny, tmp_path):
    net, processor = tiny
    videos = tasks.video_task(2, seed=1, frames=6, folder=str(tmp_path))
    images = tasks.search_task(1, seed=1, tokens=16)
    text = dict(id="t", question="How many stars?", options=[], answer="1", problem_type="numerical", image=None,
                video=None, target=None, rationale=None, source="test")
    samples = [videos[0], images[0], text, videos[1]]
    batch, masks = data.encode(samples, processor)
    assert batch["video_grid_thw"].tolist() == [[3, 8, 8]] * 2
    assert batch["second_per_grid_ts"].tolist() == [2.0, 2.0]
    assert batch["pixel_values_videos"].shape == (2 * 3 * 64, 3 * 2 * 14 * 14)
    assert masks["visual"].sum(1).tolist() == [48, 16, 0, 48]
    for b, s in zip([0, 3], videos):  # target tokens only in the needle's temporal group
        vis = masks["target"][b, masks["visual"][b]].reshape(3, 16)
        assert vis.any(1).tolist() == [g == s["target"]["frame"] // 2 for g in range(3)]
    assert (batch["mm_token_type_ids"] > 0).equal(masks["visual"])
    with torch.no_grad():
        together = net(**batch).logits[:, -1]
        for b, s in enumerate(samples):  # each sample alone gives the same output: pixels stayed aligned
            alone, _ = data.encode([s], processor)
            assert torch.allclose(net(**alone).logits[0, -1], together[b], atol=1e-4), s["id"]


def test_video_needle_is_one_scene_of_two_frames(tmp_path):
    """The default video holds each scene for 2 frames (one temporal patch): the star is in exactly one scene, in
    both of its frames and no other; hold=1 (a new scene each frame) puts it in exactly one frame."""
    for hold in (2, 1):
        for s in tasks.video_task(8, seed=2, frames=6, folder=str(tmp_path / str(hold)), hold=hold):
            frames, *_ = data.read_video(s["video"])
            colour = np.array(tasks.PALETTE[s["options"]["ABCD".index(s["answer"])].split(". ")[1]])
            first = s["target"]["frame"]
            x0, y0, x1, y1 = s["target"]["box"]    # the star's pixels: its colour inside its box in its frame (a
            inside = np.zeros((112, 112), bool)    # distractor, at most 22 px, never covers all of a 36 px star)
            inside[y0:y1, x0:x1] = np.abs(pixels(frames[first]) - colour).max(-1)[y0:y1, x0:x1] < 30
            assert inside.sum() > 300
            star = [bool((np.abs(pixels(f) - colour).max(-1)[inside] < 30).mean() > 0.9) for f in frames]
            assert star == [first <= f < first + hold for f in range(6)], (s["id"], star)
            assert f"{first + 1}" in s["rationale"]


def test_video_target_follows_frame_sampling(tiny, tmp_path):
    _, processor = tiny
    seen = set()
    for s in tasks.video_task(4, seed=3, frames=4, folder=str(tmp_path), hold=1):   # a new scene every frame
        batch, masks = data.encode([s], processor, video_fps=0.5)   # keeps frames 0 and 2: one temporal group
        assert batch["video_grid_thw"].tolist() == [[1, 8, 8]] and batch["second_per_grid_ts"].tolist() == [4.0]
        seen.add(s["target"]["frame"] in (0, 2))
        assert masks["target"].any().item() == (s["target"]["frame"] in (0, 2))  # a skipped needle: no target
    assert seen == {True, False}


def test_encode_repeats_each_prompt_g_times(tiny):
    _, processor = tiny
    prompts = tasks.search_task(2, seed=0, tokens=16)
    batch, masks = data.encode([s for s in prompts for _ in range(3)], processor, mode="zero")
    assert batch["input_ids"].shape[0] == 6 and batch["pixel_values"].shape[0] == 6 * 64
    rows = batch["pixel_values"].reshape(6, 64, -1)
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[2], rows[3])
    assert torch.equal(masks["target"][0], masks["target"][2])


# ---------------------------------------------------------------------------------------------------------------
# Real data sets (Video-R1 layout)

def make_dataset(folder, jsonl=True, records=None):
    os.makedirs(folder / "img", exist_ok=True)
    tasks.search_task(1, tokens=16)[0]["image"].save(folder / "img" / "a.png")
    video = tasks.video_task(1, frames=3, folder=str(folder / "vid"))[0]["video"]
    base = dict(problem_id=1, problem="What colour is the star?", data_type="image", problem_type="multiple choice",
                options=["A. red", "B. blue", "C. green", "D. yellow"], solution="<answer>B</answer>",
                path="./img/a.png", data_source="test", extra="ignored")
    records = records or [base, dict(base, problem_id=2, data_type="video", path="./vid/" + os.path.basename(video),
                                     process="<think>It is blue.</think>"),
                          dict(base, problem_id=3, problem_type="numerical", options=[], solution="<answer>3</answer>")]
    path = folder / ("data.jsonl" if jsonl else "data.json")
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1))
    return str(path), records


@pytest.mark.parametrize("jsonl", [True, False])
def test_load_dataset_with_images_and_videos(tiny, tmp_path, jsonl):
    path, _ = make_dataset(tmp_path, jsonl)
    samples = data.load_dataset(path)
    assert [s["id"] for s in samples] == ["1", "2", "3"]
    img, vid, num = samples
    assert img["image"] == str(tmp_path / "img" / "a.png") and img["video"] is None
    assert vid["video"].endswith(".mp4") and os.path.isfile(vid["video"]) and vid["image"] is None
    assert img["question"] == "What colour is the star?\nA. red\nB. blue\nC. green\nD. yellow"
    assert img["answer"] == "B" and vid["rationale"] == "It is blue." and img["rationale"] is None
    assert num["options"] == [] and num["question"] == "What colour is the star?" and num["answer"] == "3"
    assert img["source"] == "test" and img["target"] is None
    batch, _ = data.encode(samples, tiny[1], video_fps=2.0)
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]] and batch["second_per_grid_ts"].tolist() == [1.0]
    assert data.reward("<think>x</think><answer>B. blue</answer>", img)["reward"] == 1.0


def corrupt(path):
    path.write_bytes(b"\x00not a media file" * 10)


BAD = {  # name -> (change to the records or files, expected line, message fragment)
    "malformed line": (lambda f, r: None, 2, "malformed JSONL"),
    "missing field": (lambda f, r: r[1].pop("solution"), 2, "missing field 'solution'"),
    "no answer tags": (lambda f, r: r[0].update(solution="B"), 1, "no <answer>"),
    "bad data_type": (lambda f, r: r[2].update(data_type="audio"), 3, "data_type"),
    "missing image": (lambda f, r: r[2].update(path="./img/none.png"), 3, "image not found"),
    "unreadable image": (lambda f, r: corrupt(f / "img" / "a.png"), 1, "unreadable image"),
    "corrupt video": (lambda f, r: corrupt(f / "vid" / os.listdir(f / "vid")[0]), 2, "corrupt"),
    "empty video file": (lambda f, r: (f / "vid" / os.listdir(f / "vid")[0]).write_bytes(b""), 2, "video"),
    "video without frames": (lambda f, r: empty_mp4(f / "vid" / os.listdir(f / "vid")[0]), 2, "empty video"),
}


def empty_mp4(path):
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=1)
        s.width = s.height = 32
        c.start_encoding()  # header only, no frames


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_file_and_line(tmp_path, case):
    change, line, message = BAD[case]
    path, records = make_dataset(tmp_path)
    change(tmp_path, records)
    text = "\n".join(json.dumps(r) for r in records)
    if case == "malformed line":
        text = text.replace('"problem_id": 2', '"problem_id": 2,,')
    open(path, "w").write(text)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}"):
        data.load_dataset(path)


def test_bad_media_at_encode_time_names_file_and_line(tiny, tmp_path):
    path, _ = make_dataset(tmp_path)
    samples = data.load_dataset(path)
    corrupt(tmp_path / "img" / "a.png")
    with pytest.raises(ValueError, match=f"{path}:1: .*unreadable image"):
        data.encode(samples[:1], tiny[1])
    corrupt(Path(samples[1]["video"]))
    with pytest.raises(ValueError, match=f"{path}:2: corrupt or unreadable video"):
        data.encode(samples[1:2], tiny[1])
    empty_mp4(samples[1]["video"])
    with pytest.raises(ValueError, match=f"{path}:2: empty video"):
        data.encode(samples[1:2], tiny[1])


def test_json_array_error_uses_record_index(tmp_path):
    path, records = make_dataset(tmp_path, jsonl=False)
    records[2].pop("problem")
    open(path, "w").write(json.dumps(records))
    with pytest.raises(ValueError, match=f"{path}:3: missing field 'problem'"):
        data.load_dataset(path)


# ---------------------------------------------------------------------------------------------------------------
# Rewards

CHOICE = dict(answer="B", problem_type="multiple choice", options=["A. red", "B. dark blue", "C. green", "D. 7"])
NUMBER = dict(answer="3.5", problem_type="numerical", options=[])
FREE = dict(answer="Hello World", problem_type="free-form", options=[])
REWARDS = [  # text, sample, mode, accuracy, format
    ("<think>look</think><answer>B</answer>", CHOICE, "think", 1, 1),
    ("  <think>look</think>\n<answer> b. </answer>\n", CHOICE, "think", 1, 1),
    ("<think>look</think><answer>B. dark blue</answer>", CHOICE, "think", 1, 1),
    ("<think>look</think><answer>(B)</answer><|im_end|>", CHOICE, "think", 1, 1),
    ("<think>look</think><answer>dark  Blue</answer>", CHOICE, "think", 1, 1),
    ("<think>look</think><answer>A</answer>", CHOICE, "think", 0, 1),
    ("<think>look</think><answer>A. dark blue</answer>", CHOICE, "think", 0, 1),
    ("<think>look</think><answer>blue</answer>", CHOICE, "think", 0, 1),
    ("<think>look</think><answer>E</answer>", CHOICE, "think", 0, 1),
    ("<answer>B</answer>", CHOICE, "think", 1, 0),
    ("<answer>B</answer>", CHOICE, "zero", 1, 1),
    ("<think>x</think><answer>B</answer>", CHOICE, "zero", 1, 0),
    ("The answer is B", CHOICE, "think", 0, 0),
    ("<think>a</think><think>b</think><answer>B</answer>", CHOICE, "think", 1, 0),
    ("<think>a</think><answer>B</answer> trailing", CHOICE, "think", 1, 0),
    ("<answer>A</answer><answer>B</answer>", CHOICE, "zero", 1, 0),
    ("<answer>3.50</answer>", NUMBER, "zero", 1, 1),
    ("<answer>3.5000001</answer>", NUMBER, "zero", 0, 1),
    ("<answer>three</answer>", NUMBER, "zero", 0, 1),
    ("<answer> hello   world </answer>", FREE, "zero", 1, 1),
    ("<answer>hello world!</answer>", FREE, "zero", 0, 1),
    ("<think></think><answer></answer>", FREE, "think", 0, 1),
    ("", FREE, "think", 0, 0),
]


@pytest.mark.parametrize("text,sample,mode,accuracy,fmt", REWARDS)
def test_reward_table(text, sample, mode, accuracy, fmt):
    r = data.reward(text, sample, mode)
    assert (r["accuracy"], r["format"]) == (accuracy, fmt)
    assert r["reward"] == pytest.approx(0.9 * accuracy + 0.1 * fmt)


def test_extract_answer():
    assert data.extract_answer("<answer> B </answer>") == "B"
    assert data.extract_answer("<answer>A</answer> then <answer>C</answer>") == "C"
    assert data.extract_answer("<answer>B") is None and data.extract_answer(None) is None


pieces = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "B", "b. dark blue", "3.5", " ", "\n",
                          "(", ")", ".", "1e999", "nan", "<|im_end|>"])
texts = st.one_of(st.text(), st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=12).map("".join))


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([CHOICE, NUMBER, FREE]), st.sampled_from(["think", "zero"]))
def test_reward_never_raises_and_is_bounded(text, sample, mode):
    r = data.reward(text, sample, mode)
    assert 0.0 <= r["reward"] <= 1.0 and r["accuracy"] in (0.0, 1.0) and r["format"] in (0.0, 1.0)


def test_prompt_messages_modes():
    s = tasks.search_task(1, tokens=16)[0]
    think, zero = data.prompt_messages(s, "think"), data.prompt_messages(s, "zero")
    assert [m["role"] for m in think] == ["system", "user"]
    assert think[1]["content"][0] == {"type": "image"} and think[1]["content"][1]["text"].startswith(s["question"])
    assert "<think>" in think[1]["content"][1]["text"] and "<think>" not in zero[1]["content"][1]["text"]
    with pytest.raises(ValueError):
        data.prompt_messages(s, "other")
