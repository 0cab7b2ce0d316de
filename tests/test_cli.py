"""The command line: every user mistake is one line on stderr and exit status 2 with nothing written to out_dir,
--help lists every option, the warm start is named by its whole recipe, and --wandb_log=True logs every step."""
import os
import subprocess
import sys
import types

import pytest

import cli
import distill
import ral
import sft
import tasks
from helpers import spread_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--sft_steps=0", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=6", "--eval_n=2",
         "--train_size=8"]


def mistakes(tmp):
    """argv -> the words the error line must contain."""
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return {
        ("--sft_lrr=1",): "unknown option --sft_lrr (did you mean --sft_lr?)",
        ("--rl_steps=abc",): "--rl_steps: expected int, got 'abc'",
        ("--zero=1",): "--zero: expected bool",
        ("rl_steps=3",): "options take two dashes: --rl_steps=3",
        ("config/nope.py",): "config file not found: config/nope.py",
        ("--train_file=missing.jsonl",): "--train_file: no such file: missing.jsonl",
        (f"--train_file={empty}",): f"{empty}: no records",
        ("--resume=True",): "--resume=True but there is no checkpoint",
        (f"--out_dir={a_file}/run",): "--out_dir: cannot write to",
        ("--mini_batches=9",): "--mini_batches must be between 1 and group_size=8",
        ("--init_from=./no/such/folder",): "--init_from: no such folder: ./no/such/folder",
        ("--task=audio",): "--task must be one of search, count, left, video",
        ("--train_size=0", "--rl_epochs=1"): "--rl_epochs needs a finite prompt set",
        ("--rl_steps",): "--rl_steps needs a value",
    }


def test_every_mistake_is_one_line_and_exit_2(tmp_path, capsys):
    for argv, words in mistakes(tmp_path).items():
        out = tmp_path / "out"
        args = list(argv) if any(a.startswith("--out_dir") for a in argv) else [f"--out_dir={out}", *argv]
        with pytest.raises(SystemExit) as stop:
            ral.cli(ral.main, args)
        err = capsys.readouterr().err
        assert stop.value.code == 2, argv
        assert err.count("\n") == 1 and words in err, (argv, err)
        assert not out.exists(), argv                      # nothing written before the configuration is valid


