"""How often analyze.py's 95% intervals cover the truth, on synthetic experiments with known answers.

    python benchmarks/coverage.py --experiments 400 --seeds 3 4 5

Per experiment and seed count n: a cell mean over 5 evaluation tasks (strata) with n seeds each (true mean 0.5), the
policy-axis change of a 2 x 2 matrix with n seeds a cell (true change 0.25), and the probability of improvement of two
runs of the same distribution over 3 cells (true 0.5); normal seed noise, sd 0.1. Prints the fraction of experiments
whose interval covers the truth, with analyze.py's intervals (spread about the mean, OURS) and with rliable's plain
percentile bootstrap, and the rate at which the value axis (no true change) is called significant.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # analyze.py lives at the repository root

import analyze  # noqa: E402


@dataclasses.dataclass
class Args:
    experiments: int = 400
    """Synthetic experiments per seed count."""
    seeds: tuple[int, ...] = (3, 4, 5)
    """Seeds per cell / stratum."""
    reps: int = 500
    """Bootstrap draws per interval."""


def coverage(n: int, boot: analyze.Bootstrap, experiments: int) -> dict[str, float]:
    rng = np.random.default_rng(n)  # the same experiments for both kinds of interval
    hits = {"mean": 0, "change": 0, "poi": 0, "false_axis": 0}
    for _ in range(experiments):
        tasks = [0.3 + 0.1 * t + 0.1 * rng.standard_normal(n) for t in range(5)]
        low, high = analyze.estimate(tasks, boot)["mean_ci"]
        hits["mean"] += low <= 0.5 <= high
        seeds = [[{s: 0.2 + 0.25 * j + 0.1 * rng.standard_normal() for s in range(n)} for j in range(2)]
                 for _ in range(2)]
        m = analyze.Matrix("synthetic", "iql_ddpgbc", "success", [1, 2], [1, 2], np.zeros((2, 2)), np.zeros((2, 2)),
                           np.full((2, 2), n), [[None] * 2] * 2, seeds, False, [[{}] * 2] * 2)
        low, high = analyze.axis_change(m, "policy", boot)["ci"]
        hits["change"] += low <= 0.25 <= high
        low, high = analyze.axis_change(m, "value", boot)["ci"]
        hits["false_axis"] += not low <= 0 <= high
        x, y = [0.1 * rng.standard_normal(n) for _ in range(3)], [0.1 * rng.standard_normal(n) for _ in range(3)]
        low, high = analyze.probability_of_improvement(x, y, boot)["poi_ci"]
        hits["poi"] += low <= 0.5 <= high
    return {k: v / experiments for k, v in hits.items()}


def main(args: Args) -> None:
    print("seeds  intervals            mean   change  P(X>Y)  value axis called (truth: no change)")
    for n in args.seeds:
        for name, spread in (("analyze.py (spread)", True), ("plain percentile", False)):
            c = coverage(n, analyze.Bootstrap(reps=args.reps, spread=spread), args.experiments)
            print(f"{n:5d}  {name:19s}  {c['mean']:.3f}  {c['change']:.3f}   {c['poi']:.3f}   {c['false_axis']:.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
