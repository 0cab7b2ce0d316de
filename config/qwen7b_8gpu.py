# The paper's setting (docs/METHOD.md, "The paper's setup"): Qwen2.5-VL-7B, SFT on Video-R1-COT-165k, then RL on the first
# 51.2k prompts of Video-R1-260k, one epoch, on one node of 8 GPUs:
#   torchrun --nproc_per_node=8 ral.py config/qwen7b_8gpu.py --sft_file=... --train_file=... --eval_file=...
# Vision tower and merger frozen (model.prepare). Images up to 5120x28x28 pixels, video at 1 fps, at most 128 frames
# of 128x28x28 pixels: data.encode's defaults.
init_from = "Qwen/Qwen2.5-VL-7B-Instruct"
out_dir = "out/qwen7b-ral"
algo = "ral"
zero = False                     # the paper's <think>...</think><answer>...</answer> format
sft_stop = 0.0                   # the whole SFT epoch (the tiny default stops early on the offline task)
sft_steps = 2600                 # ~ one epoch of 165k samples at 64 per step
sft_batch = 64
sft_lr = 5e-6
rl_steps = 6400                  # 51.2k prompts / 8 prompts per step
prompts_per_step = 8             # "rollout batch size 8": 8 prompts x 8 responses, one group per GPU
group_size = 8
max_new_tokens = 1024            # not reported by the paper
temperature = 1.0
lr = 1e-5
beta = 0.04
lambda_attn = 1.0
clip_eps = 0.2
mini_batches = 2                 # >= 2 optimizer steps per rollout, else the attention term has no gradient
micro_batch = 2                  # sequences per forward; lower it for long videos
grad_checkpointing = True
# fp32 master weights + gradients + AdamW + the bf16 reference: 138 GB per GPU in DDP, 18.5 GB sharded over 8
# (python bench.py --what memory): the 7B trains only with FSDP2
fsdp = True
eval_n = 0                       # --eval_file: the whole file; without one, no evaluation
eval_every = 400
ckpt_every = 100
