"""
The offline tasks: families of questions about images and videos the project draws itself, with a known answer and
the boxes it depends on (for grounding), and the registry every stage reads them from.

search_task(n, ...)   visual search (V*-like): one star among many circles/squares, "what colour is the star?"
count_task(n, ...)    counting (relational): how many red shapes (1-4) among shapes of other colours
left_task(n, ...)     left of (relational): the colour of the leftmost of four shapes
video_task(n, ...)    video needle: the star in one scene (held 2 frames) of F frames, a real mp4 written with PyAV
TASKS                 name -> generator, the options it reads, its standard held-out suites
offline_stream(cfg, stage)     the run's task as an endless stream of fresh samples (SFT: stage 0, RL: stage 1)

A sample is data.py's plain dict (id, question, options, answer, problem_type, image or video, target, rationale,
source). Every draw is a function of its seed.
"""
import functools
import math
import os
import random
import tempfile

import av
import numpy as np
from PIL import Image, ImageDraw

from data import seed_for

PALETTE = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 215, 20), "purple": (140, 40, 180), "orange": (245, 130, 20)}
DISTRACTORS = ["circle", "square", "triangle", "diamond"]
LETTERS = "ABCD"
OPTION_COLOURS = list(PALETTE)[:4]   # the options, in this order, of every offline question
CELL = 28           # one merged visual token covers 28x28 pixels (14 px patches, 2x2 merge)
STAR = 36           # target size in pixels: wider and taller than a token cell, so it always spans 2x2+ cells
BACKGROUND = (255, 255, 255)

# ----------------------------------------------------------------------------------------------------------------
# Offline tasks: drawing


def _draw(draw, shape, box, colour):
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "star":      # five points, inner radius 0.45
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=colour)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=colour)


def _overlap(a, b, margin=0):
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _place(rng, side, size, taken, avoid):
    """A free box of the given size: away from everything if possible, never touching `avoid` (the target)."""
    for tries in range(2000):
        x, y = rng.randrange(side - size + 1), rng.randrange(side - size + 1)
        box = (x, y, x + size, y + size)
        if avoid is not None and _overlap(box, avoid, margin=2):
            continue
        if tries > 100 or not any(_overlap(box, t, margin=2) for t in taken):
            return box
    raise ValueError(f"cannot place a {size}px shape on a {side}px canvas; lower the clutter")


def _scene(rng, side, clutter, target_colour, with_target=True):
    """A white canvas with `clutter` distractors and (optionally) the star. Every option colour is used by some
    distractor, so neither the question nor "which colours are in the picture" gives the answer away."""
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    box = None
    if with_target:
        x, y = rng.randrange(side - STAR + 1), rng.randrange(side - STAR + 1)
        box = (x, y, x + STAR, y + STAR)
    colours = OPTION_COLOURS + [rng.choice(list(PALETTE)) for _ in range(clutter)]
    taken = []
    for k in range(clutter):
        size = rng.randrange(12, 23)
        taken.append(_place(rng, side, size, taken, box))
        _draw(draw, rng.choice(DISTRACTORS), taken[-1], PALETTE[colours[k]])
    if box is not None:  # drawn through a mask, so the box is exactly the star's pixel extent
        mask = Image.new("L", (side, side), 0)
        _draw(ImageDraw.Draw(mask), "star", box, 255)
        img.paste(PALETTE[target_colour], mask=mask)
        box = mask.getbbox()
    return img, box


