"""
The command line of ral.py and distill.py, nanoGPT style: a table of options (name: (default, meaning)), then
config files (plain python assignments), then --key=value overrides. Every mistake is a UsageError, which
`cli` turns into one line on stderr and exit status 2; --help lists every option with its default and meaning.
"""
import ast
import difflib
import importlib
import importlib.util
import math
import os
import sys
import types

import tasks


class UsageError(ValueError):
    """A user's mistake in options, files or folders: one line on stderr, exit status 2 (see cli)."""


def usage(options, doc):
    rows = [(f"--{k}={v!r}", meaning) for k, (v, meaning) in options.items()]
    width = max(len(flag) for flag, _ in rows) + 2
    return (doc.strip() + "\n\noptions (default and meaning; config files first, then --key=value):\n" +
            "\n".join(f"  {flag.ljust(width)}{meaning}" for flag, meaning in rows))


def typed(key, value, default):
    """value as the type of the default (an int where a float is expected is fine), else a UsageError."""
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise UsageError(f"--{key}: expected {type(default).__name__}, got {value!r}")
    return value


def unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    return f"unknown option --{key}" + (f" (did you mean --{close[0]}?)" if close else "; see --help")


def parse(argv, options, doc):
    """The config: defaults (a task family's own recipe over them: tasks.TASKS), then each config file, then each
    --key=value, in order; read twice where the family has a recipe, since which family is known only after the
    user's settings. --help prints and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(options, doc))
        sys.exit(0)
    defaults = {k: default for k, (default, _) in options.items()}
    cfg = read(argv, dict(defaults))
    recipe = {k: v for k, v in tasks.TASKS.get(cfg.get("task"), {}).get("recipe", {}).items() if k in cfg}
    return read(argv, {**defaults, **recipe}) if recipe else cfg


def read(argv, cfg):
    """Each config file, then each --key=value, over cfg."""
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key not in cfg:
                raise UsageError(unknown(key, cfg))
            if not eq:
                raise UsageError(f"--{key} needs a value: --{key}=...")
            try:
                value = ast.literal_eval(text)      # numbers, True/False, lists; otherwise a plain string
            except (ValueError, SyntaxError):
                value = text
            cfg[key] = typed(key, value, cfg[key])
        elif "=" in arg and not arg.endswith(".py"):
            raise UsageError(f"{arg!r} is not a config file; options take two dashes: --{arg}")
        elif not os.path.isfile(arg):
            raise UsageError(f"config file not found: {arg}")
        else:
            scope = {}     # a preset may import modules and find files beside itself (__file__)
            exec(open(arg).read(), {"__file__": os.path.abspath(arg)}, scope)
            for key, value in scope.items():
                if isinstance(value, types.ModuleType):
                    continue
                if key not in cfg:
                    raise UsageError(f"{arg}: {unknown(key, cfg)}")
                cfg[key] = typed(key, value, cfg[key])
    return cfg


def import_function(spec, option="--reward"):
    """'module:function' (a module on the path, or a .py file) -> the function, else a UsageError naming option."""
    module, colon, name = spec.partition(":")
    if not colon or not module or not name:
        raise UsageError(f"{option}={spec!r}: expected module:function (e.g. my_rewards:exact_match)")
    try:
        if module.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
            if found is None or not os.path.isfile(module):
                raise ImportError(f"no such file {module}")
            loaded = importlib.util.module_from_spec(found)
            found.loader.exec_module(loaded)
        else:
            loaded = importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"{option}={spec!r}: cannot import {module}: {e}") from None
    fn = getattr(loaded, name, None)
    if not callable(fn):
        raise UsageError(f"{option}={spec!r}: {module} has no function {name}")
    return fn


def cli(main, argv):
    """Run main(argv); a UsageError ends in one line on stderr and exit status 2, never a traceback."""
    try:
        main(argv)
    except UsageError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# The trainer's options (ral.py's; distill.py adds its own), nanoGPT style: defaults here, then a config file
# (python assignments), then --key=value. check: every value a run would otherwise fail on later.

OPTIONS = dict(   # name: (default, meaning)
    out_dir=("out/ral", "run folder: run_config.json, metrics.jsonl, samples.jsonl, curves.png, results.json, ckpt/"),
    init_from=("tiny", "'tiny' (built offline), a save_pretrained folder, or a hub id"),
    tiny_layers=(4, "decoder layers of the tiny model"),
    tiny_hidden=(128, "hidden size of the tiny model"),
    algo=("ral", "'ral' (Eq. 4) or 'grpo' (the same with lambda_attn = 0)"),
    zero=(True, "RAL-zero / GRPO-zero: no thinking block in SFT or RL, answer-only format reward (False: the "
                "paper's <think> format; the tiny default answers directly, see README)"),
    task=("search", "offline task when no data files are given, one of tasks.TASKS: " + "; ".join(
        f"'{name}' ({t['about']})" for name, t in tasks.TASKS.items())),
    task_tokens=(16, "visual tokens per image (search) or per frame (video)"),
    task_frames=(4, "frames per video (video task; 4 x 16 = 32 visual tokens: at 8 frames, 64 tokens, the tiny "
                       "regime's RL gains nothing, docs/study/issue20.md section 6)"),
    train_size=(0, "offline RL prompts (0: an endless stream, every prompt fresh, none seen twice)"),
    sft_size=(0, "offline SFT samples (0: an endless stream, fresh every step); equal to train_size: the same set"),
    sft_file=("", "SFT data set (data.py's Video-R1 layout, JSON or JSONL) instead of the offline task"),
    train_file=("", "RL prompts (same layout) instead of the offline task"),
    eval_file=("", "held-out set (same layout) instead of the offline suite"),
    sft_steps=(1500, "stage 1: supervised warm-start steps (0: start RL from init_from as it is)"),
    sft_batch=(16, "SFT sequences per step, over all ranks"),
    sft_lr=(5e-4, "SFT peak learning rate (20 warmup steps, then cosine)"),
    sft_tower_lr=(0.0, "> 0: SFT trains the vision tower and merger too, at this peak rate on the same schedule (RL "
                       "keeps them frozen); 0: frozen in both stages, as the paper"),
    sft_stop=(0.4, "> 0: end SFT at the first validation check whose sampled accuracy (temperature, as RL samples) "
                   "reaches this, so the warm start lands at a chosen competence whatever the seed"),
    sft_cooldown=(0, "SFT steps after the stop fires, the rate falling linearly to zero so the warm start settles "
                     "(stopped at the peak rate, a half-trained model's greedy answer swings from step to step)"),
    sft_val_every=(25, "SFT steps between validation checks (with sft_stop)"),
    sft_val_n=(128, "validation samples, drawn from the offline task with their own seed (never the held-out's); with"
                    " --sft_file, min(this, 10% of the file) of its records, held out of SFT"),
    warm_dir=("", "where the warm start lives; '' = beside out_dir, named by its recipe"),
    rl_steps=(60, "stage 2: RL steps (one rollout each; --task=count: 120, its own recipe in tasks.TASKS)"),
    rl_epochs=(0.0, "if > 0: RL passes over the prompts instead of rl_steps (steps = epochs x prompts / "
                    "prompts_per_step, rounded up)"),
    prompts_per_step=(16, "prompts per RL step over all ranks (each gets group_size responses)"),
    group_size=(8, "G: responses per prompt (Eq. 8 normalizes within a group)"),
    max_new_tokens=(48, "longest response, in tokens"),
    vision_cache=(True, "encode each prompt's image or video once per step and reuse it in every forward (exact: "
                        "the tower is frozen); False re-encodes it each time, as bench.py compares"),
    generate_batch=(0, "sequences per generate call (whole groups; at least one group), to bound memory; 0 = all "
                       "of a rank's prompts x group_size in one call"),
    temperature=(1.0, "rollout sampling temperature: plain sampling from softmax(logits / T), and the loss's "
                      "log-probs use the same T"),
    lr=(2e-4, "RL learning rate (AdamW)"),
    warmup=(0, "RL steps over which the lr rises linearly to --lr (Adam's first steps move every weight by ~lr)"),
    weight_decay=(0.0, "AdamW weight decay (SFT and RL)"),
    grad_clip=(1.0, "gradient-norm clip (SFT and RL)"),
    clip_eps=(0.2, "PPO ratio clip of Eq. 1: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"),
    clip_eps_high=(0.0, "the upper ratio clip (DAPO's clip-higher, e.g. 0.28); 0 = clip_eps"),
    loss_agg=("token", "how per-token terms (Eq. 1 and 3) add up to the loss: 'token' (mean over the optimizer "
                       "step's response tokens, as DAPO), 'sequence' (each response's token mean, then the mean over "
                       "responses: the original GRPO), 'constant' (sum / (max_new_tokens x responses): Dr. GRPO)"),
    scale_rewards=("group", "advantages (Eq. 8): 'group' divides by the group's reward std, 'none' only subtracts "
                            "its mean (Dr. GRPO)"),
    mask_truncated=(False, "responses that reach max_new_tokens without ending leave the loss (DAPO's overlong "
                           "filtering); they keep their reward, in the logs and in their group's advantages"),
    beta=(0.04, "weight of the k3 KL to the frozen reference (0: no reference model)"),
    lambda_attn=(1.0, "weight of the attention term, Eq. 4 (set to 0 by algo=grpo)"),
    mini_batches=(2, "optimizer steps per rollout and epoch, each on a slice of every group (1..group_size)"),
    epochs=(1, "passes over each rollout; mini_batches * epochs >= 2, else RAL == GRPO (METHOD.md, Eq. 3)"),
    attn_layer=(-1, "the decoder layer whose attention is the policy (Eq. 2): -1, the final layer, as the paper says;"
                    " others (0-based, negative from the end) as an ablation"),
    grad_probe_every=(0, "> 0: every this many RL steps, the gradient norms of the token terms and of the attention "
                         "term separately, on one micro-batch of the rollout's last optimizer step (METHOD.md, 'The "
                         "gradient probe'); 0: off"),
    micro_batch=(0, "sequences per forward, to bound memory (RL and SFT); 0 = a whole mini-batch slice of a group "
                    "(SFT: a rank's whole batch)"),
    reward=("", "a reward of your own, 'module:function' (reward_fn(text, sample, mode) -> dict(reward, accuracy, "
                "format)): RL, the SFT stop and the evaluations all score with it; '' = data.reward"),
    eval_n=(tasks.EVAL_N, "held-out samples (0: none from the offline suite; with --eval_file, 0 = the whole "
                               "file); tasks.EVAL_N, so eval.py scores the same ones"),
    eval_every=(0, "evaluate every this many RL steps (0: only before and after)"),
    ckpt_every=(20, "checkpoint every this many RL steps (and at the end)"),
    sft_ckpt_every=(100, "checkpoint SFT every this many steps into <warm start>.partial (0: never); a run that "
                         "finds one of its recipe continues SFT from it exactly"),
    log_samples=(2, "responses per step written to samples.jsonl"),
    seed=(0, "seed of the tiny model, the tasks, SFT order and every rollout"),
    device=("auto", "'auto' (cuda:LOCAL_RANK if there is a GPU, else cpu), 'cpu', 'cuda:0', ..."),
    dtype=("float32", "trainable weights and optimizer state: 'float32' (master weights) or 'bfloat16' (pure "
                      "bf16: small updates round away)"),
    compute_dtype=("auto", "forward/backward compute: 'auto' (bf16 autocast on GPU, fp32 on CPU), 'bfloat16' (autocast"
                           " on CPU too), 'float32'; the attention policy is always float32"),
    grad_checkpointing=(False, "activation checkpointing in the decoder (less memory, more compute)"),
    dist_timeout=(3600, "seconds a rank waits in a collective before the job fails (NCCL's default: 600); it must "
                        "cover rank 0's longest lone work, gathering and writing a checkpoint (7B: ~94 GB)"),
    fsdp=(False, "shard the policy with FSDP2 (each decoder layer, the root; the frozen vision tower stays a replica) "
                 "under torchrun, for models whose replica does not fit; fp32 shards, bf16 compute on GPU. False: DDP"),
    resume=(False, "continue exactly from out_dir/ckpt (a run killed before its first RL checkpoint starts RL over;"
                   " SFT continues from its own checkpoint in any case)"),
    wandb_log=(False, "also log metrics to Weights & Biases (WANDB_MODE=offline works without network)"),
    wandb_project=("ral", "the wandb project"),
)
DEFAULTS = {k: v[0] for k, v in OPTIONS.items()}


def check(cfg):
    """Every value a run would otherwise fail on later, with the option named."""
    from model import check_source      # here, not at the top: model.py imports this file for UsageError
    def need(ok, message):
        if not ok:
            raise UsageError(message)
    need(cfg["algo"] in ("grpo", "ral"), f"--algo must be grpo or ral, got {cfg['algo']!r}")
    need(cfg["task"] in tasks.TASKS, f"--task must be one of {', '.join(tasks.TASKS)}, got {cfg['task']!r}")
    need(math.isqrt(cfg["task_tokens"]) ** 2 == cfg["task_tokens"] > 0,
         f"--task_tokens must be a perfect square (a square image of 28 px tokens), got {cfg['task_tokens']}")
    need(1 <= cfg["mini_batches"] <= cfg["group_size"],
         f"--mini_batches must be between 1 and group_size={cfg['group_size']}: each takes a slice of every group")
    for key in ("rl_steps", "prompts_per_step", "group_size", "max_new_tokens", "sft_batch", "epochs", "ckpt_every",
                "dist_timeout"):
        need(cfg[key] >= (0 if key == "rl_steps" else 1), f"--{key} must be positive, got {cfg[key]}")
    for key in ("sft_steps", "eval_n", "eval_every", "micro_batch", "generate_batch", "train_size", "sft_size", "beta",
                "warmup", "rl_epochs", "lambda_attn", "sft_ckpt_every", "sft_tower_lr"):
        need(cfg[key] >= 0, f"--{key} must be >= 0, got {cfg[key]}")
    need(cfg["dtype"] in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {cfg['dtype']!r}")
    need(cfg["loss_agg"] in ("token", "sequence", "constant"),
         f"--loss_agg must be token, sequence or constant, got {cfg['loss_agg']!r}")
    need(cfg["scale_rewards"] in ("group", "none"), f"--scale_rewards must be group or none, got {cfg['scale_rewards']!r}")
    need(cfg["clip_eps"] >= 0 and cfg["clip_eps_high"] >= 0, "--clip_eps and --clip_eps_high must be >= 0")
    need(cfg["compute_dtype"] in ("auto", "float32", "bfloat16"),
         f"--compute_dtype must be auto, float32 or bfloat16, got {cfg['compute_dtype']!r}")
    for key in ("sft_file", "train_file", "eval_file"):
        need(not cfg[key] or os.path.isfile(cfg[key]), f"--{key}: no such file: {cfg[key]}")
    if cfg["init_from"] != "tiny":
        problem = check_source(cfg["init_from"])
        need(problem is None, f"--init_from: {problem}")
    folder = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    need(os.path.isdir(folder) and os.access(folder, os.W_OK), f"--out_dir: cannot write to {cfg['out_dir']}")
    ckpt = os.path.join(cfg["out_dir"], "ckpt")
    need(not cfg["resume"] or any(os.path.exists(os.path.join(c, "trainer_state.pt"))
                                  for c in (ckpt, ckpt + ".tmp", ckpt + ".old"))
         or os.path.exists(os.path.join(cfg["out_dir"], "run_config.json")),     # started, killed before a checkpoint
         f"--resume=True but there is no checkpoint in {ckpt}")
    need(cfg["sft_val_every"] >= 1 and cfg["sft_val_n"] >= 1, "--sft_val_every and --sft_val_n must be positive")
    need(cfg["sft_cooldown"] >= 0, f"--sft_cooldown must be >= 0, got {cfg['sft_cooldown']}")
    need(not cfg["rl_epochs"] or cfg["train_size"] or cfg["train_file"], "--rl_epochs needs a finite prompt set: "
         "--train_size=0 is an endless stream")
    need(cfg["init_from"] != "tiny" or -cfg["tiny_layers"] <= cfg["attn_layer"] < cfg["tiny_layers"],
         f"--attn_layer={cfg['attn_layer']} is not a decoder layer of the tiny model (--tiny_layers="
         f"{cfg['tiny_layers']}: use -{cfg['tiny_layers']} .. {cfg['tiny_layers'] - 1})")
    need(not (cfg["sft_tower_lr"] and cfg["fsdp"]), "--sft_tower_lr trains the tower, which FSDP keeps as an "
         "untrained replica (scale.replicate_tower): not with --fsdp=True")
    need(cfg["grad_probe_every"] >= 0, f"--grad_probe_every must be >= 0, got {cfg['grad_probe_every']}")
    need(not (cfg["grad_probe_every"] and cfg["fsdp"]), "--grad_probe_every needs whole gradients on each rank: "
         "not with --fsdp=True")
    if cfg["mini_batches"] * cfg["epochs"] < 2 and cfg["algo"] == "ral":
        print("warning: one optimizer step per rollout: the attention term has zero gradient (RAL == GRPO)")


def plan(cfg, suite):
    """What each stage reads, one line each. A data file given for one stage while another falls back to the offline
    task is an easy mistake to make: the last line names it."""
    offline = lambda size: f"the offline task '{cfg['task']}' ({f'{size} samples' if size else 'an endless stream'})"
    sft_from = cfg["sft_file"] or offline(cfg["sft_size"]) if cfg["sft_steps"] else "none (sft_steps=0)"
    held_out = f"{suite} (at most {cfg['eval_n']} samples)" if cfg["eval_n"] else \
        f"{suite} (every sample)" if cfg["eval_file"] else "none (eval_n=0)"
    lines = [f"SFT:      {sft_from}", f"RL:       {cfg['train_file'] or offline(cfg['train_size'])}",
             f"held out: {held_out}"]
    used = dict(sft_file=cfg["sft_steps"], train_file=True, eval_file=cfg["eval_n"])
    given = [k for k in used if cfg[k]]
    missing = [k for k in used if used[k] and not cfg[k]]
    if given and missing:
        lines.append(f"note: --{', --'.join(given)} given but not --{', --'.join(missing)}: "
                     f"{'that stage uses' if len(missing) == 1 else 'those stages use'} the offline task")
    return "\n".join(lines)
