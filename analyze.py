"""analyze.py: a sweep's run folders -> data-scaling matrices, the aggregated table, bottleneck verdicts, MSE plots,
offline-to-online curves.

    python analyze.py sweeps/quickstart                       # everything, into sweeps/quickstart/analysis/
    python analyze.py sweeps/matrix --only table verdicts     # just the numbers
    python analyze.py sweeps/online --only online             # offline-to-online curves (runs with --online-steps)
    python analyze.py runs/pointmaze-medium-navigate-v0/iql_ddpgbc/20261124-101010_s0    # one run folder

Input. Every run folder below SWEEP_DIR (a folder holding config.json or result.json, at any depth; SWEEP_DIR may be
one itself). A folder with result.json is complete; one without it is incomplete: counted, listed with the last step
in its metrics.jsonl, and never part of a number. Runs that SWEEP_DIR/sweep.json (scaling.py) marks "failed" or
"diverged", and folders with failure.json but no result.json, are listed with their exit status and message and left
out as well.

Numbers, from the per-member (per-seed) values in result.json:
  - cell = (env, script, value data size, policy data size, alpha). Folders of the same cell (v.._p.._s0 and
    v.._p.._s1, or one folder with several members) are pooled seed by seed; a seed found twice in a cell is averaged
    into one value. A cell's mean and std are over its seeds (std with ddof=0, as in result.json).
  - performance (--metric): auto = the success rate for OGBench environments, the return for dm_control ones.
  - matrix (per env x script): at each (value size, policy size) the cell of the best alpha, the best alpha chosen
    by the MEAN over seeds (never by the single best seed); ties go to the smaller alpha; missing cells are NaN.
  - matrix average (table): the mean of the matrix's cell means; its spread is the std over seeds of the per-seed
    matrix average, seeds paired by seed id across cells (only seeds present in every cell count). "final" is the
    performance metric at the last evaluation, "best" the best success during training (OGBench only); each picks
    its own best alpha per cell. bc (policy size only) is averaged over its policy sizes, a baseline column.
  - verdict (per env x script; `verdict`): change along the policy axis = mean over value rows of
    perf[v, largest p] - perf[v, smallest p]; along the value axis = mean over policy columns of
    perf[largest v, p] - perf[smallest v, p]. Noise = the standard error of the difference of two cell means,
    sqrt(2 s^2 / n): s^2 the within-cell variance over seeds (ddof=1) pooled over the matrix's cells, n the median
    number of seeds per cell. An axis matters when |change| > --threshold x noise (skipped when no cell has 2 seeds)
    and |change| > --min-change (success rates: absolute; returns: times the matrix's largest |cell|). Verdict:
    neither matters -> flat; one -> policy-bounded / value-bounded; both -> the one whose |change| is at least
    --dominance times the other's, else both. An axis with fewer than 2 sizes is n/a.
  - generalization: per script, the cell with the largest value and policy sizes (the all-data cell when the sweep
    has it; if that cell is missing, the one with the largest policy size, then value size) at the alpha chosen for
    performance; train / validation / evaluation MSE to the oracle, mean over seeds with std error bars.
  - test time: result.json's "test_time" lists the test-time methods a run evaluated ([], ["opex"], ["ttt"],
    ["opex", "ttt"]; absent = []) and, per method m, m_success, m_return and, where an oracle exists, m_eval_mse,
    measured on the same episodes as the run's plain success / return / eval_mse. Per env x script with such runs:
    plain performance (success, or return on dm_control; best_success has no test-time counterpart, so --metric
    best_success uses success) and evaluation MSE of exactly those runs next to each method's (m_success /
    m_return, m_eval_mse), at the alpha chosen by plain performance per (value size, policy size), averaged over
    those cells as in the table, seeds paired by id. A script whose runs evaluated one method shows plain and that
    one. The matrices, table and verdicts use the plain numbers of every run.
  - offline-to-online (`online`): runs whose result.json has "online_steps" > 0 (the scripts' --online-steps: after
    "steps" offline updates, that many more, each chunk collecting environment steps with the current policy and
    training on offline + online data; 0 or absent = offline only, left out here). From metrics.jsonl's "eval"
    records at step >= steps (a cut-off last line skipped; a later record of the same seed and step replaces an
    earlier one): online step = step - steps (0 = the end of offline training; one update per environment step, so
    it counts online environment steps) -> train / validation / evaluation MSE (where the env has an oracle) and
    performance (success, or return on dm_control; --metric best_success uses success). Per cell, pooled seed by
    seed as above; at each online step that every seed of the cell has, mean and std (ddof=0) over seeds. The
    change from online step 0 to the last is the paper's check that online data mainly lowers evaluation MSE. The
    matrices, table and verdicts use result.json's final numbers of every run (for an online run: after online
    fine-tuning).

Artefacts in --out (default SWEEP_DIR/analysis), each written through a temporary file and a rename:
  matrices_<env>.png/.pdf        one panel per value x extractor script (rows value learner, columns extractor)
  table.md, table.csv, table.tex matrix-averaged performance per env x value learner x extractor, bc as baseline
  verdicts.md, verdicts.csv      the verdict per matrix and the numbers behind it (also printed)
  generalization_<env>.png/.pdf  train / validation / evaluation MSE per script
  testtime_<env>.png/.pdf        per script, plain vs OPEX vs TTT performance (top) and evaluation MSE (bottom,
                                 where the runs measured it), the same runs and episodes
  online_<env>.png/.pdf          offline-to-online curves: train / validation / evaluation MSE (where measured) and
                                 performance against online environment steps, a line per cell (mean ± std band)
  online.md                      per env x cell each quantity at online step 0 -> the last online step, and the change
                                 (also printed)
  summary.json                   counts (complete, incomplete, failed, diverged), the lists, every cell's aggregates
                                 (env, script, sizes, alpha, mean, std, seeds), the matrices, table, verdicts, and
                                 the test-time numbers under result.json's keys (success, opex_success, ...), and
                                 the offline-to-online curves ("online": per env, per cell, its points)

Exit status 0; 2 with one line naming the problem and the fix for bad input (a missing or empty SWEEP_DIR, no
complete run, a damaged result.json or sweep.json, bad flags).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

import envs
from runs import (EXTRACTORS, RESULT_METRICS, TEST_TIME_METHODS, VALUE_LEARNERS, UsageError, exit_on_usage_error,
                  read_metrics, write_atomic, write_json_atomic)

TABLE_COLUMNS = (*EXTRACTORS, "bc")
METRICS = (*RESULT_METRICS, "best_success")  # per member in result.json
TEST_TIME_REQUIRED = ("success", "return")  # result.json has <method>_<key> for each method in "test_time"
TEST_TIME_OPTIONAL = ("eval_mse",)  # ... and this one where the env has an oracle
TEST_TIME_KEYS = tuple(f"{m}_{k}" for m in TEST_TIME_METHODS for k in (*TEST_TIME_REQUIRED, *TEST_TIME_OPTIONAL))
HEADER_KEYS = ("env", "script", "seeds", "value_data_size", "policy_data_size", "alpha")
ARTEFACTS = ("matrices", "table", "verdicts", "generalization", "testtime", "online")
ONLINE_MSES = ("train_mse", "val_mse", "eval_mse")  # drawn against online steps where the eval records have them
METRIC_LABELS = {"success": "success rate", "return": "return", "best_success": "best success rate during training"}
MSE_LABELS = {"train_mse": "train MSE", "val_mse": "validation MSE", "eval_mse": "evaluation MSE"}
NAMES = {"iql": "IQL", "sarsa": "SARSA", "crl": "CRL", "awr": "AWR", "ddpgbc": "DDPG+BC", "sfbc": "SfBC", "bc": "BC",
         "opex": "OPEX", "ttt": "TTT"}
DPI = 100  # every figure: its PNG is exactly figsize x DPI pixels (no tight bounding box)
PANEL_SIZE = (3.4, 3.0)  # inches per matrix panel
ONLINE_PANEL_SIZE = (3.8, 3.0)  # inches per offline-to-online panel
LIST_LIMIT = 10  # incomplete / failed runs printed; summary.json lists all


@dataclasses.dataclass
class Args:
    """Read a sweep's run folders and write data-scaling matrices, the aggregated table, bottleneck verdicts,
    generalization (MSE) and test-time (plain vs OPEX vs TTT performance and evaluation MSE) bar plots,
    offline-to-online curves (MSEs and performance against online environment steps), and summary.json (see the
    module docstring for every rule)."""

    sweep_dir: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="SWEEP_DIR")]]
    """A scaling.py --sweep-dir, any folder of run folders, or a single run folder."""
    out: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None
    """Folder for the artefacts (created); default SWEEP_DIR/analysis."""
    metric: Literal["auto", "success", "return", "best_success"] = "auto"
    """Performance: auto = success rate on OGBench, return on dm_control; best_success = best during training."""
    only: tuple[Literal["matrices", "table", "verdicts", "generalization", "testtime", "online"], ...] = ARTEFACTS
    """Artefacts to make (summary.json is always written), e.g. --only table verdicts."""
    format: tuple[Literal["png", "pdf"], ...] = ("png", "pdf")
    """Figure file formats."""
    threshold: float = 2.0
    """Verdict: an axis matters when its change exceeds this many standard errors of a cell-mean difference."""
    min_change: float = 0.02
    """Verdict: ... and exceeds this (success rate: absolute; return: this fraction of the matrix's largest |cell|)."""
    dominance: float = 2.0
    """Verdict: when both axes matter, an axis whose change is this many times the other's decides alone."""


# ----------------------------------------------------------------------------------------------------------------
# Loading run folders
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One complete run folder: its setting and, per metric, one number per member (NaN where there is none)."""

    folder: Path
    env: str
    script: str
    value_size: int | None  # None: bc (no value function)
    policy_size: int | None
    alpha: float | None  # None: SfBC, BC
    seeds: list[int]
    values: dict[str, list[float]]
    test_time: tuple[str, ...] = ()  # the test-time methods the run evaluated, in TEST_TIME_METHODS order
    steps: int | None = None  # offline steps
    online_steps: int = 0  # online steps after them (0: offline only)


@dataclasses.dataclass
class Sweep:
    """What SWEEP_DIR holds: complete runs, and the folders / runs left out with the reason."""

    root: Path
    runs: list[Run]
    incomplete: list[dict]  # folder, last_step, steps
    failed: list[dict]  # folder, exit_status, attempts, message
    diverged: list[dict]

    def counts(self) -> dict[str, int]:
        return {"complete": len(self.runs), "incomplete": len(self.incomplete), "failed": len(self.failed),
                "diverged": len(self.diverged)}


def _number(value) -> float:
    """A per-member entry as a float; "n/a", null and anything else not a number become NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def parse_test_time(value, path: Path, fix: str) -> tuple[str, ...]:
    """result.json's "test_time" as the methods the run evaluated, in TEST_TIME_METHODS order: a list of them;
    absent, null or "none" = none; a single method name = that one."""
    methods = [] if value is None or value == "none" else [value] if isinstance(value, str) else value
    if not isinstance(methods, list) or not all(isinstance(m, str) and m in TEST_TIME_METHODS for m in methods):
        raise UsageError(f"{path}: key 'test_time' is {value!r}, expected a list of test-time methods "
                              f"({', '.join(TEST_TIME_METHODS)}), e.g. [] or [\"opex\", \"ttt\"]; {fix}")
    return tuple(m for m in TEST_TIME_METHODS if m in methods)


def read_result(path: Path) -> Run:
    """Parse and check one result.json (UsageError naming the file and the key on a damaged or foreign file)."""
    fix = "rerun that run (delete its folder; scaling.py reruns folders without result.json)"
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); {fix}") from error
    if not isinstance(result, dict):
        raise UsageError(f"{path} does not hold a JSON object; {fix}")
    test_time = parse_test_time(result.get("test_time"), path, fix)
    metrics = METRICS + tuple(f"{m}_{k}" for m in test_time for k in TEST_TIME_REQUIRED)
    for key in HEADER_KEYS + metrics:
        if key not in result:
            raise UsageError(f"{path} lacks key '{key}'; {fix}")
    seeds = result["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UsageError(f"{path}: key 'seeds' must be a non-empty list of integers; {fix}")
    for key in ("value_data_size", "policy_data_size", "alpha"):
        if result[key] is not None and _number(result[key]) != _number(result[key]):  # NaN: not a number
            raise UsageError(f"{path}: key '{key}' must be a number or null, got {result[key]!r}; {fix}")
    values = {}
    optional = [key for m in test_time for key in (f"{m}_{k}" for k in TEST_TIME_OPTIONAL) if key in result]
    for key in (*metrics, *optional):
        entry = result[key]
        if not isinstance(entry, dict) or not isinstance(entry.get("per_member"), list) \
                or len(entry["per_member"]) != len(seeds):
            raise UsageError(f"{path}: key '{key}' must be {{per_member, mean, std}} with one value per seed "
                                  f"({len(seeds)}); {fix}")
        values[key] = [_number(v) for v in entry["per_member"]]
    online_steps = result.get("online_steps") or 0
    if not isinstance(online_steps, int) or isinstance(online_steps, bool) or online_steps < 0:
        raise UsageError(f"{path}: key 'online_steps' must be an integer >= 0 or null, got "
                              f"{result['online_steps']!r}; {fix}")
    if online_steps and (not isinstance(result.get("steps"), int) or isinstance(result["steps"], bool)):
        raise UsageError(f"{path}: an online run (online_steps {online_steps}) needs key 'steps' (its offline "
                              f"steps, an integer); {fix}")
    size = lambda v: None if v is None else int(v)  # noqa: E731
    return Run(folder=Path(path).parent, env=str(result["env"]), script=str(result["script"]),
               value_size=size(result["value_data_size"]), policy_size=size(result["policy_data_size"]),
               alpha=None if result["alpha"] is None else float(result["alpha"]), seeds=list(seeds), values=values,
               test_time=test_time, steps=result.get("steps"), online_steps=online_steps)


def find_run_folders(root: Path) -> list[Path]:
    """Every folder at or below `root` holding config.json or result.json."""
    return sorted({p.parent for name in ("config.json", "result.json") for p in Path(root).rglob(name)})


def read_sweep_json(root: Path) -> dict[Path, dict]:
    """Runs that root/sweep.json marks failed or diverged, keyed by their resolved folder below `root`."""
    path = Path(root) / "sweep.json"
    if not path.exists():
        return {}
    fix = "rerun the scaling.py command to rewrite it, or move it out of the way"
    try:
        sweep = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); {fix}") from error
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
        raise UsageError(f"{path} lacks key 'runs' (a list); {fix}")
    base = Path(str((sweep.get("settings") or {}).get("sweep_dir", "")))
    marked = {}
    for entry in sweep["runs"]:
        if not isinstance(entry, dict) or entry.get("status") not in ("failed", "diverged"):
            continue
        if "folder" not in entry:
            raise UsageError(f"{path}: a {entry['status']} run lacks key 'folder'; {fix}")
        folder = Path(entry["folder"])
        # sweep.json names folders as <sweep-dir as typed>/<env>/<script>/<run>; the sweep may have moved since
        inside = folder.parts[:len(base.parts)] == base.parts and base.parts
        relative = Path(*folder.parts[len(base.parts):]) if inside else Path(*folder.parts[-3:])
        marked[(Path(root) / relative).resolve()] = entry
    return marked


