"""analyze.py's interval estimates against the rliable package on the same scores (a check, not a dependency).

    pip install rliable "pandas<3"     # rliable 1.2.0's arch 7.x does not import with pandas 3
    python benchmarks/rliable_check.py

Scores: 5 seeds x 5 tasks for X and for Y (seeded, clipped normal). Prints rliable's mean, IQM and probability of
improvement with their 95% stratified bootstrap intervals (20,000 draws), then analyze.py's with its plain bootstrap
(spread=False: rliable's definition; point estimates must agree exactly, interval ends to bootstrap noise) and with
the spread it uses by default (wider at 5 seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # analyze.py lives at the repository root

import analyze  # noqa: E402

REPS = 20_000


def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (np.clip(0.4 + 0.15 * rng.standard_normal((5, 5)), 0, 1),
            np.clip(0.3 + 0.15 * rng.standard_normal((5, 5)), 0, 1))


def show(name: str, numbers: dict) -> None:
    parts = [f"{k} {numbers[k]:.4f} [{numbers[k + '_ci'][0]:.4f}, {numbers[k + '_ci'][1]:.4f}]"
             for k in ("mean", "iqm", "poi")]
    print(f"{name:22s} " + " | ".join(parts))


def main() -> None:
    x, y = scores()
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as error:
        sys.exit(f"rliable is not installed here ({error}); pip install rliable \"pandas<3\"")
    point, ci = rly.get_interval_estimates(
        {"x": x}, lambda s: np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)]), reps=REPS)
    poi, poi_ci = rly.get_interval_estimates(
        {"x,y": (x, y)}, lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps=REPS)
    show("rliable", {"mean": point["x"][0], "mean_ci": ci["x"][:, 0], "iqm": point["x"][1], "iqm_ci": ci["x"][:, 1],
                     "poi": poi["x,y"][0], "poi_ci": poi_ci["x,y"][:, 0]})
    for name, spread in (("analyze.py, plain", False), ("analyze.py (default)", True)):
        boot = analyze.Bootstrap(reps=REPS, spread=spread)
        tasks_x, tasks_y = [x[:, t] for t in range(5)], [y[:, t] for t in range(5)]
        show(name, {**analyze.estimate(tasks_x, boot), **analyze.probability_of_improvement(tasks_x, tasks_y, boot)})


if __name__ == "__main__":
    main()
