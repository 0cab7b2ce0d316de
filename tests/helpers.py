"""Shared by the tests (and the scripts they launch under torchrun): a reward with spread, and checkpoint folders laid
out as the hub ships Qwen2.5-VL Instruct, written offline with plain json and safetensors."""
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def spread_reward(text, sample, mode="think"):
    """A reward with spread on a random model (the real one is 0 for every response), so advantages are non-zero."""
    return dict(reward=(len(text) % 3) / 2, accuracy=0.0, format=0.0)


# ----------------------------------------------------------------------------------------------------------------
# A hub-layout Qwen2.5-VL-7B-Instruct folder: the files and the token ids of the real one, tiny sizes, random weights

FIRST_SPECIAL = 151643          # Qwen2's byte-level BPE has 151643 ordinary tokens; the specials follow them
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]                       # 151643 ... 151656
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]                                     # 151657 ... 151664
IDS = {t: FIRST_SPECIAL + i for i, t in enumerate(SPECIAL + NOT_SPECIAL)}
# Qwen2.5-VL Instruct's chat template (chat_template.json and tokenizer_config.json): a system turn with its
# default prompt when the conversation does not open with one
HUB_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The 7B's text and vision geometry (config.json of Qwen/Qwen2.5-VL-7B-Instruct)
GEOMETRY_7B = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, mrope_section=[16, 24, 24],
                   vision=dict(hidden_size=1280, num_heads=16, out_hidden_size=3584, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31]))


def hub_config(vocab_size, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, mrope_section=(2, 3, 3),
               vision_depth=2, vision_hidden=32, vision_heads=2, vision_intermediate=64, fullatt=(1,),
               window_size=112, ids=None):
    """config.json as the hub ships it: the text model's keys at the top level, vision_config nested, M-RoPE in
    rope_scaling (keys of transformers 4.4x, which wrote it)."""
    ids = ids or IDS
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": intermediate, "max_position_embeddings": 128000,
        "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": heads,
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": vision_depth, "hidden_act": "silu", "hidden_size": vision_hidden,
                          "intermediate_size": vision_intermediate, "num_heads": vision_heads, "in_chans": 3,
                          "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "window_size": window_size,
                          "fullatt_block_indexes": list(fullatt), "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
        "vocab_size": vocab_size,
    }


def corpus():
    """Text the tokenizer is trained on: the offline tasks' prompts, rationales and both answer formats."""
    import data
    import tasks
    lines = []
    for s in tasks.search_task(16, seed=0, tokens=16):
        for mode in ("think", "zero"):
            lines += [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]
                      for m in data.prompt_messages(s, mode)] + [data.sft_target(s, mode)]
    return lines


def hub_tokenizer(trained=600, first_special=FIRST_SPECIAL):
    """tokenizer.json in Qwen2's layout (NFC, its split regex, byte-level BPE): a small vocabulary trained here,
    padded with unreachable filler entries up to first_special, then the special tokens at their real ids."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=trained, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    assert len(vocab) <= first_special
    vocab.update({f"<fill{i}>": i for i in range(len(vocab), first_special)})   # no merge ever makes one
    spec["added_tokens"] = [dict(id=first_special + i, content=t, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=t in SPECIAL) for i, t in enumerate(SPECIAL + NOT_SPECIAL)]
    return spec


def write_hub_checkpoint(folder, seed=0, shards=2, tokenizer=None, **config):
    """A folder laid out like the hub's Qwen/Qwen2.5-VL-7B-Instruct: config.json (flat), generation_config.json,
    preprocessor_config.json, chat_template.json, tokenizer.json + tokenizer_config.json, and the weights in bf16
    under the hub's names (model.layers.*, visual.*, lm_head), sharded with model.safetensors.index.json. Sizes
    from hub_config's keywords; the vocabulary is padded past the last special id, as the real one (152064).
    tokenizer: another folder's tokenizer.json spec to reuse (teacher and student share one)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(folder, exist_ok=True)
    spec = tokenizer or hub_tokenizer()
    n_tokens = max(t["id"] for t in spec["added_tokens"]) + 1
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    write = lambda name, obj: json.dump(obj, open(os.path.join(folder, name), "w"), indent=2, ensure_ascii=False)
    write("config.json", hub_config(vocab_size=(n_tokens + 15) // 16 * 16, ids=ids, **config))
    write("generation_config.json", {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                                     "do_sample": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                                     "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
                                     "transformers_version": "4.49.0"})
    write("preprocessor_config.json", {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                                       "temporal_patch_size": 2, "merge_size": 2,
                                       "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                       "image_std": [0.26862954, 0.26130258, 0.27577711],
                                       "image_processor_type": "Qwen2VLImageProcessor",
                                       "processor_class": "Qwen2_5_VLProcessor"})
    write("chat_template.json", {"chat_template": HUB_CHAT_TEMPLATE})
    write("tokenizer.json", spec)
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in spec["added_tokens"]}
    write("tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL[1:], "bos_token": None, "chat_template": HUB_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "processor_class": "Qwen2_5_VLProcessor",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    # random weights for the hub's names (model.layers.*, visual.*, lm_head): the shapes of transformers' model of
    # this config (built on the meta device: no memory), norms 1, everything else N(0, 0.02^2)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(folder))
                  .state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    hub_name = lambda k: k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    draw = lambda k, shape: torch.ones(shape) if "norm" in k or "ln_q" in k else torch.randn(shape, generator=g) * 0.02
    weights = {hub_name(k): draw(k, shape).to(torch.bfloat16) for k, shape in shapes.items()}
    names = sorted(weights)
    parts = [names[i::shards] for i in range(shards)]
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else \
        ["model.safetensors"]
    for part, name in zip(parts, files):
        save_file({k: weights[k] for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
    if shards > 1:
        write("model.safetensors.index.json", {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
            "weight_map": {k: name for part, name in zip(parts, files) for k in part}})
    return folder