def _failure(folder: Path, entry: dict) -> dict:
    """A failed / diverged run as listed: folder, exit status, attempts and a one-line message."""
    if entry.get("status") == "diverged" or "non_finite" in entry:
        step, bad = entry.get("diverged_at_step", entry.get("step")), entry.get("non_finite") or []
        message = f"non-finite {', '.join(bad) or '?'} at step {step}"
    else:
        tail = [line for line in str(entry.get("stderr_tail") or "").splitlines() if line.strip()]
        message = tail[-1].strip() if tail else ""
    return {"folder": str(folder), "exit_status": entry.get("exit_status"), "attempts": entry.get("attempts"),
            "message": message}


def _progress(folder: Path) -> dict:
    """An incomplete folder: the last step in its metrics.jsonl (a cut-off last line is skipped) and its --steps."""
    steps = None
    try:
        steps = json.loads((folder / "config.json").read_text())["config"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    logged = [r["step"] for r in read_metrics(folder / "metrics.jsonl") if isinstance(r, dict) and "step" in r]
    return {"folder": str(folder), "last_step": max(logged) if logged else None, "steps": steps}


def load_sweep(root: Path) -> Sweep:
    """Read every run folder below `root`; UsageError when there is nothing complete to analyse."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"SWEEP_DIR {root} does not exist; give a scaling.py --sweep-dir, a folder of run "
                              "folders, or one run folder")
    if not root.is_dir():
        raise UsageError(f"SWEEP_DIR {root} is not a folder; give the folder that holds the run folders")
    marked = read_sweep_json(root)
    folders = find_run_folders(root)
    if not folders and not marked:
        raise UsageError(f"{root} holds no run folders (no config.json or result.json below it); give a "
                              "scaling.py --sweep-dir or a run folder")
    sweep = Sweep(root, [], [], [], [])
    for folder in folders:
        entry = marked.pop(folder.resolve(), None)
        if entry is not None:
            (sweep.failed if entry["status"] == "failed" else sweep.diverged).append(_failure(folder, entry))
        elif (folder / "result.json").exists():
            sweep.runs.append(read_result(folder / "result.json"))
        elif (folder / "failure.json").exists():
            try:
                failure = json.loads((folder / "failure.json").read_text())
            except (OSError, ValueError):
                failure = {}
            sweep.diverged.append(_failure(folder, {"status": "diverged", "exit_status": 3,
                                                    **(failure if isinstance(failure, dict) else {})}))
        else:
            sweep.incomplete.append(_progress(folder))
    for entry in marked.values():  # failed before the script made its folder (e.g. a bad flag)
        (sweep.failed if entry["status"] == "failed" else sweep.diverged).append(_failure(Path(entry["folder"]),
                                                                                          entry))
    if not sweep.runs:
        counts = ", ".join(f"{n} {k}" for k, n in sweep.counts().items() if n)
        raise UsageError(f"{root} holds no complete run ({counts}; a complete one has result.json); let the "
                              "runs finish, or rerun the scaling.py command to finish them")
    return sweep


# ----------------------------------------------------------------------------------------------------------------
# Cells, best alpha, matrices
# ----------------------------------------------------------------------------------------------------------------

CellKey = tuple  # (env, script, value size, policy size, alpha)


def _size_order(size: int | None) -> float:
    return math.inf if size is None else size  # None (all data) sorts last


def _cell_order(key: CellKey) -> tuple:
    env, script, value, policy, alpha = key
    return env, script, _size_order(value), _size_order(policy), -math.inf if alpha is None else alpha


def script_order(script: str) -> tuple:
    """iql, sarsa, crl rows x awr, ddpgbc, sfbc columns, then bc, then anything else."""
    value, _, extractor = script.partition("_")
    rank = lambda x, xs: xs.index(x) if x in xs else len(xs)  # noqa: E731
    return (script == "bc", rank(value, VALUE_LEARNERS), rank(extractor, EXTRACTORS), script)


def cell_values(runs: list[Run], metric: str) -> dict[CellKey, dict[int, float]]:
    """Per cell, the metric's value per seed, pooled over folders (a seed seen twice averaged; NaN left out)."""
    seen: dict[CellKey, dict[int, list[float]]] = {}
    for run in runs:
        if metric not in run.values:
            continue
        key = (run.env, run.script, run.value_size, run.policy_size, run.alpha)
        for seed, value in zip(run.seeds, run.values[metric]):
            if math.isfinite(value):
                seen.setdefault(key, {}).setdefault(seed, []).append(value)
    return {key: {seed: float(np.mean(v)) for seed, v in sorted(seen[key].items())}
            for key in sorted(seen, key=_cell_order)}


def stats(per_seed: dict[int, float]) -> dict:
    """mean, std (ddof=0) and number of seeds of one cell; NaN mean and std without seeds."""
    values = np.asarray(list(per_seed.values()), np.float64)
    if values.size == 0:
        return {"mean": math.nan, "std": math.nan, "n_seeds": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n_seeds": int(values.size)}


def choose_alpha(cells: dict[CellKey, dict[int, float]]) -> dict[tuple, tuple[float | None, dict[int, float]]]:
    """Per (env, script, value size, policy size): the alpha with the highest MEAN over seeds and its per-seed
    values. Ties go to the smaller alpha."""
    best: dict[tuple, tuple[float | None, dict[int, float], float]] = {}
    for key in sorted(cells, key=_cell_order):
        if not cells[key]:
            continue
        mean = float(np.mean(list(cells[key].values())))
        group = key[:4]
        if group not in best or mean > best[group][2]:
            best[group] = (key[4], cells[key], mean)
    return {group: (alpha, per_seed) for group, (alpha, per_seed, _) in best.items()}


@dataclasses.dataclass
class Matrix:
    """One env x script: performance at the best alpha per (value size, policy size); NaN where a cell is missing."""

    env: str
    script: str
    metric: str
    value_sizes: list[int | None]  # ascending; [None] for bc
    policy_sizes: list[int | None]  # ascending
    mean: np.ndarray  # [value, policy]
    std: np.ndarray
    n: np.ndarray  # seeds per cell
    alpha: list[list[float | None]]  # the chosen alpha per cell
    seeds: list[list[dict[int, float]]]  # the chosen alpha's value per seed, per cell
    has_alpha: bool  # the script has an alpha (any run gave one)

    def to_json(self) -> dict:
        return {"env": self.env, "script": self.script, "metric": self.metric, "value_sizes": self.value_sizes,
                "policy_sizes": self.policy_sizes, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "n_seeds": self.n.tolist(), "alpha": self.alpha}


def build_matrices(runs: list[Run], metric_by_env: dict[str, str]) -> list[Matrix]:
    """Every env x script's matrix (bc included, as a single row), in env then script order. The axes are the sizes
    that script's runs have; a combination with no run, or no number for the metric, is a NaN cell."""
    matrices = []
    for env, metric in sorted(metric_by_env.items()):
        env_runs = [run for run in runs if run.env == env]
        chosen = choose_alpha(cell_values(env_runs, metric))
        for script in sorted({run.script for run in env_runs}, key=script_order):
            mine = [run for run in env_runs if run.script == script]
            values = sorted({run.value_size for run in mine}, key=_size_order)
            policies = sorted({run.policy_size for run in mine}, key=_size_order)
            shape = (len(values), len(policies))
            m = Matrix(env, script, metric, values, policies, np.full(shape, np.nan), np.full(shape, np.nan),
                       np.zeros(shape, int), [[None] * shape[1] for _ in values], [[{}] * shape[1] for _ in values],
                       any(run.alpha is not None for run in mine))
            for i, v in enumerate(values):
                for j, p in enumerate(policies):
                    if (env, script, v, p) in chosen:
                        alpha, per_seed = chosen[(env, script, v, p)]
                        s = stats(per_seed)
                        m.mean[i, j], m.std[i, j], m.n[i, j] = s["mean"], s["std"], s["n_seeds"]
                        m.alpha[i][j], m.seeds[i][j] = alpha, per_seed
            matrices.append(m)
    return matrices


def performance_metric(env: str, choice: str = "auto") -> str:
    """--metric for one env: auto = return on dm_control (no success there), success elsewhere."""
    if choice != "auto":
        return choice
    try:
        family = envs.parse_env(env).family
    except UsageError:  # a name this version does not know: dm_control names start with a DMC domain
        family = "dmc" if env.split("-")[0] in {task.split("-")[0] for task in envs.DMC_TASKS} else "ogbench"
    return "return" if family == "dmc" else "success"


def pooled(cells: list[dict[int, float]]) -> dict:
    """Average over cells: mean of the cell means; std over seeds of the per-seed average (seeds present in every
    cell, paired by id; NaN with none in common); the number of those seeds and of cells."""
    cells = [c for c in cells if c]
    if not cells:
        return {"mean": math.nan, "std": math.nan, "n_seeds": 0, "cells": 0}
    common = sorted(set.intersection(*(set(c) for c in cells)))
    per_seed = [float(np.mean([c[s] for c in cells])) for s in common]
    return {"mean": float(np.mean([np.mean(list(c.values())) for c in cells])),
            "std": float(np.std(per_seed)) if per_seed else math.nan, "n_seeds": len(common), "cells": len(cells)}


def matrix_average(m: Matrix) -> dict:
    """The matrix's average performance over its cells (see `pooled`)."""
    return pooled([cell for row in m.seeds for cell in row])


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck verdict
# ----------------------------------------------------------------------------------------------------------------

def _mean_finite(values) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def axis_changes(m: Matrix) -> tuple[float, float]:
    """(policy change, value change): mean over value rows of perf[v, largest p] - perf[v, smallest p], and mean
    over policy columns of perf[largest v, p] - perf[smallest v, p]; rows / columns lacking an end cell are left
    out; NaN for an axis with fewer than 2 sizes."""
    policy = _mean_finite(m.mean[:, -1] - m.mean[:, 0]) if len(m.policy_sizes) >= 2 else math.nan
    value = _mean_finite(m.mean[-1, :] - m.mean[0, :]) if len(m.value_sizes) >= 2 else math.nan
    return policy, value


def cell_noise(m: Matrix) -> float:
    """Standard error of the difference of two cell means, sqrt(2 s^2 / n): s^2 the within-cell variance over seeds
    (ddof=1) pooled over the matrix's cells, n the median seeds per cell. NaN when no cell has 2 seeds."""
    squares, dof, counts = 0.0, 0, []
    for row in m.seeds:
        for cell in row:
            values = np.asarray(list(cell.values()), np.float64)
            if values.size:
                counts.append(values.size)
                squares += float(((values - values.mean()) ** 2).sum())
                dof += values.size - 1
    if dof == 0:
        return math.nan
    return math.sqrt(2 * squares / dof / float(np.median(counts)))


def verdict(m: Matrix, threshold: float = 2.0, min_change: float = 0.02, dominance: float = 2.0) -> dict:
    """The bottleneck verdict of one matrix and the numbers behind it (rule in the module docstring)."""
    policy, value = axis_changes(m)
    noise = cell_noise(m)
    finite = np.abs(m.mean[np.isfinite(m.mean)])
    scale = (float(finite.max()) if finite.size else math.nan) if m.metric == "return" else 1.0
    floor = min_change * scale

    def matters(change: float) -> bool | None:
        if not math.isfinite(change):
            return None
        # Rounded to 12 digits: success rates are multiples of 1 / episodes, and a change of exactly the floor
        # (0.28 - 0.24 + 0.20 - 0.20) / 2 = 0.020000000000000018 must not count as above it.
        change = round(abs(change), 12)
        return bool(change > floor and (not math.isfinite(noise) or change > threshold * noise))

    policy_matters, value_matters = matters(policy), matters(value)
    if policy_matters is None and value_matters is None:
        label = "n/a"
    elif policy_matters is None:
        label = "value matters (policy n/a)" if value_matters else "flat (policy n/a)"
    elif value_matters is None:
        label = "policy matters (value n/a)" if policy_matters else "flat (value n/a)"
    elif policy_matters and value_matters:
        label = ("policy-bounded" if abs(policy) >= dominance * abs(value) else
                 "value-bounded" if abs(value) >= dominance * abs(policy) else "both")
    else:
        label = "policy-bounded" if policy_matters else "value-bounded" if value_matters else "flat"
    return {"env": m.env, "script": m.script, "metric": m.metric, "value_sizes": m.value_sizes,
            "policy_sizes": m.policy_sizes, "policy_change": policy, "value_change": value, "noise": noise,
            "floor": floor, "policy_matters": policy_matters, "value_matters": value_matters, "verdict": label}


# ----------------------------------------------------------------------------------------------------------------
# Table, generalization and test-time numbers
# ----------------------------------------------------------------------------------------------------------------

def table_rows(final: list[Matrix], best: list[Matrix]) -> list[dict]:
    """Rows of the aggregated table: per kind ("final", "best"), env and value learner, the matrix average of each
    extractor (awr, ddpgbc, sfbc) and of bc, and the best extractor of the row (highest mean; bc not a candidate)."""
    rows = []
    for kind, matrices in (("final", final), ("best", best)):
        for env in sorted({m.env for m in matrices}):
            mine = {m.script: m for m in matrices if m.env == env}
            bc = matrix_average(mine["bc"]) if "bc" in mine else None
            learners = [v for v in VALUE_LEARNERS if any(s.startswith(v + "_") for s in mine)] or ["-"]
            for learner in learners:
                row = {"kind": kind, "env": env, "metric": next(iter(mine.values())).metric, "value": learner,
                       "bc": bc}
                for extractor in EXTRACTORS:
                    script = f"{learner}_{extractor}"
                    row[extractor] = matrix_average(mine[script]) if script in mine else None
                scored = [(row[e]["mean"], e) for e in EXTRACTORS if row[e] and math.isfinite(row[e]["mean"])]
                row["best_extractor"] = max(scored, key=lambda x: x[0])[1] if scored else None
                rows.append(row)
    return rows


def _choose_cell(m: Matrix) -> tuple[int, int] | None:
    """The largest cell of a matrix: (largest v, largest p) if present, else the largest policy, then value size."""
    present = [(i, j) for i in range(len(m.value_sizes)) for j in range(len(m.policy_sizes)) if m.seeds[i][j]]
    if not present:
        return None
    corner = (len(m.value_sizes) - 1, len(m.policy_sizes) - 1)
    return corner if corner in present else max(present, key=lambda ij: (ij[1], ij[0]))


def generalization_rows(runs: list[Run], matrices: list[Matrix]) -> dict[str, list[dict]]:
    """Per env, per script: train / val / eval MSE stats at its largest cell and performance-chosen alpha (scripts
    without any MSE number there are left out)."""
    mse = {k: cell_values(runs, k) for k in ("train_mse", "val_mse", "eval_mse")}
    out: dict[str, list[dict]] = {}
    for m in matrices:
        ij = _choose_cell(m)
        if ij is None:
            continue
        i, j = ij
        key = (m.env, m.script, m.value_sizes[i], m.policy_sizes[j], m.alpha[i][j])
        row = {k: stats(mse[k].get(key, {})) for k in mse}
        if any(row[k]["n_seeds"] for k in mse):
            out.setdefault(m.env, []).append({"script": m.script, "value_size": key[2], "policy_size": key[3],
                                              "alpha": key[4], **row})
    return out


def testtime_rows(runs: list[Run], metric_by_env: dict[str, str]) -> dict[str, list[dict]]:
    """Per env, per script whose runs evaluated test-time methods, from those runs only (rule in the module
    docstring): "metric" (success or return), "methods" (those evaluated), "cells" (alpha-chosen cells), and under
    result.json's own keys the pooled numbers (mean, std, n_seeds, cells): plain performance ("success" /
    "return") and each method's ("opex_success", ...); "eval_mse" and "<method>_eval_mse" where measured."""
    out: dict[str, list[dict]] = {}
    for env, metric in sorted(metric_by_env.items()):
        base = "return" if metric == "return" else "success"  # best_success has no test-time counterpart
        tt_runs = [run for run in runs if run.env == env and run.test_time]
        for script in sorted({run.script for run in tt_runs}, key=script_order):
            mine = [run for run in tt_runs if run.script == script]
            methods = [m for m in TEST_TIME_METHODS if any(m in run.test_time for run in mine)]
            chosen = choose_alpha(cell_values(mine, base))
            keys = [(*group, alpha) for group, (alpha, _) in chosen.items()]
            row = {"script": script, "metric": base, "methods": methods, "cells": len(keys)}
            for prefix in ("", *(m + "_" for m in methods)):
                for key, always in ((base, True), ("eval_mse", False)):
                    values = cell_values(mine, prefix + key)
                    numbers = pooled([values.get(k, {}) for k in keys])
                    if always or numbers["cells"]:
                        row[prefix + key] = numbers
            out.setdefault(env, []).append(row)
    return out


def read_online_curve(run: Run, quantities: tuple[str, ...]) -> dict[str, dict[int, dict[int, float]]]:
    """One online run's curves from its metrics.jsonl: per quantity, per seed, online step (eval step - offline steps,
    steps before the offline end left out) -> value; a later record of the same seed and step replaces an earlier
    one, and a missing or non-finite value is left out."""
    curves: dict[str, dict[int, dict[int, float]]] = {q: {} for q in quantities}
    for record in read_metrics(run.folder / "metrics.jsonl"):
        if not isinstance(record, dict) or record.get("event") != "eval":
            continue
        step, seed, member = record.get("step"), record.get("seed"), record.get("member")
        if not isinstance(seed, int) and isinstance(member, int) and 0 <= member < len(run.seeds):
            seed = run.seeds[member]  # a record without its seed: the member's
        if not isinstance(step, int) or not isinstance(seed, int) \
                or not run.steps <= step <= run.steps + run.online_steps:
            continue
        for quantity in quantities:
            value = _number(record.get(quantity))
            if math.isfinite(value):
                curves[quantity].setdefault(seed, {})[step - run.steps] = value
    return {q: per_seed for q, per_seed in curves.items() if per_seed}


def online_points(curves: dict[str, dict[int, dict[int, float]]]) -> list[dict]:
    """A cell's points in online-step order: {"online_step", and per quantity its stats over seeds} where a quantity
    appears at the online steps that every seed having that quantity has."""
    common = {q: set.intersection(*(set(curve) for curve in per_seed.values())) for q, per_seed in curves.items()}
    return [{"online_step": step, **{q: stats({seed: curve[step] for seed, curve in per_seed.items()})
                                     for q, per_seed in curves.items() if step in common[q]}}
            for step in sorted(set().union(*common.values()))]


def online_rows(runs: list[Run], metric_by_env: dict[str, str]) -> dict[str, list[dict]]:
    """Per env, per cell with online runs (script order, then sizes and alpha): "script", "value_size",
    "policy_size", "alpha", "metric" (success or return), "seeds", and "points" (see `online_points`) from the eval
    records of its runs with online_steps > 0, pooled seed by seed (a seed's values at an online step from several
    folders averaged). Cells whose runs logged no eval record from the offline end on are left out."""
    out: dict[str, list[dict]] = {}
    for env, metric in sorted(metric_by_env.items()):
        base = "return" if metric == "return" else "success"  # best_success has no per-evaluation counterpart
        seen: dict[CellKey, dict[str, dict[int, dict[int, list[float]]]]] = {}
        for run in runs:
            if run.env != env or run.online_steps <= 0:
                continue
            cell = seen.setdefault((run.env, run.script, run.value_size, run.policy_size, run.alpha), {})
            for quantity, per_seed in read_online_curve(run, (*ONLINE_MSES, base)).items():
                for seed, curve in per_seed.items():
                    for step, value in curve.items():
                        cell.setdefault(quantity, {}).setdefault(seed, {}).setdefault(step, []).append(value)
        for key in sorted(seen, key=lambda k: (script_order(k[1]), *_cell_order(k)[2:])):
            curves = {q: {seed: {step: float(np.mean(v)) for step, v in sorted(curve.items())}
                          for seed, curve in sorted(seen[key][q].items())}
                      for q in (*ONLINE_MSES, base) if q in seen[key]}
            if curves:
                out.setdefault(env, []).append({
                    "script": key[1], "value_size": key[2], "policy_size": key[3], "alpha": key[4], "metric": base,
                    "seeds": sorted({seed for per_seed in curves.values() for seed in per_seed}),
                    "points": online_points(curves)})
    return out


def online_changes(row: dict) -> dict[str, dict]:
    """Per quantity of an online row: its mean at its first and last online step ("from", "to", "first_step",
    "last_step") and "change" = to - from."""
    changes = {}
    for quantity in (*ONLINE_MSES, row["metric"]):
        present = [p for p in row["points"] if quantity in p]
        if present:
            first, last = present[0], present[-1]
            changes[quantity] = {"from": first[quantity]["mean"], "to": last[quantity]["mean"],
                                 "change": last[quantity]["mean"] - first[quantity]["mean"],
                                 "first_step": first["online_step"], "last_step": last["online_step"]}
    return changes


# ----------------------------------------------------------------------------------------------------------------
# Formatting and writing
# ----------------------------------------------------------------------------------------------------------------

def size_label(size: int | None) -> str:
    """Transitions as the paper writes them: 1000000 -> 1M, 100000 -> 0.1M, 10000 -> 10k, None -> all."""
    if size is None:
        return "all"
    if size >= 100_000:
        return f"{size / 1e6:.3g}M"
    if size >= 1_000:
        return f"{size / 1e3:.3g}k"
    return str(size)


def script_label(script: str) -> str:
    value, _, extractor = script.partition("_")
    return f"{NAMES.get(value, value)} + {NAMES.get(extractor, extractor)}" if extractor else NAMES.get(value, value)


def _fmt(x: float | None, metric: str) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.1f}" if metric == "return" else f"{x:.3f}"


def _fmt_mse(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _write_text(path: Path, text: str) -> Path:
    write_atomic(path, lambda f: f.write(text))
    return path


def _clean(obj):
    """NaN / inf -> None, numpy scalars -> Python, recursively (summary.json stays strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_table(rows: list[dict], out: Path) -> list[Path]:
    """table.md (bold: best extractor), table.csv (best_extractor column), table.tex (\\textbf)."""
    kinds = {"final": "final performance (last evaluation)", "best": "best success rate during training"}
    md = ["# Matrix-averaged performance", "",
          "Each entry: the mean over the matrix's cells (per cell the alpha with the best mean over seeds) ± the std "
          "over seeds of the per-seed matrix average (seeds paired by id). Bold: the row's best extractor. bc: "
          "behaviour cloning, averaged over its policy sizes (a baseline, not a candidate).", ""]
    tex = ["% matrix-averaged performance; bold: best extractor of the row; bc: baseline"]
    for kind, title in kinds.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        md += [f"## {title}", "", "| env | metric | value | " + " | ".join(TABLE_COLUMNS) + " |",
               "| --- " * (3 + len(TABLE_COLUMNS)) + "|"]
        tex += [f"% {title}", "\\begin{tabular}{lll" + "c" * len(TABLE_COLUMNS) + "}", "\\hline",
                "env & metric & value & " + " & ".join(TABLE_COLUMNS) + " \\\\", "\\hline"]
        for row in mine:
            md_cells, tex_cells = [], []
            for column in TABLE_COLUMNS:
                a = row[column]
                text = "" if a is None else _fmt(a["mean"], row["metric"]) + (
                    "" if not math.isfinite(a["std"]) else " ± " + _fmt(a["std"], row["metric"]))
                bold = column == row["best_extractor"]
                md_cells.append(f"**{text}**" if bold and text else text)
                tex_text = text.replace("±", "$\\pm$")
                tex_cells.append(f"\\textbf{{{tex_text}}}" if bold and text else tex_text)
            md.append(f"| {row['env']} | {row['metric']} | {row['value']} | " + " | ".join(md_cells) + " |")
            metric = row["metric"].replace("_", "\\_")
            tex.append(f"{row['env']} & {metric} & {row['value']} & " + " & ".join(tex_cells) + " \\\\")
        md.append("")
        tex += ["\\hline", "\\end{tabular}", ""]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["kind", "env", "metric", "value_learner"]
    for column in TABLE_COLUMNS:
        header += [f"{column}_mean", f"{column}_std", f"{column}_seeds", f"{column}_cells"]
    writer.writerow(header + ["best_extractor"])
    for row in rows:
        line = [row["kind"], row["env"], row["metric"], row["value"]]
        for column in TABLE_COLUMNS:
            a = row[column]
            line += ["", "", "", ""] if a is None else [
                f"{a['mean']:.6g}", f"{a['std']:.6g}" if math.isfinite(a["std"]) else "", a["n_seeds"], a["cells"]]
        writer.writerow(line + [row["best_extractor"] or ""])
    return [_write_text(out / "table.md", "\n".join(md)), _write_text(out / "table.csv", buffer.getvalue()),
            _write_text(out / "table.tex", "\n".join(tex))]


VERDICT_COLUMNS = ("env", "script", "metric", "value sizes", "policy sizes", "policy change", "value change",
                   "noise", "floor", "policy matters", "value matters", "verdict")


def _verdict_cells(v: dict) -> list[str]:
    number = lambda x: "n/a" if x is None or not math.isfinite(x) else f"{x:+.4g}"  # noqa: E731
    flag = lambda x: "n/a" if x is None else "yes" if x else "no"  # noqa: E731
    return [v["env"], v["script"], v["metric"], " ".join(size_label(s) for s in v["value_sizes"]),
            " ".join(size_label(s) for s in v["policy_sizes"]), number(v["policy_change"]),
            number(v["value_change"]), number(v["noise"]).lstrip("+"), number(v["floor"]).lstrip("+"),
            flag(v["policy_matters"]), flag(v["value_matters"]), v["verdict"]]


def verdict_text(verdicts: list[dict]) -> str:
    """The verdicts as an aligned plain-text table (printed)."""
    rows = [list(VERDICT_COLUMNS)] + [_verdict_cells(v) for v in verdicts]
    widths = [max(len(r[c]) for r in rows) for c in range(len(VERDICT_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_verdicts(verdicts: list[dict], out: Path, threshold: float, min_change: float,
                   dominance: float) -> list[Path]:
    rule = (f"An axis matters when |change| > {threshold:g} x noise (when noise is known) and |change| > floor "
            f"({min_change:g} for success rates; for returns {min_change:g} x the matrix's largest |cell|). Both "
            f"matter: the axis with at least {dominance:g}x the other's |change| decides, else 'both'. Change: mean "
            "over rows / columns of perf[largest size] - perf[smallest size]; noise: standard error of the "
            "difference of two cell means (pooled within-cell variance over seeds).")
    md = ["# Bottleneck verdicts", "", rule, "", "| " + " | ".join(VERDICT_COLUMNS) + " |",
          "| --- " * len(VERDICT_COLUMNS) + "|"]
    md += ["| " + " | ".join(_verdict_cells(v)) + " |" for v in verdicts]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["env", "script", "metric", "value_sizes", "policy_sizes", "policy_change", "value_change",
                     "noise", "floor", "policy_matters", "value_matters", "verdict"])
    number = lambda x: "" if x is None or not math.isfinite(x) else f"{x:.6g}"  # noqa: E731
    for v in verdicts:
        writer.writerow([v["env"], v["script"], v["metric"], " ".join(size_label(s) for s in v["value_sizes"]),
                         " ".join(size_label(s) for s in v["policy_sizes"]), number(v["policy_change"]),
                         number(v["value_change"]), number(v["noise"]), number(v["floor"]),
                         "" if v["policy_matters"] is None else v["policy_matters"],
                         "" if v["value_matters"] is None else v["value_matters"], v["verdict"]])
    return [_write_text(out / "verdicts.md", "\n".join(md) + "\n"), _write_text(out / "verdicts.csv",
                                                                               buffer.getvalue())]


# ----------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend; imported only when a figure is drawn)
# ----------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, stem: str, formats: tuple[str, ...]) -> list[Path]:
    """Write the figure as <stem>.<format> for each format (atomically), at DPI, then close it."""
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        write_atomic(path, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=DPI), binary=True)
        paths.append(path)
    _pyplot().close(fig)
    return paths


def panel_layout(scripts: list[str]) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(rows, columns, script -> panel): rows value learners x columns extractors, as in the paper; a single row
    when there are 3 scripts or fewer, or a script not named <value>_<extractor>."""
    parts = [s.partition("_") for s in scripts]
    if len(scripts) <= 3 or any(v not in VALUE_LEARNERS or e not in EXTRACTORS for v, _, e in parts):
        return 1, len(scripts), {s: (0, k) for k, s in enumerate(scripts)}
    rows = [v for v in VALUE_LEARNERS if any(p[0] == v for p in parts)]
    cols = [e for e in EXTRACTORS if any(p[2] == e for p in parts)]
    return len(rows), len(cols), {s: (rows.index(v), cols.index(e)) for s, (v, _, e) in zip(scripts, parts)}


def matrix_figsize(rows: int, cols: int) -> tuple[float, float]:
    """Inches of a matrix figure: PANEL_SIZE per panel, plus room for the colourbar and the title."""
    return PANEL_SIZE[0] * cols + 1.2, PANEL_SIZE[1] * rows + 0.5


def plot_matrices(matrices: list[Matrix], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """One figure per env: a panel per value x extractor script (bc is in the table, not here)."""
    plt = _pyplot()
    paths = []
    for env in sorted({m.env for m in matrices}):
        mine = [m for m in matrices if m.env == env and m.script != "bc"]
        if not mine:
            continue
        rows, cols, where = panel_layout([m.script for m in mine])
        fig, axes = plt.subplots(rows, cols, figsize=matrix_figsize(rows, cols), squeeze=False, layout="constrained")
        finite = np.concatenate([m.mean[np.isfinite(m.mean)] for m in mine])
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if high - low < 1e-9:
            low, high = low - 0.05, high + 0.05
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("white")  # missing cells stay empty
        used = set()
        for m in mine:
            ax = axes[where[m.script]]
            used.add(where[m.script])
            image = ax.imshow(np.ma.masked_invalid(m.mean), origin="lower", cmap=cmap, vmin=low, vmax=high,
                              aspect="auto")
            for i in range(len(m.value_sizes)):
                for j in range(len(m.policy_sizes)):
                    if math.isfinite(m.mean[i, j]):
                        text = f"{m.mean[i, j]:.1f}" if m.metric == "return" else f"{m.mean[i, j]:.2f}"
                        if m.has_alpha and m.alpha[i][j] is not None:
                            text += f"\nα={m.alpha[i][j]:g}"
                        light = (m.mean[i, j] - low) / (high - low) > 0.6
                        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                                color="black" if light else "white")
            ax.set_xticks(range(len(m.policy_sizes)), [size_label(s) for s in m.policy_sizes])
            ax.set_yticks(range(len(m.value_sizes)), [size_label(s) for s in m.value_sizes])
            ax.set_xlabel("policy data (transitions)")
            ax.set_ylabel("value data (transitions)")
            ax.set_title(script_label(m.script))
        for r in range(rows):
            for c in range(cols):
                if (r, c) not in used:
                    axes[r, c].axis("off")
        fig.colorbar(image, ax=axes, label=METRIC_LABELS.get(mine[0].metric, mine[0].metric), shrink=0.9)
        # Two lines: a single panel is narrower than the one-line title would be.
        fig.suptitle(f"{env}\nbest alpha per cell, mean over seeds", fontsize=10)
        paths += save_figure(fig, out, f"matrices_{env}", formats)
    return paths


def _bars(groups: list[str], series: dict[str, list[dict]], ylabel: str, title: str):
    """A figure of grouped bars (see `_draw_bars`)."""
    fig, ax = _pyplot().subplots(figsize=bars_figsize(len(groups)), layout="constrained")
    _draw_bars(ax, groups, series, ylabel, title)
    return fig


def _draw_bars(ax, groups: list[str], series: dict[str, list[dict]], ylabel: str, title: str) -> None:
    """Grouped bars on `ax`: one group per label in `groups`, one bar per series (mean, std error bars; NaN: no
    bar)."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, values) in enumerate(series.items()):
        means = np.array([v["mean"] for v in values], np.float64)
        errors = np.nan_to_num(np.array([v["std"] for v in values], np.float64))
        present = np.isfinite(means)
        ax.bar(x[present] + (k - (len(series) - 1) / 2) * width, means[present], width, yerr=errors[present],
               capsize=3, label=name)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def bars_figsize(groups: int, rows: int = 1) -> tuple[float, float]:
    return max(5.0, 1.3 * groups + 1.5), 3.8 * rows


def plot_generalization(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    paths = []
    for env, mine in sorted(rows.items()):
        groups = [f"{r['script']}\n" + ("" if r["value_size"] is None else f"v{size_label(r['value_size'])} ")
                  + f"p{size_label(r['policy_size'])}" + ("" if r["alpha"] is None else f" α={r['alpha']:g}")
                  for r in mine]
        series = {name: [r[key] for r in mine] for name, key in
                  (("train", "train_mse"), ("validation", "val_mse"), ("evaluation", "eval_mse"))}
        fig = _bars(groups, series, "MSE to the oracle's action",
                    f"{env}\npolicy error on training / validation / evaluation states\n(largest cell per script; "
                    "mean ± std over seeds)")
        paths += save_figure(fig, out, f"generalization_{env}", formats)
    return paths


def _cells(n: int) -> str:
    return f"{n} cell" + "s" * (n != 1)


def testtime_panels(mine: list[dict]) -> list[str]:
    """The keys drawn for one env's test-time rows: performance, and eval_mse when some method measured it."""
    methods = {m for r in mine for m in r["methods"]}
    return [mine[0]["metric"]] + (["eval_mse"] if any(f"{m}_eval_mse" in r for r in mine for m in methods) else [])


def plot_testtime(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Per env: plain vs each evaluated test-time method, performance on top and evaluation MSE below (where
    measured); a script without a method's numbers has no bar there."""
    plt = _pyplot()
    paths = []
    missing = {"mean": math.nan, "std": math.nan}
    for env, mine in sorted(rows.items()):
        methods = [m for m in TEST_TIME_METHODS if any(m in r["methods"] for r in mine)]
        panels = testtime_panels(mine)
        fig, axes = plt.subplots(len(panels), 1, figsize=bars_figsize(len(mine), len(panels)), squeeze=False,
                                 layout="constrained")
        groups = [f"{r['script']}\n({_cells(r['cells'])})" for r in mine]
        for ax, key in zip(axes[:, 0], panels):
            series = {name: [r.get(prefix + key, missing) for r in mine]
                      for name, prefix in (("plain", ""), *((NAMES[m], m + "_") for m in methods))}
            series = {name: v for name, v in series.items() if any(math.isfinite(x["mean"]) for x in v)} or series
            if key == "eval_mse":
                ylabel, title = "MSE to the oracle's action", "policy error on evaluation states"
            else:
                ylabel = METRIC_LABELS[key]
                title = (f"{env}\ntest-time policy improvement: {ylabel}\n(the same runs and episodes; mean ± std "
                         "over seeds)")
            _draw_bars(ax, groups, series, ylabel, title)
        paths += save_figure(fig, out, f"testtime_{env}", formats)
    return paths


def testtime_text(rows: dict[str, list[dict]]) -> str:
    """The test-time numbers as printed: one line per env x script, under result.json's keys."""
    lines = []
    for env, mine in sorted(rows.items()):
        for r in mine:
            parts = []
            for key in (r["metric"], "eval_mse"):
                for prefix in ("", *(m + "_" for m in r["methods"])):
                    if prefix + key in r:
                        a = r[prefix + key]
                        mean, std = ((_fmt_mse(a["mean"]), _fmt_mse(a["std"])) if key == "eval_mse" else
                                     (_fmt(a["mean"], key), _fmt(a["std"], key)))
                        parts.append(f"{prefix + key} {mean}" + (f" ± {std}" if math.isfinite(a["std"]) else ""))
            lines.append(f"  {env} {r['script']} ({_cells(r['cells'])}): " + " | ".join(parts))
    return "\n".join(lines)


def online_setting(row: dict, keys: tuple[str, ...] = ("value_size", "policy_size", "alpha")) -> str:
    """A cell's value / policy sizes and alpha as the figures write them ("v10k p0.1M α=0.3"), only the `keys`
    asked for; bc has no value size and SfBC / BC no alpha."""
    parts = {"value_size": None if row["value_size"] is None else f"v{size_label(row['value_size'])}",
             "policy_size": f"p{size_label(row['policy_size'])}",
             "alpha": None if row["alpha"] is None else f"α={row['alpha']:g}"}
    return " ".join(parts[k] for k in keys if parts[k] is not None)


def online_labels(mine: list[dict]) -> list[str]:
    """Legend labels of one env's online rows: the script's name, plus the sizes / alpha in which the rows differ."""
    varying = tuple(k for k in ("value_size", "policy_size", "alpha") if len({r[k] for r in mine}) > 1)
    return [f"{script_label(r['script'])} {online_setting(r, varying)}".rstrip() for r in mine]


def _online_change(quantity: str, change: dict) -> str:
    """"from → to (change)" of one quantity; MSEs also as a relative change."""
    if quantity in ONLINE_MSES:
        text = f"{_fmt_mse(change['from'])} → {_fmt_mse(change['to'])} ({change['change']:+.3g}"
        return text + (f", {100 * change['change'] / change['from']:+.0f}%)" if change["from"] else ")")
    sign = "+" if change["change"] >= 0 else "-"
    return (f"{_fmt(change['from'], quantity)} → {_fmt(change['to'], quantity)} "
            f"({sign}{_fmt(abs(change['change']), quantity)})")


def online_text(rows: dict[str, list[dict]]) -> str:
    """The offline-to-online changes as printed: one line per env x cell, under result.json's keys."""
    lines = []
    for env, mine in sorted(rows.items()):
        for r in mine:
            changes = online_changes(r)
            steps = f"online step {r['points'][0]['online_step']} → {r['points'][-1]['online_step']}"
            lines.append(f"  {env} {r['script']} {online_setting(r)} ({len(r['seeds'])} seeds, {steps}): "
                         + " | ".join(f"{q} {_online_change(q, c)}" for q, c in changes.items()))
    return "\n".join(lines)


def write_online(rows: dict[str, list[dict]], out: Path) -> list[Path]:
    """online.md: per env x cell, each quantity at online step 0 -> the last online step and the change."""
    columns = (*(MSE_LABELS[q] for q in ONLINE_MSES), "performance")
    md = ["# Offline-to-online fine-tuning", "",
          "Each entry: the mean over seeds at online step 0 (the end of offline training) → at the last online step "
          "(the change; for MSEs also relative). MSEs are to the oracle's action on training, validation and "
          "evaluation states; performance is the success rate (return on dm_control). The paper's check: online "
          "data should mainly lower the evaluation MSE.", "",
          "| env | script | value data | policy data | alpha | seeds | online steps | " + " | ".join(columns) + " |",
          "| --- " * (7 + len(columns)) + "|"]
    for env, mine in sorted(rows.items()):
        for r in mine:
            changes = online_changes(r)
            cells = [_online_change(q, changes[q]) if q in changes else "n/a" for q in (*ONLINE_MSES, r["metric"])]
            cells[-1] = f"{r['metric']} {cells[-1]}"
            setting = ["-" if r["value_size"] is None else size_label(r["value_size"]), size_label(r["policy_size"]),
                       "-" if r["alpha"] is None else f"{r['alpha']:g}", str(len(r["seeds"])),
                       str(r["points"][-1]["online_step"])]
            md.append(f"| {env} | {r['script']} | " + " | ".join(setting + cells) + " |")
    return [_write_text(out / "online.md", "\n".join(md) + "\n")]


def online_figsize(panels: int, lines: int) -> tuple[float, float]:
    """Inches of an offline-to-online figure: ONLINE_PANEL_SIZE per panel, plus the title and one legend row per
    `panels` lines (the legend has a column per panel)."""
    return ONLINE_PANEL_SIZE[0] * panels, ONLINE_PANEL_SIZE[1] + 0.7 + 0.25 * math.ceil(lines / panels)


def plot_online(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Per env: a panel per quantity (the MSEs some row has, then performance) against online environment steps, a
    line per cell with markers at the evaluated points and a ±std band over seeds, the legend below."""
    plt = _pyplot()
    paths = []
    for env, mine in sorted(rows.items()):
        quantities = [q for q in ONLINE_MSES if any(q in p for r in mine for p in r["points"])] + [mine[0]["metric"]]
        fig, axes = plt.subplots(1, len(quantities), figsize=online_figsize(len(quantities), len(mine)),
                                 squeeze=False, layout="constrained")
        cmap = plt.get_cmap("tab10" if len(mine) <= 10 else "tab20")
        for k, (r, label) in enumerate(zip(mine, online_labels(mine))):
            for ax, quantity in zip(axes[0], quantities):
                present = [p for p in r["points"] if quantity in p]
                x = np.array([p["online_step"] for p in present], np.float64)
                mean = np.array([p[quantity]["mean"] for p in present], np.float64)
                std = np.array([p[quantity]["std"] for p in present], np.float64)
                ax.plot(x, mean, marker="o", markersize=3, color=cmap(k % cmap.N), label=label)
                ax.fill_between(x, mean - std, mean + std, color=cmap(k % cmap.N), alpha=0.2, linewidth=0)
        for ax, quantity in zip(axes[0], quantities):
            ax.set_xlabel("online environment steps")
            if quantity in ONLINE_MSES:
                ax.set_ylabel("MSE to the oracle's action")
                ax.set_title(MSE_LABELS[quantity], fontsize=9)
            else:
                ax.set_ylabel(METRIC_LABELS[quantity])
                ax.set_title("performance", fontsize=9)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(quantities), fontsize=8)
        fig.suptitle(f"{env}\noffline-to-online: mean ± std over seeds", fontsize=10)
        paths += save_figure(fig, out, f"online_{env}", formats)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def _listing(title: str, entries: list[dict], line) -> list[str]:
    if not entries:
        return []
    lines = [f"{title} ({len(entries)}):"] + [f"  {line(e)}" for e in entries[:LIST_LIMIT]]
    if len(entries) > LIST_LIMIT:
        lines.append(f"  ... and {len(entries) - LIST_LIMIT} more (all in summary.json)")
    return lines


def report(sweep: Sweep) -> str:
    """The counts line and the lists of runs left out."""
    counts = sweep.counts()
    members = sum(len(r.seeds) for r in sweep.runs)
    lines = [f"{sweep.root}: {counts['complete']} complete run folders ({members} trained members), "
             f"{counts['incomplete']} incomplete, {counts['failed']} failed, {counts['diverged']} diverged "
             "(only complete runs are analysed)"]
    steps = lambda e: f"step {e['last_step'] if e['last_step'] is not None else 0} of {e['steps'] or '?'}"  # noqa: E731
    lines += _listing("incomplete (no result.json)", sweep.incomplete, lambda e: f"{e['folder']} ({steps(e)})")
    for title, entries in (("FAILED", sweep.failed), ("DIVERGED", sweep.diverged)):
        lines += _listing(title, entries, lambda e: f"{e['folder']} (exit {e['exit_status']}): {e['message']}")
    for env, script in sorted({(r.env, r.script) for r in sweep.runs}):
        mixed = sorted({r.steps for r in sweep.runs if (r.env, r.script) == (env, script)}, key=str)
        if len(mixed) > 1:
            lines.append(f"note: {env} {script} mixes runs of {', '.join(map(str, mixed))} steps")
    return "\n".join(lines)


def check_args(args: Args) -> None:
    if not args.only:
        raise UsageError(f"--only needs at least one of {' '.join(ARTEFACTS)}")
    if not args.format:
        raise UsageError("--format needs at least one of png pdf")
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    if not (math.isfinite(args.min_change) and args.min_change >= 0):
        raise UsageError(f"--min-change must be a finite number >= 0, got {args.min_change}")
    if not (math.isfinite(args.dominance) and args.dominance >= 1):
        raise UsageError(f"--dominance must be a finite number >= 1, got {args.dominance}")


def main(args: Args) -> list[Path]:
    """Analyse args.sweep_dir; returns the files written."""
    check_args(args)
    sweep = load_sweep(Path(args.sweep_dir))
    out = Path(args.out) if args.out else Path(args.sweep_dir) / "analysis"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {out}: {error.strerror}; choose a writable folder") from error
    print(report(sweep))
    runs = sweep.runs
    metric_by_env = {env: performance_metric(env, args.metric) for env in sorted({r.env for r in runs})}
    matrices = build_matrices(runs, metric_by_env)
    best_envs = {env: "best_success" for env in metric_by_env if performance_metric(env) == "success"}
    best = build_matrices(runs, best_envs) if args.metric != "best_success" else matrices
    verdicts = [verdict(m, args.threshold, args.min_change, args.dominance) for m in matrices if m.script != "bc"]
    rows = table_rows(matrices, best)
    generalization = generalization_rows(runs, matrices)
    testtime = testtime_rows(runs, metric_by_env)
    online = online_rows(runs, metric_by_env)
    written: list[Path] = []
    if "matrices" in args.only:
        written += plot_matrices(matrices, out, args.format)
    if "table" in args.only:
        written += write_table(rows, out)
    if "verdicts" in args.only:
        print("\nbottleneck verdicts:\n" + verdict_text(verdicts))
        print(f"(change: mean over rows / columns of perf[largest size] - perf[smallest size]; noise: standard error "
              f"of a difference of two cell means; an axis matters when |change| > {args.threshold:g} x noise and "
              "> floor)")
        written += write_verdicts(verdicts, out, args.threshold, args.min_change, args.dominance)
    if "generalization" in args.only:
        if generalization:
            written += plot_generalization(generalization, out, args.format)
        else:
            print("generalization: skipped, no run has train / val / eval MSE (no oracle for these environments)")
    if "testtime" in args.only:
        if testtime:
            print("\ntest time (plain vs test-time methods, the same runs and episodes; mean ± std over seeds):\n"
                  + testtime_text(testtime))
            written += plot_testtime(testtime, out, args.format)
        else:
            print("testtime: skipped, no run evaluated a test-time method (result.json 'test_time' empty)")
    if "online" in args.only:
        if online:
            print("\noffline-to-online (online step 0 → the last; mean over seeds, the change in parentheses):\n"
                  + online_text(online))
            written += plot_online(online, out, args.format) + write_online(online, out)
        elif any(run.online_steps for run in runs):
            print("online: skipped, the online runs' metrics.jsonl hold no evaluation from the end of offline "
                  "training on")
        else:
            print("online: skipped, no run has online steps (result.json 'online_steps' 0 or absent)")
    cells = []
    all_metrics = (*METRICS, *TEST_TIME_KEYS)
    values = {k: cell_values(runs, k) for k in all_metrics}
    for key in sorted({key for per_metric in values.values() for key in per_metric}, key=_cell_order):
        env, script, value, policy, alpha = key
        cell = {"env": env, "script": script, "value_data_size": value, "policy_data_size": policy, "alpha": alpha,
                "seeds": sorted({s for k in all_metrics for s in values[k].get(key, {})})}
        cell.update({k: stats(values[k][key]) for k in all_metrics if key in values[k]})
        cells.append(cell)
    summary = {"sweep_dir": str(sweep.root), "counts": sweep.counts(), "metric": metric_by_env,
               "incomplete": sweep.incomplete, "failed": sweep.failed, "diverged": sweep.diverged,
               "complete": [str(r.folder) for r in runs], "cells": cells,
               "matrices": [m.to_json() for m in matrices], "verdicts": verdicts, "table": rows,
               "generalization": generalization, "testtime": testtime, "online": online}
    write_json_atomic(out / "summary.json", _clean(summary))
    written.append(out / "summary.json")
    print(f"wrote {len(written)} files to {out}: {' '.join(p.name for p in written)}")
    return written


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(tyro.cli(Args, description=__doc__)))
