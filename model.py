"""
The policy: a Qwen2.5-VL model, its processor, and the attention-policy capture of RAL (Eq. 2).

load(name_or_path)  -> model, processor   a hub id or a local folder, through from_pretrained
build_tiny(...)     -> model, processor   a random tiny Qwen2.5-VL with a locally trained tokenizer (offline)
policy_forward(...)                        one forward -> response log-probs and the attention policy p^t

The capture: every attention layer keeps running SDPA; the final text layer's kernel also hands its q and k to
policy_forward, which computes the head-averaged softmax of the response query rows (a B x R x T matrix), drops
each token's weight on itself
and renormalizes (Eq. 2). It is exactly eager attention's weights for those rows, differentiable, and the layer's
output is untouched.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AttentionInterface, AttentionMaskInterface, AutoTokenizer, GenerationConfig,
                          LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.masking_utils import sdpa_mask
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cli import UsageError

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS
# Qwen2.5-VL's chat format, reduced to what the project uses (system/user/assistant, images and videos).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Processor:
    """Tokenizer + image processor. (transformers' Qwen2_5_VLProcessor insists on a video processor, which needs
    torchvision; data.py turns video frames into patches itself with the image processor's constants.)"""
    tokenizer: object
    image_processor: Qwen2VLImageProcessorPil

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def load_processor(path):
    return Processor(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))


def check_source(name_or_path):
    """Why name_or_path cannot be loaded, or None. The filesystem is asked first: a path that does not exist is
    named as such at once, instead of being sent to the hub (where it waits on the network, then fails). Only a
    name of the form "owner/name" whose "owner" is not a folder here is left to the hub."""
    if os.path.isdir(name_or_path):
        ok = os.path.isfile(os.path.join(name_or_path, "config.json"))
        return None if ok else f"{name_or_path} is a folder without config.json (not a save_pretrained checkpoint)"
    if os.path.exists(name_or_path):
        return f"{name_or_path} is a file, not a checkpoint folder"
    parent = os.path.dirname(name_or_path)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        return f"no such folder: {name_or_path}"
    if os.path.isdir(parent):
        return f"no such folder: {name_or_path} (the folder {parent}/ exists here, so it is not taken for a hub id)"
    return None


def load(name_or_path, device="cpu", dtype=None):
    """A Qwen2.5-VL checkpoint (hub id or folder), capture kernel on, vision frozen. dtype None: bf16 on GPU, fp32
    on CPU (frozen models: reference, teacher, evaluation); the trainer asks for float32 master weights. A hub id
    that cannot be fetched (not on the hub, no network, no cached copy) is a UsageError of one line."""
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype,
                                                                   attn_implementation="sdpa")
        processor = load_processor(name_or_path)
    except OSError as e:   # transformers' message for a missing hub id or files: its first line says what
        raise UsageError(f"cannot load {name_or_path}: {str(e).strip().splitlines()[0]}") from None
    return prepare(model.to(device), processor.tokenizer), processor


def build_tokenizer(vocab_size=1024):
    """A byte-level BPE tokenizer trained here, on the vocabulary of the project's prompts and answers."""
    words = ("the a an of in on at is are which what where how many colour color shape object target small large "
             "red green blue yellow purple orange white black gray circle square triangle star cross diamond "
             "left right top bottom middle center corner frame video image picture find look answer question "
             "options choose letter number count first last second third only one two three four five "
             "locate located found see there it its with and or not none "
             "<think> </think> <answer> </answer> A. B. C. D. A B C D system user assistant "
             "You are a helpful assistant. Think step by step, then answer. 0 1 2 3 4 5 6 7 8 9 , . ? : ( )").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def build_tiny(layers=4, hidden=128, heads=4, kv_heads=2, vision_depth=2, vision_hidden=64, seed=0,
               min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024):
    """A random tiny Qwen2.5-VL, built offline and seeded, with its processor. Same architecture as the real one."""
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    mrope = [head_dim // 8, head_dim // 16 * 3, head_dim // 16 * 3]  # temporal, height, width; sums to head_dim/2
    mrope[0] += head_dim // 2 - sum(mrope)
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=mrope),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1], window_size=112)
    # the token ids live in text_config, as transformers puts those of a hub config.json
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return prepare(model, tokenizer), Processor(tokenizer, image_processor)


