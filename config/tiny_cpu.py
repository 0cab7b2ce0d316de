# The embedded default (what `python ral.py` runs): a tiny Qwen2.5-VL built offline, the visual-search task,
# a supervised warm start, then RL, on 2 CPU cores in minutes. Listed here so the numbers are easy to find.
init_from = "tiny"
task = "search"
task_tokens = 16
sft_steps = 1500
rl_steps = 60