def _where(box, side):
    """Coarse location words of a box on a side x side canvas (3 x 3 regions)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ["top", "middle", "bottom"][min(2, int(3 * cy / side))]
    col = ["left", "center", "right"][min(2, int(3 * cx / side))]
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _question(stem):
    """A colour question with the 4 options in one fixed order (A. red, B. green, C. blue, D. yellow): the text is
    the same for every sample, so only the image tells the answer, and a small model needs no option lookup."""
    options = [f"{L}. {c}" for L, c in zip(LETTERS, OPTION_COLOURS)]
    return stem + "\n" + "\n".join(options), options


def _balanced_letters(rng, n):
    """Answers balanced over A-D: a seeded shuffle of A,B,C,D repeated (counts differ by at most 1)."""
    letters = [LETTERS[i % 4] for i in range(n)]
    rng.shuffle(letters)
    return letters


# ----------------------------------------------------------------------------------------------------------------
# Offline tasks: the families


def search_task(n, seed=0, tokens=64, clutter=None):
    """Visual search: a (sqrt(tokens)*28)^2 canvas, so exactly `tokens` visual tokens per image, with clutter
    distractors (default tokens // 4: clutter grows with the canvas) and one star whose colour is asked."""
    side = math.isqrt(tokens) * CELL
    if side * side != tokens * CELL * CELL:
        raise ValueError(f"tokens must be a perfect square, got {tokens}")
    clutter = tokens // 4 if clutter is None else clutter
    rng = random.Random(f"search-{seed}-{tokens}-{clutter}")
    samples = []
    for i, letter in enumerate(_balanced_letters(rng, n)):
        question, options = _question("What colour is the star?")
        colour = OPTION_COLOURS[LETTERS.index(letter)]
        img, box = _scene(rng, side, clutter, colour)
        samples.append(dict(id=f"search-{tokens}-{seed}-{i}", question=question, options=options, answer=letter,
                            problem_type="multiple choice", image=img, video=None,
                            target=dict(box=box, frame=None),
                            rationale=f"The star is in the {_where(box, side)} of the image. It is {colour}.",
                            source="search"))
    return samples


COUNTED = "red"      # the count task counts this colour; every other shape has another colour
SHAPE = 18           # every shape of the relational tasks has this size, so the counted colour's area tracks the count


def _shapes(rng, side, colours, size=SHAPE, one_per_token=False):
    """Shapes of the given colours on a white canvas, no two touching (the count task needs them apart), each
    drawn through its own mask, so its box is exactly its pixel extent. one_per_token: each shape lies inside its
    own token cell (28 px), at least 2 px from the cell's edges. Returns the image and the boxes."""
    img = Image.new("RGB", (side, side), BACKGROUND)
    cells = side // CELL
    if one_per_token:
        if len(colours) > cells * cells or size > CELL - 4:
            raise ValueError(f"cannot place {len(colours)} shapes of {size}px in {cells * cells} token cells")
        spots = rng.sample(range(cells * cells), len(colours))
    boxes = []
    for j, colour in enumerate(colours):
        for _ in range(5000):
            if one_per_token:
                row, col = divmod(spots[j], cells)
                x, y = col * CELL + rng.randrange(2, CELL - size - 1), row * CELL + rng.randrange(2, CELL - size - 1)
            else:
                x, y = rng.randrange(side - size + 1), rng.randrange(side - size + 1)
            box = (x, y, x + size, y + size)
            if not any(_overlap(box, b, margin=2) for b in boxes):
                break
        else:
            raise ValueError(f"cannot place {len(colours)} shapes of {size}px apart on a {side}px canvas")
        mask = Image.new("L", (side, side), 0)
        _draw(ImageDraw.Draw(mask), rng.choice(DISTRACTORS), box, 255)
        img.paste(PALETTE[colour], mask=mask)
        boxes.append(mask.getbbox())
    return img, boxes


def count_task(n, seed=0, tokens=16, clutter=None):
    """Counting (relational: the answer is a property of several objects together): 1 to 4 red shapes among
    `clutter` shapes of other colours (default max(3, tokens // 8)), "how many red shapes are there?", options
    A. 1 ... D. 4 (balanced). Each shape lies inside its own visual token (28 px), so the count is the number of
    red tokens: shapes placed anywhere straddled tokens, and the tiny regime's RL only sharpened the warm start's
    off-by-one confusions (docs/study/issue20.md, section 7). Target boxes: the red shapes, every one the answer
    depends on."""
    side = math.isqrt(tokens) * CELL
    if side * side != tokens * CELL * CELL:
        raise ValueError(f"tokens must be a perfect square, got {tokens}")
    clutter = max(3, tokens // 8) if clutter is None else clutter
    others = [c for c in PALETTE if c != COUNTED]
    rng = random.Random(f"count-{seed}-{tokens}-{clutter}")
    options = [f"{L}. {k}" for L, k in zip(LETTERS, range(1, 5))]
    samples = []
    for i, letter in enumerate(_balanced_letters(rng, n)):
        k = LETTERS.index(letter) + 1
        colours = [COUNTED] * k + [rng.choice(others) for _ in range(clutter)]
        rng.shuffle(colours)
        img, boxes = _shapes(rng, side, colours, one_per_token=True)
        targets = [b for b, c in zip(boxes, colours) if c == COUNTED]
        samples.append(dict(id=f"count-{tokens}-{seed}-{i}", question=f"How many {COUNTED} shapes are there?\n"
                            + "\n".join(options), options=options, answer=letter, problem_type="multiple choice",
                            image=img, video=None, target=dict(box=None, boxes=targets, frame=None),
                            rationale=f"There {'is' if k == 1 else 'are'} {k} {COUNTED} "
                                      f"shape{'' if k == 1 else 's'}.", source="count"))
    return samples


def left_task(n, seed=0, tokens=16):
    """Left of (relational: the answer compares two objects' positions): one shape of each option colour, "which
    colour is the leftmost shape?" (balanced over A-D). The leftmost shape lies in token columns (28 px) left of
    every other shape's first one, so the answer is decided at the resolution the LLM sees, not inside a visual
    token (a 4 px margin within one token stayed at chance in the tiny regime). Target boxes: the leftmost shape
    and the next one, the pair the comparison is decided by."""
    side = math.isqrt(tokens) * CELL
    if side * side != tokens * CELL * CELL:
        raise ValueError(f"tokens must be a perfect square, got {tokens}")
    rng = random.Random(f"left-{seed}-{tokens}")
    samples = []
    for i, letter in enumerate(_balanced_letters(rng, n)):
        colour = OPTION_COLOURS[LETTERS.index(letter)]
        while True:
            img, boxes = _shapes(rng, side, OPTION_COLOURS)
            order = sorted(range(4), key=lambda j: boxes[j][0])
            if (boxes[order[0]][2] - 1) // CELL < boxes[order[1]][0] // CELL:
                break
        # the drawn colours are fixed (red, green, blue, yellow); which one is leftmost is the draw's, so relabel
        # by swapping colours: the shape drawn leftmost takes the answer's colour
        first = order[0]
        swap = OPTION_COLOURS.index(colour)
        if first != swap:
            img = _swap_colours(img, PALETTE[OPTION_COLOURS[first]], PALETTE[colour])
            boxes[first], boxes[swap] = boxes[swap], boxes[first]
            order = [swap if j == first else first if j == swap else j for j in order]
        question, opts = _question("Which colour is the leftmost shape?")
        samples.append(dict(id=f"left-{tokens}-{seed}-{i}", question=question, options=opts, answer=letter,
                            problem_type="multiple choice", image=img, video=None,
                            target=dict(box=None, boxes=[boxes[order[0]], boxes[order[1]]], frame=None),
                            rationale=f"The leftmost shape is {colour}.", source="left"))
    return samples


def _swap_colours(img, a, b):
    x = np.asarray(img).copy()
    is_a, is_b = (x == a).all(-1), (x == b).all(-1)
    x[is_a], x[is_b] = b, a
    return Image.fromarray(x)


def write_mp4(frames, path, fps=1):
    """PIL frames -> an H.264 mp4 (mpeg4 if this ffmpeg has no libx264). Lossless (qp 0): x264's rate control
    (crf) now and then encodes identical frames differently, and the task must be a function of its seed."""
    with av.open(path, mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        except Exception:
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())  # flush


def video_task(n, seed=0, frames=4, folder=None, tokens_per_frame=16, clutter=None, hold=2):
    """Video needle: `frames` cluttered frames at 1 fps, one mp4 per sample. Each scene is held for `hold` frames
    (2: a shot per temporal patch, as consecutive frames of a real video look alike; 1: a new scene every frame) and
    the star is in exactly one scene. tokens_per_frame sets the frame size (sqrt*28 px square) and so the tokens of
    each 2-frame temporal group. The target frame is the first of the star's scene."""
    side = math.isqrt(tokens_per_frame) * CELL
    clutter = max(3, tokens_per_frame // 4) if clutter is None else clutter
    folder = folder or tempfile.mkdtemp(prefix="ral-video-")
    os.makedirs(folder, exist_ok=True)
    name = f"video-{seed}-{frames}-{tokens_per_frame}-{clutter}" + (f"-hold{hold}" if hold != 1 else "")
    rng = random.Random(name)   # it names the files too; hold=1: the draws from before scenes were held
    shots = -(-frames // hold)
    samples = []
    for i, letter in enumerate(_balanced_letters(rng, n)):
        question, options = _question("What colour is the star in the video?")
        colour = OPTION_COLOURS[LETTERS.index(letter)]
        needle = rng.randrange(shots)
        scenes = [_scene(rng, side, clutter, colour, with_target=(k == needle)) for k in range(shots)]
        path = os.path.join(folder, f"{name}-{i}.mp4")
        if not os.path.exists(path):   # a function of the name: another rank (or run) may have written it already
            write_mp4([scenes[f // hold][0] for f in range(frames)], f"{path}.{os.getpid()}.tmp.mp4")
            os.replace(f"{path}.{os.getpid()}.tmp.mp4", path)   # another rank may write it at once: same bytes
        box, first = scenes[needle][1], needle * hold
        seen = f"frame {first + 1}" if hold == 1 or first + 1 == frames else \
            f"frames {first + 1}-{min(frames, first + hold)}"
        samples.append(dict(id=f"video-{tokens_per_frame}-{seed}-{i}", question=question, options=options,
                            answer=letter, problem_type="multiple choice", image=None, video=path,
                            target=dict(box=box, frame=first),
                            rationale=(f"The star is in {seen} of {frames}, in the {_where(box, side)}. "
                                       f"It is {colour}."), source="video"))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# The task registry: every offline family is one entry, and every stage reads it from here (ral.py's --task and
# load_samples, sft.py's stream and early-stop validation, eval.py's suites, study.py's task part). A new family is
# one generator plus one entry; the tokenizer needs nothing (byte-level: any text encodes).
#   make(n, seed, options, folder) -> n samples, a function of (n, seed, options); folder: where media files go
#   options: ((ral.py option, the suite name's default or None), ...), the options it reads, in suite-name order
#   suites:  its standard held-out suites (eval.py evaluates them all by default)
#   recipe:  (optional) trainer defaults of its own, below any config file or --key=value (cli.parse)

# The held-out draw of every offline suite, owned here: eval.py's suites and ral.py's eval_n default both read it.
EVAL_SEED = 10_000      # held out: the trainer draws its tasks from small seeds and the streams (STREAM_SEED)
EVAL_N = 256


TASKS = dict(
    search=dict(make=lambda n, seed, o, folder=None: search_task(n, seed=seed, tokens=o["task_tokens"]),
                options=(("task_tokens", None),),
                suites=("search-16", "search-64", "search-256", "search-1024"),
                about="one image: the colour of the one star among distractors"),
    count=dict(make=lambda n, seed, o, folder=None: count_task(n, seed=seed, tokens=o["task_tokens"]),
               options=(("task_tokens", None),), suites=("count-16", "count-64"),
               # an ordinal answer: RL first sharpens the warm start's off-by-one confusions and corrects them
               # later; at 60 steps strong warm starts had not got there (docs/study/issue20.md, sections 7, 9)
               recipe=dict(rl_steps=120),
               about="one image: how many red shapes (1-4) among shapes of other colours"),
    left=dict(make=lambda n, seed, o, folder=None: left_task(n, seed=seed, tokens=o["task_tokens"]),
              options=(("task_tokens", None),), suites=("left-16", "left-64"),
              about="one image: the colour of the leftmost of four shapes"),
    video=dict(make=lambda n, seed, o, folder=None: video_task(n, seed=seed, frames=o["task_frames"], folder=folder,
                                                               tokens_per_frame=o["task_tokens"]),
               options=(("task_frames", None), ("task_tokens", 16)),
               suites=("video-4", "video-8", "video-16"),
               about="the needle: the star's colour, in one frame of an mp4"),
)


def task_options(task, cfg):
    """The options a task reads, from a run's config (ral.py's options)."""
    return {key: cfg[key] for key, _ in TASKS[task]["options"]}


def suite_name(task, options):
    """The one spelling of an offline suite's name: the task, then its option values joined by x, trailing values
    at the name's default left out (search-16, video-8, video-8x64)."""
    values = [options[key] for key, _ in TASKS[task]["options"]]
    defaults = [default for _, default in TASKS[task]["options"]]
    while len(values) > 1 and values[-1] == defaults[-1]:
        values, defaults = values[:-1], defaults[:-1]
    return f"{task}-{'x'.join(str(v) for v in values)}"


def parse_suite(name):
    """suite_name's inverse: (task, options), or None if name is not an offline suite's."""
    task, _, rest = name.partition("-")
    values = rest.split("x")
    spec = TASKS.get(task, dict(options=()))["options"]
    if not spec or not all(v.isdigit() for v in values) or len(values) > len(spec):
        return None
    options = {key: default for key, default in spec}
    options.update({key: int(v) for (key, _), v in zip(spec, values)})
    return (task, options) if None not in options.values() else None


STREAM_SEED, BLOCK = 1 << 20, 64   # stream seeds lie above eval's held-out seed and sft's validation seed


def offline_stream(cfg, stage):
    """The run's offline task (cfg["task"]) as an endless stream for one stage (0: SFT, 1: RL): item i lies in
    block i // 64, drawn with its own seed, so no prompt repeats and item i is the same for any ranks or after a
    resume. Media files (the video's mp4s, 8 KB each) go to the run's media folder, named by their draw, so ranks
    writing the same block write the same bytes. Returns take(start, count) -> samples."""
    make, options = TASKS[cfg["task"]]["make"], task_options(cfg["task"], cfg)
    folder = os.path.join(cfg["out_dir"], "media")

    @functools.lru_cache(maxsize=4)
    def block(b):
        return make(BLOCK, STREAM_SEED + seed_for(cfg["seed"], stage, b) % 2 ** 40, options, folder)
    return lambda start, count: [block(i // BLOCK)[i % BLOCK] for i in range(start, start + count)]