def token_ids(model, tokenizer=None):
    """The checkpoint's end-of-response ids (a list) and its pad id, read where transformers keeps them: it moves
    the ids of a flat hub config.json into text_config (the top-level Qwen2_5_VLConfig has none), and
    generation_config.json lists every end (Qwen2.5-VL Instruct: [<|im_end|>, <|endoftext|>]). The tokenizer's eos
    token comes first (the end of a turn in its chat template: SFT targets end with it); its pad token is the last
    resort."""
    text, generation = model.config.get_text_config(), model.generation_config
    listed = lambda v: [] if v is None else [int(v)] if isinstance(v, int) else [int(x) for x in v]
    eos = listed(getattr(tokenizer, "eos_token_id", None)) + listed(text.eos_token_id) + listed(generation.eos_token_id)
    pads = (text.pad_token_id, generation.pad_token_id, getattr(tokenizer, "pad_token_id", None))
    if not eos:
        raise ValueError("the checkpoint names no end-of-sequence token (config, generation_config or tokenizer)")
    return list(dict.fromkeys(eos)), next((int(p) for p in pads if p is not None), eos[0])


def prepare(model, tokenizer=None):
    """Freeze the vision encoder and merger (the paper trains only the LLM); switch every layer to our kernel;
    keep the token ids (token_ids) in the model's generation_config, where generate and SFT read them (and
    save_pretrained writes them)."""
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.set_attn_implementation("ral_sdpa")
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = token_ids(model, tokenizer)
    return model


def end_ids(model):
    """The ids that end a response, as prepare keeps them (generation stops at any; the first ends an SFT target)."""
    ids = getattr(model, "module", model).generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids)


def training_memory(model, world=1, fsdp=False, weight_bytes=4, reference=True, gathered_bytes=2):
    """Per-device bytes of the training state, before activations: trainable weights (fp32 master weights: 4
    bytes), their gradients (same dtype), AdamW's two moments (fp32), the frozen vision tower and merger (bf16, one
    replica per device in every mode, shared by the policy and the reference: scale.replicate_tower), and the bf16
    reference LLM. FSDP shards all but the tower over `world` devices; DDP keeps a full copy on each (its gradient
    buckets are views of the gradients: gradient_as_bucket_view). Under FSDP, `generation` is the whole LLM that
    scale.gathered holds on every device through a rollout or an evaluation, in the dtype FSDP gathers
    (gathered_bytes: bf16 on GPU, the weights' own on CPU); DDP's replica is whole already. Works on a meta-device
    model (no weights)."""
    trainable = sum(w.numel() for w in model.parameters() if w.requires_grad)
    frozen = sum(w.numel() for w in model.parameters() if not w.requires_grad)
    share = world if fsdp else 1
    rows = dict(weights=trainable * weight_bytes / share + frozen * 2, gradients=trainable * weight_bytes / share,
                optimizer=trainable * 8 / share, reference=trainable * 2 / share if reference else 0,
                generation=trainable * gathered_bytes if fsdp else 0)
    return dict(rows, total=sum(rows.values()))


# ----------------------------------------------------------------------------------------------------------------
# The attention-policy capture (Eq. 2)

# policy_forward opens a capture (a dict) here; the kernel of the policy's layer puts its q, k and mask into it.
# A module-level slot, not a forward kwarg: FSDP's pre-forward hooks rebuild kwargs, so a dict passed through
# model(..., capture=d) reaches the kernel as a copy and the caller would see nothing.
_capture = None


@contextmanager
def capturing():
    """Inside this block, a forward leaves the last text layer's query (after rotary), key, mask and scaling in the
    dict it yields; policy_forward turns them into p^t after the forward."""
    global _capture
    previous, _capture = _capture, {}
    try:
        yield _capture
    finally:
        _capture = previous


def policy_layer(config):
    """The decoder layer whose attention is the policy (Eq. 2): the final one unless set_attn_layer chose another."""
    return getattr(config, "ral_attn_layer", config.num_hidden_layers - 1)


def set_attn_layer(model, layer):
    """Make decoder layer `layer` (negative: from the end; -1, the final layer, is the paper's) the attention policy.
    Kept in the text config, which every attention layer reads and checkpoints save, so every capture of this model
    (rollout, update, evaluation, eval.py on its checkpoint later) takes the same layer."""
    config = getattr(model, "module", model).config.text_config
    n = config.num_hidden_layers
    if not -n <= layer < n:
        raise ValueError(f"attn_layer {layer} is not a decoder layer of a {n}-layer model (use -{n} .. {n - 1})")
    config.ral_attn_layer = layer % n
    return config.ral_attn_layer


