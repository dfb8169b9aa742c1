"""scaling.py: a real 2x2 sweep, packing, resuming after SIGTERM and SIGKILL, failures, Ray, bad input."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import POINTMAZE, ROOT, run_in_process, run_script

import analyze
import runs
import scaling

TINY = ["--", "--log-interval", "50", "--eval-interval", "100", "--hidden-dims", "16", "--batch-size", "32",
        "--eval-episodes", "1", "--mse-samples", "64", "--eval-max-steps", "50"]


def sweep_args(data_dir, sweep_dir, *extra):
    return ["--envs", POINTMAZE, "--scripts", "iql_ddpgbc", "--value-sizes", "2000", "4000", "--policy-sizes",
            "2000", "4000", "--steps", "100", "--dataset-dir", str(data_dir), "--sweep-dir", str(sweep_dir),
            "--no-progress", *extra, *TINY]


def results(sweep_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sweep_dir)): p.read_bytes() for p in sorted(sweep_dir.rglob("result.json"))}


def test_2x2_sweep_completes_packs_and_skips_complete_runs(data_dir, tmp_path):
    alone, packed = tmp_path / "alone", tmp_path / "packed"
    proc = run_script("scaling.py", *sweep_args(data_dir, alone, "--workers", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = results(alone)
    assert sorted(first) == [f"{POINTMAZE}/iql_ddpgbc/v{v}_p{p}_s0/result.json" for v in (2000, 4000)
                             for p in (2000, 4000)]
    state = json.loads((alone / "sweep.json").read_text())
    assert state["counts"] == {"done": 4, "skipped": 0, "failed": 0, "diverged": 0, "pending": 0}
    assert state["finished"]
    for run in state["runs"]:
        saved = json.loads((Path(run["folder"]) / "result.json").read_text())
        assert (saved["value_data_size"], saved["policy_data_size"]) == (run["value_data_size"],
                                                                         run["policy_data_size"])
    # four runs in one vmapped process: one folder each, the same numbers as four processes (to float rounding)
    proc = run_script("scaling.py", *sweep_args(data_dir, packed, "--pack", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 to run in 1 process " in proc.stdout
    assert sorted(results(packed)) == sorted(first)
    for name in first:
        a, b = json.loads(first[name]), json.loads((packed / name).read_bytes())
        for key in runs.RESULT_METRICS:
            assert b[key]["mean"] == pytest.approx(a[key]["mean"], rel=1e-3, abs=1e-4), (name, key)
    # the same command again: nothing runs, nothing changes
    proc = run_script("scaling.py", *sweep_args(data_dir, alone, "--workers", "2"))
    assert proc.returncode == 0 and "skipped (already complete) 4" in proc.stdout, proc.stdout
    assert results(alone) == first
    # analyze.py on the folders the sweep wrote: every cell of its summary is that run folder's result.json
    analyze.main(analyze.Args(sweep_dir=str(alone), only=("table", "verdicts", "generalization"), format=("png",)))
    summary = json.loads((alone / "analysis" / "summary.json").read_text())
    assert summary["counts"]["complete"] == 4 and len(summary["cells"]) == 4
    for cell in summary["cells"]:
        saved = json.loads(first[f"{POINTMAZE}/iql_ddpgbc/v{cell['value_data_size']}_p{cell['policy_data_size']}_s0/"
                                 "result.json"])
        assert cell["seeds"] == saved["seeds"] == [0]
        for key in (*runs.RESULT_METRICS, "best_success"):
            assert cell[key]["mean"] == saved[key]["mean"] and cell[key]["n_seeds"] == 1, key


def _children_of(sweep_dir: Path) -> list[int]:
    """Live processes whose command line mentions the sweep folder (the launcher's runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(sweep_dir) in cmdline and "algos/" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_sweep_resumes_only_what_is_missing(data_dir, tmp_path, sig):
    """Runs long enough to write resume states: killed after one run completed and another wrote one, the rerun
    skips the complete runs, continues the interrupted one from its latest state and starts the others."""
    sweep_dir = tmp_path / "sweep"
    args = [*sweep_args(data_dir, sweep_dir, "--workers", "1")[:-len(TINY)], "--", "--log-interval", "50",
            "--eval-interval", "400", "--resume-interval", "50", "--hidden-dims", "16", "--batch-size", "32",
            "--eval-episodes", "1", "--mse-samples", "64", "--eval-max-steps", "50"]
    args[args.index("--steps") + 1] = "400"
    folders = [sweep_dir / POINTMAZE / "iql_ddpgbc" / f"v{v}_p{p}_s0" for v in (2000, 4000) for p in (2000, 4000)]
    launcher = subprocess.Popen([sys.executable, str(ROOT / "scaling.py"), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    interrupted = lambda: [f for f in folders if not (f / "result.json").exists() and runs.resume_steps(f)]  # noqa
    while not (results(sweep_dir) and interrupted()) and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(sig)
    launcher.wait(timeout=60)
    assert launcher.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    deadline = time.time() + 10  # the runs get the launcher's signal (or their parent-death signal) and exit
    while _children_of(sweep_dir) and time.time() < deadline:
        time.sleep(0.05)
    assert _children_of(sweep_dir) == [], "a run outlived its launcher"
    before = results(sweep_dir)
    assert 1 <= len(before) < 4
    latest = {f: runs.resume_steps(f)[-1] for f in interrupted()}
    assert latest, "no run was interrupted after writing a resume state"
    proc = run_script("scaling.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped (already complete) {len(before)}" in proc.stdout and f"done {4 - len(before)}" in proc.stdout
    after = results(sweep_dir)
    assert len(after) == 4 and all(after[name] == content for name, content in before.items())
    for folder in (sweep_dir / POINTMAZE / "iql_ddpgbc").iterdir():
        if folder.is_dir():  # a rerun folder holds one run's records, not the killed attempt's too
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            steps = [r["step"] for r in records if r["event"] == "train"]
            assert steps == list(range(50, 401, 50)), (folder, steps)
            # the interrupted runs continued from their latest state; the others never resumed
            assert [r["step"] for r in records if r["event"] == "resume"] == ([latest[folder]] if folder in latest
                                                                                else []), folder


def test_online_cell_twins_the_largest_cell_and_analyze_draws_them_beside_its_runs(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["--envs", POINTMAZE, "--scripts", "iql_ddpgbc", "--value-sizes", "2000", "4000", "--policy-sizes", "4000",
            "--steps", "200", "--online-cell", "100", "--cell-eval-interval", "50", "--dataset-dir", str(data_dir),
            "--sweep-dir", str(sweep), "--no-progress", "--pack", "4", *TINY[:-2], "--eval-interval", "200"]
    proc = run_script("scaling.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "offline-to-online: 1 runs of the largest cell train 100 steps offline, then 100 online" in proc.stdout
    cell, twin = (sweep / POINTMAZE / "iql_ddpgbc" / name for name in ("v4000_p4000_s0", "v4000_p4000_o100_s0"))
    other = sweep / POINTMAZE / "iql_ddpgbc" / "v2000_p4000_s0"
    result = json.loads((twin / "result.json").read_text())
    assert (result["steps"], result["online_steps"]) == (100, 100)
    assert json.loads((cell / "result.json").read_text())["online_steps"] == 0

    def evals(folder):
        return [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "eval_mse" in r]

    # the cell and its twin evaluate every --cell-eval-interval (given after the sweep's own --eval-interval); the
    # rest of the matrix at its own interval
    assert evals(cell) == evals(twin) == [50, 100, 150, 200] and evals(other) == [200]
    analyze.main(analyze.Args(sweep_dir=str(sweep), out=str(tmp_path / "out"), only=("online",)))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    online = summary["online"][POINTMAZE]
    assert [row.get("offline_only", False) for row in online] == [False, True]
    assert all([p["online_step"] for p in row["points"]] == [0, 50, 100] for row in online)
    # the matrix holds the two offline cells, each of one seed: the twin is never pooled into its cell
    cells = {(c["value_data_size"], c["policy_data_size"]): c for c in summary["cells"] if not c.get("online_steps")}
    assert set(cells) == {(2000, 4000), (4000, 4000)} and all(c["success"]["n_seeds"] == 1 for c in cells.values())


def test_failing_runs_are_recorded_retried_and_listed(data_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # CRL on a reward-based task exits 2; IQL on it completes
    proc = run_script("scaling.py", "--envs", "pointmaze-medium-navigate-singletask-v0", "--scripts", "iql_ddpgbc",
                      "crl_ddpgbc", "--steps", "100", "--dataset-dir", str(data_dir), "--sweep-dir", str(sweep_dir),
                      "--retries", "1", "--no-progress", *TINY)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "done 1, skipped (already complete) 0, failed 1" in proc.stdout
    assert "FAILED" in proc.stdout and "needs a goal-conditioned environment" in proc.stdout
    state = json.loads((sweep_dir / "sweep.json").read_text())
    failed = [r for r in state["runs"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["script"] == "crl_ddpgbc"
    assert failed[0]["exit_status"] == 2 and failed[0]["attempts"] == 2
    assert "needs a goal-conditioned environment" in failed[0]["stderr_tail"]
    assert not (Path(failed[0]["folder"]) / "result.json").exists()


def dry_run(capsys, *args: str) -> str:
    """scaling.py --dry-run called in this process (no JAX start-up per call): its standard output."""
    capsys.readouterr()
    assert scaling.main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    out = dry_run(capsys, "--preset", "quickstart", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    # AWR vs DDPG+BC on IQL: 2 scripts x 4 seeds on all the data, each script's 4 runs packed in one process
    assert "8 runs, 0 complete, 8 to run in 2 processes (up to 4 runs each), 80,000 member-updates" in out
    assert "would generate 100 episodes" in out and "--members-file" in out
    assert not sweep_dir.exists() and not (tmp_path / "no-data").exists()
    # the CPU study (docs/results.md, the pre-registered design): 2 scripts x 3 x 3 cells x 5 seeds, one alpha each;
    # the largest cell's runs also evaluate OPEX and TTT and have offline-to-online twins, each in processes apart
    out = dry_run(capsys, "--preset", "cpu-study", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    assert "100 runs, 0 complete, 100 to run in 14 processes (up to 9 runs each), 2,000,000 member-updates" in out
    # the page states the plan the preset makes: every line of its dry-run block, as printed (paths aside)
    page = (ROOT / "docs" / "results.md").read_text()
    block = page.split("<!-- the cpu-study plan -->")[1].split("```")[1].strip().splitlines()
    plan_lines = [line for line in out.splitlines() if "data/cpu-study" not in line and "first process" not in line]
    assert block and all(line.replace("sweeps/cpu-study", str(sweep_dir)) in plan_lines for line in block), block
    settings = scaling.resolve(scaling.Args(preset="cpu-study", sweep_dir=str(sweep_dir)), [])
    assert (settings["value_sizes"], settings["policy_sizes"]) == ((10_000, 30_000, 100_000),) * 2
    assert (settings["awr_alphas"], settings["ddpgbc_alphas"]) == ((10.0,), (0.001,))
    assert settings["seeds"] == (0, 1, 2, 3, 4)
    procs = scaling.processes(scaling.plan(settings), settings)
    tested = [p for p in procs if "--test-time" in p.command]
    twins = [p for p in procs if "--online-steps" in p.command]
    assert len(tested) == len(twins) == 2 and all(len(p.runs) == 5 for p in tested + twins)
    assert all("--test-time opex ttt" in " ".join(p.command) for p in tested)
    assert all(p.command[p.command.index("--steps") + 1] == "10000" and
               p.command[p.command.index("--online-steps") + 1] == "10000" and
               all(r.folder.name == f"v100000_p100000_a{r.alpha:g}_o10000_s{r.seed}" for r in p.runs) for p in twins)
    assert {(r.value_data_size, r.policy_data_size) for p in tested + twins for r in p.runs} == {(100_000, 100_000)}
    # the cell and its twins evaluate every 5000 steps (the last --eval-interval wins), the rest at the end only
    for p in procs:
        intervals = [p.command[i + 1] for i, arg in enumerate(p.command) if arg == "--eval-interval"]
        assert intervals[-1] == ("5000" if p in tested + twins else "20000"), p.command
    assert all(not r.test_time and not r.online_steps and (r.value_data_size, r.policy_data_size) != (100_000, 100_000)
               for p in procs if p not in tested + twins for r in p.runs)
    # the paper-size preset: 9 pairs x 2 envs x 16 cells x 4 seeds x the table's alpha grids: 4 for AWR (the paper's),
    # 3 for DDPG+BC (each dataset's tuned alpha and a decade either side), 1 for SfBC; the discount from the table too
    out = dry_run(capsys, "--preset", "matrix", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    assert f"{2 * 16 * 4 * 3 * (4 + 3 + 1)} runs" in out
    # (CRL's DDPG+BC grid is centred on CRL's tuned alpha, IQL's and SARSA's on GCIQL's: the reference tunes each)
    assert ("pointmaze-large-navigate-v0 from envs.HYPERPARAMETERS: discount 0.99 (reference); alpha grids awr 0.3 1 "
            "3 10, iql/sarsa_ddpgbc 0.0003 0.003 0.03, crl_ddpgbc 0.003 0.03 0.3") in out
    assert "cube-single-play-v0 from envs.HYPERPARAMETERS: discount 0.99 (reference); alpha grids awr 0.3 1 3 10, " \
           "iql/sarsa_ddpgbc 0.1 1 10, crl_ddpgbc 0.3 3 30" in out
    # a flag overrides the table: the given grid, for every dataset
    out = dry_run(capsys, "--preset", "matrix", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir), "--ddpgbc-alphas", "0.5")
    assert f"{2 * 16 * 4 * 3 * (4 + 1 + 1)} runs" in out and "ddpgbc 0.1 1 10" not in out
    # plain vs OPEX vs TTT: 2 envs x 3 scripts x 4 seeds, each run evaluating all three, the seeds packed
    out = dry_run(capsys, "--preset", "testtime", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    assert "24 runs, 0 complete, 24 to run in 6 processes" in out and "--test-time opex ttt" in out
    # narrow vs high coverage: 4 datasets x (2 DDPG+BC scripts x 2 policy sizes x 3 alphas + bc x 2 sizes) x 4 seeds
    out = dry_run(capsys, "--preset", "coverage", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    assert f"{4 * (2 * 2 * 3 + 2) * 4} runs" in out and "pointmaze-large-explore-v0" in out
    assert "would generate official episodes" in out
    # offline-to-online: 2 envs x 3 scripts x 4 seeds, 1M offline + 0.5M online updates each
    out = dry_run(capsys, "--preset", "online", "--dataset-dir", str(tmp_path / "no-data"),
                  "--sweep-dir", str(sweep_dir))
    assert "24 runs, 0 complete, 24 to run in 6 processes (up to 4 runs each), 36,000,000 member-updates" in out
    assert "--online-steps 500000" in out


def test_bad_inputs_exit_2(data_dir, tmp_path, capsys):
    base = ["--dataset-dir", str(data_dir), "--sweep-dir", str(tmp_path / "sweep"), "--dry-run"]
    cases = [
        (["--scripts", "iql_dpgbc"], "--scripts: iql_dpgbc is not a script"),
        (["--scripts", "iql_ddpgbc", "bc", "--online-steps", "1000"], "bc has no value function to fine-tune"),
        (["--online-steps", "-5"], "--online-steps must be >= 0"),
        (["--envs", "pointmaze-medium-navigat-v0"], "did you mean pointmaze-medium-navigate-v0"),
        (["--value-sizes", "2000", "2000"], "--value-sizes must be distinct positive"),
        (["--policy-sizes", "0"], "--policy-sizes must be distinct positive"),
        (["--policy-sizes", "99999999"], "--policy-sizes 99999999 exceeds the"),
        (["--ddpgbc-alphas", "-1"], "--ddpgbc-alphas must be finite and >= 0"),
        (["--pack", "0"], "--pack must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--envs", "antmaze-large-navigate-v0"], "antmaze-large-navigate-v0"),
    ]
    for extra, message in cases:
        code, stderr = run_in_process("scaling.py", [*base, *extra], capsys)
        assert code == 2 and message in stderr, (extra, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1, stderr
        assert not (tmp_path / "sweep").exists()


def test_ray_backend_without_ray_says_how_to_install(data_dir, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; sys.argv = ['scaling.py'] + sys.argv[1:]; import runs, scaling; "
            "runs.exit_on_usage_error(lambda: sys.exit(scaling.main()))")
    proc = subprocess.run([sys.executable, "-c", code, *sweep_args(data_dir, tmp_path / "sweep", "--backend", "ray")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "pip install -e '.[ray]'" in proc.stderr, proc.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is the optional [ray] extra")
def test_ray_backend_against_a_local_ray_instance(data_dir, tmp_path):
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        sweep_dir = tmp_path / "sweep"
        proc = run_script("scaling.py", *sweep_args(data_dir, sweep_dir, "--backend", "ray", "--address",
                                                    f"127.0.0.1:{port}", "--pack", "2"))
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
        assert len(results(sweep_dir)) == 4 and "done 4" in proc.stdout
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
