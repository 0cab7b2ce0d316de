"""Real checkpoints: a folder laid out as the hub ships Qwen/Qwen2.5-VL-7B-Instruct (helpers.write_hub_checkpoint:
flat config.json, the special tokens at their real ids 151643-151664, the real chat template, generation_config.json,
preprocessor_config.json, sharded bf16 safetensors under the hub's names; tiny sizes, random weights) through what a
user runs: loading, the prompt, sampling, SFT, RL under DDP and FSDP on 2 gloo ranks, checkpoint, resume, eval.py and
distill.py; and a folder with the 7B's attention geometry, where the capture equals eager attention at real image and
video sizes."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import distill
import eval as evaluation
import model as M
import ral
import tasks
from helpers import GEOMETRY_7B, IDS, hub_tokenizer, spread_reward, write_hub_checkpoint
from test_fsdp import SCRIPT, launch
from test_model import eager_policy
from test_ral import ROOT

IM_END, END_OF_TEXT = IDS["<|im_end|>"], IDS["<|endoftext|>"]      # 151645, 151643


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The 7B-Instruct layout at tiny sizes (2 layers, hidden 64), and a 1-layer student sharing its tokenizer."""
    tmp = tmp_path_factory.mktemp("hub")
    spec = hub_tokenizer()
    return (write_hub_checkpoint(str(tmp / "Qwen2.5-VL-7B-Instruct"), tokenizer=spec),
            write_hub_checkpoint(str(tmp / "student"), seed=1, shards=1, tokenizer=spec, layers=1))


def sample(image_size=(56, 84), seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8))
    return dict(id=f"s{seed}", question="What colour is the star?\nA. red\nB. green\nC. blue\nD. yellow",
                options=["A. red", "B. green", "C. blue", "D. yellow"], answer="B", problem_type="multiple choice",
                image=image, video=None, target=None, rationale="The star is green.")


def test_hub_checkpoint_loads_with_its_token_ids(hub):
    """Every tensor of the shards lands on its parameter; the ids come from text_config and generation_config
    (the top-level config has none: the AttributeError this replaces); the checkpoint's sampling settings are
    overridden in what generate actually resolves; the pixel limits are the checkpoint's."""
    folder = hub[0]
    model, processor = M.load(folder)
    assert not hasattr(model.config, "pad_token_id") and not hasattr(model.config, "eos_token_id")
    params = model.state_dict()
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    for file in set(index.values()):
        for name, tensor in load_file(os.path.join(folder, file)).items():
            ours = name.replace("visual.", "model.visual.", 1) if name.startswith("visual.") else \
                name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
            assert torch.equal(params.pop(ours), tensor.float()), name
    assert not params                                                   # nothing left at its random init
    assert model.generation_config.eos_token_id == M.end_ids(model) == [IM_END, END_OF_TEXT]
    assert model.generation_config.pad_token_id == END_OF_TEXT
    assert M.suppressed_tokens(model.config) == [151652, 151653, 151655, 151656]
    # generation_config.json says do_sample, temperature 0.1, top_k 1, top_p 0.001, repetition_penalty 1.05
    resolved, _ = model._prepare_generation_config(M.sampling_config(model, 8, processor.tokenizer))
    assert resolved.do_sample is False and resolved.temperature == 1.0 and resolved.top_p == 1.0
    assert resolved.repetition_penalty == 1.0 and resolved.num_beams == 1
    # greedy decoding reads no top-k: sampling_config gives it transformers' own default (50, not the checkpoint's 1)
    assert str(resolved.get_generation_mode()) == "GenerationMode.GREEDY_SEARCH" and resolved.top_k == 50
    assert resolved.eos_token_id == [IM_END, END_OF_TEXT] and resolved.pad_token_id == END_OF_TEXT
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (3136, 12845056)