def ral_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA for every layer; inside capturing(), the policy's layer (the last text layer unless set_attn_layer chose
    another) also hands over its q and k. p^t is computed from them outside the layer, so an activation-checkpointed
    layer recomputes exactly what it saved (the slot is closed when backward recomputes the layer, and the capture
    saves nothing inside it)."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _capture is not None and getattr(module, "layer_idx", None) == policy_layer(module.config):
        _capture.update(query=query, key=key, mask=attention_mask, scaling=kwargs.get("scaling", module.scaling))
    return out


def attention_policy(query, key, attention_mask, rows, scaling):
    """query B x H x T x d (after rotary), key B x K x T x d (the K key-value heads as the layer computed them, before
    repeat_kv: query head h reads key head h // (H / K)), attention_mask: None (plain causal) or SDPA's boolean
    B x 1 x T x T (True = may attend) or additive float mask. Returns B x rows x T: p^t over keys, zero at t and after.
    """
    T = key.shape[2]
    t = torch.arange(T - rows, T, device=query.device)                          # absolute position of each row
    allowed = (torch.arange(T, device=query.device)[None, :] <= t[:, None])[None]  # causal, 1 x R x T
    if attention_mask is not None:
        m = attention_mask[:, 0, T - rows:]
        allowed = allowed & (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2)
    # p in float32 even under bf16 autocast (in float64 for a float64 model)
    with torch.autocast(query.device.type, enabled=False):
        q, k = (at_least_float32(x) for x in (query[:, :, T - rows:], key))
        alpha = HeadMeanSoftmax.apply(q, k, allowed, scaling)                   # head mean
    alpha = alpha.masked_fill(t[:, None] == torch.arange(T, device=query.device), 0.0)  # drop the weight on itself
    return alpha / alpha.sum(-1, keepdim=True)                                  # renormalize over keys < t


def at_least_float32(x):
    """x in float32, or as it is if it is float64 (a float64 model keeps its precision)."""
    return x if x.dtype == torch.float64 else x.float()


def head_softmax(q, k, allowed, scaling):
    """One head's attention weights: softmax(q k^T * scaling) over the allowed keys (B x R x T)."""
    return (q @ k.transpose(1, 2) * scaling).masked_fill(~allowed, float("-inf")).softmax(-1)


