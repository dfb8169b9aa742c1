"""Parity with the authors' own implementation: OGBench's `impls/` and our script, on the same generated dataset with
matched settings and several seeds, side by side.

    python benchmarks/parity.py --ogbench-dir ~/src/ogbench --reference-python ~/venvs/ogbench/bin/python \\
        --env pointmaze-medium-navigate-v0 --pairs iql_ddpgbc iql_awr --seeds 0 1 2 --steps 20000

The reference is run, never copied: `<ogbench-dir>/impls/main.py` in a subprocess, with a Python that has its own
requirements (flax, distrax, ml_collections, wandb: `pip install -e ".[parity]"`, or a venv of impls/requirements.txt),
with HOME pointed at a work folder whose ~/.ogbench/data holds our generated dataset (so nothing is downloaded) and
wandb disabled (a launcher wraps wandb.init; main.py itself runs unchanged). Tested with wandb 0.17 (newer releases
reject the Settings main.py passes). Our script runs the same seeds packed, --seeds-per-run at a time (--num-seeds).
Runs that completed in an earlier call (a reference seed, a block of our seeds) are reused, so adding seeds later costs
only the new ones.

Matched: the data (both sides read the same two files, the generated training file and its -val file: our script
trains on the whole training file and validates on the -val file, as the reference does, with no split of its own),
steps, batch size, hidden widths, alpha, discount, expectile (GCIQL's 0.9),
evaluation episodes per task and seeds (as numbers: the two codes draw different random streams). Not matched, by
design: the reference draws one batch for value and actor, ours a value batch and a policy batch (the paper's
decoupling); the reference logs the TD target's mean as critic/q_mean, ours the critics' prediction.

Writes a JSON file and a Markdown table (--out, by default docs/parity/<env>.md): overall and per-task success (mean
and standard error over seeds, and each seed's) at the last step, value and critic statistics and losses at the logged
steps, updates/s and wall time of each side, and the reference's commit. With the default --out it then rewrites the
summary table of docs/parity.md (between its two markers) from every docs/parity/*.json; `--summary-only` does just
that, running nothing:

    python benchmarks/parity.py --summary-only
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs.py and algos/ live at the repository root

import envs  # noqa: E402
import numpy as np  # noqa: E402
import runs  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# main.py asks wandb for an online run; this launcher makes every wandb.init a disabled one (nothing leaves the
# machine), then runs main.py unchanged.
REFERENCE_LAUNCHER = ("import runpy, sys, wandb; init = wandb.init; "
                      "wandb.init = lambda **kwargs: init(**{**kwargs, 'mode': 'disabled'}); "
                      "sys.argv = ['main.py', *sys.argv[1:]]; runpy.run_path('main.py', run_name='__main__')")
REFERENCE_AGENT = {"iql": "gciql.py", "crl": "crl.py"}  # our value learner -> the reference's agent file
STATS = ("v_mean", "q_mean", "value_loss", "critic_loss", "critic_categorical_accuracy", "actor_loss")  # ours
# ... and the reference's columns for each (the first one its train.csv has): GCIQL's, then CRL's contrastive critic
REFERENCE_STATS = {"v_mean": ("training/value/v_mean",), "q_mean": ("training/critic/q_mean",),
                   "value_loss": ("training/value/value_loss",),
                   "critic_loss": ("training/critic/critic_loss", "training/critic/contrastive_loss"),
                   "critic_categorical_accuracy": ("training/critic/categorical_accuracy",),
                   "actor_loss": ("training/actor/actor_loss",)}
SUMMARY_STATS = {"v_mean": "V", "q_mean": "Q", "value_loss": "value loss", "critic_loss": "critic loss",
                 "critic_categorical_accuracy": "critic accuracy"}  # compared in the summary where both sides log it


@dataclasses.dataclass
class Args:
    ogbench_dir: str | None = None
    """A checkout of OGBench's repository (the folder holding impls/); never copied, only run. Required unless
    --summary-only."""
    reference_commit: str | None = None
    """The checkout's commit, recorded in the report; default: `git rev-parse HEAD` in --ogbench-dir."""
    summary_only: bool = False
    """Only rewrite docs/parity.md's summary table from docs/parity/*.json (no run, no --ogbench-dir)."""
    reference_python: str = sys.executable
    """The Python that runs the reference (it needs flax, distrax, ml_collections and wandb)."""
    env: str = "pointmaze-medium-navigate-v0"
    """Dataset, generated here with the official recipe (`envs.py generate`) if the work folder lacks it."""
    episodes: int = 100
    """Episodes of the generated dataset (plus 10% for the -val file)."""
    pairs: tuple[str, ...] = ("iql_ddpgbc", "iql_awr")
    """Our scripts to compare: iql_ddpgbc, iql_awr (reference GCIQL), crl_ddpgbc, crl_awr (reference CRL)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds, consecutive (ours trains them packed)."""
    seeds_per_run: int = 3
    """Our seeds packed into one process; blocks of this many are run folders of their own, reused once complete."""
    steps: int = 20_000
    """Gradient steps on each side."""
    log_interval: int = 5_000
    """Steps between the logged statistics compared."""
    batch_size: int = 256
    """Batch size on both sides (the reference's default is 1024)."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden widths of every network on both sides (the reference's default is 512 512 512)."""
    eval_episodes: int = 10
    """Evaluation episodes per task on both sides, at the last step."""
    eval_interval: int | None = None
    """Steps between evaluations on both sides (a success curve in the report); default: only at the last step. A
    reused run keeps the evaluations it made: the curve has the steps both sides evaluated."""
    alpha: float | None = None
    """The extractor's alpha on both sides; default: our per-dataset table (envs.HYPERPARAMETERS)."""
    work_dir: str = "parity"
    """Folder for the datasets, both sides' run folders and logs (one subfolder per --env)."""
    out: str | None = None
    """Markdown report (a .json with the same stem beside it); default docs/parity/<env>.md."""


