"""Soak: a small sweep killed with SIGKILL at random moments, again and again, then finished; nothing may be lost or
altered.

    python benchmarks/soak.py --kills 50

1. generates a small pointmaze dataset in the work folder (offline, once);
2. runs the sweep once without interruption (the reference) and times it;
3. runs the same sweep into a fresh folder and SIGKILLs its launcher (its runs die with it) after a delay drawn
   uniformly from [--min-delay, the reference's wall time], relaunching the same command each time, until the sweep
   completes; then compares that round with the reference and starts another round, until --kills kills were made;
4. a round's result: every run's result.json (wall_seconds aside) and metrics.jsonl records (timings and the resume
   records aside) against the reference's. "Lost": a run without result.json once its round completed; "altered":
   a run whose result.json or records differ.

Prints a summary and writes JSON (--out): kills, rounds, launches, results lost and altered (both must be 0), the
reference's wall time and the soaked rounds', and the extra wall time the kills cost (soaked minus reference, per
round on average). Exit status 1 if anything was lost or altered or a launch failed on its own.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs.py and algos/ live at the repository root

import envs  # noqa: E402
import runs  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = "pointmaze-medium-navigate-v0"
TIMING = {"seconds", "updates_per_second"}  # the only numbers allowed to differ between two runs


@dataclasses.dataclass
class Args:
    kills: int = 50
    """SIGKILLs to make in all (a round that completes starts another)."""
    seed: int = 0
    """Seed of the kill delays."""
    steps: int = 400
    """Steps of each run of the sweep (2 runs packed in one process, a resume state every 50 steps)."""
    min_delay: float = 0.5
    """Shortest delay between a launch and its kill, in seconds."""
    work_dir: str = "soak"
    """Folder for the dataset, the reference sweep and the soaked rounds (each round replaces the last)."""
    out: str | None = None
    """JSON summary; default <work-dir>/soak.json."""


def sweep_command(data_dir: Path, sweep_dir: Path, steps: int) -> list[str]:
    """A 2-cell sweep (value sizes 2000 and 4000) packed in one process, small networks, a resume state every 50
    steps: everything the kills can interrupt (start-up, training, resume states, evaluation, result files)."""
    return [sys.executable, str(ROOT / "scaling.py"), "--envs", ENV, "--scripts", "iql_ddpgbc", "--value-sizes",
            "2000", "4000", "--policy-sizes", "4000", "--pack", "2", "--steps", str(steps), "--dataset-dir",
            str(data_dir), "--sweep-dir", str(sweep_dir), "--no-progress", "--", "--log-interval", "50",
            "--eval-interval", str(steps), "--resume-interval", "50", "--hidden-dims", "16", "--batch-size", "32",
            "--eval-episodes", "1", "--mse-samples", "64"]


def comparable(folder: Path) -> tuple[dict, list[dict]] | None:
    """A run folder's numbers without its timings (None if it has no result.json)."""
    if not (folder / "result.json").exists():
        return None
    result = json.loads((folder / "result.json").read_text())
    result.pop("wall_seconds", None)
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in runs.read_metrics(folder / "metrics.jsonl")
               if r.get("event") != "resume"]
    return result, records


def run_folders(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in (sweep_dir / ENV).rglob("config.json"))


def main(args: Args) -> dict:
    runs.check([(args.kills >= 0, "--kills must be >= 0"), (args.steps >= 50 and args.steps % 50 == 0,
                                                           "--steps must be a positive multiple of 50"),
                (args.min_delay >= 0, "--min-delay must be >= 0")])
    work = Path(args.work_dir).resolve()
    data_dir = work / "data"
    if not envs.dataset_path(envs.parse_env(ENV), str(data_dir)).exists():
        envs.generate(envs.parse_env(ENV), str(data_dir), num_episodes=30, max_episode_steps=200, seed=0,
                      progress=False)
    reference_dir, soaked_dir = work / "reference", work / "soaked"
    shutil.rmtree(reference_dir, ignore_errors=True)
    start = time.time()
    done = subprocess.run(sweep_command(data_dir, reference_dir, args.steps), cwd=ROOT, capture_output=True, text=True)
    reference_seconds = time.time() - start
    if done.returncode:
        raise runs.UsageError(f"the reference sweep failed (exit {done.returncode}): {done.stderr[-500:]}")
    reference = {p.name: comparable(p) for p in run_folders(reference_dir)}

    rng = random.Random(args.seed)
    kills = rounds = launches = lost = altered = failed_launches = 0
    round_seconds: list[float] = []
    log = work / "launches.log"
    log.write_text("")
    while kills < args.kills:
        shutil.rmtree(soaked_dir, ignore_errors=True)
        rounds += 1
        round_start = time.time()
        while True:  # relaunch the same command until the round's sweep completes
            launches += 1
            with open(log, "a") as f:
                child = subprocess.Popen(sweep_command(data_dir, soaked_dir, args.steps), cwd=ROOT, stdout=f,
                                         stderr=subprocess.STDOUT)
            delay = rng.uniform(args.min_delay, max(args.min_delay, reference_seconds))
            try:
                code = child.wait(timeout=delay) if kills < args.kills else child.wait()
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()
                kills += 1
                print(f"kill {kills}/{args.kills} after {delay:.1f} s (round {rounds})", flush=True)
                continue
            if code == 0:
                break
            failed_launches += 1  # a launch that failed on its own: a bug the kills left behind
            print(f"launch {launches} failed on its own (exit {code}); see {log}", flush=True)
            if failed_launches > 3:
                raise runs.UsageError(f"the soaked sweep keeps failing; see {log}")
        round_seconds.append(time.time() - round_start)
        soaked = {p.name: comparable(p) for p in run_folders(soaked_dir)}
        round_lost = sum(soaked.get(name) is None for name in reference)
        round_altered = sum(soaked.get(name) is not None and soaked[name] != numbers
                            for name, numbers in reference.items())
        lost, altered = lost + round_lost, altered + round_altered
        print(f"round {rounds}: {len(reference) - round_lost - round_altered}/{len(reference)} runs identical to "
              f"the reference, lost {round_lost}, altered {round_altered}, {round_seconds[-1]:.0f} s", flush=True)
    mean_round = sum(round_seconds) / len(round_seconds) if round_seconds else 0.0
    summary = {"kills": kills, "rounds": rounds, "launches": launches, "runs_per_round": len(reference),
               "results_lost": lost, "results_altered": altered, "launches_failed": failed_launches,
               "reference_seconds": reference_seconds, "soaked_seconds_per_round": mean_round,
               "extra_seconds_per_round": mean_round - reference_seconds, "args": dataclasses.asdict(args)}
    runs.write_json_atomic(Path(args.out) if args.out else work / "soak.json", summary)
    print(f"{kills} kills over {rounds} round(s), {launches} launches: results lost {lost}, altered {altered}, "
          f"launches that failed on their own {failed_launches}; reference sweep {reference_seconds:.0f} s, a "
          f"soaked round {mean_round:.0f} s on average (+{mean_round - reference_seconds:.0f} s of repeated work)")
    return summary


if __name__ == "__main__":
    summary = {}
    runs.exit_on_usage_error(lambda: summary.update(main(tyro.cli(Args))))
    sys.exit(1 if summary["results_lost"] or summary["results_altered"] or summary["launches_failed"] else 0)
