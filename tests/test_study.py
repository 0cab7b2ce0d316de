"""study.py --quick at a toy budget: it runs its arms, writes the table and the plots, the table's numbers are the
runs' own numbers, a second call re-runs nothing, and an arm killed after a checkpoint continues from it."""
import json
import os

import study


def test_quick_study_end_to_end(tmp_path):
    out = str(tmp_path / "study")
    argv = ["--quick", "--parts", "core", "--seeds", "1", "--out_dir", out,
            "--sft_steps=5", "--rl_steps=2", "--eval_n=4", "--max_new_tokens=8"]
    study.main(argv)
    for name in ("report.md", "accuracy_vs_tokens.png", "grounding.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    table = open(os.path.join(out, "report.md")).read()
    for method in ("grpo", "ral"):
        results = json.load(open(os.path.join(out, f"core-search-16-{method}-s0", "results.json")))
        row = next(line for line in table.splitlines() if line.startswith(f"| core | search-16 | {method} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[3] == "1" and cells[4] == f"{100 * results['before_rl']['accuracy']:.1f}"
        assert cells[5] == f"{100 * results['after_rl']['accuracy']:.1f}"
    after = [json.load(open(os.path.join(out, f"core-search-16-{m}-s0", "results.json")))["after_rl"]["accuracy"]
             for m in ("grpo", "ral")]
    seed_row = next(line for line in table.splitlines() if line.startswith("| 0 |"))   # the per-seed table
    before = results["before_rl"]["accuracy"]
    assert seed_row == f"| 0 | {100 * before:.1f} | {100 * after[0]:.1f} | {100 * after[1]:.1f} |"
    stamp = os.path.getmtime(os.path.join(out, "core-search-16-ral-s0", "results.json"))
    study.main(argv)                                                     # finished arms are never re-run
    assert os.path.getmtime(os.path.join(out, "core-search-16-ral-s0", "results.json")) == stamp
    # killed between its last checkpoint and results.json: the next call continues that arm (--resume=True)
    folder = os.path.join(out, "core-search-16-ral-s0")
    first = json.load(open(os.path.join(folder, "results.json")))
    os.remove(os.path.join(folder, "results.json"))
    study.main(argv)
    assert json.load(open(os.path.join(folder, "run_config.json")))["resume"] is True
    again = json.load(open(os.path.join(folder, "results.json")))
    assert again["before_rl"] == first["before_rl"] and again["after_rl"] == first["after_rl"]
    assert len(open(os.path.join(folder, "metrics.jsonl")).readlines()) == 2            # no step logged twice
    # --report_only starts nothing: with a seed never run, the report still holds seed 0's arms alone
    study.main(argv[:4] + ["2"] + argv[5:] + ["--report_only"])
    assert not os.path.exists(os.path.join(out, "core-search-16-ral-s1"))
    assert "| core | search-16 | ral | 1 |" in open(os.path.join(out, "report.md")).read()
    # --sampled: held-out accuracy sampled as RL samples, of the warm start and after RL, once per arm
    study.main(argv + ["--sampled"])
    readings = {m: json.load(open(os.path.join(out, f"core-search-16-{m}-s0", "sampled.json"))) for m in ("grpo", "ral")}
    assert readings["grpo"]["before"] == readings["ral"]["before"]        # one warm start, the same seeded draws
    assert readings["grpo"]["n"] == 4 and all(0 <= r[k] <= 1 for r in readings.values() for k in ("before", "after"))
    table = open(os.path.join(out, "report.md")).read().split("**Sampled accuracy**")[1]
    row = next(line for line in table.splitlines() if line.startswith("| core | search-16 | ral |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    r = readings["ral"]
    assert cells[4:7] == [f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}", f"{100 * (r['after'] - r['before']):.1f}"]
    assert cells[7] == f"{100 * (r['after'] - readings['grpo']['after']):.1f}"
    # the sharpening control: the warm start sampled at T = COLD, the same draws for both arms
    assert readings["grpo"]["before_cold"] == r["before_cold"] and 0 <= r["before_cold"] <= 1
    assert cells[8] == f"{100 * (r['after'] - r['before_cold']):.1f}"
    # an older sampled.json (no before_cold) gets the missing reading alone; what it holds is not recomputed
    path = os.path.join(out, "core-search-16-ral-s0", "sampled.json")
    with open(path, "w") as f:
        json.dump({k: v for k, v in r.items() if k != "before_cold"} | dict(after=0.125), f)
    again = study.sampled_readings(os.path.dirname(path))
    assert again["after"] == 0.125 and again["before_cold"] == r["before_cold"]
    assert json.load(open(path)) == again


def test_paired_difference_is_to_the_settings_first_arm():
    row = lambda method, seed, after: dict(part="think", setting="search-16", method=method, seed=seed, before=0.5,
                                           after=after)
    rows = [row("grpo-think", 0, 0.6), row("grpo-think", 1, 0.7), row("ral-think", 0, 0.65), row("ral-think", 1, 0.8)]
    _, cells = study.arm_cells(rows, ("think", "search-16", "ral-think"))
    assert cells[0] == "2" and cells[4] == f"7.5 ± {100 * 12.706 * 0.025:.1f}"   # paired 0.05, 0.10: se 0.025, t(1)
    assert study.arm_cells(rows, ("think", "search-16", "grpo-think"))[1][4] == "–"
