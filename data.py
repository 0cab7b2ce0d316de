"""
The inputs: real data sets, media decoding, prompts, batches, rewards, and the seeded orders every draw follows.
(The offline tasks the project draws itself are in tasks.py.)

load_dataset(path)    Video-R1 layout (JSON array or JSONL), the same samples for SFT, RL and evaluation
prompt_messages / sft_target   the thinking ("think") and direct ("zero", RAL-zero) formats
encode(samples, processor)     a left-padded prompt batch for the model, and its visual and target masks
reward(text, sample)           0.9 * accuracy + 0.1 * format (the paper's reward); never raises

A sample is a plain dict: id, question (with the lettered options), options, answer (as it appears inside
<answer>), problem_type, image (path or PIL image) or video (path), target ({"box", "frame"} or None),
rationale (thinking text or None), source; samples from load_dataset also carry origin ("file:line"), which
errors raised later (a frame that does not decode) name.
"""
import json
import math
import os
import re

import av
import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

PROBLEM_TYPES = {"multiple choice", "numerical", "OCR", "free-form", "regression"}
SYSTEM = "You are a helpful assistant."

# ----------------------------------------------------------------------------------------------------------------
# Seeds and orders: every draw a function of (seed, step, ...), the same for any number of ranks and after a resume

def epoch_prompts(n, step, per_step, seed):
    """The prompt indices of one RL step: the file is read in seeded epochs without replacement (epoch e is
    randperm(n) seeded by (seed, e); step s takes positions s * per_step ... of that sequence). A function of the
    step alone: the same order for any number of ranks, and after a resume."""
    orders = {}
    picked = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch = position // n
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
        picked.append(int(orders[epoch][position % n]))
    return picked


def seed_for(*parts):
    """A deterministic seed from (seed, step, group): the rollout does not depend on rank count or resumption."""
    h = 0
    for part in parts:
        h = (h * 1_000_003 + int(part)) % (2 ** 62)
    return h



# ----------------------------------------------------------------------------------------------------------------
# Real data sets (Video-R1 layout)