def check(args: Args) -> None:
    runs.check([
        (args.ogbench_dir is not None and (Path(args.ogbench_dir).expanduser() / "impls" / "main.py").exists(),
         f"--ogbench-dir {args.ogbench_dir} has no impls/main.py; point it at a checkout of OGBench's repository"),
        (all(p in ("iql_ddpgbc", "iql_awr", "crl_ddpgbc", "crl_awr") for p in args.pairs),
         f"--pairs: {' '.join(args.pairs)}; choose among iql_ddpgbc iql_awr crl_ddpgbc crl_awr"),
        (len(args.seeds) >= 1 and list(args.seeds) == list(range(args.seeds[0], args.seeds[0] + len(args.seeds))),
         "--seeds must be consecutive (ours trains them packed)"),
        (args.steps >= 1 and args.steps % args.log_interval == 0, "--steps must be a multiple of --log-interval"),
        (args.seeds_per_run >= 1, "--seeds-per-run must be at least 1"),
    ])


def settings(args: Args, pair: str) -> dict:
    """The matched settings of one pair: alpha, discount and the actor goals' random share from our table (alpha
    unless --alpha is given); the reference gets the rest of its actor goals from the trajectory, as
    hyperparameters.sh does (0.5 / 0.5 on stitch)."""
    row = envs.hyperparameters(args.env)
    return {"alpha": row[f"alpha/{pair}"][0] if args.alpha is None else args.alpha, "discount": row["discount"][0],
            "actor_p_randomgoal": envs.table_entry(row, "actor_p_randomgoal", pair)[0]}


