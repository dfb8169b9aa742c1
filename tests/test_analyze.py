"""analyze.py on synthetic run folders with known numbers: verdicts, best alpha, table numbers, artefacts, test-time
numbers, excluded runs, missing cells, bad input. No training anywhere: result.json files are written by `write_cell`
below."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import POINTMAZE, run_in_process, run_script

import analyze
import runs

SIZES = (10_000, 30_000, 90_000)
BOOT = analyze.Bootstrap()  # 2000 draws, 95%, seeded: what analyze.py uses by default


def core(numbers: dict, keys=("mean", "std", "n_seeds")) -> dict:
    """The plain numbers of a stats / pooled entry (its intervals are checked where they are the point)."""
    return {k: numbers[k] for k in keys}


def write_cell(root: Path, per_seed: dict[int, float], *, env: str = POINTMAZE, script: str = "iql_ddpgbc",
               v: int | None = 10_000, p: int = 10_000, alpha: float | None = 0.3, split: bool = True,
               best_offset: float = 0.1, mse: tuple | None = (0.1, 0.2, 0.5), returns: dict | None = None,
               testtime: dict | None = None, mse_factor: dict | None = None, tag: str = "") -> list[Path]:
    """result.json (and config.json) for one cell, in the layout and format the scripts write: one folder per seed
    like scaling.py (`split`), or one folder holding every seed as members. Returns the folders.
    `testtime` {method: {seed: success}}: "test_time" lists those methods, and each gets <method>_success,
    <method>_return (the plain return + the success gain) and, with `mse`, <method>_eval_mse = the plain eval MSE x
    `mse_factor`[method] (default OPEX 0.8, TTT 0.6)."""
    name = ("" if v is None else f"v{v}_") + f"p{p}" + ("" if alpha is None else f"_a{alpha:g}") + tag
    groups = [[s] for s in per_seed] if split else [list(per_seed)]
    folders = []
    for seeds in groups:
        folder = root / env / script / (f"{name}_s{seeds[0]}" if split else name)
        per_member = {"success": [per_seed[s] for s in seeds],
                      "return": [(returns or {}).get(s, -100.0 + per_seed[s]) for s in seeds],
                      "best_success": [per_seed[s] + best_offset for s in seeds]}
        for k, key in enumerate(("train_mse", "val_mse", "eval_mse")):
            per_member[key] = [mse[k] + 0.01 * s for s in seeds] if mse else ["n/a"] * len(seeds)
        header = {"env": env, "script": script, "steps": 1000, "seeds": seeds, "value_data_size": v,
                  "policy_data_size": p, "alpha": alpha, "wall_seconds": 1.0}
        header["test_time"] = list(testtime or {})
        for method, values in (testtime or {}).items():
            per_member[f"{method}_success"] = [values[s] for s in seeds]
            per_member[f"{method}_return"] = [r + values[s] - per_seed[s] for s, r in zip(seeds, per_member["return"])]
            if mse:
                factor = {"opex": 0.8, "ttt": 0.6, **(mse_factor or {})}[method]
                per_member[f"{method}_eval_mse"] = [factor * e for e in per_member["eval_mse"]]
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"config": {"steps": 1000, "seed": seeds[0]}}))
        (folder / "result.json").write_text(json.dumps({**header, **runs.summarize(per_member)}))
        folders.append(folder)
    return folders


def matrices_of(root: Path, metric: str = "success") -> dict[str, analyze.Matrix]:
    runs = analyze.load_sweep(root).runs
    envs_ = {r.env for r in runs}
    return {m.script: m for m in analyze.build_matrices(runs, {e: metric for e in envs_}, BOOT)}


def test_verdicts_policy_value_both_flat_and_noise(tmp_path):
    """Known effects, 4 seeds a cell: each verdict names the axis that was built in, and each change's interval
    covers the change that was built in (0.3 / 0 / 0.2 / 0 / 0.1 / -0.3: an axis matters when its interval excludes
    zero on either side)."""
    rng = np.random.default_rng(0)
    patterns = {
        "iql_ddpgbc": (lambda i, j: 0.2 + 0.15 * j, 0.01),  # only the policy axis
        "sarsa_ddpgbc": (lambda i, j: 0.2 + 0.15 * i, 0.01),  # only the value axis
        "iql_awr": (lambda i, j: 0.2 + 0.1 * (i + j), 0.01),  # both, equally
        "sarsa_awr": (lambda i, j: 0.4, 0.01),  # neither: seed noise only
        "crl_ddpgbc": (lambda i, j: 0.3 + 0.05 * j, 0.15),  # a policy trend buried in seed noise
        "crl_awr": (lambda i, j: 0.6 - 0.15 * j, 0.01),  # more policy data hurts: an interval below zero matters
    }
    written = {}
    for script, (f, sd) in patterns.items():
        for i, v in enumerate(SIZES):
            for j, p in enumerate(SIZES):
                values = {s: f(i, j) + sd * float(rng.standard_normal()) for s in range(4)}
                written[(script, i, j)] = values
                write_cell(tmp_path, values, script=script, v=v, p=p)
    matrices = matrices_of(tmp_path)
    got = {script: analyze.verdict(matrices[script], BOOT) for script in patterns}
    assert {s: v["verdict"] for s, v in got.items()} == {
        "iql_ddpgbc": "policy-bounded", "sarsa_ddpgbc": "value-bounded", "iql_awr": "both", "sarsa_awr": "flat",
        "crl_ddpgbc": "flat", "crl_awr": "policy-bounded"}
    # the numbers behind them, by hand from what was written
    for script in patterns:
        mean = np.array([[np.mean(list(written[(script, i, j)].values())) for j in range(3)] for i in range(3)])
        assert got[script]["policy_change"] == pytest.approx(np.mean(mean[:, 2] - mean[:, 0]))
        assert got[script]["value_change"] == pytest.approx(np.mean(mean[2, :] - mean[0, :]))
        assert got[script]["n_seeds"] == 4
    truth = {"iql_ddpgbc": (0.3, 0.0), "sarsa_ddpgbc": (0.0, 0.3), "iql_awr": (0.2, 0.2), "sarsa_awr": (0.0, 0.0),
             "crl_ddpgbc": (0.1, 0.0), "crl_awr": (-0.3, 0.0)}
    for script, (policy, value) in truth.items():
        (p_low, p_high), (v_low, v_high) = got[script]["policy_ci"], got[script]["value_ci"]
        assert p_low <= policy <= p_high and v_low <= value <= v_high, (script, got[script])
    # the noisy one is flat because its interval holds zero, not because of the absolute floor
    noisy = got["crl_ddpgbc"]
    assert abs(noisy["policy_change"]) > noisy["floor"] and noisy["policy_ci"][0] < 0 < noisy["policy_ci"][1]
    # with --dominance 1, "both" goes to the axis that changed more
    both = got["iql_awr"]
    larger = "policy-bounded" if abs(both["policy_change"]) > abs(both["value_change"]) else "value-bounded"
    assert analyze.verdict(matrices["iql_awr"], BOOT, dominance=1.0)["verdict"] == larger


def test_fewer_than_three_seeds_give_no_verdict(tmp_path, capsys):
    """A strong policy effect, but cells of 1 or 2 seeds: "insufficient seeds", never a verdict; a third seed in
    every cell brings it."""
    for seeds in ({0: 0}, {0: 0, 1: 0}):
        root = tmp_path / f"n{len(seeds)}"
        for j, p in enumerate(SIZES[:2]):
            for v in SIZES[:2]:
                write_cell(root, {s: 0.1 + 0.5 * j + 0.01 * s for s in seeds}, v=v, p=p)
        result = analyze.verdict(matrices_of(root)["iql_ddpgbc"], BOOT)
        assert result["verdict"] == f"insufficient seeds (n = {len(seeds)}, need 3)"
        assert result["policy_matters"] is None and result["value_matters"] is None
    analyze.main(analyze.Args(str(tmp_path / "n1"), only=("verdicts",)))
    printed = capsys.readouterr().out
    assert "insufficient seeds (n = 1, need 3)" in printed and "policy-bounded" not in printed
    write_cell(tmp_path / "n2", {2: 0.12}, v=SIZES[0], p=SIZES[0], tag="_more")
    partly = analyze.verdict(matrices_of(tmp_path / "n2")["iql_ddpgbc"], BOOT)
    assert partly["verdict"] == "insufficient seeds (n = 2, need 3)"  # the fewest seeds of a compared cell counts
    for v in SIZES[:2]:
        for p in SIZES[:2]:
            if (v, p) != (SIZES[0], SIZES[0]):
                write_cell(tmp_path / "n2", {2: 0.12 + 0.5 * (p == SIZES[1])}, v=v, p=p, tag="_more")
    assert analyze.verdict(matrices_of(tmp_path / "n2")["iql_ddpgbc"], BOOT)["verdict"] == "policy-bounded"


def test_intervals_cover_the_true_value_at_their_stated_rate_neither_more_nor_less():
    """Two-sided: 95% intervals cover the truth in 92-96.5% of 1500 synthetic experiments, so a 90% or a 99% interval
    labelled 95% fails (the test above only has a floor). Enough seeds that the percentile bootstrap nearly reaches its
    level (at 3 to 5 seeds it under-covers, see analyze.Bootstrap): 20 seeds a stratum / cell for the mean (5 tasks
    as strata) and the axis change (2 x 2 matrix), 10 runs a side in each of 3 strata for P(X > Y).
    The band, from 4000 experiments (another RNG seed) of the same construction, per mean / change / P(X > Y): 95%
    intervals cover 0.940 / 0.944 / 0.948, a little under 0.95, which is why the band is not centred on 0.95; 90%
    ones 0.888 / 0.900 / 0.901 and 99% ones 0.982 / 0.984 / 0.986. At 1500 experiments the binomial standard error is
    0.006 at 0.94, 0.008 at 0.90 and 0.0035 at 0.982: 0.92 sits midway between the 95% and 90% levels, 0.965
    between 95% and 99%, so every 95% level lies 3 standard errors or more inside the band and every 90% / 99% one
    2.5 / 5 or more outside it. Seeded, so the counts
    are fixed (here 0.947 / 0.944 / 0.955; 0.900 / 0.899 / 0.905 at 90%, 0.988 / 0.980 / 0.985 at 99%); the margins
    say a change of RNG stream or numpy would not make it fail by chance."""
    rng = np.random.default_rng(2)
    boot = analyze.Bootstrap(reps=400)
    experiments, seeds, runs_a_side = 1500, 20, 10
    hits = {"mean": 0, "change": 0, "poi": 0}
    for _ in range(experiments):
        tasks = [0.3 + 0.1 * t + 0.1 * rng.standard_normal(seeds) for t in range(5)]  # true mean 0.5
        low, high = analyze.estimate(tasks, boot)["mean_ci"]
        hits["mean"] += low <= 0.5 <= high
        cells = [[{s: 0.2 + 0.25 * j + 0.1 * rng.standard_normal() for s in range(seeds)} for j in range(2)]
                 for _ in range(2)]  # policy axis +0.25
        m = analyze.Matrix(POINTMAZE, "iql_ddpgbc", "success", SIZES[:2], SIZES[:2], np.zeros((2, 2)),
                           np.zeros((2, 2)), np.full((2, 2), seeds), [[0.3] * 2] * 2, cells, True, [[{}] * 2] * 2)
        low, high = analyze.axis_change(m, "policy", boot)["ci"]
        hits["change"] += low <= 0.25 <= high
        x = [0.1 * rng.standard_normal(runs_a_side) for _ in range(3)]
        y = [0.1 * rng.standard_normal(runs_a_side) for _ in range(3)]
        low, high = analyze.probability_of_improvement(x, y, boot)["poi_ci"]  # same distribution: 0.5
        hits["poi"] += low <= 0.5 <= high
    coverage = {k: v / experiments for k, v in hits.items()}
    assert all(0.92 <= c <= 0.965 for c in coverage.values()), coverage


def test_interval_width_is_the_normal_theory_width_at_each_confidence():
    """A known case: the mean of n = 200 normal draws has standard error s / sqrt(n) (s: the sample's sd, ddof=1,
    which the spread makes the resampled means' sd exactly), and its bootstrap distribution is normal to within a
    fraction of a percent at this n, so a c interval is 2 z_c s / sqrt(n) wide, centred on the mean. Checked at 90%,
    95% (the default) and 99% to 3%: the next level is 16% (1.645 / 1.960) or 31% (2.576 / 1.960) away, so an
    interval computed at another level than it is labelled fails. The same for an axis change (four cells of 200
    seeds: sd sqrt(sum of the cells' s^2 / n) / 2). 20000 draws: the percentile's own noise is about 1%."""
    from scipy import stats

    rng = np.random.default_rng(0)
    n = 200
    sample = rng.normal(0.5, 0.2, n)
    cells = [[{s: rng.normal(0.2 + 0.25 * j, 0.1 + 0.05 * (i + j)) for s in range(n)} for j in range(2)]
             for i in range(2)]
    m = analyze.Matrix(POINTMAZE, "iql_ddpgbc", "success", SIZES[:2], SIZES[:2], np.zeros((2, 2)), np.zeros((2, 2)),
                       np.full((2, 2), n), [[0.3] * 2] * 2, cells, True, [[{}] * 2] * 2)
    values = [np.asarray(list(cell.values())) for row in cells for cell in row]
    change_se = math.sqrt(sum(v.var(ddof=1) / n for v in values)) / 2
    change = np.mean([values[1].mean() - values[0].mean(), values[3].mean() - values[2].mean()])
    for confidence in (0.90, 0.95, 0.99):
        boot = analyze.Bootstrap(reps=20_000, confidence=confidence)
        z = stats.norm.ppf(0.5 + confidence / 2)
        for (low, high), centre, se in ((analyze.estimate([sample], boot)["mean_ci"], sample.mean(),
                                         sample.std(ddof=1) / math.sqrt(n)),
                                        (analyze.axis_change(m, "policy", boot)["ci"], change, change_se)):
            assert high - low == pytest.approx(2 * z * se, rel=0.03), (confidence, high - low, 2 * z * se)
            assert (low + high) / 2 == pytest.approx(centre, abs=0.1 * se), confidence  # symmetric
    # the default is 95%
    low, high = analyze.estimate([sample], analyze.Bootstrap(reps=20_000))["mean_ci"]
    assert high - low == pytest.approx(2 * 1.959964 * sample.std(ddof=1) / math.sqrt(n), rel=0.03)


def test_iqm_and_probability_of_improvement_match_their_definitions():
    """IQM = scipy's 25% trimmed mean (rliable's aggregate_iqm); P(X > Y) counts ties half; the same numbers give
    the same intervals (seeded)."""
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (4, 5, 7, 12, 40):
        scores = rng.standard_normal(n)
        assert analyze.iqm(scores) == pytest.approx(stats.trim_mean(scores, 0.25))
    assert analyze.probability_of_improvement([[2, 3]], [[0, 1]], BOOT)["poi"] == 1.0
    assert analyze.probability_of_improvement([[1, 1]], [[1, 1]], BOOT)["poi"] == 0.5
    # stratum 1: no pair above, 1 tie of 4 pairs -> 0.125; stratum 2: every pair above -> 1
    got = analyze.probability_of_improvement([[1, 2], [5, 6]], [[2, 3], [1, 1]], BOOT)
    assert got["poi"] == pytest.approx((0.125 + 1.0) / 2) and got["strata"] == 2
    assert math.isnan(analyze.probability_of_improvement([[1]], [[0, 1]], BOOT)["poi_ci"][0])  # one run: none
    # the spread steps outside what a quantity can be; its interval does not: a success rate stays within [0, 1]
    spread_low = 0.1 - math.sqrt(3 / 2) * 0.1  # seeds 0, 0, 0.3 spread about 0.1: the lowest draw is below 0
    assert spread_low < 0 and analyze.stats({0: 0.0, 1: 0.0, 2: 0.3}, BOOT, "success")["mean_ci"][0] == 0.0
    assert analyze.stats({0: 0.0, 1: 0.0, 2: 0.3}, BOOT, "return")["mean_ci"][0] == pytest.approx(spread_low)
    again = analyze.probability_of_improvement([[1, 2], [5, 6]], [[2, 3], [1, 1]], BOOT)
    assert again == got and analyze.estimate([[1, 2, 4]], BOOT) == analyze.estimate([[1, 2, 4]], BOOT)


def test_verdict_with_one_size_on_an_axis_says_n_a(tmp_path):
    for p, level in ((10_000, 0.1), (90_000, 0.5)):  # coverage-like: one value size, two policy sizes
        write_cell(tmp_path, {0: level, 1: level + 0.01, 2: level - 0.01}, v=90_000, p=p)
    result = analyze.verdict(matrices_of(tmp_path)["iql_ddpgbc"], BOOT)
    assert math.isnan(result["value_change"]) and result["value_matters"] is None
    assert result["policy_matters"] is True and result["verdict"] == "policy matters (value n/a)"


def test_best_alpha_is_chosen_by_the_mean_over_seeds(tmp_path):
    write_cell(tmp_path, {0: 0.9, 1: 0.1, 2: 0.1, 3: 0.1}, alpha=0.1)  # best single seed, mean 0.3
    write_cell(tmp_path, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, alpha=1.0)  # mean 0.5
    write_cell(tmp_path, {0: 0.4, 1: 0.4}, alpha=0.1, p=90_000)  # a tie: the smaller alpha
    write_cell(tmp_path, {0: 0.2, 1: 0.6}, alpha=1.0, p=90_000)
    m = matrices_of(tmp_path)["iql_ddpgbc"]
    assert m.alpha[0] == [1.0, 0.1]
    assert m.mean[0, 0] == pytest.approx(0.5) and m.std[0, 0] == pytest.approx(0.0) and m.n[0, 0] == 4
    assert m.seeds[0][0] == {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}


def test_missing_cells_are_nan_and_a_single_run_folder_works(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_cell(sweep, {0: 0.0, 1: 0.0}, v=10_000, p=10_000)  # a real zero stays zero
    write_cell(sweep, {0: 0.2, 1: 0.4}, v=10_000, p=90_000)
    write_cell(sweep, {0: 0.3, 1: 0.5}, v=90_000, p=10_000)  # (90k, 90k) is missing
    m = matrices_of(sweep)["iql_ddpgbc"]
    assert m.mean[0, 0] == 0.0 and math.isnan(m.mean[1, 1]) and m.n[1, 1] == 0
    assert m.mean[0, 1] == pytest.approx(0.3) and m.mean[1, 0] == pytest.approx(0.4)
    analyze.main(analyze.Args(str(sweep), only=("table", "verdicts")))
    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["matrices"][0]["mean"] == [[0.0, pytest.approx(0.3)], [pytest.approx(0.4), None]]
    # one run folder holding two members (seeds) as SWEEP_DIR
    [single] = write_cell(tmp_path / "one", {3: 0.25, 4: 0.75}, split=False)
    out = tmp_path / "single-out"
    written = analyze.main(analyze.Args(str(single), out=str(out), only=("table", "verdicts")))
    assert {p.name for p in written} == {"table.md", "table.csv", "table.tex", "improvement.csv", "verdicts.md",
                                         "verdicts.csv", "summary.json", f"aggregate_{POINTMAZE}.png",
                                         f"aggregate_{POINTMAZE}.pdf"}
    again = analyze.main(analyze.Args(str(single), out=str(tmp_path / "again"), only=("table", "verdicts")))
    by_name = lambda paths: sorted(paths, key=lambda p: p.name)  # noqa: E731
    assert [a.read_bytes() == b.read_bytes() for a, b in zip(by_name(written), by_name(again))] == [True] * 9
    assert b"CreationDate" not in (out / f"aggregate_{POINTMAZE}.pdf").read_bytes()  # or a second later it differs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"complete": 1, "incomplete": 0, "failed": 0, "diverged": 0}
    [cell] = summary["cells"]
    assert cell["seeds"] == [3, 4] and core(cell["success"]) == {"mean": 0.5, "std": 0.25, "n_seeds": 2}
    # two seeds, spread about their mean by sqrt(2 / 1) (analyze.Bootstrap): the percentiles are the spread seeds
    assert cell["success"]["mean_ci"] == pytest.approx([0.5 - 0.25 * math.sqrt(2), 0.5 + 0.25 * math.sqrt(2)])
    assert "1 complete run folders (2 trained members)" in capsys.readouterr().out


def test_incomplete_failed_and_diverged_runs_are_reported_and_left_out(tmp_path):
    sweep = tmp_path / "sweep"
    write_cell(sweep, {0: 0.2, 1: 0.2})
    # incomplete: config.json and metrics.jsonl whose last line a kill cut short
    incomplete = sweep / POINTMAZE / "iql_ddpgbc" / "v10000_p90000_a0.3_s0"
    incomplete.mkdir(parents=True)
    (incomplete / "config.json").write_text(json.dumps({"config": {"steps": 1000}}))
    (incomplete / "metrics.jsonl").write_text('{"event": "train", "step": 100}\n{"event": "train", "step": 200}\n'
                                              '{"event": "train", "st')
    # marked failed / diverged in sweep.json although a result.json with outlandish numbers is there
    [failed] = write_cell(sweep, {2: 1.0})
    [diverged] = write_cell(sweep, {3: 1.0})
    # diverged outside any sweep.json: failure.json and no result.json
    loose = sweep / POINTMAZE / "iql_ddpgbc" / "v30000_p30000_a0.3_s0"
    loose.mkdir(parents=True)
    (loose / "config.json").write_text("{}")
    (loose / "failure.json").write_text(json.dumps({"step": 500, "non_finite": ["critic_loss"]}))
    typed = "sweeps/moved-since"  # the --sweep-dir as typed when the sweep ran; the folder has moved since
    rel = lambda folder: f"{typed}/{folder.relative_to(sweep)}"  # noqa: E731
    runs = [{"folder": rel(sweep / POINTMAZE / "iql_ddpgbc" / f"v10000_p10000_a0.3_s{s}"), "status": "done"}
            for s in (0, 1)]
    runs += [{"folder": rel(failed), "status": "failed", "exit_status": 1, "attempts": 2,
              "stderr_tail": "Traceback\nValueError: boom"},
             {"folder": rel(diverged), "status": "diverged", "exit_status": 3, "diverged_at_step": 700,
              "non_finite": ["actor_loss"]},
             {"folder": f"{typed}/{POINTMAZE}/crl_ddpgbc/v10000_p10000_s0", "status": "failed", "exit_status": 2,
              "stderr_tail": "error: crl_ddpgbc needs a goal-conditioned environment"}]
    (sweep / "sweep.json").write_text(json.dumps({"settings": {"sweep_dir": typed}, "runs": runs}))
    proc = run_script("analyze.py", str(sweep), "--only", "table", "verdicts", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 complete run folders (2 trained members), 1 incomplete, 2 failed, 2 diverged" in proc.stdout, proc.stdout
    assert "step 200 of 1000" in proc.stdout and "ValueError: boom" in proc.stdout
    assert "non-finite actor_loss at step 700" in proc.stdout and "non-finite critic_loss at step 500" in proc.stdout
    assert "needs a goal-conditioned environment" in proc.stdout
    summary = json.loads((sweep / "analysis" / "summary.json").read_text())
    assert summary["counts"] == {"complete": 2, "incomplete": 1, "failed": 2, "diverged": 2}
    assert summary["incomplete"] == [{"folder": str(incomplete), "last_step": 200, "steps": 1000}]
    assert {Path(f["folder"]).name for f in summary["failed"]} == {failed.name, "v10000_p10000_s0"}
    [cell] = summary["cells"]
    assert cell["seeds"] == [0, 1] and cell["success"]["mean"] == pytest.approx(0.2)
    rows = list(csv.DictReader((sweep / "analysis" / "table.csv").open()))
    assert float(rows[0]["ddpgbc_mean"]) == pytest.approx(0.2) and rows[0]["ddpgbc_seeds"] == "2"


def by_hand(cells: dict, offset: float = 0.0) -> tuple[float, float]:
    """Matrix average and its seed spread from {(v, p): {alpha: {seed: value}}}: per cell the alpha with the best
    mean, the mean of those cell means, the std of the per-seed averages."""
    chosen = []
    for alphas in cells.values():
        best = max(sorted(alphas), key=lambda a: sum(alphas[a].values()) / len(alphas[a]))
        chosen.append(alphas[best])
    mean = sum(sum(c.values()) / len(c) for c in chosen) / len(chosen) + offset
    per_seed = [sum(c[s] for c in chosen) / len(chosen) for s in chosen[0]]
    return mean, float(np.std(per_seed))


def test_every_artefact_is_written_and_the_table_holds_the_hand_computed_means(tmp_path):
    sweep = tmp_path / "sweep"
    seeds = (0, 1, 2)
    grid = {}  # script -> {(v, p): {alpha: {seed: value}}}
    alphas = {"iql_ddpgbc": (0.03, 0.3), "iql_awr": (1.0, 3.0), "sarsa_ddpgbc": (0.3,), "iql_sfbc": (None,)}
    base = {"iql_ddpgbc": 0.5, "iql_awr": 0.3, "sarsa_ddpgbc": 0.4, "iql_sfbc": 0.2}
    for script, script_alphas in alphas.items():
        for i, v in enumerate((10_000, 90_000)):
            for j, p in enumerate((10_000, 90_000)):
                for k, alpha in enumerate(script_alphas):
                    # alpha k's advantage flips between cells, so the best alpha differs per cell
                    values = {s: round(base[script] + 0.1 * j + 0.02 * i + 0.05 * k * (-1) ** (i + j) + 0.01 * s, 4)
                              for s in seeds}
                    grid.setdefault(script, {}).setdefault((v, p), {})[alpha] = values
                    write_cell(sweep, values, script=script, v=v, p=p, alpha=alpha)
    bc = {10_000: {s: 0.35 + 0.01 * s for s in seeds}, 90_000: {s: 0.45 for s in seeds}}
    for p, values in bc.items():
        write_cell(sweep, values, script="bc", v=None, p=p, alpha=None)
    # one run of the all-data cell at alpha 0.3 that evaluated OPEX and TTT besides the plain policy (the plain
    # numbers as the grid's, so the table stays as computed by hand)
    plain = grid["iql_ddpgbc"][(90_000, 90_000)][0.3]
    opex, ttt = {s: plain[s] + 0.1 + 0.02 * s for s in seeds}, {s: plain[s] + 0.2 - 0.03 * s for s in seeds}
    write_cell(sweep, plain, v=90_000, p=90_000, alpha=0.3, testtime={"opex": opex, "ttt": ttt}, tag="_tt")
    out = tmp_path / "out"
    proc = run_script("analyze.py", str(sweep), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {"table.md", "table.csv", "table.tex", "improvement.csv", "verdicts.md", "verdicts.csv", "claims.md",
             "summary.json"}
    names |= {f"{kind}_{POINTMAZE}.{fmt}" for kind in ("matrices", "aggregate", "generalization", "testtime")
              for fmt in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == names
    assert all((out / name).stat().st_size > 0 for name in names)
    # four scripts over two value learners: a 2 x 3 grid of panels, exactly figsize x dpi pixels
    assert analyze.panel_layout(list(alphas))[:2] == (2, 3)
    width, height = analyze.matrix_figsize(2, 3)
    from matplotlib.image import imread

    assert imread(out / f"matrices_{POINTMAZE}.png").shape[:2] == (round(height * analyze.DPI),
                                                                     round(width * analyze.DPI))
    rows = {(r["kind"], r["value_learner"]): r for r in csv.DictReader((out / "table.csv").open())}
    assert set(rows) == {("final", "iql"), ("final", "sarsa"), ("best", "iql"), ("best", "sarsa")}
    for kind, offset in (("final", 0.0), ("best", 0.1)):
        for script in alphas:
            learner, extractor = script.split("_")
            mean, std = by_hand(grid[script], offset)
            assert float(rows[(kind, learner)][f"{extractor}_mean"]) == pytest.approx(mean, rel=1e-5), (kind, script)
            assert float(rows[(kind, learner)][f"{extractor}_std"]) == pytest.approx(std, rel=1e-4, abs=1e-6)
        bc_mean = np.mean([np.mean(list(c.values())) for c in bc.values()]) + offset
        assert float(rows[(kind, "iql")]["bc_mean"]) == pytest.approx(bc_mean, rel=1e-5)
        assert rows[(kind, "iql")]["best_extractor"] == "ddpgbc" and rows[(kind, "sarsa")]["best_extractor"] == "ddpgbc"
    md = (out / "table.md").read_text()
    assert f"**{by_hand(grid['iql_ddpgbc'])[0]:.3f} [" in md and "\\textbf{" in (out / "table.tex").read_text()
    verdicts = list(csv.DictReader((out / "verdicts.csv").open()))
    assert sorted(v["script"] for v in verdicts) == sorted(alphas)  # bc is not a matrix
    assert "bottleneck verdicts" in proc.stdout and "policy-bounded" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    [tt] = summary["testtime"][POINTMAZE]
    assert (tt["script"], tt["metric"], tt["methods"], tt["cells"]) == ("iql_ddpgbc", "success", ["opex", "ttt"], 1)
    eval_mse = {s: 0.5 + 0.01 * s for s in seeds}  # write_cell's plain eval MSE; OPEX x 0.8, TTT x 0.6
    expected = {"success": plain, "opex_success": opex, "ttt_success": ttt, "eval_mse": eval_mse,
                "opex_eval_mse": {s: 0.8 * e for s, e in eval_mse.items()},
                "ttt_eval_mse": {s: 0.6 * e for s, e in eval_mse.items()}}
    for key, per_seed in expected.items():
        assert tt[key]["mean"] == pytest.approx(np.mean(list(per_seed.values()))), key
        assert tt[key]["std"] == pytest.approx(np.std(list(per_seed.values())), abs=1e-9), key
        assert tt[key]["n_seeds"] == 3, key
    # the figure: performance per arm, the paired gain, evaluation MSE per arm, exactly figsize x dpi pixels
    width, height = analyze.bars_figsize(1, 3)
    assert imread(out / f"testtime_{POINTMAZE}.png").shape[:2] == (round(height * analyze.DPI),
                                                                     round(width * analyze.DPI))
    assert f"opex_success {np.mean(list(opex.values())):.3f}" in proc.stdout, proc.stdout
    assert f"ttt_eval_mse {np.mean(list(expected['ttt_eval_mse'].values())):.4g}" in proc.stdout, proc.stdout
    # the cells carry the methods' numbers next to the plain ones
    cell = next(c for c in summary["cells"] if "opex_success" in c)
    assert cell["ttt_success"]["mean"] == pytest.approx(np.mean(list(ttt.values())))
    generalization = {r["script"]: r for r in summary["generalization"][POINTMAZE]}["iql_ddpgbc"]
    assert (generalization["value_size"], generalization["policy_size"], generalization["alpha"]) == (90_000, 90_000,
                                                                                                     0.3)
    assert generalization["eval_mse"]["mean"] == pytest.approx(0.5 + 0.01)  # 0.5 + 0.01 x seed, seeds 0, 1, 2
    cell = next(c for c in summary["cells"] if c["script"] == "iql_awr" and c["alpha"] == 3.0
                and c["value_data_size"] == 10_000 and c["policy_data_size"] == 10_000)
    expected = list(grid["iql_awr"][(10_000, 10_000)][3.0].values())
    assert core(cell["success"]) == {"mean": pytest.approx(np.mean(expected)),
                                     "std": pytest.approx(np.std(expected)), "n_seeds": 3}


def test_testtime_numbers_come_from_the_runs_that_evaluated_methods(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # iql_ddpgbc: runs that evaluated OPEX and TTT in two cells, alpha 0.3 and 3.0 in the all-data cell; 3.0 has the
    # better OPEX but the worse plain numbers, and plain numbers choose the alpha
    runs = {(10_000, 0.3): ({0: 0.1, 1: 0.3}, {0: 0.2, 1: 0.2}, {0: 0.35, 1: 0.15}),
            (90_000, 0.3): ({0: 0.4, 1: 0.6}, {0: 0.5, 1: 0.9}, {0: 0.7, 1: 0.7}),
            (90_000, 3.0): ({0: 0.2, 1: 0.2}, {0: 0.95, 1: 0.95}, {0: 0.9, 1: 0.9})}
    for (v, alpha), (plain, opex, ttt) in runs.items():
        write_cell(sweep, plain, v=v, p=90_000, alpha=alpha, testtime={"opex": opex, "ttt": ttt}, tag="_tt")
    # a plain run of the all-data cell (key "test_time" absent, as in older files), far better: in the matrix, not
    # in the test-time plain numbers; another with the plain string "none"
    [old] = write_cell(sweep, {5: 0.9, 6: 0.9}, v=90_000, p=90_000, alpha=0.3, split=False)
    result = json.loads((old / "result.json").read_text())
    del result["test_time"]
    (old / "result.json").write_text(json.dumps(result))
    [none] = write_cell(sweep, {7: 0.9}, v=90_000, p=90_000, alpha=0.3)
    (none / "result.json").write_text(json.dumps({**json.loads((none / "result.json").read_text()),
                                                  "test_time": "none"}))
    # iql_awr evaluated only OPEX; sarsa_ddpgbc says "ttt" as a plain string
    awr = ({0: 0.3, 1: 0.5}, {0: 0.45, 1: 0.55})
    write_cell(sweep, awr[0], script="iql_awr", v=90_000, p=90_000, alpha=1.0, testtime={"opex": awr[1]},
               mse_factor={"opex": 0.5})
    [sarsa] = write_cell(sweep, {0: 0.2}, script="sarsa_ddpgbc", v=90_000, p=90_000, testtime={"ttt": {0: 0.3}})
    result = json.loads((sarsa / "result.json").read_text())
    (sarsa / "result.json").write_text(json.dumps({**result, "test_time": "ttt"}))
    out = tmp_path / "out"
    written = analyze.main(analyze.Args(str(sweep), out=str(out), metric="best_success", only=("testtime",),
                                        format=("png",)))
    assert {p.name for p in written} == {f"testtime_{POINTMAZE}.png", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["script"]: r for r in summary["testtime"][POINTMAZE]}
    assert list(rows) == ["iql_awr", "iql_ddpgbc", "sarsa_ddpgbc"]  # the paper's script order
    # by hand: per cell the plain-chosen alpha, the mean of the cell means, the std of the per-seed averages
    chosen = [runs[(10_000, 0.3)], runs[(90_000, 0.3)]]
    ddpgbc = rows["iql_ddpgbc"]
    assert (ddpgbc["metric"], ddpgbc["methods"], ddpgbc["cells"]) == ("success", ["opex", "ttt"], 2)
    for k, key in enumerate(("success", "opex_success", "ttt_success")):
        mean = np.mean([np.mean(list(cell[k].values())) for cell in chosen])
        std = np.std([np.mean([cell[k][s] for cell in chosen]) for s in (0, 1)])
        assert ddpgbc[key]["mean"] == pytest.approx(mean) and ddpgbc[key]["std"] == pytest.approx(std), key
    assert ddpgbc["success"]["mean"] == pytest.approx(0.35) and ddpgbc["opex_success"]["mean"] == pytest.approx(0.45)
    mse = np.mean([0.5 + 0.01 * s for s in (0, 1)])  # write_cell's plain eval MSE, the same in every cell
    assert ddpgbc["eval_mse"]["mean"] == pytest.approx(mse)
    assert ddpgbc["ttt_eval_mse"]["mean"] == pytest.approx(0.6 * mse)
    # one method: plain and that one only
    assert rows["iql_awr"]["methods"] == ["opex"] and not any(k.startswith("ttt") for k in rows["iql_awr"])
    assert rows["iql_awr"]["success"]["mean"] == pytest.approx(0.4)
    assert rows["iql_awr"]["opex_success"]["mean"] == pytest.approx(0.5)
    assert rows["iql_awr"]["opex_eval_mse"]["mean"] == pytest.approx(0.5 * mse)
    assert rows["sarsa_ddpgbc"]["methods"] == ["ttt"]
    assert core(rows["sarsa_ddpgbc"]["ttt_success"], ("mean", "std", "n_seeds", "cells")) == {
        "mean": pytest.approx(0.3), "std": 0.0, "n_seeds": 1, "cells": 1}
    assert rows["sarsa_ddpgbc"]["ttt_success"]["mean_ci"] == [None, None]  # one seed: no interval (NaN in JSON)
    assert ddpgbc["opex_gain"]["mean"] == pytest.approx(ddpgbc["opex_success"]["mean"] - ddpgbc["success"]["mean"])
    # the matrices keep the plain numbers of every run (here best_success = success + 0.1)
    matrix = next(m for m in summary["matrices"] if m["script"] == "iql_ddpgbc")
    assert matrix["mean"][1][0] == pytest.approx(np.mean([0.4, 0.6, 0.9, 0.9, 0.9]) + 0.1)
    printed = capsys.readouterr().out
    # seeds 0.3 / 0.5 (OPEX 0.45 / 0.55): the interval is their spread about the mean, x sqrt(2) (analyze.Bootstrap);
    # the gain is paired by seed (+0.15, +0.05)
    assert ("iql_awr (1 cell): success 0.400 [0.259, 0.541] | opex_success 0.500 [0.429, 0.571] | eval_mse "
            "0.505 [0.4979, 0.5121]") in printed, printed
    assert "| opex_gain +0.100 [+0.029, +0.171] |" in printed
    assert "iql_ddpgbc (2 cells): success 0.350 [0.209, 0.491] | opex_success 0.450 [0.309, 0.591] | ttt_success " \
        "0.475" in printed and "testtime_success" not in printed
    assert "sarsa_ddpgbc (1 cell): success 0.200 [n/a] | ttt_success 0.300 [n/a]" in printed  # one seed


def test_test_time_keys_are_checked(tmp_path):
    cases = {"bad-method": (lambda r: {**r, "test_time": ["opex", "sgd"]}, "key 'test_time' is ['opex', 'sgd']"),
             "not-a-list": (lambda r: {**r, "test_time": 1}, "key 'test_time' is 1"),
             "missing": (lambda r: {k: v for k, v in r.items() if k != "ttt_return"}, "lacks key 'ttt_return'"),
             "short": (lambda r: {**r, "opex_eval_mse": {"per_member": [0.1], "mean": 0.1, "std": 0.0}},
                       "key 'opex_eval_mse' must be {per_member, mean, std} with one value per seed (2)")}
    for name, (change, message) in cases.items():
        [folder] = write_cell(tmp_path / name, {0: 0.5, 1: 0.6}, split=False,
                              testtime={"opex": {0: 0.6, 1: 0.7}, "ttt": {0: 0.7, 1: 0.8}})
        analyze.load_sweep(tmp_path / name)  # as written it is fine
        (folder / "result.json").write_text(json.dumps(change(json.loads((folder / "result.json").read_text()))))
        with pytest.raises(runs.UsageError) as error:
            analyze.load_sweep(tmp_path / name)
        assert message in str(error.value) and str(folder / "result.json") in str(error.value), name


def test_dm_control_uses_return_and_skips_mse_plots(tmp_path, capsys):
    for p, level in ((10_000, 100.0), (90_000, 300.0)):
        write_cell(tmp_path, {0: 0.0, 1: 0.0}, env="walker-run", v=90_000, p=p, mse=None,
                   returns={0: level, 1: level + 10.0})
    analyze.main(analyze.Args(str(tmp_path), only=("generalization", "verdicts")))
    printed = capsys.readouterr().out
    assert "generalization: skipped" in printed and "testtime: skipped" not in printed
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["metric"] == {"walker-run": "return"}
    [m] = summary["matrices"]
    assert m["mean"] == [[pytest.approx(105.0), pytest.approx(305.0)]]
    [v] = summary["verdicts"]
    assert v["floor"] == pytest.approx(0.02 * 305.0) and v["policy_change"] == pytest.approx(200.0)
    assert summary["table"][0]["kind"] == "final" and all(r["kind"] != "best" for r in summary["table"])
    analyze.main(analyze.Args(str(tmp_path), only=("testtime",)))
    assert "testtime: skipped" in capsys.readouterr().out
    assert not list((tmp_path / "analysis").glob("testtime_*"))
    # a TTT run: returns, and no evaluation MSE (no oracle), so a single row of bars
    write_cell(tmp_path, {0: 0.0, 1: 0.0}, env="walker-run", v=90_000, p=90_000, mse=None,
               returns={0: 400.0, 1: 420.0}, testtime={"ttt": {0: 50.0, 1: 30.0}}, tag="_tt")
    analyze.main(analyze.Args(str(tmp_path), only=("testtime",), format=("png",)))
    [row] = json.loads((tmp_path / "analysis" / "summary.json").read_text())["testtime"]["walker-run"]
    assert set(row) == {"script", "metric", "methods", "cells", "return", "ttt_return", "ttt_gain"}
    assert row["ttt_gain"]["mean"] == pytest.approx(40.0)  # paired by seed: (50 - 0) and (30 - 0) added
    assert row["return"]["mean"] == pytest.approx(410.0) and row["ttt_return"]["mean"] == pytest.approx(450.0)
    from matplotlib.image import imread

    width, height = analyze.bars_figsize(1, 2)  # return per arm and the paired gain (no oracle, no MSE panel)
    assert imread(tmp_path / "analysis" / "testtime_walker-run.png").shape[:2] == (round(height * analyze.DPI),
                                                                                   round(width * analyze.DPI))


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished" / "run"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    broken = tmp_path / "broken"
    [damaged] = write_cell(broken, {0: 0.5})
    (damaged / "result.json").write_text('{"env": "pointmaze')
    keyless = tmp_path / "keyless"
    [folder] = write_cell(keyless, {0: 0.5})
    result = json.loads((folder / "result.json").read_text())
    del result["success"]
    (folder / "result.json").write_text(json.dumps(result))
    good = tmp_path / "good"
    write_cell(good, {0: 0.5})
    cases = [
        ([str(tmp_path / "nowhere")], "does not exist"),
        ([str(empty)], "holds no run folders"),
        ([str(tmp_path / "unfinished")], "holds no complete run (1 incomplete"),
        ([str(broken)], f"{damaged / 'result.json'} is not valid JSON"),
        ([str(keyless)], f"{folder / 'result.json'} lacks key 'success'"),
        ([str(good), "--confidence", "1.5"], "--confidence must be between 0 and 1"),
    ]
    for args, message in cases:
        code, stderr = run_in_process("analyze.py", args, capsys)
        assert code == 2 and message in stderr, (args, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("error: ")
    # tyro rejects an unknown artefact or format itself, also with exit status 2
    for flag, bad in (("--only", "tables"), ("--format", "svg")):
        code, stderr = run_in_process("analyze.py", [str(good), flag, bad], capsys)
        assert code == 2 and bad in stderr, stderr[-2000:]
    assert not (good / "analysis").exists()


def test_a_change_equal_to_the_floor_does_not_matter():
    """Success rates are multiples of 1/episodes: (0.28 - 0.24 + 0.20 - 0.20) / 2 is 0.020000000000000018 in floats,
    and must read as the floor itself, not above it (the quickstart sweep's value axis)."""
    mean = np.array([[0.24, 0.20], [0.28, 0.20]])
    seeds = [[{s: x + 0.001 * (s - 1) for s in range(3)} for x in row] for row in mean]  # 3 seeds, tiny noise
    m = analyze.Matrix(env=POINTMAZE, script="iql_ddpgbc", metric="success", value_sizes=[10_000, 90_000],
                       policy_sizes=[10_000, 90_000], mean=mean, std=np.zeros((2, 2)), n=np.full((2, 2), 3),
                       alpha=[[0.3, 0.3], [0.3, 0.3]], seeds=seeds, has_alpha=True, estimates=[[{}] * 2] * 2)
    result = analyze.verdict(m, BOOT)
    assert result["value_change"] > 0.02 and result["value_matters"] is False
    assert result["policy_matters"] is True and result["verdict"] == "policy-bounded"
    assert analyze.verdict(m, BOOT, min_change=0.019)["value_matters"] is True


def write_online(folders: list[Path], curves: dict[int, dict[int, dict]], online_steps: int = 500) -> None:
    """Turn `write_cell`'s folders into offline-to-online runs (result.json: "steps" 1000 offline, then
    `online_steps`): metrics.jsonl as the scripts write it, per member an eval record per training step in `curves`
    {seed: {step: {key: value}}} (offline steps included), a train record of the online phase with its online_*
    numbers in between, and a last line cut short by a kill."""
    for folder in folders:
        result = json.loads((folder / "result.json").read_text())
        (folder / "result.json").write_text(json.dumps({**result, "online_steps": online_steps}))
        lines = []
        for member, seed in enumerate(result["seeds"]):
            for step, values in sorted(curves[seed].items()):
                lines.append({"event": "eval", "step": step, "member": member, "seed": seed, **values})
                if step > 1000:  # online return / success are not the evaluation's
                    lines.append({"event": "train", "step": step, "member": member, "seed": seed, "success": 9.0,
                                  "online_transitions": step - 1000, "online_episodes": 2, "online_return": 9.0,
                                  "online_success": 9.0})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines)
                                              + '{"event": "eval", "step": 1500, "success": 1')


def test_online_curves_are_means_over_seeds_from_the_end_of_offline_training(tmp_path, capsys):
    sweep, out = tmp_path / "sweep", tmp_path / "out"
    keys = ("train_mse", "val_mse", "eval_mse", "success")

    def point(seed: int, k: int) -> dict:  # the values at online step 250 k: different per seed and quantity
        return dict(zip(keys, (0.1 - 0.01 * k + 0.001 * seed, 0.2 - 0.02 * k + 0.01 * seed,
                               0.6 - 0.1 * k + 0.05 * seed, 0.3 + 0.1 * k - 0.1 * seed)))

    # alpha 0.3: seeds 0 and 1 in two folders, evaluated at steps 500 (offline: left out), 1000 (online step 0),
    # 1250 and 1500; step 1500 = online step 500 is the last
    curves = {s: {500: dict.fromkeys(keys, 7.0), **{1000 + 250 * k: point(s, k) for k in range(3)}} for s in (0, 1)}
    write_online(write_cell(sweep, {0: 0.5, 1: 0.5}, alpha=0.3), curves)
    # alpha 3.0: seed 1 ran only 250 online steps, so the cell's curve stops at online step 250
    [a, b] = write_cell(sweep, {0: 0.5, 1: 0.5}, alpha=3.0)
    write_online([a], {0: {1000 + 250 * k: point(0, k) for k in range(3)}})
    write_online([b], {1: {1000 + 250 * k: point(1, k + 1) for k in range(2)}}, online_steps=250)
    # offline-only runs (online_steps 0, or absent as in older result.json) are not part of it
    write_online(write_cell(sweep, {0: 0.5}, script="iql_awr"), {0: {1000: point(0, 0), 1250: point(0, 1)}},
                 online_steps=0)
    # offline-only runs of the alpha-0.3 cell trained 1500 steps (online_steps 0): its comparison row, over the same
    # updates (steps 1000 -> 1500), never pooled with the online runs
    [c] = write_cell(sweep, {2: 0.5}, alpha=0.3, tag="_offline")
    (c / "result.json").write_text(json.dumps({**json.loads((c / "result.json").read_text()), "steps": 1500}))
    write_online([c], {2: {500: dict.fromkeys(keys, 7.0), **{1000 + 250 * k: point(0, 2 * k) for k in range(3)}}},
                 online_steps=0)
    result = json.loads((c / "result.json").read_text())
    (c / "result.json").write_text(json.dumps({**result, "online_steps": 0}))
    written = analyze.main(analyze.Args(str(sweep), out=str(out), only=("online",), format=("png",)))
    assert {p.name for p in written} == {f"online_{POINTMAZE}.png", "online.md", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["online"][POINTMAZE]
    offline = rows.pop(1)
    assert (offline["alpha"], offline["seeds"], offline["offline_only"]) == (0.3, [2], True)
    assert [(p["online_step"], p["eval_mse"]["mean"]) for p in offline["points"]] == \
        [(250 * k, pytest.approx(point(0, 2 * k)["eval_mse"])) for k in range(3)]
    # summary.json's cells keep the offline and the online runs of one cell apart
    assert sorted((c["alpha"], c["online_steps"], tuple(c["seeds"])) for c in summary["cells"]
                  if c["script"] == "iql_ddpgbc") == [(0.3, 0, (2,)), (0.3, 500, (0, 1)), (3.0, 250, (1,)),
                                                      (3.0, 500, (0,))]
    assert [(r["script"], r["alpha"], r["seeds"], r["offline_only"]) for r in rows] == [
        ("iql_ddpgbc", 0.3, [0, 1], False), ("iql_ddpgbc", 3.0, [0, 1], False)]
    expected = {0.3: {250 * k: {q: [point(s, k)[q] for s in (0, 1)] for q in keys} for k in range(3)},
                3.0: {250 * k: {q: [point(0, k)[q], point(1, k + 1)[q]] for q in keys} for k in range(2)}}
    for row in rows:
        assert row["metric"] == "success"
        assert [p["online_step"] for p in row["points"]] == list(expected[row["alpha"]])
        for p in row["points"]:
            for q in keys:
                hand = expected[row["alpha"]][p["online_step"]][q]
                assert core(p[q]) == {"mean": pytest.approx(np.mean(hand)), "std": pytest.approx(np.std(hand)),
                                      "n_seeds": 2}, (row["alpha"], p["online_step"], q)
    # online step 0 is step 1000 (not the offline evaluation at 500), by hand
    assert rows[0]["points"][0]["eval_mse"]["mean"] == pytest.approx(0.625)
    assert rows[0]["points"][-1]["success"]["mean"] == pytest.approx(0.45)
    changes = analyze.online_changes(rows[0])
    assert changes["eval_mse"]["change"] == pytest.approx(-0.2) and changes["success"]["change"] == pytest.approx(0.2)
    assert changes["train_mse"]["change"] == pytest.approx(-0.02)
    printed = capsys.readouterr().out
    # (both seeds change alike, so each change's interval, paired by seed, is the change itself)
    assert (f"{POINTMAZE} iql_ddpgbc v10k p10k α=0.3 (online; 2 seeds, online step 0 → 500): train_mse 0.1005 → 0.0805 "
            "(-0.02 [-0.02, -0.02], -20%) | val_mse 0.205 → 0.165 (-0.04 [-0.04, -0.04], -20%) | eval_mse 0.625 → "
            "0.425 (-0.2 [-0.2, -0.2], -32%) | success 0.250 → 0.450 (+0.200 [+0.200, +0.200])") in printed, printed
    md = (out / "online.md").read_text()
    assert (f"| {POINTMAZE} | IQL + DDPG+BC | offline + online | 10k | 10k | 3 | 2 | 250 | 0.0955 → 0.0855 (-0.01 "
            "[-0.01, -0.01], -10%) |") in md, md
    assert f"| {POINTMAZE} | IQL + DDPG+BC | offline only | 10k | 10k | 0.3 | 1 | 500 |" in md, md
    # the lines differ only in alpha, so the legend names only alpha; the PNG is exactly figsize x DPI pixels
    assert analyze.online_labels(rows) == ["IQL + DDPG+BC α=0.3, online fine-tuning",
                                           "IQL + DDPG+BC α=3, online fine-tuning"]
    from matplotlib.image import imread

    width, height = analyze.online_figsize(4, 3)
    assert imread(out / f"online_{POINTMAZE}.png").shape[:2] == (round(height * analyze.DPI),
                                                                  round(width * analyze.DPI))
    # a damaged online_steps is named
    result = json.loads((a / "result.json").read_text())
    (a / "result.json").write_text(json.dumps({**result, "online_steps": -5}))
    with pytest.raises(runs.UsageError, match="key 'online_steps' must be an integer >= 0 or null, got -5"):
        analyze.load_sweep(sweep)


def test_online_is_skipped_without_online_runs_and_dm_control_draws_performance_only(tmp_path, capsys):
    write_cell(tmp_path, {0: 0.0, 1: 0.0}, env="walker-run", v=90_000, mse=None, returns={0: 100.0, 1: 120.0})
    analyze.main(analyze.Args(str(tmp_path), only=("online",), format=("png",)))
    assert "online: skipped, no run has online steps" in capsys.readouterr().out
    assert not list((tmp_path / "analysis").glob("online*"))
    assert json.loads((tmp_path / "analysis" / "summary.json").read_text())["online"] == {}
    # an online dm_control run: returns, no MSE keys (no oracle); `--only online` as typed on the command line
    returns = {0: {1000: 100.0, 1100: 150.0}, 1: {1000: 120.0, 1100: 190.0}}
    curves = {s: {step: {"success": 0.0, "return": r} for step, r in curve.items()} for s, curve in returns.items()}
    write_online(write_cell(tmp_path, {0: 0.0, 1: 0.0}, env="walker-run", v=90_000, mse=None, split=False,
                            tag="_online"), curves, online_steps=100)
    import tyro

    analyze.main(tyro.cli(analyze.Args, args=[str(tmp_path), "--only", "online", "--format", "png"]))
    # seeds changed by +50 and +70: the interval is their spread about +60 (x sqrt(2), analyze.Bootstrap)
    assert ("walker-run iql_ddpgbc v90k p10k α=0.3 (online; 2 seeds, online step 0 → 100): return 110.0 → 170.0 (+60.0 "
            "[+45.9, +74.1])") in capsys.readouterr().out
    [row] = json.loads((tmp_path / "analysis" / "summary.json").read_text())["online"]["walker-run"]
    assert row["metric"] == "return" and [set(p) for p in row["points"]] == [{"online_step", "return"}] * 2
    assert core(row["points"][1]["return"]) == {"mean": pytest.approx(170.0), "std": pytest.approx(20.0), "n_seeds": 2}
    from matplotlib.image import imread

    width, height = analyze.online_figsize(1, 1)
    assert imread(tmp_path / "analysis" / "online_walker-run.png").shape[:2] == (round(height * analyze.DPI),
                                                                                 round(width * analyze.DPI))
    assert "return 110.0 → 170.0 (+60.0 [+45.9, +74.1]) |" in (tmp_path / "analysis" / "online.md").read_text()


def test_claims_are_called_from_their_intervals(tmp_path, capsys):
    """A sweep built with known effects, 3 seeds a cell: DDPG+BC above AWR in every cell, only the policy axis
    moving DDPG+BC, evaluation MSE above validation MSE (write_cell: 0.5 vs 0.2), OPEX up 0.1 and TTT down 0.1 on
    the largest cell. Each claim gets the call its interval supports; AWR, flat, is inconclusive on the data claim."""
    rng = np.random.default_rng(3)
    for j, p in enumerate(SIZES[:2]):
        for i, v in enumerate(SIZES[:2]):
            awr = {s: 0.2 + 0.02 * rng.standard_normal() for s in range(3)}
            ddpgbc = {s: 0.3 + 0.3 * j + 0.02 * rng.standard_normal() for s in range(3)}
            write_cell(tmp_path, awr, script="iql_awr", v=v, p=p, alpha=3.0)
            largest = (i, j) == (1, 1)
            write_cell(tmp_path, ddpgbc, v=v, p=p, testtime={"opex": {s: x + 0.1 for s, x in ddpgbc.items()},
                                                              "ttt": {s: x - 0.1 for s, x in ddpgbc.items()}}
                       if largest else None)
    analyze.main(analyze.Args(str(tmp_path), only=("claims",)))
    printed = capsys.readouterr().out
    calls = {(r["claim"], r["where"].split()[-1]): r["result"]
             for r in json.loads((tmp_path / "analysis" / "summary.json").read_text())["claims"]}
    assert calls[("extraction", "IQL")] == "reproduced"  # every seed pair decisive in every cell: a point at 1
    assert "P(DDPG+BC > AWR) = 1.00 [1.00, 1.00] over 4 cells" in printed
    assert calls[("data", "iql_ddpgbc")] == "reproduced"
    assert calls[("data", "iql_awr")].startswith("inconclusive (flat")
    assert calls[("generalization", "α=0.3")] == "reproduced"
    assert calls[("testtime", "OPEX")] == "reproduced" and calls[("testtime", "TTT")] == "not reproduced"
    assert (tmp_path / "analysis" / "claims.md").read_text().count("| reproduced |") == \
        list(calls.values()).count("reproduced") == 5  # extraction, data (DDPG+BC), generalization x 2, OPEX


def test_behaviour_links_the_figures_videos_and_evaluations_evaluate_py_wrote(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    [plain] = write_cell(sweep, {0: 0.5}, p=10_000)
    [looked_at] = write_cell(sweep, {0: 0.7}, p=90_000)
    (looked_at / runs.TRAJECTORY_FILE.format(20000)).write_bytes(b"\x89PNG")
    (looked_at / runs.EVAL_FILE.format(20000)).write_text("{}")
    videos = looked_at / runs.VIDEO_DIR.format(20000)
    videos.mkdir(parents=True)
    (videos / "task1_episode0.gif").write_bytes(b"GIF89a")
    out = tmp_path / "analysis"
    written = analyze.main(analyze.Args(str(sweep), out=str(out), only=("behaviour",)))
    assert out / "behaviour.md" in written
    page = (out / "behaviour.md").read_text()
    assert "![trajectories_00020000.png](../sweep/" in page and plain.name not in page
    for name in ("trajectories_00020000.png", "eval_00020000.json", "task1_episode0.gif"):
        link = page.split(f"[{name}](")[1].split(")")[0]
        assert (out / link).resolve().exists(), link
    [row] = json.loads((out / "summary.json").read_text())["behaviour"]
    assert row["policy_data_size"] == 90_000 and len(row["files"]) == 3
    # without such files: no page, and the printout says how to make one
    for path in (looked_at / runs.TRAJECTORY_FILE.format(20000), looked_at / runs.EVAL_FILE.format(20000),
                 videos / "task1_episode0.gif"):
        path.unlink()
    capsys.readouterr()
    assert out / "behaviour.md" not in analyze.main(analyze.Args(str(sweep), out=str(tmp_path / "again"),
                                                                 only=("behaviour",)))
    assert "evaluate.py RUN_DIR --trajectories" in capsys.readouterr().out


def test_a_cell_has_one_interval_whatever_result_json_keeps_per_task(tmp_path):
    """A cell's interval resamples its seeds in summary.json's cells and matrices alike, also where result.json keeps
    per-task success (resampling tasks as strata gave another, narrower interval for the same cell)."""
    [folder] = write_cell(tmp_path, {0: 0.2, 1: 0.4, 2: 0.6}, split=False)
    result = json.loads((folder / "result.json").read_text())
    tasks = {f"task{t}_success": [0.1 * t, 0.1 * t + 0.2, 0.1 * t + 0.4] for t in range(5)}  # seed means 0.2, 0.4, 0.6
    (folder / "result.json").write_text(json.dumps({**result, **runs.summarize(tasks)}))
    analyze.main(analyze.Args(str(tmp_path), only=("table",), format=("png",)))
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    [cell], [matrix] = summary["cells"], summary["matrices"]
    by_seed = analyze.stats({0: 0.2, 1: 0.4, 2: 0.6}, BOOT, "success")
    assert matrix["mean_ci"][0][0] == cell["success"]["mean_ci"] == pytest.approx(by_seed["mean_ci"])
    assert matrix["iqm"][0][0] == cell["success"]["iqm"]


def test_a_zero_gain_on_every_seed_is_no_change_and_close_means_are_a_tie(tmp_path):
    """OPEX equal to plain on every seed: "no change" (not "inconclusive"), its own rule in claims.md's header; AWR
    and DDPG+BC whose difference interval straddles zero: "tie", nothing bold; P(X > Y) in the claim's direction."""
    awr, ddpgbc = {0: 0.20, 1: 0.40, 2: 0.30}, {0: 0.25, 1: 0.35, 2: 0.32}
    write_cell(tmp_path, awr, script="iql_awr", alpha=3.0)
    write_cell(tmp_path, ddpgbc, testtime={"opex": dict(ddpgbc), "ttt": {s: x + 0.04 * (s - 1) for s, x in
                                                                         ddpgbc.items()}})
    analyze.main(analyze.Args(str(tmp_path), only=("table", "claims", "testtime"), format=("png",)))
    out = tmp_path / "analysis"
    summary = json.loads((out / "summary.json").read_text())
    calls = {r["where"].split()[-1]: r["result"] for r in summary["claims"] if r["claim"] == "testtime"}
    assert calls == {"OPEX": "no change", "TTT": "inconclusive"}
    assert analyze.CLAIM_RULES["testtime"] in (out / "claims.md").read_text()
    [row] = [r for r in summary["table"] if r["kind"] == "final"]
    assert row["best_extractor"] == "tie" and row["best_margin"]["over"] == "awr"
    low, high = row["best_margin"]["ci"]
    assert low < 0 < high and row["best_margin"]["difference"] == pytest.approx(np.mean([0.25, 0.35, 0.32]) - 0.3)
    assert "**" not in (out / "table.md").read_text()
    [poi] = summary["improvement"]
    assert (poi["x"], poi["y"]) == ("ddpgbc", "awr") and poi["poi"] == pytest.approx(5 / 9)  # 5 of 9 pairs above