def test_token_ids_fall_back_in_order(hub):
    """The tokenizer's eos first, then text_config's, then generation_config's list; the pad id from text_config,
    else generation_config, else the tokenizer; a checkpoint that names no end at all is an error."""
    model, processor = M.load(hub[0])
    tok = processor.tokenizer
    assert M.token_ids(model, tok) == ([IM_END, END_OF_TEXT], END_OF_TEXT)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [7, IM_END], None
    tok.pad_token = "<|box_start|>"
    assert M.token_ids(model, tok) == ([IM_END, 7], IDS["<|box_start|>"])     # 151645 from tokenizer and config
    model.config.text_config.eos_token_id, model.generation_config.eos_token_id = None, None
    assert M.token_ids(model, tok) == ([IM_END], IDS["<|box_start|>"])         # the tokenizer alone
    with pytest.raises(ValueError, match="names no end-of-sequence token"):
        M.token_ids(model, None)


def test_prompt_on_the_hub_tokenizer(hub, tmp_path):
    """The real template adds its default system prompt to a conversation without one; data.encode's prompt (which
    has one) holds it once, then the image or video as vision_start, one pad per merged token, vision_end."""
    processor = M.load_processor(hub[0])
    tok = processor.tokenizer
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}
    assert tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Which colour?<|im_end|>\n<|im_start|>assistant\n")
    video, = tasks.video_task(1, seed=0, frames=4, folder=str(tmp_path))
    image = sample()
    batch, masks = data.encode([image, video], processor, "think")
    texts = [m["content"][-1]["text"] for s in (image, video) for m in data.prompt_messages(s, "think")[1:]]
    grids = [batch["image_grid_thw"][0], batch["video_grid_thw"][0]]
    for row, text, grid, pad in zip(batch["input_ids"], texts, grids, ("<|image_pad|>", "<|video_pad|>")):
        ids = row[row != IDS["<|endoftext|>"]].tolist()                 # left padding off
        expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + pad * (int(grid.prod()) // 4) + f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids) == expected
        assert ids.count(IDS[pad]) == int(grid.prod()) // 4 and ids.count(151652) == ids.count(151653) == 1
    assert masks["visual"].sum() == (batch["input_ids"] == 151655).sum() + (batch["input_ids"] == 151656).sum()
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == 151655).long() +
                       2 * (batch["input_ids"] == 151656).long())


def test_generation_ends_at_either_of_the_checkpoints_end_ids(hub):
    """<|endoftext|>, the second id of generation_config's eos list, ends a response as <|im_end|> does: the
    lm_head row of 151643 is made twice the row of the first greedy token, so it becomes the greedy first token."""
    model, processor = M.load(hub[0])
    batch, _ = data.encode([sample()] * 2, processor, "think")
    first, mask = M.generate(model, processor, batch, 3, greedy=True)
    assert first.shape == (2, 3) and mask.all() and int(first[0, 0]) not in (IM_END, END_OF_TEXT)
    with torch.no_grad():
        model.lm_head.weight[END_OF_TEXT] = 2 * model.lm_head.weight[int(first[0, 0])]
    response, mask = M.generate(model, processor, batch, 3, greedy=True)
    assert response.tolist() == [[END_OF_TEXT]] * 2 and mask.tolist() == [[1]] * 2     # stopped after one token
    ids = torch.tensor([[5, IM_END, 7, 8], [5, END_OF_TEXT, IM_END, 8], [5, 6, 7, 8]])
    is_end = torch.isin(ids, torch.tensor(M.end_ids(model)))
    assert is_end.long().cumsum(1).tolist() == [[0, 1, 1, 1], [0, 1, 2, 2], [0, 0, 0, 0]]


def hub_args(hub, out, *extra):
    return [f"--init_from={hub}", f"--out_dir={out}", "--zero=False", "--sft_steps=2", "--sft_stop=0", "--sft_batch=2",
            "--sft_size=4", "--train_size=4", "--task_tokens=16", "--prompts_per_step=2", "--group_size=2",
            "--max_new_tokens=4", "--eval_n=2", *extra]