def run_ours(args: Args, pair: str, data_dir: Path, out: Path) -> dict:
    """Our script on --seeds, --seeds-per-run packed in one process per block; a complete block is reused."""
    s = settings(args, pair)
    records, seconds, speeds = [], 0.0, []
    for first in range(0, len(args.seeds), args.seeds_per_run):
        block = args.seeds[first:first + args.seeds_per_run]
        folder = out / f"s{block[0]}-{block[-1]}"
        command = [sys.executable, str(ROOT / "algos" / f"{pair}.py"), "--env", args.env, "--dataset-dir",
                   str(data_dir), "--steps", str(args.steps), "--log-interval", str(args.log_interval),
                   "--eval-interval", str(args.eval_interval or args.steps), "--hidden-dims",
                   *map(str, args.hidden_dims), "--batch-size", str(args.batch_size), "--eval-episodes",
                   str(args.eval_episodes), "--seed", str(block[0]),
                   "--num-seeds", str(len(block)), "--alpha", repr(s["alpha"]), "--discount", repr(s["discount"]),
                   "--out-dir", str(folder), "--no-progress"]
        log, wall = folder.with_suffix(".log"), folder.with_suffix(".wall.json")
        if not (folder / "result.json").exists():
            log.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            with open(log, "w") as f:
                code = subprocess.run(command + ["--resume"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
            if code:
                raise runs.UsageError(f"our {pair} failed (exit {code}); see {log}")
            runs.write_json_atomic(wall, time.time() - start)
        block_records = runs.read_metrics(folder / "metrics.jsonl")
        records += block_records
        seconds += json.loads(wall.read_text())  # the process's wall time, start-up and evaluation included
        speeds += [r["updates_per_second"] for r in block_records if r["event"] == "train" and r["member"] == 0][1:]
    final = [r for r in records if r["event"] == "eval" and r["step"] == args.steps]
    train = [r for r in records if r["event"] == "train"]
    every = args.eval_interval or args.steps
    evaluated = sorted({r["step"] for r in records if r["event"] == "eval" and r["step"] and r["step"] % every == 0})
    return {"wall_seconds": seconds,
            "success": [r["success"] for r in final],
            "success_by_step": {step: [r["success"] for r in records if r["event"] == "eval" and r["step"] == step]
                                for step in evaluated},
            "tasks": {k: [r[k] for r in final] for k in sorted(final[0]) if k.startswith("task")},
            "stats": {step: {k: float(np.mean([r[k] for r in train if r["step"] == step and k in r]))
                             for k in STATS if any(k in r for r in train)}
                      for step in sorted({r["step"] for r in train})},
            # steps/s of one program that trains a block of seeds at once (each step updates all of them)
            "updates_per_second": float(np.median(speeds or [math.nan]))}


def run_reference(args: Args, pair: str, home: Path, out: Path) -> dict:
    s = settings(args, pair)
    value, extractor = pair.split("_")
    impls = Path(args.ogbench_dir).expanduser().resolve() / "impls"
    widths = f"({', '.join(map(str, args.hidden_dims))},)"
    per_seed, seconds = [], 0.0
    for seed in args.seeds:
        save, wall = out / f"s{seed}", out / f"s{seed}.wall.json"
        command = [args.reference_python, "-c", REFERENCE_LAUNCHER, f"--env_name={args.env}", f"--seed={seed}",
                   f"--train_steps={args.steps}", f"--log_interval={args.log_interval}",
                   f"--eval_interval={args.eval_interval or args.steps}", f"--eval_episodes={args.eval_episodes}",
                   "--video_episodes=0",
                   f"--save_dir={save}", "--run_group=parity", f"--agent=agents/{REFERENCE_AGENT[value]}",
                   f"--agent.actor_loss={extractor}", f"--agent.alpha={s['alpha']}",
                   f"--agent.batch_size={args.batch_size}", f"--agent.discount={s['discount']}",
                   f"--agent.actor_p_randomgoal={s['actor_p_randomgoal']}",
                   f"--agent.actor_p_trajgoal={1 - s['actor_p_randomgoal']}",
                   f"--agent.actor_hidden_dims={widths}", f"--agent.value_hidden_dims={widths}"]
        environment = {**os.environ, "HOME": str(home), "WANDB_MODE": "disabled", "WANDB_ERROR_REPORTING": "false",
                       "WANDB_SILENT": "true", "MUJOCO_GL": "egl", "PYTHONPATH": str(impls)}
        log = out / f"s{seed}.log"
        if not wall.exists():  # a seed that completed in an earlier call is reused
            shutil.rmtree(save, ignore_errors=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            with open(log, "w") as f:
                code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=impls,
                                      env=environment).returncode
            if code:
                raise runs.UsageError(f"the reference {pair} failed (exit {code}); see {log}")
            runs.write_json_atomic(wall, time.time() - start)
        seconds += json.loads(wall.read_text())
        per_seed.append(tuple(read_csv(next(save.rglob(name))) for name in ("eval.csv", "train.csv")))
    final = [[row for row in evals if int(row["step"]) == args.steps][0] for evals, _ in per_seed]
    task_keys = sorted(k for k in final[0] if k.startswith("evaluation/task") and k.endswith("_success"))
    stats = {}
    for step in range(args.log_interval, args.steps + 1, args.log_interval):
        rows = [[row for row in train if int(row["step"]) == step][0] for _, train in per_seed]
        for ours, candidates in REFERENCE_STATS.items():
            theirs = next((c for c in candidates if rows[0].get(c, "") != ""), None)
            if theirs:
                stats.setdefault(step, {})[ours] = float(np.mean([float(r[theirs]) for r in rows]))
    epoch = [float(row["time/epoch_time"]) for _, train in per_seed for row in train[1:]]
    every = args.eval_interval or args.steps  # (main.py also evaluates at step 1)
    evaluated = sorted({int(row["step"]) for evals, _ in per_seed for row in evals if int(row["step"]) % every == 0})
    return {"wall_seconds": seconds,
            "success": [float(row["evaluation/overall_success"]) for row in final],
            "success_by_step": {step: [float(row["evaluation/overall_success"]) for evals, _ in per_seed
                                       for row in evals if int(row["step"]) == step] for step in evaluated},
            # evaluation/task1_horizontal_success -> task1_success, our name (OGBench adds the task's name)
            "tasks": {k.split("/")[1].split("_")[0] + "_success": [float(row[k]) for row in final] for k in task_keys},
            "stats": stats, "updates_per_second": 1.0 / float(np.median(epoch)) if epoch else math.nan}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (std with ddof=1 over sqrt(n); NaN for one value)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def mean_se(values: list[float]) -> str:
    mean, se = mean_and_se(values)
    return f"{mean:.3f} ± {se:.3f}"


def report(args: Args, results: dict, commit: str) -> str:
    lines = [f"# Parity with the reference implementation: {args.env}", "",
             f"Generated with `{' '.join(['python', 'benchmarks/parity.py', *sys.argv[1:]])}` on "
             f"{time.strftime('%Y-%m-%d')} (runs reused from earlier calls keep their own wall times); both sides on "
             "this machine's CPU. Wall times are as measured: they include whatever else shared the CPU then.", "",
             f"Reference: OGBench at {commit}.", "",
             f"Matched settings: {args.steps} steps, batch {args.batch_size}, hidden widths "
             f"{' x '.join(map(str, args.hidden_dims))}, {args.eval_episodes} evaluation episodes per task at the last "
             f"step{f' and every {args.eval_interval}' if args.eval_interval else ''}, seeds "
             f"{' '.join(map(str, args.seeds))}, dataset generated here ({args.episodes} episodes + 10% "
             "for -val); both sides train on the whole training file and validate on the -val file. Success is mean "
             "± standard error over seeds.",
             ""]
    for pair, sides in results.items():
        s = settings(args, pair)
        ours, ref = sides["ours"], sides["reference"]
        lines += [f"## {pair} (alpha {s['alpha']:g}, discount {s['discount']:g})", "",
                  "| | reference | ours |", "| --- | --- | --- |",
                  f"| overall success | {mean_se(ref['success'])} | {mean_se(ours['success'])} |",
                  f"| success per seed | {' '.join(f'{x:.2f}' for x in ref['success'])} | "
                  f"{' '.join(f'{x:.2f}' for x in ours['success'])} |"]
        for task in sorted(set(ref["tasks"]) | set(ours["tasks"])):
            lines.append(f"| {task} | {mean_se(ref['tasks'][task]) if task in ref['tasks'] else '-'} | "
                         f"{mean_se(ours['tasks'][task]) if task in ours['tasks'] else '-'} |")
        packed = min(args.seeds_per_run, len(args.seeds))
        curve = sorted(set(ref.get("success_by_step", {})) & set(ours.get("success_by_step", {})))
        lines += [f"| success at step {step} | {mean_se(ref['success_by_step'][step])} | "
                  f"{mean_se(ours['success_by_step'][step])} |" for step in curve if step != args.steps]
        lines += [f"| steps/s (reference: one seed; ours: {packed} seeds in one program) | "
                  f"{ref['updates_per_second']:.0f} | {ours['updates_per_second']:.0f} |",
                  f"| wall time, all seeds (s) | {ref['wall_seconds']:.0f} | {ours['wall_seconds']:.0f} |", "",
                  "| step | statistic | reference | ours |", "| --- | --- | --- | --- |"]
        for step in sorted(ours["stats"]):
            for k in STATS:
                r, o = ref["stats"].get(step, {}).get(k), ours["stats"][step].get(k)
                if r is not None or o is not None:
                    fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
                    lines.append(f"| {step} | {k} | {fmt(r)} | {fmt(o)} |")
        lines.append("")
    return "\n".join(lines)


def reference_commit(args: Args) -> str:
    if args.reference_commit:
        return args.reference_commit
    found = subprocess.run(["git", "-C", str(Path(args.ogbench_dir).expanduser()), "rev-parse", "HEAD"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown (not a git checkout; see --reference-commit)"


SUMMARY_PAGE = ROOT / "docs" / "parity.md"
SUMMARY_BEGIN = "<!-- the summary table: written by `python benchmarks/parity.py --summary-only`, do not edit -->"
SUMMARY_END = "<!-- end of the summary table -->"


def summary_table(reports: list[Path]) -> str:
    """One row per dataset x pair of the given parity JSON files: seeds, success of each side (mean ± standard error
    over seeds), their difference in combined standard errors, the value statistics at the last logged step, wall
    time and steps/s of each side."""
    lines = ["| dataset | pair | steps | seeds | reference | ours | ours - reference (combined s.e.) | value "
             "statistics at the end: reference / ours | wall time, all seeds (s): reference / ours | steps/s: "
             "reference (one seed) / ours (seeds packed) | reference commit |",
             "| --- " * 11 + "|"]
    for path in reports:
        report = json.loads(path.read_text())
        args = report["args"]
        for pair, sides in report["results"].items():
            ref, ours = sides["reference"], sides["ours"]
            (rm, rse), (om, ose) = mean_and_se(ref["success"]), mean_and_se(ours["success"])
            combined = math.hypot(rse, ose)
            apart = f"{om - rm:+.3f} ({abs(om - rm) / combined:.1f})" if combined > 0 else f"{om - rm:+.3f} (-)"
            last = str(max(int(step) for step in ours["stats"]))
            theirs, mine = ref["stats"].get(last, {}), ours["stats"][last]
            stats = ", ".join(f"{label} {theirs[k]:.4g} / {mine[k]:.4g}" for k, label in SUMMARY_STATS.items()
                              if k in theirs and k in mine)
            lines.append(f"| [{args['env']}](parity/{path.stem}.md) | {pair} | {args['steps']} | "
                         f"{len(ours['success'])} | "
                         f"{rm:.3f} ± {rse:.3f} | {om:.3f} ± {ose:.3f} | {apart} | {stats} | "
                         f"{ref['wall_seconds']:.0f} / {ours['wall_seconds']:.0f} | "
                         f"{ref['updates_per_second']:.0f} / {ours['updates_per_second']:.0f} | "
                         f"{report.get('reference_commit', 'not recorded')[:7]} |")
    return "\n".join(lines)


def write_summary(page: Path = SUMMARY_PAGE) -> str:
    """Rewrite the table between docs/parity.md's markers from every docs/parity/*.json; returns the table."""
    text = page.read_text()
    if SUMMARY_BEGIN not in text or SUMMARY_END not in text:
        raise runs.UsageError(f"{page} lacks the summary table's markers; put these two lines where it goes:\n"
                              f"{SUMMARY_BEGIN}\n{SUMMARY_END}")
    table = summary_table(sorted(page.with_suffix("").glob("*.json")))
    head, rest = text.split(SUMMARY_BEGIN)
    runs.write_atomic(page, lambda f: f.write(head + SUMMARY_BEGIN + "\n" + table + "\n" + SUMMARY_END
                                              + rest.split(SUMMARY_END, 1)[1]))
    return table


def main(args: Args) -> dict:
    if args.summary_only:
        print(write_summary())
        return {}
    check(args)
    work = Path(args.work_dir).resolve() / args.env
    home = work / "home"
    data_dir = home / ".ogbench" / "data"  # where the reference's ogbench looks, with HOME=home
    spec = envs.parse_env(args.env)
    if not envs.dataset_path(spec, str(data_dir)).exists():
        envs.generate(spec, str(data_dir), num_episodes=args.episodes)
    reference_home, reference_runs = home, work / "reference"  # the very files our script reads
    results = {}
    for pair in args.pairs:
        # a run is reused only by a call with the same length (other settings are the command's, kept alike)
        length = f"{args.steps}-steps"
        print(f"{pair}: reference ...", flush=True)
        reference = run_reference(args, pair, reference_home, reference_runs / pair / length)
        print(f"{pair}: ours ...", flush=True)
        # (work/ours/ holds runs of the former protocol, trained on a 90% split of the file: never reused)
        ours = run_ours(args, pair, data_dir, work / "ours-official-split" / pair / length)
        results[pair] = {"ours": ours, "reference": reference}
    commit = reference_commit(args)
    text = report(args, results, commit)
    out = Path(args.out or ROOT / "docs" / "parity" / f"{args.env}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(out, lambda f: f.write(text + "\n"))
    runs.write_json_atomic(out.with_suffix(".json"), {"args": dataclasses.asdict(args), "reference_commit": commit,
                                                      "results": results})
    print(text)
    if args.out is None:
        write_summary()
    return results


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Args)))
