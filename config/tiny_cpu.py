# The embedded default (what `python ral.py` runs): a tiny Qwen2.5-VL built offline, the visual-search task, a
# supervised warm start, then RL, on 2 CPU cores in minutes. Every value is ral.py's default (python ral.py --help),
# so this file changes nothing; copy it to start a preset of your own.
init_from = "tiny"