class HeadMeanSoftmax(torch.autograd.Function):
    """The mean over the H query heads of the attention weights of R query rows, B x R x T. Autograd alone would
    keep every head's B x R x T weights for backward; this keeps only q (B x H x R x d) and k (B x K x T x d, the K
    key-value heads, not repeated to H: grouped-query attention shares key head h // (H / K) among H / K query
    heads) and recomputes one head at a time, so the capture's memory is O(B x R x T)."""

    @staticmethod
    def forward(ctx, q, k, allowed, scaling):
        ctx.save_for_backward(q, k, allowed)
        ctx.scaling, groups = scaling, q.shape[1] // k.shape[1]
        out = head_softmax(q[:, 0], k[:, 0], allowed, scaling)
        for h in range(1, q.shape[1]):
            out += head_softmax(q[:, h], k[:, h // groups], allowed, scaling)
        return out / q.shape[1]

    @staticmethod
    def backward(ctx, grad):
        q, k, allowed = ctx.saved_tensors
        s, g, groups = ctx.scaling, grad / q.shape[1], q.shape[1] // k.shape[1]
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        for h in range(q.shape[1]):
            kh = k[:, h // groups]
            a = head_softmax(q[:, h], kh, allowed, s)
            ds = a * (g - (a * g).sum(-1, keepdim=True))                       # softmax backward
            dq[:, h] = ds @ kh * s
            dk[:, h // groups] += ds.transpose(1, 2) @ q[:, h] * s             # a key head sums its query heads
        return dq, dk, None, None


AttentionInterface.register("ral_sdpa", ral_sdpa)
AttentionMaskInterface.register("ral_sdpa", sdpa_mask)


# ----------------------------------------------------------------------------------------------------------------
# Batches: prompt batches from data.encode, with responses appended, sliced by rows

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def take_rows(batch, i, j):
    """Sequences i..j-1 of a group (G sequences sharing one prompt); the visual tensors (and the cached visual
    embeddings, one entry per image) hold the same number of rows for every sequence, so they slice evenly."""
    n = batch["input_ids"].shape[0]
    rows = lambda v: v[i * (len(v) // n):j * (len(v) // n)]
    out = {k: rows(v) if k in VISUAL_KEYS else v[i:j] for k, v in batch.items() if k != "mm_encoder_outputs"}
    if "mm_encoder_outputs" in batch:
        out["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=rows(o.pooler_output))
                                     for kind, o in batch["mm_encoder_outputs"].items()}
    return out


def encode_visuals_once(model, batch):
    """The vision tower once for a group (G sequences sharing one prompt): its merged embeddings of the first copy
    replace pixel_values as mm_encoder_outputs (transformers' input for precomputed encoder outputs), one entry per
    sequence, so generate and every later forward of the step (old and reference log-probs, every mini-batch and
    epoch of the update) reuse them. Exact while the tower and merger are frozen (prepare): for the same pixels
    their output is a constant, and no gradient flows into them."""
    n, out, encoded = len(batch["input_ids"]), dict(batch), {}
    tower = getattr(model, "module", model).model
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if pixels in batch:
            values, rows, items = out.pop(pixels), len(batch[pixels]) // n, len(batch[grid]) // n
            if not torch.equal(values[:rows], values[-rows:]):
                raise ValueError("encode_visuals_once takes a group: every sequence must show the same media")
            features = tower.get_image_features if kind == "image" else tower.get_video_features
            with torch.no_grad():
                embeds = features(values[:rows], batch[grid][:items], return_dict=True).pooler_output
            encoded[kind] = BaseModelOutputWithPooling(pooler_output=tuple(embeds) * n)
    return dict(out, mm_encoder_outputs=encoded) if encoded else out


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def append_responses(batch, responses, pad_id):
    """Left-padded prompts + a list of response token lists (right-padded) -> the full batch and response mask."""
    R = max(len(r) for r in responses)
    ids = torch.full((len(responses), R), pad_id, dtype=torch.long)
    mask = torch.zeros(len(responses), R, dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, :len(r)], mask[i, :len(r)] = torch.as_tensor(r), 1
    return with_responses(batch, ids.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)), mask


def concat_batches(batches, pad_id):
    """Prompt batches (each left-padded) as one: padded on the left to the longest, visual tensors (and cached
    embeddings) in order; a batch without images (or videos) adds no rows of them."""
    P = max(b["input_ids"].shape[1] for b in batches)
    fill = dict(input_ids=pad_id, attention_mask=0, mm_token_type_ids=0)
    out = {}
    for k in dict.fromkeys(k for b in batches for k in b):      # every key, in order of appearance
        have = [b[k] for b in batches if k in b]
        if k in fill:
            out[k] = torch.cat([F.pad(v, (P - v.shape[1], 0), value=fill[k]) for v in have])
        elif k == "mm_encoder_outputs":
            kinds = dict.fromkeys(kind for v in have for kind in v)
            out[k] = {kind: BaseModelOutputWithPooling(pooler_output=sum((v[kind].pooler_output for v in have
                                                                          if kind in v), ())) for kind in kinds}
        else:
            out[k] = torch.cat(have)
    return out


def with_responses(batch, response, response_mask):
    full = dict(batch, input_ids=torch.cat([batch["input_ids"], response], 1),
                attention_mask=torch.cat([batch["attention_mask"], response_mask.to(batch["attention_mask"])], 1))
    if "mm_token_type_ids" in batch:     # M-RoPE's token types: responses are text (0)
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], 1)
    return full


def suppressed_tokens(config):
    """The vision special tokens: a random model samples them, so they are kept out of generation, and the
    log-probs of the sampled distribution leave them out the same way."""
    return [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id]


def masked_sum(x, mask):
    """Sum over the positions where mask is set. Excluded, not multiplied by zero: an inf or nan at a padded
    position stays out of the loss and its gradient."""
    return torch.where(mask.bool(), x, 0.0).sum()


def policy_forward(model, batch, response_len, attention=True, full=False, temperature=1.0):
    """One forward over prompt + response (left-padded prompts, response in the last `response_len` columns).
    Returns per-token log-probs of the response tokens (B x R) under the distribution generate samples from
    (softmax(logits / temperature), vision special tokens excluded) and, if asked, the attention policy
    (B x R x T); with full=True also the whole log-softmax over the vocabulary at each response position (B x R x V)."""
    with capturing() if attention else nullcontext() as c:
        out = model(**batch, logits_to_keep=response_len + 1, use_cache=False)
    logits = at_least_float32(out.logits[:, :-1]) / temperature          # position t-1 predicts token t
    logits[..., suppressed_tokens(getattr(model, "module", model).config)] = float("-inf")   # DDP wraps the model
    targets = batch["input_ids"][:, -response_len:]
    logprobs = logits.log_softmax(-1)
    logp = torch.gather(logprobs, 2, targets.unsqueeze(-1)).squeeze(-1)
    p = attention_policy(c["query"], c["key"], c["mask"], response_len, c["scaling"]) if attention else None
    return (logp, p, logprobs) if full else (logp, p)


@torch.no_grad()
def token_entropy(logprobs):
    """The token policy's entropy at each position, -sum_v pi(v) log pi(v) over the vocabulary (B x R), from
    policy_forward's log-softmax (B x R x V; suppressed tokens, log-prob -inf, add 0). For the log: no gradient,
    one sequence at a time, so what it adds to memory is R x V, freed at once."""
    return torch.stack([torch.special.entr(row.exp()).sum(-1) for row in logprobs])


def sampling_config(model, max_new_tokens, tokenizer=None):
    """Every setting greedy decoding reads, explicitly: greedy search (not beams, not contrastive search) over the
    scores with nothing applied but the suppressed tokens (no repetition penalty, n-gram ban or minimum length);
    sampling is GumbelSampler's. generate fills each field left unset (None) from the checkpoint's own
    generation_config (Qwen2.5-VL Instruct ships do_sample, a repetition penalty, top-k and top-p), and the rollout
    would then not come from the distribution whose log-probs the ratio uses. Greedy decoding reads no sampling
    flag, but temperature, top-k, top-p, typical-p and the cutoffs get transformers' own defaults (which it reads as
    "off" and does not warn about) so that the checkpoint's values do not fill them; min_p and top_h, warned about
    whatever their value, stay unset, as do the fields whose "off" is None (bad words, forced tokens). Generation
    stops at any of stop_ids."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, penalty_alpha=0.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, min_new_tokens=0, renormalize_logits=False,
        suppress_tokens=suppressed_tokens(model.config), begin_suppress_tokens=[],
        temperature=1.0, top_k=50, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        eos_token_id=stop_ids(model, tokenizer), pad_token_id=model.generation_config.pad_token_id)


def stop_ids(model, tokenizer=None):
    """The ids a response ends at: the model's end ids (end_ids) and the tokenizer's eos token."""
    ends = end_ids(model) + [t for t in [getattr(tokenizer, "eos_token_id", None)] if t is not None]
    return list(dict.fromkeys(ends))


class GumbelSampler(LogitsProcessor):
    """Sampling from softmax(scores / T) by the Gumbel-max trick: argmax(scores / T + Gumbel noise) is an exact
    draw, and greedy decoding takes it. Each row draws its noise from its own generator (made on the scores'
    device at the first step), so a sequence's sample does not depend on which other sequences share its generate
    call (batched rollouts = one at a time)."""

    def __init__(self, temperature, seeds):
        self.temperature, self.seeds, self.generators = temperature, [int(s) for s in seeds], None

    def __call__(self, input_ids, scores):
        if self.generators is None:
            self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        return scores.float() / self.temperature + gumbel


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens, temperature=1.0, greedy=False, seeds=None):
    """KV-cache generation (the capture is off: no capturing() block) with sampling_config: greedy, or samples
    from softmax(logits / temperature) with one seed per row (seeds; default: drawn from torch's global
    generator). Returns response ids B x R, padded after the first end id (any of sampling_config's: Qwen2.5-VL
    Instruct ends on <|im_end|> or <|endoftext|>), and the response mask (ones up to and including it). Inside
    scale.gathered a sharded (FSDP) model is whole and each rank decodes alone; outside it, it generates with
    synced_gpus (every forward gathers weights from all ranks)."""
    extra = []
    if not greedy:
        seeds = seeds if seeds is not None else torch.randint(2 ** 62, (len(batch["input_ids"]),)).tolist()
        extra = [GumbelSampler(temperature, seeds)]
    # weights still in shards (an FSDP model outside scale.gathered) are gathered in every forward: then a rank whose
    # responses ended must keep stepping with the others (synced_gpus), or their all-gathers fall out of step
    sharded = dist.is_initialized() and dist.get_world_size() > 1 and any(isinstance(w, DTensor)
                                                                          for w in model.parameters())
    config = sampling_config(model, max_new_tokens, processor.tokenizer)
    out = model.generate(**batch, generation_config=config, logits_processor=LogitsProcessorList(extra),
                         synced_gpus=sharded)
    response = out[:, batch["input_ids"].shape[1]:]
    is_end = torch.isin(response, torch.tensor(config.eos_token_id, device=response.device))
    ended = is_end.long().cumsum(1)
    mask = (ended == 0) | ((ended == 1) & is_end)
    return response.masked_fill(~mask, config.pad_token_id), mask.long()
