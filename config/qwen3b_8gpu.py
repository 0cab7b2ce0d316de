# Qwen2.5-VL-3B with the paper's hyperparameters: the same recipe at a size whose full fine-tuning state fits
# comfortably in plain DDP on 80 GB GPUs.
exec(open("config/qwen7b_8gpu.py").read())
init_from = "Qwen/Qwen2.5-VL-3B-Instruct"
out_dir = "out/qwen3b-ral"