def _records(path):
    """(line, record) pairs from a JSON array (line = 1-based record index) or a JSONL file (line = file line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    records = []
    for line, row in enumerate(text.splitlines(), 1):
        if row.strip():
            try:
                records.append((line, json.loads(row)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line}: malformed JSONL line: {e.msg}") from None
    return records


def _check_media(file, kind, where):
    """Fail now, with file:line, on missing/unreadable media, rather than deep inside a training step."""
    if not os.path.isfile(file):
        raise ValueError(f"{where}: {kind} not found: {file}")
    if kind == "image":  # the header only: cheap enough for 100k-sample files; pixels are decoded in encode
        try:
            Image.open(file).close()
        except Exception as e:
            raise ValueError(f"{where}: missing or unreadable image {file}: {e}") from None
    else:
        try:
            with av.open(file) as container:
                first = next(container.decode(video=0), None) if container.streams.video else None
        except Exception as e:
            raise ValueError(f"{where}: corrupt or unreadable video {file}: {e}") from None
        if first is None:
            raise ValueError(f"{where}: empty video (no frames): {file}")


def load_dataset(path, check_media=True):
    """Samples from a Video-R1 style file. Media paths are relative to the file. Every record becomes a sample or
    an error naming file:line; nothing is dropped. check_media=False skips opening each media file."""
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    for line, r in _records(path):
        where = f"{path}:{line}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(r).__name__}")
        for key in ("problem_id", "problem", "data_type", "problem_type", "solution", "path"):
            if r.get(key) is None:
                raise ValueError(f"{where}: missing field '{key}'")
        if r["data_type"] not in ("image", "video"):
            raise ValueError(f"{where}: data_type must be 'image' or 'video', got {r['data_type']!r}")
        if r["problem_type"] not in PROBLEM_TYPES:
            raise ValueError(f"{where}: unknown problem_type {r['problem_type']!r}")
        options = r.get("options") or []
        if r["problem_type"] == "multiple choice" and not options:
            raise ValueError(f"{where}: multiple choice record without options")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: options must be a list of strings")
        answer = extract_answer(str(r["solution"]))
        if not answer:
            raise ValueError(f"{where}: solution has no <answer>...</answer>: {str(r['solution'])[:80]!r}")
        media = os.path.normpath(os.path.join(base, str(r["path"])))
        if check_media:
            _check_media(media, r["data_type"], where)
        process = r.get("process")
        rationale = None
        if process:
            m = re.search(r"<think>(.*?)</think>", process, re.S)
            rationale = (m.group(1) if m else process).strip()
        question = r["problem"] + ("\n" + "\n".join(options) if options else "")
        samples.append(dict(id=str(r["problem_id"]), question=question, options=options, answer=answer,
                            problem_type=r["problem_type"], image=media if r["data_type"] == "image" else None,
                            video=media if r["data_type"] == "video" else None, target=None, rationale=rationale,
                            source=r.get("data_source") or os.path.basename(path), origin=where))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Media: images through Pillow, video through PyAV, patches laid out as Qwen2-VL's processor does


def load_image(image, where=None):
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except Exception as e:
        raise ValueError(f"{where or image}: missing or unreadable image {image}: {e}") from None


def _resize(img, max_pixels, ip):
    """Resize to multiples of 28 within the pixel budget, keeping the aspect (the Qwen2-VL rule, smart_resize)."""
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(img.height, img.width, factor, min_pixels=min(ip.size.shortest_edge, max_pixels),
                        max_pixels=max_pixels)
    return img if (w, h) == img.size else img.resize((w, h), resample=Image.BICUBIC)


def read_video(path, fps=1.0, max_frames=128, frame_pixels=128 * 28 * 28, ip=None, where=None):
    """Decode with PyAV, keeping the first frame of every 1/fps interval (fps lowered if the video is longer than
    max_frames / fps), each frame resized within frame_pixels. Returns frames (PIL), their source frame indices,
    the effective fps and the source (width, height). The frame count is padded to a multiple of the temporal
    patch (2) by repeating the last frame."""
    where = where or path
    frames, index, size = [], [], None
    try:
        with av.open(path) as container:
            for stream in container.streams.video[:1]:  # none: an empty video, reported below
                duration = (float(stream.duration * stream.time_base) if stream.duration
                            else (container.duration or 0) / 1e6)
                if duration > 0 and duration * fps > max_frames:
                    fps = max_frames / duration
                last = -1
                for i, frame in enumerate(container.decode(stream)):
                    t = frame.time if frame.time is not None else i / float(stream.average_rate or 1)
                    bucket = math.floor(t * fps + 1e-6)
                    if bucket > last:
                        last, img = bucket, frame.to_image()
                        size = img.size
                        frames.append(_resize(img, frame_pixels, ip) if ip is not None else img)
                        index.append(i)
    except Exception as e:
        raise ValueError(f"{where}: corrupt or unreadable video {path}: {e}") from None
    if not frames:
        raise ValueError(f"{where}: empty video (no frames): {path}")
    if len(frames) > max_frames:  # unknown duration: fall back to uniform subsampling
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames, index = [frames[k] for k in keep], [index[k] for k in keep]
    tp = ip.temporal_patch_size if ip is not None else 2
    while len(frames) % tp:
        frames.append(frames[-1]), index.append(index[-1])
    return frames, index, fps, size


def video_patches(frames, ip):
    """Frames (same size, multiples of 28, count a multiple of the temporal patch) -> (patches, grid_thw) exactly
    as Qwen2-VL's video processor: rows ordered (t, h/2, w/2, 2, 2), each row flat as (channel, time, 14, 14)."""
    x = np.stack([np.asarray(f, dtype=np.float32).transpose(2, 0, 1) for f in frames]) * ip.rescale_factor
    mean = np.asarray(ip.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    T, C, H, W = x.shape
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    gt, gh, gw = T // tp, H // p, W // p
    x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, C * tp * p * p)), torch.tensor([gt, gh, gw])


