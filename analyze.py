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
  - intervals (every number below carries one): the mean and the interquartile mean (IQM) with a --confidence
    stratified bootstrap interval over seeds (Agarwal et al. 2021, rliable's definitions; --bootstrap-reps draws,
    seeded, so the same runs give the same intervals; each stratum's seeds spread about their mean by
    sqrt(n / (n - 1)) first, OURS, see `Bootstrap`). One definition per quantity, used by summary.json, the tables,
    the figures and claims.md alike: a cell's interval resamples its seeds (one stratum; per-task success is not a
    stratum: a seed's tasks share one policy); an average over cells (matrix average, test-time numbers) has the
    cells as strata, each cell's seeds resampled within it. The headline number is the mean; the IQM is reported
    beside it, labelled. No interval ("[n/a]") with fewer than 2 seeds.
  - probability of improvement (table; `improvement_rows`): for every two extractors on the same value learner and
    env, P(X > Y) with X the later of awr, ddpgbc, sfbc (P(DDPG+BC > AWR), the paper's claim's direction, in the
    table, the figure and claims.md alike) = per cell both matrices have, the probability that a seed of X scores
    above a seed of Y (ties half), averaged over those cells, with its interval.
  - performance (--metric): auto = the success rate for OGBench environments, the return for dm_control ones.
  - matrix (per env x script): at each (value size, policy size) the cell of the best alpha, the best alpha chosen
    by the MEAN over seeds (never by the single best seed); ties go to the smaller alpha; missing cells are NaN.
  - matrix average (table): the mean of the matrix's cell means with its interval (cells as strata) and the IQM
    over every cell's seeds; "std" in table.csv is the std over seeds of the per-seed matrix average, seeds paired
    by seed id across cells (only seeds present in every cell count). "final" is the
    performance metric at the last evaluation, "best" the best success during training (OGBench only); each picks
    its own best alpha per cell. bc (policy size only) is averaged over its policy sizes, a baseline column. The
    best extractor of a row is bold only where the interval of its difference to every other extractor (matrix
    averages, each cell's seeds resampled) excludes zero; otherwise the row's best is "tie".
  - verdict (per env x script; `verdict`): change along the policy axis = mean over value rows of
    perf[v, largest p] - perf[v, smallest p]; along the value axis = mean over policy columns of
    perf[largest v, p] - perf[smallest v, p], each with its interval (each compared cell's seeds resampled within
    it). With fewer than 3 seeds in a compared cell: "insufficient seeds (n = N, need 3)" and no verdict. An axis
    matters when its interval excludes zero and |change| > --min-change (success rates: absolute; returns: times
    the matrix's largest |cell|). Verdict: neither matters -> flat; one -> policy-bounded / value-bounded; both ->
    the one whose |change| is at least --dominance times the other's, else both. An axis with fewer than 2 sizes is
    n/a.
  - generalization: per script, the cell with the largest value and policy sizes (the all-data cell when the sweep
    has it; if that cell is missing, the one with the largest policy size, then value size) at the alpha chosen for
    performance; train / validation / evaluation MSE to the oracle, mean over seeds with interval error bars, and
    evaluation minus validation MSE paired by seed (the paper's generalization gap) with its interval.
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
    change from online step 0 to the last (with its interval, paired by seed) is the paper's check that online data
    mainly lowers evaluation MSE. Offline-only runs of the same cell that trained past the online runs' offline
    steps are shown beside them over the same updates (the paper's comparison: as many updates, no online data).
    Offline and online runs are never pooled: the matrices, table, verdicts, generalization and test-time numbers
    use the offline runs (a sweep of online runs only: those), and summary.json's cells carry "online_steps".
  - claims (`claim_rows`, claims.md): each claim is called by its own rule (CLAIM_RULES): an interval against "no
    effect" (extraction, generalization, test time; "no change" where every seed's paired change is exactly zero)
    or the verdict rule (data).

Artefacts in --out (default SWEEP_DIR/analysis), each written through a temporary file and a rename:
  matrices_<env>.png/.pdf        one panel per value x extractor script (rows value learner, columns extractor),
                                 each cell's interval under its mean; success coloured on [0, 1]; not drawn when
                                 every panel would be one cell
  table.md, table.csv, table.tex matrix-averaged performance per env x value learner x extractor, bc as baseline
                                 (mean and IQM with intervals; table.md also the probabilities of improvement)
  improvement.csv                P(X > Y) with its interval per env x value learner x extractor pair (also printed)
  aggregate_<env>.png/.pdf       matrix-averaged mean (table.md's) with interval bars per extractor and value
                                 learner, and the probabilities of improvement with their intervals
  verdicts.md, verdicts.csv      the verdict per matrix and the numbers behind it (also printed)
  generalization_<env>.png/.pdf  train / validation / evaluation MSE per script (numbers printed)
  testtime_<env>.png/.pdf        per script, plain vs OPEX vs TTT performance, each method's gain over plain paired
                                 by seed, and evaluation MSE (where measured), the same runs and episodes
  online_<env>.png/.pdf          offline-to-online curves: train / validation / evaluation MSE (where measured) and
                                 performance against the updates after the offline phase, a line per cell (mean,
                                 interval band), dashed: offline-only runs of the same updates
  online.md                      per env x cell each quantity at online step 0 -> the last online step, and the change
                                 (also printed)
  behaviour.md                   per run folder holding evaluate.py's files (trajectories_<step>.png shown; videos/
                                 and eval_<step>.json linked), its cell; only when some folder holds them
  summary.json                   counts (complete, incomplete, failed, diverged), the lists, every cell's aggregates
                                 (env, script, sizes, alpha, mean, std, seeds, intervals, IQM), the matrices, table,
                                 probabilities of improvement ("improvement"), verdicts, and
                                 the test-time numbers under result.json's keys (success, opex_success, ...), and
                                 the offline-to-online curves ("online": per env, per cell, its points), and the
                                 folders with evaluate.py's files ("behaviour")

Exit status 0; 2 with one line naming the problem and the fix for bad input (a missing or empty SWEEP_DIR, no
complete run, a damaged result.json or sweep.json, bad flags).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

import envs
from runs import (EVAL_FILE, EXTRACTORS, RESULT_METRICS, TASK_SUCCESS, TEST_TIME_METHODS, TRAJECTORY_FILE,
                  VALUE_LEARNERS, VIDEO_DIR, UsageError, exit_on_usage_error, read_metrics,
                  write_atomic, write_json_atomic)

TABLE_COLUMNS = (*EXTRACTORS, "bc")  # the table's columns; a forked script's unknown extractor adds one (table_columns)


def table_columns(rows: list[dict]) -> list[str]:
    """TABLE_COLUMNS, with every extractor of a forked script (iql_myloss: "myloss") before bc, in order of first
    use."""
    extra = [c for r in rows for c in r.get("extractors", ()) if c not in TABLE_COLUMNS]
    return [*EXTRACTORS, *dict.fromkeys(extra), "bc"]
METRICS = (*RESULT_METRICS, "best_success")  # per member in result.json
TEST_TIME_REQUIRED = ("success", "return")  # result.json has <method>_<key> for each method in "test_time"
TEST_TIME_OPTIONAL = ("eval_mse",)  # ... and this one where the env has an oracle
TEST_TIME_KEYS = tuple(f"{m}_{k}" for m in TEST_TIME_METHODS for k in (*TEST_TIME_REQUIRED, *TEST_TIME_OPTIONAL))
HEADER_KEYS = ("env", "script", "seeds", "value_data_size", "policy_data_size", "alpha")
ARTEFACTS = ("matrices", "table", "verdicts", "generalization", "testtime", "online", "claims", "behaviour")
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
    only: tuple[Literal["matrices", "table", "verdicts", "generalization", "testtime", "online", "claims",
                        "behaviour"], ...] = ARTEFACTS
    """Artefacts to make (summary.json is always written), e.g. --only table verdicts."""
    format: tuple[Literal["png", "pdf"], ...] = ("png", "pdf")
    """Figure file formats."""
    confidence: float = 0.95
    """Level of every interval (stratified bootstrap over seeds); a verdict's axis matters when its interval
    excludes zero."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples per interval (seeded: the same runs give the same intervals)."""
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
    optional += [key for key in result if TASK_SUCCESS.fullmatch(key)]  # per-task success: the bootstrap's strata
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
# Interval estimates: the mean and the interquartile mean (IQM) with stratified bootstrap confidence intervals, and
# the probability of improvement (Agarwal et al., NeurIPS 2021, rliable's definitions; computed here, not with the
# rliable package: docs/analysis.md has the measured reasons and the check against it)
# ----------------------------------------------------------------------------------------------------------------

MIN_SEEDS = 3  # a verdict needs at least this many seeds in every cell it compares


def iqm(scores: np.ndarray) -> np.ndarray:
    """Interquartile mean over the last axis: the mean after dropping floor(n / 4) scores at each end (rliable's
    aggregate_iqm, scipy.stats.trim_mean(x, 0.25))."""
    scores = np.sort(np.asarray(scores, np.float64), axis=-1)
    cut = int(0.25 * scores.shape[-1])
    return scores[..., cut:scores.shape[-1] - cut].mean(-1)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Stratified bootstrap: each stratum's runs (seeds) are drawn with replacement, independently per stratum;
    percentile intervals. Seeded: the same numbers give the same intervals.

    OURS: for means and changes, each stratum's runs are first spread about their mean by sqrt(n / (n - 1)), so a
    resampled mean has the unbiased variance s^2 / n instead of the plain bootstrap's (n - 1) / n of it, which at 3 to
    5 seeds matters: 95% intervals of a mean / an axis change covered the truth in 83% / 86% of 400 synthetic
    experiments at 3 seeds and 89% / 91% at 5 with rliable's plain percentile bootstrap (spread=False); 89% / 89%
    and 92% / 93% with the spread, and an axis without a true change was called significant in 10% instead of 18% of
    them at 3 seeds (benchmarks/coverage.py). The probability of improvement compares ranks and is resampled
    plainly."""

    reps: int = 2000
    confidence: float = 0.95
    seed: int = 0
    spread: bool = True

    def resample(self, strata: list[np.ndarray], stream: int = 0, plain: bool = False) -> list[np.ndarray]:
        """Per stratum, `reps` draws of its runs: [reps, runs] arrays (spread about the mean unless `plain`)."""
        rng = np.random.default_rng([self.seed, stream])
        draws = []
        for s in strata:
            n = len(s)
            if self.spread and not plain and n > 1:
                s = s.mean() + math.sqrt(n / (n - 1)) * (s - s.mean())
            draws.append(s[rng.integers(0, n, (self.reps, n))])
        return draws

    def interval(self, samples: np.ndarray, bounds: tuple[float, float] = (-math.inf, math.inf)) -> list[float]:
        """The percentile interval, kept within the quantity's possible values (the spread can step outside them:
        a success rate's interval never reaches below 0)."""
        tail = 50 * (1 - self.confidence)
        return np.clip(np.percentile(samples, [tail, 100 - tail]), *bounds).tolist()


def value_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: [0, 1] for success rates, [0, inf) for MSEs, anything for returns."""
    if metric.endswith("success"):
        return 0.0, 1.0
    return (0.0, math.inf) if metric.endswith("mse") else (-math.inf, math.inf)


NO_INTERVAL = [math.nan, math.nan]


def estimate(strata: list, boot: Bootstrap, bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """Mean and IQM of every score of every stratum, each with its interval ("mean_ci", "iqm_ci") within `bounds`;
    no interval (NaN) unless every stratum has 2 runs or more."""
    strata = [np.asarray(s, np.float64) for s in strata if len(s)]
    if not strata:
        return {"mean": math.nan, "mean_ci": NO_INTERVAL, "iqm": math.nan, "iqm_ci": NO_INTERVAL}
    scores = np.concatenate(strata)
    out = {"mean": float(scores.mean()), "mean_ci": NO_INTERVAL, "iqm": float(iqm(scores)), "iqm_ci": NO_INTERVAL}
    if min(len(s) for s in strata) >= 2:
        draws = np.concatenate(boot.resample(strata), axis=1)
        out.update(mean_ci=boot.interval(draws.mean(1), bounds), iqm_ci=boot.interval(iqm(draws), bounds))
    return out


def difference_estimate(cells: list[tuple[dict[int, float], dict[int, float]]], boot: Bootstrap) -> dict:
    """B - A over pairs of cells (A, B) of the same runs (e.g. plain and OPEX success, validation and evaluation MSE):
    per pair the per-seed differences of the seeds both have, pooled with pairs as strata (see `estimate`);
    "all_zero": every one of those differences is exactly zero (the call is then "no change", not "inconclusive")."""
    differences = [[b[s] - a[s] for s in sorted(set(a) & set(b))] for a, b in cells]
    flat = [d for stratum in differences for d in stratum]
    return {**estimate(differences, boot), "all_zero": bool(flat) and all(d == 0 for d in flat)}


def probability_of_improvement(x: list, y: list, boot: Bootstrap) -> dict:
    """P(X > Y): per stratum (a task, a matrix cell) the probability that a run of X scores above a run of Y, ties
    counting half, averaged over strata; its interval resamples X's and Y's runs independently within each stratum.
    NaN without a stratum both have; no interval unless every stratum has 2 runs or more on each side."""
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(x, y) if len(a) and len(b)]
    if not pairs:
        return {"poi": math.nan, "poi_ci": NO_INTERVAL, "strata": 0}

    def poi(xs, ys):  # [reps, n], [reps, m] -> [reps]
        greater = (xs[:, :, None] > ys[:, None, :]) + 0.5 * (xs[:, :, None] == ys[:, None, :])
        return greater.mean((1, 2))

    point = float(np.mean([poi(a[None], b[None])[0] for a, b in pairs]))
    out = {"poi": point, "poi_ci": NO_INTERVAL, "strata": len(pairs)}
    if min(min(len(a), len(b)) for a, b in pairs) >= 2:
        xs = boot.resample([a for a, _ in pairs], stream=1, plain=True)
        ys = boot.resample([b for _, b in pairs], stream=2, plain=True)
        out["poi_ci"] = boot.interval(np.mean([poi(a, b) for a, b in zip(xs, ys)], axis=0))
    return out


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


def stats(per_seed: dict[int, float], boot: Bootstrap, metric: str) -> dict:
    """mean, std (ddof=0) and number of seeds of one cell, with `estimate`'s mean and IQM intervals (the seeds
    resampled, one stratum) within the metric's `value_range`; NaN without seeds."""
    values = np.asarray(list(per_seed.values()), np.float64)
    if values.size == 0:
        return {"mean": math.nan, "std": math.nan, "n_seeds": 0, **estimate([], boot)}
    return {**estimate([values], boot, value_range(metric)),
            "mean": float(values.mean()),
            "std": float(values.std()), "n_seeds": int(values.size)}


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
    estimates: list[list[dict]]  # per cell `stats`: mean and IQM over seeds with intervals (seeds resampled)

    def to_json(self) -> dict:
        cells = lambda key: [[e.get(key, math.nan) for e in row] for row in self.estimates]  # noqa: E731
        return {"env": self.env, "script": self.script, "metric": self.metric, "value_sizes": self.value_sizes,
                "policy_sizes": self.policy_sizes, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "n_seeds": self.n.tolist(), "alpha": self.alpha, "mean_ci": cells("mean_ci"), "iqm": cells("iqm"),
                "iqm_ci": cells("iqm_ci")}


def build_matrices(runs: list[Run], metric_by_env: dict[str, str], boot: Bootstrap) -> list[Matrix]:
    """Every env x script's matrix (bc included, as a single row), in env then script order. The axes are the sizes
    that script's runs have; a combination with no run, or no number for the metric, is a NaN cell. A cell's
    interval resamples its seeds, exactly as summary.json's "cells" (one definition per quantity)."""
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
                       any(run.alpha is not None for run in mine), [[{}] * shape[1] for _ in values])
            for i, v in enumerate(values):
                for j, p in enumerate(policies):
                    if (env, script, v, p) in chosen:
                        alpha, per_seed = chosen[(env, script, v, p)]
                        s = m.estimates[i][j] = stats(per_seed, boot, metric)
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


def pooled(cells: list[dict[int, float]], boot: Bootstrap, metric: str) -> dict:
    """Average over cells: mean of the cell means; std over seeds of the per-seed average (seeds present in every
    cell, paired by id; NaN with none in common); the number of those seeds and of cells; and `estimate`'s IQM and
    intervals with the cells as strata (each cell's seeds resampled within it)."""
    cells = [c for c in cells if c]
    if not cells:
        return {"mean": math.nan, "std": math.nan, "n_seeds": 0, "cells": 0, **estimate([], boot)}
    common = sorted(set.intersection(*(set(c) for c in cells)))
    per_seed = [float(np.mean([c[s] for c in cells])) for s in common]
    strata = [np.asarray(list(c.values()), np.float64) for c in cells]
    out = {"mean": float(np.mean([s.mean() for s in strata])), "mean_ci": NO_INTERVAL,  # cells weigh alike
           "iqm": float(iqm(np.concatenate(strata))), "iqm_ci": NO_INTERVAL}
    if min(len(s) for s in strata) >= 2:  # as `estimate`, with one resample for both intervals
        draws, bounds = boot.resample(strata), value_range(metric)
        out.update(mean_ci=boot.interval(np.mean([d.mean(1) for d in draws], axis=0), bounds),
                   iqm_ci=boot.interval(iqm(np.concatenate(draws, axis=1)), bounds))
    return {**out, "std": float(np.std(per_seed)) if per_seed else math.nan, "n_seeds": len(common),
            "cells": len(cells)}


def matrix_average(m: Matrix, boot: Bootstrap) -> dict:
    """The matrix's average performance over its cells (see `pooled`)."""
    return pooled([cell for row in m.seeds for cell in row], boot, m.metric)


def average_difference(a: Matrix, b: Matrix, boot: Bootstrap) -> dict:
    """B's matrix average minus A's ("difference") with its interval ("ci"): each cell's seeds resampled within it,
    A's and B's cells independently (different runs), as `pooled` resamples one matrix."""
    strata = [[np.asarray(list(c.values()), np.float64) for row in m.seeds for c in row if c] for m in (a, b)]
    if not all(strata):
        return {"difference": math.nan, "ci": NO_INTERVAL}
    difference = float(np.mean([s.mean() for s in strata[1]]) - np.mean([s.mean() for s in strata[0]]))
    if min(len(s) for side in strata for s in side) < 2:
        return {"difference": difference, "ci": NO_INTERVAL}
    means = [np.mean([d.mean(1) for d in boot.resample(side, stream=3 + k)], axis=0) for k, side in enumerate(strata)]
    return {"difference": difference, "ci": boot.interval(means[1] - means[0])}


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck verdict
# ----------------------------------------------------------------------------------------------------------------

def axis_change(m: Matrix, axis: str, boot: Bootstrap) -> dict:
    """The change along `axis` ("policy" or "value"): the mean over value rows of perf[v, largest p] - perf[v,
    smallest p] (policy), or over policy columns of perf[largest v, p] - perf[smallest v, p] (value); rows / columns
    lacking an end cell are left out. Its interval resamples each cell's seeds within the cell. "n_seeds": the fewest
    seeds of a cell it uses; NaN change for an axis with fewer than 2 sizes."""
    rows, cols = len(m.value_sizes), len(m.policy_sizes)
    if axis == "policy":
        pairs = [((i, 0), (i, cols - 1)) for i in range(rows)] if cols >= 2 else []
    else:
        pairs = [((0, j), (rows - 1, j)) for j in range(cols)] if rows >= 2 else []
    pairs = [(a, b) for a, b in pairs if m.seeds[a[0]][a[1]] and m.seeds[b[0]][b[1]]]
    if not pairs:
        return {"change": math.nan, "ci": NO_INTERVAL, "n_seeds": 0}
    used = sorted({cell for pair in pairs for cell in pair})
    values = {c: np.asarray(list(m.seeds[c[0]][c[1]].values()), np.float64) for c in used}
    n_seeds = min(len(v) for v in values.values())
    change = float(np.mean([values[b].mean() - values[a].mean() for a, b in pairs]))
    ci = NO_INTERVAL
    if n_seeds >= 2:
        draws = dict(zip(used, (d.mean(1) for d in boot.resample([values[c] for c in used]))))
        ci = boot.interval(np.mean([draws[b] - draws[a] for a, b in pairs], axis=0))
    return {"change": change, "ci": ci, "n_seeds": n_seeds}


def verdict(m: Matrix, boot: Bootstrap, min_change: float = 0.02, dominance: float = 2.0) -> dict:
    """The bottleneck verdict of one matrix and the numbers behind it (rule in the module docstring): an axis
    matters when the interval of its change excludes zero and the change exceeds the floor; no verdict with fewer
    than MIN_SEEDS seeds in a cell it compares."""
    policy, value = axis_change(m, "policy", boot), axis_change(m, "value", boot)
    finite = np.abs(m.mean[np.isfinite(m.mean)])
    scale = (float(finite.max()) if finite.size else math.nan) if m.metric == "return" else 1.0
    floor = min_change * scale
    present = [a for a in (policy, value) if math.isfinite(a["change"])]
    n_seeds = min((a["n_seeds"] for a in present), default=0)

    def matters(a: dict) -> bool | None:
        if not math.isfinite(a["change"]) or n_seeds < MIN_SEEDS:
            return None
        low, high = a["ci"]
        # Rounded to 12 digits: success rates are multiples of 1 / episodes, and a change of exactly the floor
        # (0.28 - 0.24 + 0.20 - 0.20) / 2 = 0.020000000000000018 must not count as above it.
        return bool(round(abs(a["change"]), 12) > floor and (low > 0 or high < 0))

    policy_matters, value_matters = matters(policy), matters(value)
    if not present:
        label = "n/a"
    elif n_seeds < MIN_SEEDS:
        label = f"insufficient seeds (n = {n_seeds}, need {MIN_SEEDS})"
    elif policy_matters is None:
        label = "value matters (policy n/a)" if value_matters else "flat (policy n/a)"
    elif value_matters is None:
        label = "policy matters (value n/a)" if policy_matters else "flat (value n/a)"
    elif policy_matters and value_matters:
        p, v = abs(policy["change"]), abs(value["change"])
        label = "policy-bounded" if p >= dominance * v else "value-bounded" if v >= dominance * p else "both"
    else:
        label = "policy-bounded" if policy_matters else "value-bounded" if value_matters else "flat"
    return {"env": m.env, "script": m.script, "metric": m.metric, "value_sizes": m.value_sizes,
            "policy_sizes": m.policy_sizes, "policy_change": policy["change"], "policy_ci": policy["ci"],
            "value_change": value["change"], "value_ci": value["ci"], "n_seeds": n_seeds, "floor": floor,
            "policy_matters": policy_matters, "value_matters": value_matters, "verdict": label}


# ----------------------------------------------------------------------------------------------------------------
# Table, generalization and test-time numbers
# ----------------------------------------------------------------------------------------------------------------

def table_rows(final: list[Matrix], best: list[Matrix], boot: Bootstrap) -> list[dict]:
    """Rows of the aggregated table: per kind ("final", "best"), env and value learner, the matrix average of each
    extractor (awr, ddpgbc, sfbc) and of bc, and "best_extractor": the extractor with the highest mean where the
    interval of its difference to every other extractor of the row excludes zero, "tie" where one does not, None
    with no candidate (bc is a baseline, not a candidate); "best_margin": that difference to the runner-up."""
    rows = []
    for kind, matrices in (("final", final), ("best", best)):
        for env in sorted({m.env for m in matrices}):
            mine = {m.script: m for m in matrices if m.env == env}
            bc = matrix_average(mine["bc"], boot) if "bc" in mine else None
            # a forked script (iql_myloss, mine_awr) adds its value learner as a row, its extractor as a column
            parts = [s.partition("_") for s in sorted(mine, key=script_order) if s != "bc"]
            learners = list(dict.fromkeys([*(v for v in VALUE_LEARNERS if any(p[0] == v for p in parts)),
                                           *(p[0] for p in parts)])) or ["-"]
            extractors = list(dict.fromkeys([*EXTRACTORS, *(p[2] for p in parts)]))
            for learner in learners:
                row = {"kind": kind, "env": env, "metric": next(iter(mine.values())).metric, "value": learner,
                       "bc": bc, "extractors": extractors}
                for extractor in extractors:
                    script = f"{learner}_{extractor}"
                    row[extractor] = matrix_average(mine[script], boot) if script in mine else None
                scored = sorted(((row[e]["mean"], e) for e in extractors if row[e] and math.isfinite(row[e]["mean"])),
                                key=lambda x: -x[0])
                row["best_extractor"], row["best_margin"] = (scored[0][1] if scored else None), None
                if len(scored) > 1:
                    top = mine[f"{learner}_{scored[0][1]}"]
                    margins = [average_difference(mine[f"{learner}_{e}"], top, boot) for _, e in scored[1:]]
                    row["best_margin"] = {"over": scored[1][1], **margins[0]}
                    if not all(m["ci"][0] > 0 for m in margins):  # NaN (no interval) counts as not excluding zero
                        row["best_extractor"] = "tie"
                rows.append(row)
    return rows


def improvement_rows(matrices: list[Matrix], boot: Bootstrap) -> list[dict]:
    """For every two extractors on the same value learner and env: P(X > Y), X the later in EXTRACTORS' order
    (P(DDPG+BC > AWR), P(SfBC > AWR), P(SfBC > DDPG+BC): the direction of the paper's claim, used alike in the
    table, the figure and claims.md), by `probability_of_improvement`, the strata being the cells both matrices have
    (same value and policy size; each at its own chosen alpha), the runs each cell's seeds."""
    rows = []
    for env in sorted({m.env for m in matrices}):
        mine = {m.script: m for m in matrices if m.env == env}
        for learner in VALUE_LEARNERS:
            present = [e for e in EXTRACTORS if f"{learner}_{e}" in mine]
            for k, second in enumerate(present):
                for first in present[k + 1:]:
                    a, b = mine[f"{learner}_{first}"], mine[f"{learner}_{second}"]
                    x, y = [], []
                    for i, v in enumerate(a.value_sizes):
                        for j, p in enumerate(a.policy_sizes):
                            if v in b.value_sizes and p in b.policy_sizes:
                                x.append(list(a.seeds[i][j].values()))
                                y.append(list(b.seeds[b.value_sizes.index(v)][b.policy_sizes.index(p)].values()))
                    rows.append({"env": env, "metric": a.metric, "value": learner, "x": first, "y": second,
                                 **probability_of_improvement(x, y, boot)})
    return rows


CLAIMS = {  # the paper's four claims as this sweep can test them (`claim_rows`)
    "extraction": "DDPG+BC extracts a better policy than AWR from the same value function",
    "data": "more policy data helps more than more value data",
    "generalization": "the policy errs more on the states it meets at test time than on held-out dataset states",
    "testtime": "test-time policy improvement (OPEX / TTT) raises performance",
}


CLAIM_RULES = {  # how claim_rows calls each claim: claims.md's header and docs/analysis.md say the same
    "extraction": "the 95% interval of P(DDPG+BC > AWR) above 0.5: reproduced; below 0.5: not reproduced; "
                  "else inconclusive",
    "data": "the bottleneck verdict (verdicts.md's rule: two intervals, a floor, 2x dominance): policy-bounded: "
            "reproduced; value-bounded: not reproduced; flat, both or insufficient seeds: inconclusive",
    "generalization": "the 95% interval of evaluation minus validation MSE (paired by seed) above 0: reproduced; "
                      "below 0: not reproduced; every seed's difference exactly 0: no change; else inconclusive",
    "testtime": "the 95% interval of the method's gain over plain (paired by seed) above 0: reproduced; below 0: "
                "not reproduced; every seed's gain exactly 0: no change; else inconclusive",
}


def _call(low: float, high: float, null: float, larger_supports: bool = True, no_change: bool = False) -> str:
    """reproduced / not reproduced / inconclusive from an interval and the value meaning "no effect"; "no change"
    where every seed's paired change is exactly zero (`no_change`)."""
    if no_change:
        return "no change"
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive (no interval: fewer than 2 seeds)"
    if low > null:
        return "reproduced" if larger_supports else "not reproduced"
    if high < null:
        return "not reproduced" if larger_supports else "reproduced"
    return "inconclusive"


def claim_rows(improvements: list[dict], verdicts: list[dict], generalization: dict, testtime: dict) -> list[dict]:
    """One row per (claim, where this sweep can test it): "claim" (a CLAIMS key), "where", "evidence" (the number and
    its interval) and "result" (reproduced at this scale / not reproduced / inconclusive, from the interval)."""
    rows = []
    for r in improvements:
        if {r["x"], r["y"]} == {"awr", "ddpgbc"}:
            flip = r["x"] == "awr"  # P(DDPG+BC > AWR) = 1 - P(AWR > DDPG+BC)
            poi = 1 - r["poi"] if flip else r["poi"]
            low, high = (1 - r["poi_ci"][1], 1 - r["poi_ci"][0]) if flip else r["poi_ci"]
            rows.append({"claim": "extraction", "where": f"{r['env']} {NAMES.get(r['value'], r['value'])}",
                         "evidence": f"P(DDPG+BC > AWR) = {poi:.2f} [{low:.2f}, {high:.2f}] over {_cells(r['strata'])}",
                         "result": _call(low, high, 0.5)})
    for v in verdicts:
        if not (math.isfinite(v["policy_change"]) and math.isfinite(v["value_change"])):
            continue
        result = ("reproduced" if v["verdict"] == "policy-bounded" else "not reproduced"
                  if v["verdict"] == "value-bounded" else f"inconclusive ({v['verdict']})")
        rows.append({"claim": "data", "where": f"{v['env']} {v['script']}",
                     "evidence": f"policy axis {_signed_interval(v['policy_change'], v['policy_ci'], v['metric'])}, "
                                 f"value axis {_signed_interval(v['value_change'], v['value_ci'], v['metric'])}",
                     "result": result})
    for env, mine in sorted(generalization.items()):
        for r in mine:
            d = r["eval_minus_val"]
            rows.append({"claim": "generalization", "where": f"{env} {r['script']} {online_setting(r)}",
                         "evidence": f"evaluation - validation MSE {_signed_interval(d['mean'], d['mean_ci'], 'mse')}",
                         "result": _call(*d["mean_ci"], 0.0, no_change=d.get("all_zero", False))})
    for env, mine in sorted(testtime.items()):
        for r in mine:
            for m in r["methods"]:
                gain = r.get(f"{m}_gain")
                if gain:
                    rows.append({"claim": "testtime", "where": f"{env} {r['script']} {NAMES[m]}",
                                 "evidence": f"{r['metric']} gain over plain "
                                             f"{_signed_interval(gain['mean'], gain['mean_ci'], r['metric'])}",
                                 "result": _call(*gain["mean_ci"], 0.0, no_change=gain.get("all_zero", False))})
    return rows


def claims_page(rows: list[dict], confidence: float) -> str:
    """claims.md: each claim's own rule, then the rows."""
    level = f"{100 * confidence:g}%"
    rules = [f"- **{CLAIMS[c]}**: {CLAIM_RULES[c].replace('95%', level)}." for c in CLAIMS
             if any(r["claim"] == c for r in rows)]
    return ("# The paper's claims in this sweep\n\nEach row: where the sweep tests a claim, the number that decides "
            "it with its interval, and the call, by the claim's own rule:\n\n" + "\n".join(rules) + "\n\n"
            + claims_text(rows, markdown=True) + "\n")


def claims_text(rows: list[dict], markdown: bool = False) -> str:
    lines = ["| claim | where | evidence | at this scale |", "| --- | --- | --- | --- |"] if markdown else []
    for r in rows:
        lines.append(f"| {CLAIMS[r['claim']]} | {r['where']} | {r['evidence']} | {r['result']} |" if markdown else
                     f"  {r['claim']}: {r['where']}: {r['evidence']} -> {r['result']}")
    return "\n".join(lines)


def _choose_cell(m: Matrix) -> tuple[int, int] | None:
    """The largest cell of a matrix: (largest v, largest p) if present, else the largest policy, then value size."""
    present = [(i, j) for i in range(len(m.value_sizes)) for j in range(len(m.policy_sizes)) if m.seeds[i][j]]
    if not present:
        return None
    corner = (len(m.value_sizes) - 1, len(m.policy_sizes) - 1)
    return corner if corner in present else max(present, key=lambda ij: (ij[1], ij[0]))


def generalization_rows(runs: list[Run], matrices: list[Matrix], boot: Bootstrap) -> dict[str, list[dict]]:
    """Per env, per script: train / val / eval MSE stats at its largest cell and performance-chosen alpha (scripts
    without any MSE number there are left out), and "eval_minus_val": evaluation minus validation MSE, paired by
    seed, with its interval (the paper's claim: the policy errs more on the states it meets at test time)."""
    mse = {k: cell_values(runs, k) for k in ("train_mse", "val_mse", "eval_mse")}
    out: dict[str, list[dict]] = {}
    for m in matrices:
        ij = _choose_cell(m)
        if ij is None:
            continue
        i, j = ij
        key = (m.env, m.script, m.value_sizes[i], m.policy_sizes[j], m.alpha[i][j])
        row = {k: stats(mse[k].get(key, {}), boot, k) for k in mse}
        row["eval_minus_val"] = difference_estimate([(mse["val_mse"].get(key, {}), mse["eval_mse"].get(key, {}))],
                                                    boot)
        if any(row[k]["n_seeds"] for k in mse):
            out.setdefault(m.env, []).append({"script": m.script, "value_size": key[2], "policy_size": key[3],
                                              "alpha": key[4], **row})
    return out


def testtime_rows(runs: list[Run], metric_by_env: dict[str, str], boot: Bootstrap) -> dict[str, list[dict]]:
    """Per env, per script whose runs evaluated test-time methods, from those runs only (rule in the module
    docstring): "metric" (success or return), "methods" (those evaluated), "cells" (alpha-chosen cells), and under
    result.json's own keys the pooled numbers (`pooled`): plain performance ("success" / "return") and each
    method's ("opex_success", ...); "eval_mse" and "<method>_eval_mse" where measured; and per method its change
    from plain, paired by seed with the cells as strata (`difference_estimate`): "<method>_gain" (performance) and
    "<method>_eval_mse_change"."""
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
                    numbers = pooled([values.get(k, {}) for k in keys], boot, key)
                    if always or numbers["cells"]:
                        row[prefix + key] = numbers
            for method in methods:
                for key, name in ((base, "gain"), ("eval_mse", "eval_mse_change")):
                    plain, tested = cell_values(mine, key), cell_values(mine, f"{method}_{key}")
                    if any(k in tested for k in keys):
                        row[f"{method}_{name}"] = difference_estimate(
                            [(plain.get(k, {}), tested.get(k, {})) for k in keys], boot)
            out.setdefault(env, []).append(row)
    return out


def read_online_curve(run: Run, quantities: tuple[str, ...], window: tuple[int, int] | None = None
                      ) -> dict[str, dict[int, dict[int, float]]]:
    """One run's curves from its metrics.jsonl over `window` = (first, last) step (default: an online run's online
    phase, (steps, steps + online_steps)): per quantity, per seed, step - first -> value; a later record of the same
    seed and step replaces an earlier one, and a missing or non-finite value is left out."""
    first, last = window or (run.steps, run.steps + run.online_steps)
    curves: dict[str, dict[int, dict[int, float]]] = {q: {} for q in quantities}
    for record in read_metrics(run.folder / "metrics.jsonl"):
        if not isinstance(record, dict) or record.get("event") != "eval":
            continue
        step, seed, member = record.get("step"), record.get("seed"), record.get("member")
        if not isinstance(seed, int) and isinstance(member, int) and 0 <= member < len(run.seeds):
            seed = run.seeds[member]  # a record without its seed: the member's
        if not isinstance(step, int) or not isinstance(seed, int) or not first <= step <= last:
            continue
        for quantity in quantities:
            value = _number(record.get(quantity))
            if math.isfinite(value):
                curves[quantity].setdefault(seed, {})[step - first] = value
    return {q: per_seed for q, per_seed in curves.items() if per_seed}


def _common_steps(curves: dict[str, dict[int, dict[int, float]]]) -> dict[str, set[int]]:
    """Per quantity, the online steps that every seed having that quantity has."""
    return {q: set.intersection(*(set(curve) for curve in per_seed.values())) for q, per_seed in curves.items()}


def online_points(curves: dict[str, dict[int, dict[int, float]]], boot: Bootstrap) -> list[dict]:
    """A cell's points in online-step order: {"online_step", and per quantity its stats over seeds} where a quantity
    appears at the online steps that every seed having that quantity has."""
    common = _common_steps(curves)
    return [{"online_step": step, **{q: stats({seed: curve[step] for seed, curve in per_seed.items()}, boot, q)
                                     for q, per_seed in curves.items() if step in common[q]}}
            for step in sorted(set().union(*common.values()))]


def online_change_intervals(curves: dict[str, dict[int, dict[int, float]]], boot: Bootstrap) -> dict[str, list]:
    """Per quantity, the interval of its change from the first to the last common online step, paired by seed."""
    out = {}
    for q, per_seed in curves.items():
        steps = _common_steps(curves)[q]
        if steps:
            first, last = min(steps), max(steps)
            out[q] = difference_estimate([({s: c[first] for s, c in per_seed.items()},
                                           {s: c[last] for s, c in per_seed.items()})], boot)["mean_ci"]
    return out


def online_rows(runs: list[Run], metric_by_env: dict[str, str], boot: Bootstrap) -> dict[str, list[dict]]:
    """Per env, per cell with online runs (script order, then sizes and alpha): "script", "value_size",
    "policy_size", "alpha", "metric" (success or return), "offline_only": False, "seeds", and "points" (see
    `online_points`) from the eval records of its runs with online_steps > 0, pooled seed by seed (a seed's values
    at an online step from several folders averaged), and "change_ci" (see `online_change_intervals`). Cells whose
    runs logged no eval record from the offline end on are left out. After each such row, where the sweep has
    offline-only runs (online_steps 0) of the same cell that trained past the online runs' offline steps, a row
    "offline_only": True of those runs over the same updates (step - the online runs' offline steps): the
    comparison the paper makes, with the same number of updates and no online data."""
    out: dict[str, list[dict]] = {}
    key_of = lambda run: (run.env, run.script, run.value_size, run.policy_size, run.alpha)  # noqa: E731
    for env, metric in sorted(metric_by_env.items()):
        quantities = (*ONLINE_MSES, "return" if metric == "return" else "success")  # best_success: no counterpart
        online = [run for run in runs if run.env == env and run.online_steps > 0]
        for key in sorted({key_of(r) for r in online}, key=lambda k: (script_order(k[1]), *_cell_order(k)[2:])):
            mine = [run for run in online if key_of(run) == key]
            curves = _pooled_curves([(run, None) for run in mine], quantities)
            if not curves:
                continue
            out.setdefault(env, []).append(_online_row(key, curves, quantities[-1], False, boot))
            split, length = min(run.steps for run in mine), max(run.online_steps for run in mine)
            offline = [run for run in runs if key_of(run) == key and not run.online_steps
                       and isinstance(run.steps, int) and run.steps > split]
            offline_curves = _pooled_curves([(run, (split, split + length)) for run in offline], quantities)
            if offline_curves:
                out[env].append(_online_row(key, offline_curves, quantities[-1], True, boot))
    return out


def _pooled_curves(chosen: list[tuple[Run, tuple[int, int] | None]], quantities: tuple[str, ...]) -> dict:
    """The curves (`read_online_curve`, each run over its window) of several runs of one cell, pooled seed by seed:
    a seed's values at a step from several folders averaged."""
    seen: dict[str, dict[int, dict[int, list[float]]]] = {}
    for run, window in chosen:
        for quantity, per_seed in read_online_curve(run, quantities, window).items():
            for seed, curve in per_seed.items():
                for step, value in curve.items():
                    seen.setdefault(quantity, {}).setdefault(seed, {}).setdefault(step, []).append(value)
    return {q: {seed: {step: float(np.mean(v)) for step, v in sorted(curve.items())}
                for seed, curve in sorted(seen[q].items())} for q in quantities if q in seen}


def _online_row(key: CellKey, curves: dict, metric: str, offline_only: bool, boot: Bootstrap) -> dict:
    return {"script": key[1], "value_size": key[2], "policy_size": key[3], "alpha": key[4], "metric": metric,
            "offline_only": offline_only, "seeds": sorted({seed for per_seed in curves.values() for seed in per_seed}),
            "points": online_points(curves, boot), "change_ci": online_change_intervals(curves, boot)}


def online_changes(row: dict) -> dict[str, dict]:
    """Per quantity of an online row: its mean at its first and last online step ("from", "to", "first_step",
    "last_step"), "change" = to - from and its interval "ci" (paired by seed)."""
    changes = {}
    for quantity in (*ONLINE_MSES, row["metric"]):
        present = [p for p in row["points"] if quantity in p]
        if present:
            first, last = present[0], present[-1]
            changes[quantity] = {"from": first[quantity]["mean"], "to": last[quantity]["mean"],
                                 "change": last[quantity]["mean"] - first[quantity]["mean"],
                                 "first_step": first["online_step"], "last_step": last["online_step"],
                                 "ci": row.get("change_ci", {}).get(quantity, NO_INTERVAL)}
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


def _with_interval(a: dict, metric: str, key: str = "mean") -> str:
    """"0.253 [0.210, 0.300]": a number and its interval; "[n/a]" where there is none (fewer than 2 seeds)."""
    fmt = _fmt_mse if metric.endswith("mse") else lambda x: _fmt(x, metric)  # noqa: E731
    low, high = a.get(f"{key}_ci", NO_INTERVAL)
    return f"{fmt(a[key])} [{fmt(low)}, {fmt(high)}]" if math.isfinite(low) else f"{fmt(a[key])} [n/a]"


def _signed_interval(change: float, ci: list, metric: str) -> str:
    """"+0.120 [+0.040, +0.200]": a change and its interval, signed."""
    def fmt(x):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:+.4g}" if metric.endswith("mse") else f"{x:+.1f}" if metric == "return" else f"{x:+.3f}"
    return f"{fmt(change)} [{fmt(ci[0])}, {fmt(ci[1])}]" if math.isfinite(ci[0]) else f"{fmt(change)} [n/a]"


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


def write_table(rows: list[dict], improvements: list[dict], out: Path, confidence: float) -> list[Path]:
    """table.md (bold: best extractor; the mean table, the IQM table, the probabilities of improvement), table.csv
    (best_extractor column), improvement.csv, table.tex (\\textbf)."""
    kinds = {"final": "final performance (last evaluation)", "best": "best success rate during training"}
    level = f"{100 * confidence:g}%"
    md = ["# Matrix-averaged performance", "",
          f"Each entry: the mean over the matrix's cells (per cell the alpha with the best mean over seeds) and its "
          f"{level} stratified bootstrap interval (strata: the cells; each cell's seeds resampled within it); [n/a]: "
          "fewer than 2 seeds. Bold: the row's best extractor, only where the interval of its difference to every "
          "other extractor excludes zero (else the row's best is a tie; table.csv's best_extractor says \"tie\"). bc: "
          "behaviour cloning, averaged over its "
          "policy sizes (a baseline, not a candidate). The IQM (interquartile mean over every cell's seeds) follows "
          "each mean table.", ""]
    tex = [f"% matrix-averaged performance [{level} interval]; bold: best extractor of the row; bc: baseline"]
    columns = table_columns(rows)
    for kind, title in kinds.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        for key, heading in (("mean", title), ("iqm", f"{title}: IQM")):
            md += [f"## {heading}", "", "| env | metric | value | " + " | ".join(columns) + " |",
                   "| --- " * (3 + len(columns)) + "|"]
            if key == "mean":
                tex += [f"% {title}", "\\begin{tabular}{lll" + "c" * len(columns) + "}", "\\hline",
                        "env & metric & value & " + " & ".join(columns) + " \\\\", "\\hline"]
            for row in mine:
                md_cells, tex_cells = [], []
                for column in columns:
                    text = "" if row.get(column) is None else _with_interval(row[column], row["metric"], key)
                    bold = column == row["best_extractor"] and key == "mean"
                    md_cells.append(f"**{text}**" if bold and text else text)
                    tex_cells.append(f"\\textbf{{{text}}}" if bold and text else text)
                md.append(f"| {row['env']} | {row['metric']} | {row['value']} | " + " | ".join(md_cells) + " |")
                if key == "mean":
                    metric = row["metric"].replace("_", "\\_")
                    tex.append(f"{row['env']} & {metric} & {row['value']} & " + " & ".join(tex_cells) + " \\\\")
            md.append("")
        tex += ["\\hline", "\\end{tabular}", ""]
    if improvements:
        md += ["## Probability of improvement", "",
               f"P(X > Y): the probability that a seed of extractor X scores above a seed of extractor Y on the same "
               f"value learner, averaged over the cells both matrices have (ties count half), with its {level} "
               "stratified bootstrap interval. 0.5: no difference; an interval above 0.5: X is better.", "",
               improvement_text(improvements, markdown=True), ""]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["kind", "env", "metric", "value_learner"]
    for column in columns:
        header += [f"{column}_{k}" for k in ("mean", "ci_low", "ci_high", "iqm", "iqm_ci_low", "iqm_ci_high", "std",
                                             "seeds", "cells")]
    writer.writerow(header + ["best_extractor"])
    number = lambda x: f"{x:.6g}" if x is not None and math.isfinite(x) else ""  # noqa: E731
    for row in rows:
        line = [row["kind"], row["env"], row["metric"], row["value"]]
        for column in columns:
            a = row.get(column)
            line += [""] * 9 if a is None else [number(a["mean"]), *map(number, a["mean_ci"]), number(a["iqm"]),
                                               *map(number, a["iqm_ci"]), number(a["std"]), a["n_seeds"],
                                               a["cells"]]
        writer.writerow(line + [row["best_extractor"] or ""])
    poi = io.StringIO()
    writer = csv.writer(poi, lineterminator="\n")
    writer.writerow(["env", "metric", "value_learner", "x", "y", "poi", "poi_ci_low", "poi_ci_high", "cells"])
    for r in improvements:
        writer.writerow([r["env"], r["metric"], r["value"], r["x"], r["y"], number(r["poi"]),
                         *map(number, r["poi_ci"]), r["strata"]])
    return [_write_text(out / "table.md", "\n".join(md)), _write_text(out / "table.csv", buffer.getvalue()),
            _write_text(out / "improvement.csv", poi.getvalue()), _write_text(out / "table.tex", "\n".join(tex))]


def improvement_text(improvements: list[dict], markdown: bool = False) -> str:
    """The probabilities of improvement, one line (or Markdown row) per env x value learner x extractor pair."""
    lines = (["| env | value | X | Y | P(X > Y) | cells |", "| --- | --- | --- | --- | --- | --- |"]
             if markdown else [])
    for r in improvements:
        low, high = r["poi_ci"]
        text = f"{r['poi']:.2f} [{low:.2f}, {high:.2f}]" if math.isfinite(low) else (
            "n/a" if not math.isfinite(r["poi"]) else f"{r['poi']:.2f} [n/a]")
        x, y = NAMES.get(r["x"], r["x"]), NAMES.get(r["y"], r["y"])
        lines.append(f"| {r['env']} | {r['value']} | {x} | {y} | {text} | {r['strata']} |" if markdown else
                     f"  {r['env']} {NAMES.get(r['value'], r['value'])}: P({x} > {y}) = {text} over "
                     f"{_cells(r['strata'])}")
    return "\n".join(lines)


VERDICT_COLUMNS = ("env", "script", "metric", "value sizes", "policy sizes", "policy change [CI]",
                   "value change [CI]", "seeds", "floor", "policy matters", "value matters", "verdict")


def _verdict_cells(v: dict) -> list[str]:
    flag = lambda x: "n/a" if x is None else "yes" if x else "no"  # noqa: E731
    return [v["env"], v["script"], v["metric"], " ".join(size_label(s) for s in v["value_sizes"]),
            " ".join(size_label(s) for s in v["policy_sizes"]),
            _signed_interval(v["policy_change"], v["policy_ci"], v["metric"]),
            _signed_interval(v["value_change"], v["value_ci"], v["metric"]), str(v["n_seeds"]), f"{v['floor']:.4g}",
            flag(v["policy_matters"]), flag(v["value_matters"]), v["verdict"]]


def verdict_text(verdicts: list[dict]) -> str:
    """The verdicts as an aligned plain-text table (printed)."""
    rows = [list(VERDICT_COLUMNS)] + [_verdict_cells(v) for v in verdicts]
    widths = [max(len(r[c]) for r in rows) for c in range(len(VERDICT_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def verdict_rule(confidence: float, min_change: float, dominance: float) -> str:
    return (f"Change: mean over value rows (policy axis) / policy columns (value axis) of perf[largest size] - "
            f"perf[smallest size], with its {100 * confidence:g}% stratified bootstrap interval (each cell's seeds "
            f"resampled within it). A verdict needs at least {MIN_SEEDS} seeds in every cell compared (seeds: the "
            f"fewest); an axis matters when its interval excludes zero and |change| > floor ({min_change:g} for "
            f"success rates; for returns {min_change:g} x the matrix's largest |cell|). Both matter: the axis with at "
            f"least {dominance:g}x the other's |change| decides, else 'both'.")


def write_verdicts(verdicts: list[dict], out: Path, confidence: float, min_change: float,
                   dominance: float) -> list[Path]:
    md = ["# Bottleneck verdicts", "", verdict_rule(confidence, min_change, dominance), "",
          "| " + " | ".join(VERDICT_COLUMNS) + " |", "| --- " * len(VERDICT_COLUMNS) + "|"]
    md += ["| " + " | ".join(_verdict_cells(v)) + " |" for v in verdicts]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["env", "script", "metric", "value_sizes", "policy_sizes", "policy_change", "policy_ci_low",
                     "policy_ci_high", "value_change", "value_ci_low", "value_ci_high", "seeds", "floor",
                     "policy_matters", "value_matters", "verdict"])
    number = lambda x: "" if x is None or not math.isfinite(x) else f"{x:.6g}"  # noqa: E731
    for v in verdicts:
        writer.writerow([v["env"], v["script"], v["metric"], " ".join(size_label(s) for s in v["value_sizes"]),
                         " ".join(size_label(s) for s in v["policy_sizes"]), number(v["policy_change"]),
                         *map(number, v["policy_ci"]), number(v["value_change"]), *map(number, v["value_ci"]),
                         v["n_seeds"], number(v["floor"]), "" if v["policy_matters"] is None else v["policy_matters"],
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
    """Write the figure as <stem>.<format> for each format (atomically), at DPI, then close it. A PDF carries no
    creation date, so the same sweep gives the same bytes."""
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        write_atomic(path, lambda f, fmt=fmt, metadata=metadata: fig.savefig(f, format=fmt, dpi=DPI,
                                                                              metadata=metadata), binary=True)
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
    """One figure per env: a panel per value x extractor script (bc is in the table, not here). Colours: success rates
    on a fixed [0, 1] scale (noise between cells shows as noise); returns from the figure's lowest to highest cell,
    as the colourbar's label says. No figure where every panel would be a single cell (the table has its number)."""
    plt = _pyplot()
    paths = []
    for env in sorted({m.env for m in matrices}):
        mine = [m for m in matrices if m.env == env and m.script != "bc"]
        if not mine or all(m.mean.size == 1 for m in mine):
            continue
        rows, cols, where = panel_layout([m.script for m in mine])
        fig, axes = plt.subplots(rows, cols, figsize=matrix_figsize(rows, cols), squeeze=False, layout="constrained")
        label = METRIC_LABELS.get(mine[0].metric, mine[0].metric)
        if mine[0].metric.endswith("success"):
            low, high = 0.0, 1.0
        else:
            finite = np.concatenate([m.mean[np.isfinite(m.mean)] for m in mine])
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if high - low < 1e-9:
                low, high = low - 0.05, high + 0.05
            label += " (colours: lowest to highest cell)"
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
                        fmt = "{:.1f}" if m.metric == "return" else "{:.2f}"
                        ci_low, ci_high = m.estimates[i][j].get("mean_ci", NO_INTERVAL)
                        text = fmt.format(m.mean[i, j]) + (f"\n[{fmt.format(ci_low)}, {fmt.format(ci_high)}]"
                                                           if math.isfinite(ci_low) else f"\nn={m.n[i, j]}")
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
        fig.colorbar(image, ax=axes, label=label, shrink=0.9)
        # Two lines: a single panel is narrower than the one-line title would be.
        fig.suptitle(f"{env}\nbest alpha per cell: mean over seeds [95% bootstrap interval]", fontsize=10)
        paths += save_figure(fig, out, f"matrices_{env}", formats)
    return paths


def _bars(groups: list[str], series: dict[str, list[dict]], ylabel: str, title: str):
    """A figure of grouped bars (see `_draw_bars`)."""
    fig, ax = _pyplot().subplots(figsize=bars_figsize(len(groups)), layout="constrained")
    _draw_bars(ax, groups, series, ylabel, title)
    return fig


def _draw_bars(ax, groups: list[str], series: dict[str, list[dict]], ylabel: str, title: str,
               key: str = "mean") -> None:
    """Grouped bars on `ax`: one group per label in `groups`, one bar per series (`key`, "mean" or "iqm", with its
    interval as the error bar; none without an interval; NaN: no bar)."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (name, values) in enumerate(series.items()):
        heights = np.array([v[key] for v in values], np.float64)
        bounds = np.array([v.get(f"{key}_ci", NO_INTERVAL) for v in values], np.float64).reshape(-1, 2)
        errors = np.nan_to_num(np.stack([heights - bounds[:, 0], bounds[:, 1] - heights]).clip(0))
        present = np.isfinite(heights)
        ax.bar(x[present] + (k - (len(series) - 1) / 2) * width, heights[present], width,
               yerr=errors[:, present], capsize=3, label=name)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def plot_aggregates(rows: list[dict], improvements: list[dict], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Per env (rliable's two figures): the matrix-averaged mean with its interval per extractor, grouped by value
    learner (final performance; the numbers of table.md's mean table), and the probability of improvement of each
    extractor pair with its interval, in `improvement_rows`' direction."""
    plt = _pyplot()
    paths = []
    for env in sorted({r["env"] for r in rows}):
        mine = [r for r in rows if r["env"] == env and r["kind"] == "final"]
        pairs = [r for r in improvements if r["env"] == env]
        columns = [c for c in table_columns(mine) if any(r.get(c) for r in mine)]
        if not columns:
            continue
        fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(bars_figsize(len(mine))[0] + 4.5 * bool(pairs), 3.8),
                                 squeeze=False, layout="constrained")
        missing = {"mean": math.nan, "mean_ci": NO_INTERVAL}
        series = {NAMES.get(c, c): [r.get(c) or missing for r in mine] for c in columns}
        _draw_bars(axes[0, 0], [NAMES.get(r["value"], r["value"]) for r in mine], series,
                   METRIC_LABELS.get(mine[0]["metric"], mine[0]["metric"]),
                   f"{env}\nmatrix-averaged mean (table.md), 95% bootstrap interval")
        if pairs:
            ax = axes[0, 1]
            labels = [f"{NAMES.get(r['value'], r['value'])}: {NAMES[r['x']]} > {NAMES[r['y']]}" for r in pairs]
            poi = np.array([r["poi"] for r in pairs], np.float64)
            bounds = np.array([r["poi_ci"] for r in pairs], np.float64).reshape(-1, 2)
            errors = np.nan_to_num(np.stack([poi - bounds[:, 0], bounds[:, 1] - poi]).clip(0))
            y = np.arange(len(pairs))
            ax.errorbar(poi, y, xerr=errors, fmt="o", capsize=4)
            ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
            ax.set_yticks(y, labels, fontsize=8)
            ax.set_xlim(0, 1)
            ax.invert_yaxis()
            ax.set_xlabel("probability of improvement P(X > Y)")
            ax.set_title("extractor X vs Y on the same value learner\n(over matched cells, 95% interval)", fontsize=9)
        paths += save_figure(fig, out, f"aggregate_{env}", formats)
    return paths


def bars_figsize(groups: int, rows: int = 1) -> tuple[float, float]:
    return max(5.0, 1.3 * groups + 1.5), 3.8 * rows


def generalization_text(rows: dict[str, list[dict]]) -> str:
    lines = []
    for env, mine in sorted(rows.items()):
        for r in mine:
            d = r["eval_minus_val"]
            lines.append(f"  {env} {r['script']} {online_setting(r)}: "
                         + " | ".join(f"{k} {_with_interval(r[k], k)}" for k in ONLINE_MSES if r[k]["n_seeds"])
                         + f" | eval - val {_signed_interval(d['mean'], d['mean_ci'], 'eval_mse')}")
    return "\n".join(lines)


def plot_generalization(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    paths = []
    for env, mine in sorted(rows.items()):
        groups = [f"{script_label(r['script'])}\n"
                  + ("" if r["value_size"] is None else f"v{size_label(r['value_size'])} ")
                  + f"p{size_label(r['policy_size'])}" + ("" if r["alpha"] is None else f" α={r['alpha']:g}")
                  for r in mine]
        series = {name: [r[key] for r in mine] for name, key in
                  (("train", "train_mse"), ("validation", "val_mse"), ("evaluation", "eval_mse"))}
        fig = _bars(groups, series, "MSE to the oracle's action",
                    f"{env}\npolicy error on training / validation / evaluation states\n(largest cell per script; "
                    "mean over seeds, 95% bootstrap interval)")
        paths += save_figure(fig, out, f"generalization_{env}", formats)
    return paths


def _cells(n: int) -> str:
    return f"{n} cell" + "s" * (n != 1)


def testtime_panels(mine: list[dict]) -> list[str]:
    """The panels of one env's test-time figure: performance per arm, the paired gain over plain ("gain"), and
    eval_mse when some method measured it."""
    methods = {m for r in mine for m in r["methods"]}
    return [mine[0]["metric"], "gain"] + (["eval_mse"] if any(f"{m}_eval_mse" in r for r in mine for m in methods)
                                          else [])


def plot_testtime(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Per env: plain vs each evaluated test-time method on the same runs and episodes: performance per arm, the
    gain of each method over plain paired by seed (the number the text reports), and evaluation MSE per arm (where
    measured); a script without a method's numbers has no bar there."""
    plt = _pyplot()
    paths = []
    missing = {"mean": math.nan, "std": math.nan}
    for env, mine in sorted(rows.items()):
        methods = [m for m in TEST_TIME_METHODS if any(m in r["methods"] for r in mine)]
        panels = testtime_panels(mine)
        fig, axes = plt.subplots(len(panels), 1, figsize=bars_figsize(len(mine), len(panels)), squeeze=False,
                                 layout="constrained")
        groups = [f"{script_label(r['script'])}\n({_cells(r['cells'])})" for r in mine]
        for ax, key in zip(axes[:, 0], panels):
            if key == "gain":
                series = {f"{NAMES[m]} - plain": [r.get(f"{m}_gain", missing) for r in mine] for m in methods}
                ylabel, title = "gain over plain", "paired gain: method minus plain, seed by seed"
                ax.axhline(0, color="gray", linewidth=1)
            else:
                series = {name: [r.get(prefix + key, missing) for r in mine]
                          for name, prefix in (("plain", ""), *((NAMES[m], m + "_") for m in methods))}
                series = {name: v for name, v in series.items() if any(math.isfinite(x["mean"]) for x in v)} or series
                ylabel, title = (("MSE to the oracle's action", "policy error on evaluation states per arm")
                                 if key == "eval_mse" else (METRIC_LABELS[key], f"{METRIC_LABELS[key]} per arm"))
            _draw_bars(ax, groups, series, ylabel, title)
        fig.suptitle(f"{env}\ntest-time policy improvement, the same runs and episodes\n(mean over seeds, 95% "
                     "bootstrap interval)", fontsize=10)
        paths += save_figure(fig, out, f"testtime_{env}", formats)
    return paths


def testtime_text(rows: dict[str, list[dict]]) -> str:
    """The test-time numbers as printed: one line per env x script, under result.json's keys, each with its
    interval, then each method's gain over plain (and change of evaluation MSE) with its interval."""
    lines = []
    for env, mine in sorted(rows.items()):
        for r in mine:
            parts = []
            for key in (r["metric"], "eval_mse"):
                for prefix in ("", *(m + "_" for m in r["methods"])):
                    if prefix + key in r:
                        parts.append(f"{prefix + key} {_with_interval(r[prefix + key], key)}")
            for m in r["methods"]:
                for name, metric in (("gain", r["metric"]), ("eval_mse_change", "eval_mse")):
                    if f"{m}_{name}" in r:
                        a = r[f"{m}_{name}"]
                        parts.append(f"{m}_{name} {_signed_interval(a['mean'], a['mean_ci'], metric)}")
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
    return [f"{script_label(r['script'])} {online_setting(r, varying)}".rstrip()
            + (", offline only (same updates)" if r.get("offline_only") else ", online fine-tuning") for r in mine]


def _online_change(quantity: str, change: dict) -> str:
    """"from → to (change [interval])" of one quantity; MSEs also as a relative change."""
    interval = _signed_interval(change["change"], change.get("ci", NO_INTERVAL), quantity)
    if quantity in ONLINE_MSES:
        text = f"{_fmt_mse(change['from'])} → {_fmt_mse(change['to'])} ({interval}"
        return text + (f", {100 * change['change'] / change['from']:+.0f}%)" if change["from"] else ")")
    return f"{_fmt(change['from'], quantity)} → {_fmt(change['to'], quantity)} ({interval})"


def online_text(rows: dict[str, list[dict]]) -> str:
    """The offline-to-online changes as printed: one line per env x cell, under result.json's keys."""
    lines = []
    for env, mine in sorted(rows.items()):
        for r in mine:
            changes = online_changes(r)
            steps = f"online step {r['points'][0]['online_step']} → {r['points'][-1]['online_step']}"
            kind = "offline only, the same updates" if r.get("offline_only") else "online"
            lines.append(f"  {env} {r['script']} {online_setting(r)} ({kind}; {len(r['seeds'])} seeds, {steps}): "
                         + " | ".join(f"{q} {_online_change(q, c)}" for q, c in changes.items()))
    return "\n".join(lines)


def write_online(rows: dict[str, list[dict]], out: Path) -> list[Path]:
    """online.md: per env x cell, each quantity at online step 0 -> the last online step and the change."""
    columns = (*(MSE_LABELS[q] for q in ONLINE_MSES), "performance")
    md = ["# Offline-to-online fine-tuning", "",
          "Each entry: the mean over seeds at online step 0 (the end of offline training) → at the last online step "
          "(the change with its 95% bootstrap interval, paired by seed; for MSEs also relative). "
          "MSEs are to the oracle's action on training, validation and "
          "evaluation states; performance is the success rate (return on dm_control). Rows \"offline only\": runs "
          "of the same cell trained offline for the same number of updates (no online data), over the same steps. "
          "The paper's check: online data should mainly lower the evaluation MSE.", "",
          "| env | script | data | value data | policy data | alpha | seeds | steps | " + " | ".join(columns) + " |",
          "| --- " * (8 + len(columns)) + "|"]
    for env, mine in sorted(rows.items()):
        for r in mine:
            changes = online_changes(r)
            cells = [_online_change(q, changes[q]) if q in changes else "n/a" for q in (*ONLINE_MSES, r["metric"])]
            cells[-1] = f"{r['metric']} {cells[-1]}"
            setting = ["-" if r["value_size"] is None else size_label(r["value_size"]), size_label(r["policy_size"]),
                       "-" if r["alpha"] is None else f"{r['alpha']:g}", str(len(r["seeds"])),
                       str(r["points"][-1]["online_step"])]
            kind = "offline only" if r.get("offline_only") else "offline + online"
            md.append(f"| {env} | {script_label(r['script'])} | {kind} | " + " | ".join(setting + cells) + " |")
    return [_write_text(out / "online.md", "\n".join(md) + "\n")]


def online_figsize(panels: int, lines: int) -> tuple[float, float]:
    """Inches of an offline-to-online figure: ONLINE_PANEL_SIZE per panel, plus the title and one legend row per
    `panels` lines (the legend has a column per panel)."""
    return ONLINE_PANEL_SIZE[0] * panels, ONLINE_PANEL_SIZE[1] + 0.7 + 0.25 * math.ceil(lines / panels)


def plot_online(rows: dict[str, list[dict]], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Per env: a panel per quantity (the MSEs some row has, then performance) against the updates after the offline
    phase, a solid line per online cell and a dashed one in its colour for its offline-only runs, markers at the
    evaluated points and a 95% interval band over seeds, the legend below. Axes from zero (success: 0 to 1), so a
    wiggle of 0.01 looks like one."""
    plt = _pyplot()
    paths = []
    for env, mine in sorted(rows.items()):
        quantities = [q for q in ONLINE_MSES if any(q in p for r in mine for p in r["points"])] + [mine[0]["metric"]]
        fig, axes = plt.subplots(1, len(quantities), figsize=online_figsize(len(quantities), len(mine)),
                                 squeeze=False, layout="constrained")
        cmap = plt.get_cmap("tab10" if len(mine) <= 10 else "tab20")
        colour = -1
        for r, label in zip(mine, online_labels(mine)):
            colour += not r.get("offline_only")  # an offline-only row takes its online row's colour, dashed
            k, style = colour, "--" if r.get("offline_only") else "-"
            for ax, quantity in zip(axes[0], quantities):
                present = [p for p in r["points"] if quantity in p]
                x = np.array([p["online_step"] for p in present], np.float64)
                mean = np.array([p[quantity]["mean"] for p in present], np.float64)
                band = np.array([p[quantity].get("mean_ci", NO_INTERVAL) for p in present], np.float64)
                ax.plot(x, mean, marker="o", markersize=3, color=cmap(k % cmap.N), linestyle=style, label=label)
                ax.fill_between(x, band[:, 0], band[:, 1], color=cmap(k % cmap.N), alpha=0.2, linewidth=0)
        for ax, quantity in zip(axes[0], quantities):
            ax.set_xlabel("updates after the offline phase\n(online: one environment step each)")
            if quantity in ONLINE_MSES:
                ax.set_ylabel("MSE to the oracle's action")
                ax.set_title(MSE_LABELS[quantity], fontsize=9)
                ax.set_ylim(bottom=0)
            else:
                ax.set_ylabel(METRIC_LABELS[quantity])
                ax.set_title("performance", fontsize=9)
                if quantity.endswith("success"):
                    ax.set_ylim(0, 1)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(quantities), fontsize=8)
        fig.suptitle(f"{env}\noffline-to-online against offline only: mean over seeds, 95% bootstrap interval",
                     fontsize=10)
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


def behaviour_rows(runs: list[Run]) -> list[dict]:
    """The complete run folders holding what evaluate.py writes (trajectory figures, videos, eval_<step>.json), each
    with its cell and those files, in cell order."""
    patterns = [name.replace("{:08d}", "*") for name in (TRAJECTORY_FILE, VIDEO_DIR + "/*", EVAL_FILE)]
    rows = []
    for run in sorted(runs, key=lambda r: (_cell_order((r.env, r.script, r.value_size, r.policy_size, r.alpha)),
                                           str(r.folder))):
        files = [path for pattern in patterns for path in sorted(run.folder.glob(pattern))]
        if files:
            rows.append({"env": run.env, "script": run.script, "value_data_size": run.value_size,
                         "policy_data_size": run.policy_size, "alpha": run.alpha, "seeds": run.seeds,
                         "folder": str(run.folder), "files": [str(path) for path in files]})
    return rows


def write_behaviour(rows: list[dict], out: Path) -> list[Path]:
    """behaviour.md: per run folder, its trajectory figures shown and its videos and evaluations linked (paths relative
    to the analysis folder, so the page reads in place)."""
    md = ["# What the policies do\n", "The files `evaluate.py` wrote into this sweep's run folders: trajectories "
          "over the data coloured by the oracle's error, videos, evaluations of a checkpoint (the repository's "
          "docs/evaluate.md explains them).\n"]
    for row in rows:
        sizes = f"value {row['value_data_size']} · policy {row['policy_data_size']} · alpha {row['alpha']}"
        md.append(f"## {row['env']} · {row['script']} · {sizes} · seeds {row['seeds']}\n")
        for name in row["files"]:
            link = os.path.relpath(name, out)
            md.append(f"![{Path(name).name}]({link})\n" if name.endswith(".png") else f"- [{Path(name).name}]({link})")
        md.append("")
    return [_write_text(out / "behaviour.md", "\n".join(md) + "\n")]


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
    if not (math.isfinite(args.confidence) and 0 < args.confidence < 1):
        raise UsageError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {args.confidence}")
    if args.bootstrap_reps < 100:
        raise UsageError(f"--bootstrap-reps must be at least 100, got {args.bootstrap_reps}")
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
    # Offline and online runs of one cell are different experiments, never pooled: the matrices, table, verdicts,
    # generalization and test-time numbers use the offline runs (a sweep of online runs only: those), the online
    # comparison both, and summary.json's cells keep them apart by "online_steps".
    runs = [r for r in sweep.runs if not r.online_steps] or sweep.runs
    boot = Bootstrap(args.bootstrap_reps, args.confidence)
    metric_by_env = {env: performance_metric(env, args.metric) for env in sorted({r.env for r in runs})}
    matrices = build_matrices(runs, metric_by_env, boot)
    best_envs = {env: "best_success" for env in metric_by_env if performance_metric(env) == "success"}
    best = build_matrices(runs, best_envs, boot) if args.metric != "best_success" else matrices
    verdicts = [verdict(m, boot, args.min_change, args.dominance) for m in matrices if m.script != "bc"]
    rows = table_rows(matrices, best, boot)
    improvements = improvement_rows(matrices, boot)
    generalization = generalization_rows(runs, matrices, boot)
    testtime = testtime_rows(runs, metric_by_env, boot)
    online = online_rows(sweep.runs, metric_by_env, boot)
    written: list[Path] = []
    if "matrices" in args.only:
        written += plot_matrices(matrices, out, args.format)
    if "table" in args.only:
        if improvements:
            print(f"\nprobability of improvement ({100 * args.confidence:g}% interval; above 0.5: the first is "
                  "better):\n" + improvement_text(improvements))
        written += write_table(rows, improvements, out, args.confidence)
        written += plot_aggregates(rows, improvements, out, args.format)
    if "verdicts" in args.only:
        print("\nbottleneck verdicts:\n" + verdict_text(verdicts))
        print(f"({verdict_rule(args.confidence, args.min_change, args.dominance)})")
        written += write_verdicts(verdicts, out, args.confidence, args.min_change, args.dominance)
    if "generalization" in args.only:
        if generalization:
            print("\ngeneralization (largest cell per script; MSE to the oracle's action, mean over seeds [interval]; "
                  "eval - val paired by seed):\n" + generalization_text(generalization))
            written += plot_generalization(generalization, out, args.format)
        else:
            print("generalization: skipped, no run has train / val / eval MSE (no oracle for these environments)")
    if "testtime" in args.only:
        if testtime:
            print("\ntest time (plain vs test-time methods, the same runs and episodes; mean over seeds [interval]; "
                  "gain / change: the method minus plain, paired by seed):\n"
                  + testtime_text(testtime))
            written += plot_testtime(testtime, out, args.format)
        else:
            print("testtime: skipped, no run evaluated a test-time method (result.json 'test_time' empty)")
    if "online" in args.only:
        if online:
            print("\noffline-to-online (online step 0 → the last; mean over seeds, the change in parentheses):\n"
                  + online_text(online))
            written += plot_online(online, out, args.format) + write_online(online, out)
        elif any(run.online_steps for run in sweep.runs):
            print("online: skipped, the online runs' metrics.jsonl hold no evaluation from the end of offline "
                  "training on")
        else:
            print("online: skipped, no run has online steps (result.json 'online_steps' 0 or absent)")
    behaviour = behaviour_rows(sweep.runs)
    if "behaviour" in args.only:
        if behaviour:
            print(f"\nbehaviour: {len(behaviour)} run folder(s) hold evaluate.py's trajectory figures, videos or "
                  "evaluations, linked in behaviour.md")
            written += write_behaviour(behaviour, out)
        else:
            print("behaviour: skipped, no run folder holds evaluate.py's figures, videos or evaluations "
                  "(python evaluate.py RUN_DIR --trajectories)")
    claims = claim_rows(improvements, verdicts, generalization, testtime)
    if "claims" in args.only and claims:
        print(f"\nthe paper's claims at this scale ({100 * args.confidence:g}% intervals):\n" + claims_text(claims))
        written.append(_write_text(out / "claims.md", claims_page(claims, args.confidence)))
    cells = []
    all_metrics = (*METRICS, *TEST_TIME_KEYS)
    for online_steps in sorted({r.online_steps for r in sweep.runs}):
        values = {k: cell_values([r for r in sweep.runs if r.online_steps == online_steps], k) for k in all_metrics}
        for key in sorted({key for per_metric in values.values() for key in per_metric}, key=_cell_order):
            env, script, value, policy, alpha = key
            cell = {"env": env, "script": script, "value_data_size": value, "policy_data_size": policy,
                    "alpha": alpha, "online_steps": online_steps,
                    "seeds": sorted({s for k in all_metrics for s in values[k].get(key, {})})}
            cell.update({k: stats(values[k][key], boot, k) for k in all_metrics if key in values[k]})
            cells.append(cell)
    summary = {"sweep_dir": str(sweep.root), "counts": sweep.counts(), "metric": metric_by_env,
               "incomplete": sweep.incomplete, "failed": sweep.failed, "diverged": sweep.diverged,
               "complete": [str(r.folder) for r in runs], "cells": cells,
               "matrices": [m.to_json() for m in matrices], "verdicts": verdicts, "table": rows,
               "improvement": improvements, "claims": claims, "confidence": args.confidence,
               "bootstrap_reps": args.bootstrap_reps,
               "generalization": generalization, "testtime": testtime, "online": online, "behaviour": behaviour}
    write_json_atomic(out / "summary.json", _clean(summary))
    written.append(out / "summary.json")
    print(f"wrote {len(written)} files to {out}: {' '.join(p.name for p in written)}")
    return written


if __name__ == "__main__":
    exit_on_usage_error(lambda: main(tyro.cli(Args, description=__doc__)))
