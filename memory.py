"""
What a run needs in GPU memory, counted on any machine (no GPU, no weights): the training state of the released
Qwen2.5-VL configs built on the meta device, in DDP and FSDP; one micro-batch's activations through policy_forward
and Eq. 4's loss, counted from the code (tests/test_bench.py checks the count against a measured step); and a whole
step of each preset (config/qwen3b_8gpu.py, qwen7b) at its longest input, the update and the rollout, against 80 GB.

    python bench.py --what memory --gpus 8          # the two tables
"""
import inspect
import os

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import cli
import data
import tasks
from model import training_memory


# The released checkpoints' config.json values (text and vision tower) that set the parameter count.
QWEN25_VL = {
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


def meta_model(name):
    """The released Qwen2.5-VL config `name` on the meta device (no weights), vision tower frozen as model.prepare."""
    text = QWEN25_VL[name]
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=text["hidden_size"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.model.visual.requires_grad_(False)
    return model


def bench_memory(gpus):
    rows = []
    for name in QWEN25_VL:
        model = meta_model(name)
        params = sum(w.numel() for w in model.parameters())
        for mode in ("DDP", "FSDP"):
            m = training_memory(model, gpus, fsdp=mode == "FSDP")
            rows.append(dict(model=f"Qwen2.5-VL-{name}", params=params, mode=mode, gpus=gpus, **m))
    return rows


def activation_memory(text, batch, seq, rows, act_bytes=2, checkpointing=True, padded=True):
    """Bytes of one micro-batch's forward + backward through policy_forward (with the attention policy) and Eq. 4's
    loss, by what holds them, counted from the code; tests/test_bench.py checks them against a measured step.
    text: the text config's sizes; `batch` sequences of `seq` tokens, the last `rows` the response; act_bytes 2 when
    the layers compute in bf16 (FSDP's bf16 gathered weights), 4 in fp32; padded: the batch has padding, so the
    model builds the dense B x 1 x T x T mask (a group's responses differ in length: in training, always).
    held: what the forward keeps for backward. peak: the larger of the forward's end (held + the logits' working
    set) and the backward of a layer (checkpointing: the layer inputs, the mask, one layer recomputed, and its
    gradients' working set, about 2 B T I + 2 B T H fp32 elements as measured on small models)."""
    B, T, R, e = batch, seq, rows, act_bytes
    H, I, L = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    nh, kv, V = text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]
    d, N = H // nh, B * T
    held_kv = nh if padded and kv > 1 else kv     # with a mask transformers repeats the key heads for SDPA (a copy,
                                                  # repeat_kv; a view when there is one key head)
    layer = (2 * (N * H * (4 + 2 * e) + 4 * N)  # 2 RMSNorms: the fp32 input, 1/rms, the normalized input before and
             + 2 * N * nh * d * e             # after its weight; q and SDPA's output
             + 2 * N * held_kv * d * e        # k and v as SDPA saves them
             + 4 * B * nh * T                 # SDPA's log-sum-exp
             + 4 * N * I * e                  # the MLP: gate, up, silu(gate), silu(gate) * up
             + (B * T * T * e if padded else 0))   # SDPA's float copy of the boolean mask, made by every layer
    m = dict(
        layer_inputs=L * N * H * e if checkpointing else 0,   # all checkpointing keeps of a layer: its input
        layers=0 if checkpointing else L * layer,
        mask=B * T * T if padded else 0,      # the boolean B x 1 x T x T mask, shared by the layers
        head=N * H * (4 + e) + 4 * N + B * (R + 1) * H * e + 2 * B * T * d * e,   # final norm, head input, rotary
        logits=4 * B * R * V,                 # the response rows' fp32 log-softmax (B x R x V)
        # q of the response rows and the key heads in fp32: copies under bf16; in fp32 views of the layer's own q
        # and k, which hold them whole unless SDPA keeps them anyway (q always, k without a mask, no checkpointing)
        capture=(4 * B * nh * R * d if e != 4 else 4 * B * nh * T * d if checkpointing else 0)
                + (4 * B * kv * T * d if e != 4 or padded or checkpointing else 0)
                + B * R * T * (7 * 4 + 7) + R * T,           # Eq. 2's rows and Eq. 3's JSD: 7 fp32 + 7 bool B x R x T
    )
    m["held"] = sum(m.values())
    m["logits_working"] = B * (R + 1) * V * e + 4 * B * R * V          # the head's logits and their fp32 copy
    m["layer_backward"] = (layer if checkpointing else 0) + 2 * N * I * e + 2 * N * H * 4
    backward = m["layer_backward"] + (m["layer_inputs"] + m["mask"] if checkpointing else m["held"])
    m["peak"] = max(m["held"] + m["logits_working"], backward)
    return m


PRESETS = (("3B", "config/qwen3b_8gpu.py"), ("7B", "config/qwen7b_8gpu.py"))
PROMPT_TEXT_TOKENS = 128   # the chat template and the question around the video: an allowance, not measured


def preset(path):
    """A preset's options as ral.py resolves them (a preset may read another by its path from the repository)."""
    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    try:
        return cli.parse([path], cli.OPTIONS, "")
    finally:
        os.chdir(here)


def longest_visual_tokens():
    """The most visual tokens data.encode gives one sample: a video at its default frames (2 per temporal patch) of
    frame_pixels each, or an image at image_pixels (one token per 28 x 28 pixels)."""
    p = inspect.signature(data.encode).parameters
    video = p["video_frames"].default // 2 * (p["frame_pixels"].default // tasks.CELL ** 2)
    return max(video, p["image_pixels"].default // tasks.CELL ** 2)


def bench_memory_whole(gpus, presets=PRESETS):
    """Per GPU, a step of each preset at its longest input: the training state, then the larger of the update
    (one micro-batch's activations, activation_memory) and the rollout's generate (the gathered bf16 model, the KV
    cache, the prefill). Everything in bf16 compute as FSDP runs it on GPU. Returns one dict of rows per preset."""
    out = []
    for name, path in presets:
        cfg, model, text = preset(path), meta_model(name), QWEN25_VL[name]
        params = sum(w.numel() for w in model.parameters())
        layer_params = sum(w.numel() for w in model.model.language_model.layers[0].parameters())
        visual_params = sum(w.numel() for w in model.model.visual.parameters())
        root_params = params - visual_params - text["num_hidden_layers"] * layer_params   # embeddings, norm, head
        head_params = text["vocab_size"] * text["hidden_size"]
        B, R, H = cfg["micro_batch"], cfg["max_new_tokens"], text["hidden_size"]
        visual = longest_visual_tokens()
        P = visual + PROMPT_TEXT_TOKENS
        T = P + R
        sequences = cfg["prompts_per_step"] // gpus * cfg["group_size"]            # a rank's rollout
        L, kv, d = text["num_hidden_layers"], text["num_key_value_heads"], H // text["num_attention_heads"]
        act = activation_memory(text, B, T, R, 2, cfg["grad_checkpointing"])
        state = training_memory(model, gpus, fsdp=cfg["fsdp"])
        rows = dict(state=state["total"] - state["generation"],     # the gathered copy is generate_copy below
                    # FSDP2 keeps the root unit gathered from forward to backward, the head's bf16 gradient until
                    # the end of backward, one decoder layer prefetched beside the current one, and a layer's
                    # unsharded bf16 gradient with its fp32 copy for the reduce-scatter
                    fsdp_in_flight=(2 * root_params + 2 * head_params + 2 * 2 * layer_params + 6 * layer_params)
                    if cfg["fsdp"] else 0,
                    # a step's rollout, kept for its update: p_old (fp32 B x R x T) and the cached visual embeddings
                    rollout_buffers=sequences * R * T * 4 + cfg["prompts_per_step"] // gpus * visual * H * 2,
                    **{f"act_{k}": v for k, v in act.items()},
                    # every unit gathered once in bf16 for the whole generate (the tower is a replica already)
                    generate_copy=(params - visual_params) * 2,
                    kv_cache=L * 2 * sequences * kv * T * d * 2,
                    # no_grad prefill of the rank's sequences, one layer at a time: the hidden states, the norm's
                    # fp32 copy and the MLP's gate, up and their product
                    prefill=sequences * P * (H * (2 + 4) + 3 * text["intermediate_size"] * 2))
        rows["update_peak"] = rows["state"] + rows["fsdp_in_flight"] + rows["rollout_buffers"] + act["peak"]
        rows["generate_peak"] = rows["state"] + rows["generate_copy"] + rows["kv_cache"] + rows["prefill"] + \
            cfg["prompts_per_step"] // gpus * visual * H * 2
        rows["peak"] = max(rows["update_peak"], rows["generate_peak"])
        out.append(dict(model=f"Qwen2.5-VL-{name}", preset=path, gpus=gpus, micro_batch=B, response=R,
                        visual_tokens=visual, T=T, sequences=sequences, checkpointing=cfg["grad_checkpointing"],
                        fsdp=cfg["fsdp"], rows=rows))
    return out


# (row, how it is derived) for the whole-memory table, in order
WHOLE_ROWS = (
    ("state", "training state (fp32 shards, gradients, AdamW, bf16 reference): meta-device count, above"),
    ("fsdp_in_flight", "FSDP2 units in flight: root (embeddings, head) and 2 decoder layers in bf16, head and "
                       "layer gradients: computed"),
    ("rollout_buffers", "the step's rollout kept for the update: p_old (B x R x T fp32), visual embeddings: computed"),
    ("act_layer_inputs", "activations: each decoder layer's input, kept by checkpointing: counted, tested"),
    ("act_mask", "the dense boolean B x 1 x T x T mask (the only T^2 term): counted, tested"),
    ("act_head", "final norm, head input, rotary tables: counted, tested"),
    ("act_logits", "log-softmax of the response rows (B x R x V fp32): counted, tested"),
    ("act_capture", "the capture (q rows, key heads in fp32) and Eq. 2-3's B x R x T tensors: counted, tested"),
    ("act_layer_backward", "backward of one layer: recomputed (with SDPA's float copy of the mask) and its "
                           "gradients: counted, working set measured on small models, tested"),
    ("act_logits_working", "forward's logits working set (bf16 logits, fp32 copy): counted, tested"),
    ("act_peak", "activation peak: the larger of the forward's end (held + logits working set) and a layer's "
                 "backward (+ layer inputs, mask): counted, tested"),
    ("update_peak", "**update peak**: state + in flight + rollout + activation peak"),
    ("generate_copy", "rollout: the bf16 LLM gathered once for generate (its parameters x 2 bytes): computed"),
    ("kv_cache", "rollout: KV cache of the rank's sequences (bf16): computed"),
    ("prefill", "rollout: prefill working set (one layer over the rank's sequences): computed"),
    ("generate_peak", "**generate peak**: state + gathered copy + KV cache + prefill + visual embeddings"),
    ("peak", "**per-GPU peak**"),
)


def print_memory_tables(results):
    if "memory" in results:
        print("\n### Training state per GPU, before activations (GB = 1e9 bytes): fp32 master weights + fp32 "
              "gradients + AdamW (fp32) + bf16 frozen vision tower (one replica per GPU, shared with the reference) + "
              "bf16 reference LLM; under FSDP also the bf16 LLM gathered for generation\n")
        print("| model | parameters | mode | GPUs | weights | gradients | AdamW | reference | generation | total | "
              "state under 80 GB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["memory"]:
            gb = lambda k: f"{r[k] / 1e9:.1f}"
            print(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['mode']} | {r['gpus']} | {gb('weights')} | "
                  f"{gb('gradients')} | {gb('optimizer')} | {gb('reference')} | {gb('generation')} | {gb('total')} | "
                  f"{'yes' if r['total'] < 80e9 else 'no'} |")
    if "memory_whole" in results:
        presets = results["memory_whole"]
        print("\n### Memory per GPU, whole: a step of each preset at its longest input (GB = 1e9 bytes)\n")
        for p in presets:
            print(f"- {p['model']} ({p['preset']}): {p['gpus']} GPUs, FSDP {p['fsdp']}, "
                  f"micro-batch {p['micro_batch']}, {p['visual_tokens']} visual + {PROMPT_TEXT_TOKENS} text + {p['response']} response tokens "
                  f"(T = {p['T']}), {p['sequences']} sequences per rank, checkpointing {p['checkpointing']}")
        print("\n| | how it is derived | " + " | ".join(p["model"] for p in presets) + " |")
        print("|---|---|" + "---|" * len(presets))
        for key, how in WHOLE_ROWS:
            print(f"| {key} | {how} | " + " | ".join(f"{p['rows'][key] / 1e9:.2f}" for p in presets) + " |")
        print("| under 80 GB | | " + " | ".join("yes" if p["rows"]["peak"] < 80e9 else "no" for p in presets) + " |")