def _cells(box, scale, grid, merge, target_group=0):
    """Per merged visual token (order t, h, w): does its 28x28 cell of the resized image overlap the box?"""
    gt, gh, gw = (int(g) for g in grid)
    rows, cols, size = gh // merge, gw // merge, 14 * merge
    x0, y0, x1, y1 = box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]
    hit = [c * size < x1 and (c + 1) * size > x0 and r * size < y1 and (r + 1) * size > y0
           for r in range(rows) for c in range(cols)]
    return [t == target_group and h for t in range(gt) for h in hit]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and batches


def prompt_messages(sample, mode="think"):
    """System + user chat messages: the image or video first, then the question and the format instruction."""
    if mode not in ("think", "zero"):
        raise ValueError(f"mode must be 'think' or 'zero', got {mode!r}")
    hint = {"multiple choice": "Answer with the option's letter.", "numerical": "Answer with a number."}
    fmt = ("First think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."
           if mode == "think" else "Give only the final answer inside <answer> </answer>, without thinking.")
    text = "\n".join(filter(None, [sample["question"], hint.get(sample.get("problem_type"), ""), fmt]))
    media = ([{"type": "image"}] if sample.get("image") is not None
             else [{"type": "video"}] if sample.get("video") is not None else [])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": media + [{"type": "text", "text": text}]}]


def sft_target(sample, mode="think"):
    answer = f"<answer>{sample['answer']}</answer>"
    if mode == "zero":
        return answer
    if not sample.get("rationale"):
        raise ValueError(f"{sample.get('origin', sample['id'])}: no rationale for a thinking SFT target")
    return f"<think>{sample['rationale']}</think>{answer}"