def test_a_mistake_in_a_real_process_has_no_traceback():
    for script, argv in (("ral.py", ["rl_steps=3"]), ("distill.py", ["--gamma=1"]),
                         ("eval.py", ["--ckpt", "./no/such/run"]), ("eval.py", ["--suite", "serch-64"])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2, (script, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (script, proc.stderr)


def test_help_lists_every_option_with_its_default(capsys):
    for module in (ral, distill):
        with pytest.raises(SystemExit) as stop:
            module.main(["--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        for key, (default, meaning) in module.OPTIONS.items():
            assert f"--{key}={default!r}" in text and meaning in text, key


def test_grpo_means_no_attention_term():
    assert ral.configure(["--algo=grpo", "--lambda_attn=5"])["lambda_attn"] == 0.0
    assert ral.configure(["--lambda_attn=5"])["lambda_attn"] == 5.0


def test_config_file_then_overrides(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("rl_steps = 7\nlr = 1\n")
    cfg = ral.configure([str(preset), "--rl_steps=9"])
    assert cfg["rl_steps"] == 9 and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    preset.write_text("import os\nrl_steps = len(os.path.basename(__file__))\n")    # modules are not options
    assert ral.configure([str(preset)])["rl_steps"] == len("preset.py")
    preset.write_text("rl_stepz = 7\n")
    with pytest.raises(ral.UsageError, match="did you mean --rl_steps"):
        ral.configure([str(preset)])


def test_a_task_familys_recipe_sits_between_the_defaults_and_the_users_settings(tmp_path):
    family = tasks.TASKS["count"]["recipe"]
    assert family["rl_steps"] != cli.DEFAULTS["rl_steps"]
    assert ral.configure(["--task=count"])["rl_steps"] == family["rl_steps"]
    assert ral.configure(["--task=search"])["rl_steps"] == cli.DEFAULTS["rl_steps"]
    assert ral.configure(["--task=count", "--rl_steps=5"])["rl_steps"] == 5          # --key=value wins
    preset = tmp_path / "preset.py"
    preset.write_text("task = 'count'\n")                                              # a config file's task too
    assert ral.configure([str(preset)])["rl_steps"] == family["rl_steps"]
    preset.write_text("task = 'count'\nrl_steps = 7\n")
    assert ral.configure([str(preset)])["rl_steps"] == 7
    assert ral.configure([str(preset), "--task=search"])["rl_steps"] == 7


def test_warm_start_is_named_by_its_whole_recipe(tmp_path):
    def path(*argv):
        cfg = ral.configure([f"--out_dir={tmp_path / 'run'}", *argv])
        return sft.warm_path(cfg, sft.warm_recipe(cfg))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sft.json").write_text("[1]")
    (tmp_path / "b" / "sft.json").write_text("[2]")
    base = path()
    assert path() == base and path("--lr=1e-3", "--rl_steps=3") == base       # RL options do not matter
    assert path("--sft_lr=1e-3") != base and path("--sft_batch=8") != base and path("--sft_size=64") != base
    assert path("--train_size=64") == base                                   # the RL prompts do not either
    stopped, full = path("--sft_stop=0.5"), path("--sft_stop=0")
    assert stopped != base and path("--sft_stop=0.5", "--sft_val_n=64") != stopped
    assert path("--sft_stop=0", "--sft_val_n=64") == full != base            # validation matters only with a stop
    a, b = (path(f"--sft_file={tmp_path / f / 'sft.json'}", "--sft_stop=0") for f in "ab")
    assert a != b                                                            # same base name, other content
    assert os.path.dirname(base) == str(tmp_path)


def test_warm_start_is_named_by_its_code(tmp_path):
    """An edit to a file SFT depends on (sft.CODE_FILES) names another warm start; other files do not matter."""
    for name in (*sft.CODE_FILES, "eval.py"):
        (tmp_path / name).write_text(open(os.path.join(ROOT, name)).read())
    before = sft.code_hash(root=str(tmp_path))
    assert before == sft.code_hash(root=str(tmp_path)) and sft.code_hash() == sft.code_hash(root=ROOT)
    (tmp_path / "eval.py").write_text("# edited\n")
    assert sft.code_hash(root=str(tmp_path)) == before
    for name in sft.CODE_FILES:
        edited = tmp_path / name
        kept = edited.read_text()
        edited.write_text(kept + "\n# edited\n")
        assert sft.code_hash(root=str(tmp_path)) != before, name
        edited.write_text(kept)
    cfg = ral.configure([f"--out_dir={tmp_path / 'run'}"])
    recipe = sft.warm_recipe(cfg)
    assert recipe["code_sha256"] == sft.code_hash()
    assert sft.warm_path(cfg, dict(recipe, code_sha256=before[::-1])) != sft.warm_path(cfg, recipe)


def test_reused_warm_start_says_which_and_why(tmp_path, capsys):
    cfg = ral.configure([f"--out_dir={tmp_path / 'run'}", *SMALL])
    first = sft.warm_start(cfg, [], "think", "cpu", 0, 1)
    assert "warm start saved" in capsys.readouterr().out
    assert sft.warm_start(cfg, [], "think", "cpu", 0, 1) == first
    said = capsys.readouterr().out
    assert f"reusing the warm start {first}: same recipe" in said and "sft_lr=0.0005" in said
    other = ral.configure([f"--out_dir={tmp_path / 'run'}", *SMALL, "--sft_lr=0.1", f"--warm_dir={first}"])
    with pytest.raises(ral.UsageError, match=r"another recipe \(differs in \['sft_lr'\]\)"):
        sft.warm_start(other, [], "think", "cpu", 0, 1)


def test_wandb_logs_every_step_and_rl_epochs_set_the_steps(tmp_path, monkeypatch):
    logged = []

    class Run:
        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: logged.append(kw["config"]["rl_steps"]) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    # --rl_epochs=0.5 over 8 prompts at 2 per step: 2 steps
    ral.main([f"--out_dir={tmp_path / 'run'}", "--rl_epochs=0.5", "--wandb_log=True", *SMALL], reward_fn=spread_reward)
    steps = [entry[0] for entry in logged if isinstance(entry, tuple) and "reward" in entry[1]]
    assert logged[0] == 2 and steps == [1, 2] and logged[-1] == "finished"
    assert any(isinstance(e, tuple) and "eval/after_rl/accuracy" in e[1] for e in logged)


def test_a_missing_run_or_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """A relative path with one slash whose folder exists is a path, not a hub id: "no such folder" at once. A hub
    id that cannot be fetched (here: offline, no cached copy) ends in one line too, from eval.py and ral.py."""
    import huggingface_hub.constants
    import model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert model.check_source("out/no_such_run").startswith("no such folder: out/no_such_run")
    assert model.check_source("Qwen/Qwen2.5-VL-7B-Instruct") is None          # no Qwen/ folder here: a hub id
    assert model.check_source("a/b/c") == "no such folder: a/b/c"
    (tmp_path / "out" / "notes.txt").write_text("x")
    assert model.check_source("out/notes.txt") == "out/notes.txt is a file, not a checkpoint folder"
    offline = dict(os.environ, HF_HUB_OFFLINE="1")
    for argv, words in ((["--ckpt", "out/no_such_run", "--suite", "search-16"], "--ckpt: no such folder: out/no_such_run"),
                        (["--ckpt", "nobody/no_such_model"], "cannot load nobody/no_such_model"),
                        (["--ckpt", "tiny", "--suite", "missing.jsonl"], "--suite: no such file: missing.jsonl")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv], capture_output=True, text=True,
                              cwd=tmp_path, env=offline, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, (argv, proc.stderr)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        ral.cli(ral.main, ["--init_from=nobody/no_such_model", *SMALL, "--out_dir=run"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "cannot load nobody/no_such_model" in err, err


def test_the_3b_preset_reads_the_7b_one_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = ral.configure([os.path.join(ROOT, "config", "qwen3b_8gpu.py")])
    seven = ral.configure([os.path.join(ROOT, "config", "qwen7b_8gpu.py")])
    assert cfg["init_from"] == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg["out_dir"] == "out/qwen3b-ral"
    assert {k: v for k, v in cfg.items() if k not in ("init_from", "out_dir")} == \
        {k: v for k, v in seven.items() if k not in ("init_from", "out_dir")}


def test_the_plan_names_the_stage_that_falls_back_to_the_offline_task(tmp_path):
    rl = tmp_path / "rl.jsonl"
    rl.write_text("")
    cfg = ral.configure([f"--train_file={rl}"])
    lines = cli.plan(cfg, "search-16").splitlines()
    assert lines[0] == "SFT:      the offline task 'search' (an endless stream)" and lines[1] == f"RL:       {rl}"
    assert lines[-1].startswith("note: --train_file given but not --sft_file, --eval_file")
    assert "note" not in cli.plan(ral.configure([f"--train_file={rl}", "--sft_steps=0", "--eval_n=0"]), "x")
    assert "note" not in cli.plan(ral.configure([]), "search-16")              # all offline: nothing to say


def test_the_7b_preset_evaluates_the_eval_file(tmp_path):
    """config/qwen7b_8gpu.py sets eval_n = 0: with --eval_file that is the whole file (it was silently nothing),
    --eval_n takes its first n; without a file, eval_n = 0 is no evaluation."""
    from test_eval import write_benchmark
    path = write_benchmark(tmp_path, n=5)
    held_out = lambda *argv: ral.load_samples(ral.configure(["config/qwen7b_8gpu.py", f"--out_dir={tmp_path / 'run'}",
                                                             *argv]))[2]
    assert ral.configure(["config/qwen7b_8gpu.py"])["eval_n"] == 0
    assert [s["id"] for s in held_out(f"--eval_file={path}")] == ["0", "1", "2", "3", "4"]
    assert len(held_out(f"--eval_file={path}", "--eval_n=2")) == 2
    assert held_out() == []
    cfg = ral.configure(["config/qwen7b_8gpu.py", f"--eval_file={path}"])
    assert cli.plan(cfg, path).splitlines()[2] == f"held out: {path} (every sample)"
