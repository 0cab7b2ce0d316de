# Qwen2.5-VL-3B with the paper's hyperparameters. Its training state with fp32 master weights is 57 GB per GPU in
# plain DDP before activations (python bench.py --what memory), too close to 80 GB for long videos: it inherits
# the 7B preset's FSDP (8.3 GB per GPU over 8). --fsdp=False runs it in DDP for short inputs.
import os
exec(open(os.path.join(os.path.dirname(__file__), "qwen7b_8gpu.py")).read())    # from any working directory
init_from = "Qwen/Qwen2.5-VL-3B-Instruct"
out_dir = "out/qwen3b-ral"