def encode(samples, processor, mode="think", image_pixels=5120 * 28 * 28, video_fps=1.0, video_frames=128,
           frame_pixels=128 * 28 * 28):
    """A left-padded prompt batch for the model (input_ids, attention_mask, mm_token_type_ids and, when present,
    pixel_values + image_grid_thw, pixel_values_videos + video_grid_thw + second_per_grid_ts; rows in sample
    order), and masks = dict(visual=, target=): B x P bool, the visual tokens and those of the target's cells."""
    tok, ip = processor.tokenizer, processor.image_processor
    merge = ip.merge_size
    max_pixels = min(image_pixels, ip.size.longest_edge)
    cache, texts, cells = {}, [], []
    images, image_grids, videos, video_grids, seconds = [], [], [], [], []
    for s in samples:
        text = tok.apply_chat_template(prompt_messages(s, mode), tokenize=False, add_generation_prompt=True)
        target, where = s.get("target"), s.get("origin", s.get("id"))
        if s.get("image") is not None:
            key = ("image", s["image"] if isinstance(s["image"], str) else id(s["image"]))
            if key not in cache:
                img = load_image(s["image"], where)
                resized = _resize(img, max_pixels, ip)
                out = ip(images=[resized], do_resize=False, return_tensors="pt")
                scale = (resized.width / img.width, resized.height / img.height)
                cache[key] = out["pixel_values"], out["image_grid_thw"][0], scale
            pixels, grid, scale = cache[key]
            images.append(pixels), image_grids.append(grid)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge ** 2), 1)
            cells.append(_cells(target["box"], scale, grid, merge) if target else None)
        elif s.get("video") is not None:
            key = ("video", s["video"])
            if key not in cache:
                frames, index, fps, size = read_video(s["video"], video_fps, video_frames, frame_pixels, ip, where)
                pixels, grid = video_patches(frames, ip)
                scale = (frames[0].width / size[0], frames[0].height / size[1])
                cache[key] = pixels, grid, ip.temporal_patch_size / fps, index, scale
            pixels, grid, sec, index, scale = cache[key]
            videos.append(pixels), video_grids.append(grid), seconds.append(sec)
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod()) // merge ** 2), 1)
            if target and target.get("frame") in index:  # the needle frame may fall between sampled frames
                group = index.index(target["frame"]) // ip.temporal_patch_size
                cells.append(_cells(target["box"], scale, grid, merge, group))
            else:
                cells.append(None)
        else:
            cells.append(None)
        texts.append(text)
    batch = dict(tok(texts, padding=True, padding_side="left", return_tensors="pt"))
    ids = batch["input_ids"]
    image_id, video_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
    batch["mm_token_type_ids"] = (ids == image_id).long() + 2 * (ids == video_id).long()  # M-RoPE needs it
    if images:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(images), torch.stack(image_grids)
    if videos:
        batch["pixel_values_videos"], batch["video_grid_thw"] = torch.cat(videos), torch.stack(video_grids)
        batch["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    visual = (ids == image_id) | (ids == video_id)
    target = torch.zeros_like(visual)
    for b, c in enumerate(cells):
        if c is not None:
            target[b, visual[b].nonzero()[:, 0]] = torch.tensor(c)
    return batch, dict(visual=visual, target=target)


# ----------------------------------------------------------------------------------------------------------------
# Rewards: 0.9 * accuracy + 0.1 * format


def _strip_end(text):
    return re.sub(r"(<\|im_end\|>|<\|endoftext\|>)+\s*$", "", text).strip()


def extract_answer(text):
    """The text inside the last <answer>...</answer>, stripped; None if there is none."""
    if not isinstance(text, str):
        return None
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    return found[-1].strip() if found else None


def format_ok(text, mode="think"):
    """think: exactly <think>...</think><answer>...</answer>; zero: exactly <answer>...</answer>; whitespace
    around (and between the blocks) allowed, each tag exactly once."""
    text = _strip_end(text)
    counts = {t: text.count(t) for t in ("<think>", "</think>", "<answer>", "</answer>")}
    if mode == "think":
        return set(counts.values()) == {1} and re.fullmatch(r"<think>.*</think>\s*<answer>.*</answer>", text,
                                                             re.S) is not None
    want = {"<think>": 0, "</think>": 0, "<answer>": 1, "</answer>": 1}
    return counts == want and re.fullmatch(r"<answer>.*</answer>", text, re.S) is not None


def _norm(text):
    return re.sub(r"\s+", " ", str(text)).strip().lower().rstrip(".").strip()


def _number(text):
    try:
        return float(_norm(text).replace(",", "").replace(" ", ""))
    except ValueError:
        return None


def _letter(text, options):
    """The option letter an answer names: "B", "(b)", "B.", "B. red" or the option's text "red"; else None."""
    letters = {o.split(".")[0].strip().lower(): _norm(o.split(".", 1)[1]) for o in options if "." in o}
    t = _norm(text)
    m = re.fullmatch(r"\(?([a-z])\)?[.:]?", t) or re.match(r"\(?([a-z])[.):]\s", t)
    if m and m.group(1) in letters:
        return m.group(1)
    named = [k for k, v in letters.items() if v == t]
    return named[0] if len(named) == 1 else None


def is_correct(pred, sample):
    """Exact match after normalization; option letters against options; numbers as numbers."""
    if pred is None:
        return False
    gold, ptype = sample["answer"], sample.get("problem_type")
    if ptype in ("numerical", "regression"):
        a, b = _number(pred), _number(gold)
        if a is not None and b is not None:
            return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    if ptype == "multiple choice" and sample.get("options"):
        a, b = _letter(pred, sample["options"]), _letter(gold, sample["options"])
        if a is not None or b is not None:
            return a == b
    return _norm(pred) == _norm(gold)


def reward(text, sample, mode="think"):
    """The paper's reward, 0.9 * accuracy + 0.1 * format; any text (even not a string) gives a value in [0, 1]."""
    text = text if isinstance(text, str) else ""
    fmt = float(format_ok(text, mode))
    acc = float(is_correct(extract_answer(text), sample))
    return dict(reward=0.9 * acc + 0.1 * fmt, accuracy=acc, format=fmt)