@pytest.fixture(scope="module")
def runs(hub, tmp_path_factory):
    """From the hub folder on 2 gloo ranks: SFT (2 steps, think format) and 2 RL steps under DDP, then 2 under FSDP
    from the same warm start (reused); the DDP run resumed in one process to a third step."""
    tmp = tmp_path_factory.mktemp("runs")
    script = SCRIPT.format(root=ROOT)
    launch(script, hub_args(hub[0], tmp / "ddp", "--rl_steps=2"), 2, "ddp", tmp)
    launch(script, hub_args(hub[0], tmp / "fsdp", "--rl_steps=2", "--fsdp=True"), 2, "fsdp", tmp)
    ral.main(hub_args(hub[0], tmp / "ddp", "--rl_steps=3", "--resume=True"), reward_fn=spread_reward)
    return tmp


def test_sft_and_rl_from_the_hub_folder_under_ddp_and_fsdp(hub, runs):
    (warm,) = runs.glob("warm-Qwen2.5-VL-7B-Instruct-think-sft2-*")
    initial, start = M.load(hub[0])[0].state_dict(), M.load(str(warm))[0]
    assert start.generation_config.eos_token_id == [IM_END, END_OF_TEXT]        # kept through save_pretrained
    start = start.state_dict()
    trained = lambda a, b: [k for k in a if not torch.equal(a[k], b[k])]
    assert trained(initial, start) and all("visual" not in k for k in trained(initial, start))   # SFT moved the LLM
    for run, steps in (("ddp", 3), ("fsdp", 2)):
        rows = [json.loads(line) for line in open(runs / run / "metrics.jsonl")]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)) and all(r["reward"] > 0 for r in rows)
        results = json.load(open(runs / run / "results.json"))
        assert results["before_rl"]["n"] == results["after_rl"]["n"] == 2
        end = M.load(str(runs / run / "ckpt"))[0].state_dict()
        assert trained(start, end) and all("visual" not in k for k in trained(start, end)), run
        assert torch.load(runs / run / "ckpt" / "trainer_state.pt", weights_only=True)["step"] == steps


def test_eval_and_distill_on_hub_folders(hub, runs, tmp_path, monkeypatch):
    """eval.py --ckpt on the FSDP run (responses as long as the run's own max_new_tokens); distill.py with a hub
    teacher and a hub student of another depth."""
    asked = []
    generate = M.generate
    monkeypatch.setattr(M, "generate", lambda *a, **kw: asked.append(a[3]) or generate(*a, **kw))
    evaluation.main(["--ckpt", str(runs / "fsdp"), "--suite", "search-16", "--n", "2"])
    saved = json.load(open(runs / "fsdp" / "ckpt" / "eval.json"))
    assert saved["mode"] == "think" and saved["suites"]["search-16 n=2"]["n"] == 2 and set(asked) == {4}
    monkeypatch.undo()
    out = tmp_path / "distill"
    distill.main([f"--teacher={hub[0]}", f"--init_from={hub[1]}", f"--out_dir={out}", "--zero=False", "--sft_steps=0",
                  "--rl_steps=1", "--prompts_per_step=1", "--group_size=2", "--max_new_tokens=4", "--eval_n=0",
                  "--train_size=2", "--task_tokens=16"], reward_fn=spread_reward)
    row, = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert row["rkl"] > 0 and row["distill_jsd"] > 0


def video_file(path, seconds=3, fps=30, size=(640, 360)):
    """A video at a camera's frame rate: a square moving over a gradient."""
    x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None].repeat(size[1], 0).repeat(3, 2)
    frames = []
    for i in range(seconds * fps):
        frame = x.copy()
        frame[40:100, 10 + 4 * i:70 + 4 * i] = (220, 30, 30)
        frames.append(Image.fromarray(frame))
    tasks.write_mp4(frames, path, fps=fps)
    return path


def test_capture_equals_eager_at_the_7b_geometry(tmp_path):
    """The 7B's attention (28 heads, 4 KV heads, head dim 128, M-RoPE sections 16/24/24; vision: 16 heads of 80,
    a windowed and a full-attention block, 112 px windows) with one text layer and small MLPs and vocabulary:
    p from policy_forward equals transformers' eager attention (last layer, head mean, self weight dropped,
    renormalized) on a 448x448 image and a 30 fps video (real tower, eager too) and on a 1280x720 image (its 1196
    visual tokens given as random embeddings: the tower at that size costs ten seconds on a CPU)."""
    V = GEOMETRY_7B["vision"]
    folder = write_hub_checkpoint(str(tmp_path / "geometry"), shards=1, tokenizer=hub_tokenizer(first_special=640),
                                  layers=1, hidden=GEOMETRY_7B["hidden_size"],
                                  heads=GEOMETRY_7B["num_attention_heads"], kv_heads=GEOMETRY_7B["num_key_value_heads"],
                                  intermediate=128, mrope_section=GEOMETRY_7B["mrope_section"], vision_depth=2,
                                  vision_hidden=V["hidden_size"], vision_heads=V["num_heads"], vision_intermediate=128,
                                  fullatt=(1,), window_size=V["window_size"])     # [7, 15, 23, 31] cut to 2 blocks
    model, processor = M.load(folder)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads) == \
        (28, 4, 128) and text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert model.config.vision_config.fullatt_block_indexes == [1]       # block 0 windowed, block 1 full
    model.eval()
    video = dict(sample(), video=video_file(str(tmp_path / "clip.mp4")), image=None)
    small, _ = data.encode([sample((448, 448)), video], processor, "think")
    assert small["image_grid_thw"].tolist() == [[1, 32, 32]] and small["second_per_grid_ts"].tolist() == [2.0]
    large, _ = data.encode([sample((1280, 720))], processor, "think")
    assert large["image_grid_thw"].tolist() == [[1, 52, 92]]
    grid = large.pop("image_grid_thw")
    large.pop("pixel_values")
    embeds = torch.randn(int(grid.prod()) // 4, GEOMETRY_7B["hidden_size"], generator=torch.Generator().manual_seed(0))
    large = dict(large, image_grid_thw=grid, mm_encoder_outputs={"image": M.BaseModelOutputWithPooling(
        pooler_output=(embeds,))})
    rows = 3
    for batch in (small, large):
        response = torch.randint(0, 600, (len(batch["input_ids"]), rows), generator=torch.Generator().manual_seed(1))
        full = M.with_responses(batch, response, torch.ones_like(response))
        with torch.no_grad():
            logp, p = M.policy_forward(model, full, rows)
            reference, logits = eager_policy(model, full, rows)
        logits = logits[:, -rows - 1:-1].float()
        logits[..., M.suppressed_tokens(model.config)] = float("-inf")
        eager_logp = torch.gather(logits.log_softmax(-1), 2, response[..., None]).squeeze(-1)
        # measured: |p - eager| 1.4e-8 (max p 0.014) and 6e-9 (0.006); log-probs 2e-6 and 1e-6
        assert (p - reference).abs().max() < 1e-5 * reference.max(), (p - reference).abs().max()
        assert (logp - eager_logp).abs().max() < 1e-4
        assert torch.allclose(p.sum(-1), torch.ones(len(p), rows), atol=1e-5)


def test_the_7b_preset_on_the_hub_folder_evaluates_its_eval_file(hub, tmp_path):
    """The documented command's preset (eval_n = 0, grad checkpointing, micro-batches of 2, think format) from the
    hub folder, with data files in Video-R1's layout: evaluated on the whole --eval_file before and after RL."""
    from test_eval import write_benchmark
    path = write_benchmark(tmp_path, n=3)
    results = ral.main(["config/qwen7b_8gpu.py", f"--init_from={hub[0]}", f"--out_dir={tmp_path / 'run'}",
                        "--fsdp=False", "--sft_steps=0", "--rl_steps=1", "--prompts_per_step=1", "--group_size=4",
                        "--max_new_tokens=4", f"--train_file={path}", f"--eval_file={path}"], reward_fn=spread_reward)
    assert results["before_rl"]["n"] == results["after_rl"]["n"] == 3
    saved = json.load(open(tmp_path / "run" / "ckpt" / "eval.json"))["suites"]   # filed by n and reward
    assert saved[f"{path} n=3 reward=helpers.spread_reward"]["n"] == 3
