"""Runs that survive: SIGKILL + --resume ends bit for bit where an uninterrupted run ends, the NaN guard (exit 3,
failure.json), corrupted datasets, a full disk, and a table of bad inputs across every entry point (exit 2)."""

import dataclasses
import gc
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import POINTMAZE, ROOT, run_in_process, run_script

import envs
import runs
import scaling

SMALL = ["--env", POINTMAZE, "--log-interval", "50", "--hidden-dims", "32", "--batch-size", "32",
         "--eval-episodes", "1", "--mse-samples", "64", "--eval-max-steps", "50", "--no-progress"]
TIMING = {"seconds", "updates_per_second"}  # the only numbers allowed to differ between two runs


def comparable(folder: Path):
    result = json.loads((folder / "result.json").read_text())
    result.pop("wall_seconds")
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in runs.read_metrics(folder / "metrics.jsonl")
               if r["event"] != "resume"]  # a resumed run says where it resumed; the numbers must not differ
    return result, records


def resumed_at(folder: Path) -> list[int]:
    """The step each relaunch resumed from, in order, as its metrics.jsonl records them (one "resume" record per member
    each time, each member recording the same steps). A step can appear twice: a relaunch killed after a log line but
    before that step's resume state resumes from the same state as the relaunch before it, and a resume keeps the
    lines up to its state, the earlier "resume" records included."""
    records = [r for r in runs.read_metrics(folder / "metrics.jsonl") if r["event"] == "resume"]
    per_member = [[r["step"] for r in records if r["member"] == m] for m in sorted({r["member"] for r in records})]
    assert all(steps == per_member[0] for steps in per_member), per_member
    return per_member[0] if per_member else []


def train_steps(folder: Path) -> list[int]:
    return [r["step"] for r in runs.read_metrics(folder / "metrics.jsonl") if r["event"] == "train"]


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_numbers(data_dir, tmp_path):
    # SfBC: its evaluation samples candidates with a key counter, the host state a resume most easily forgets
    args = [*SMALL, "--dataset-dir", str(data_dir), "--steps", "600", "--eval-interval", "200",
            "--resume-interval", "50", "--num-seeds", "2"]
    proc = run_script("algos/iql_sfbc.py", *args, "--out-dir", str(tmp_path / "straight"))
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills, expected_resumes = 0, []
    for _ in range(12):
        command = [sys.executable, str(ROOT / "algos/iql_sfbc.py"), *args, "--out-dir", str(killed), "--resume"]
        latest = runs.resume_steps(killed)[-1] if killed.exists() and runs.resume_steps(killed) else None
        if latest is not None:
            expected_resumes.append(latest)
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 3:  # kill it somewhere after its next log line, at a random moment of the following chunk
            start = max(train_steps(killed), default=0)
            deadline = time.time() + 120
            while max(train_steps(killed), default=0) <= start and child.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            if child.poll() is None:
                child.kill()
                kills += 1
        stderr = child.communicate(timeout=300)[1]
        if latest is not None:  # said on stderr, and the lines before the resume state kept
            assert f"resumed from step {latest} of 600" in stderr, stderr[-2000:]
        if (killed / "result.json").exists():
            break
    assert kills == 3 and (killed / "result.json").exists()
    # every relaunch that found a resume state continued from it (a resume that restarted from 0 logs none), one
    # "resume" event per such relaunch, in order: two relaunches resume from the same step when the kill fell between
    # a log line and its step's resume state
    assert len(expected_resumes) >= 2 and resumed_at(killed) == expected_resumes
    assert not (killed / runs.RESUME_DIR).exists()  # a complete run keeps no resume state
    assert comparable(killed) == comparable(tmp_path / "straight")
    assert train_steps(killed) == [s for s in range(50, 601, 50) for _ in range(2)]


def test_nan_guard_exits_3_names_the_step_and_keeps_the_last_good_state(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_script("algos/iql_ddpgbc.py", *SMALL, "--dataset-dir", str(data_dir), "--steps", "200",
                      "--eval-interval", "200", "--resume-interval", "50", "--debug-poison-step", "150",
                      "--out-dir", str(out))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "step 150" in proc.stderr
    failure = json.loads((out / "failure.json").read_text())
    assert failure["step"] == 150 and "critic_loss" in failure["non_finite"] and "parameters" in failure["non_finite"]
    assert [r["step"] for r in failure["last_finite_metrics"]] == [100]
    assert not (out / "result.json").exists()
    assert runs.resume_steps(out) == [50, 100]  # the states before the poison, intact and loadable
    with np.load(out / runs.RESUME_DIR / "state_00000100.npz") as state:
        assert all(np.isfinite(state[k]).all() for k in state.files if state[k].dtype.kind == "f")
    # a sweep reports it as diverged (no retry: it would diverge again), distinct from a crash
    sweep = tmp_path / "sweep"
    proc = run_script("scaling.py", "--envs", POINTMAZE, "--scripts", "iql_ddpgbc", "--steps", "100",
                      "--dataset-dir", str(data_dir), "--sweep-dir", str(sweep), "--no-progress", "--",
                      *SMALL[2:-1], "--eval-interval", "100", "--debug-poison-step", "100")
    assert proc.returncode == 1 and "diverged 1" in proc.stdout and "DIVERGED" in proc.stdout, proc.stdout
    [run] = json.loads((sweep / "sweep.json").read_text())["runs"]
    assert run["status"] == "diverged" and run["diverged_at_step"] == 100 and run["attempts"] == 1


def test_resume_refuses_other_flags_and_starts_afresh_without_a_state(data_dir, tmp_path):
    out = tmp_path / "run"
    base = [*SMALL, "--dataset-dir", str(data_dir), "--steps", "200", "--eval-interval", "100",
            "--resume-interval", "50", "--out-dir", str(out)]
    proc = run_script("algos/bc.py", *base, "--debug-poison-step", "200")
    assert proc.returncode == 3 and runs.resume_steps(out) == [100, 150]
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    before = "".join(line for line in lines if json.loads(line)["step"] <= 150)
    proc = run_script("algos/bc.py", *base, "--resume", "--batch-size", "64")
    assert proc.returncode == 2 and "other values of batch_size" in proc.stderr, proc.stderr[-2000:]
    proc = run_script("algos/bc.py", *base, "--resume")  # the same flags (the hook off): from step 150 on
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from step 150 of 200 in {out}" in proc.stderr, proc.stderr[-2000:]
    after = (out / "metrics.jsonl").read_text()
    assert after.startswith(before)  # the lines up to the resume state, byte for byte, then the resume record
    assert json.loads(after[len(before):].splitlines()[0]) == {"event": "resume", "step": 150, "member": 0, "seed": 0}
    assert train_steps(out) == [50, 100, 150, 200] and not (out / "failure.json").exists()
    fresh = tmp_path / "fresh"  # --resume without a resume state starts at step 0, and says so
    proc = run_script("algos/bc.py", *base[:-1], str(fresh), "--resume")
    assert proc.returncode == 0 and train_steps(fresh) == [50, 100, 150, 200], proc.stderr[-2000:]
    assert "no resume state" in proc.stderr and resumed_at(fresh) == []


class Interrupted(Exception):
    """Stands for the kill in the in-process resume test: raised right after a resume state was written."""


def host_state(progress: runs.Progress) -> dict:
    """Every field runs.Progress carries on the host (the loop's state a resume state saves beside the device arrays),
    copied, without the wall time (timing, allowed to differ)."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(progress).items() if k != "seconds"}))


def test_a_resume_carries_every_host_field_with_a_success_above_zero(data_dir, tmp_path, monkeypatch):
    """The resume tests' tiny runs never succeed, so a resume that forgot the best success (or kept a stale last
    evaluation) would still compare equal there. Here the evaluation reports a scripted success per step (the real
    evaluation runs too: SfBC draws its keys, the MSEs are measured): 0.8 / 0.4 at step 100 and 0.3 / 0.1 at the last
    step, 200, so the best success [0.8, 0.4] is not the last one and comes from before the interruption. The run
    stops right after its resume state at step 150 (past the step-100 evaluation, so that state carries a last
    evaluation, a best success above zero and SfBC's key counter), then resumes in this process: the progress it
    restores, field by field, is the uninterrupted run's at step 150, its final progress is the uninterrupted run's,
    and result.json and metrics.jsonl are the uninterrupted run's."""
    module = importlib.import_module("algos.iql_sfbc")
    success = {100: [0.8, 0.4], 200: [0.3, 0.1]}
    flags = {"env": POINTMAZE, "dataset_dir": str(data_dir), "steps": 200, "log_interval": 50, "eval_interval": 100,
             "resume_interval": 50, "num_seeds": 2, "num_samples": 4, "hidden_dims": (32,), "batch_size": 32,
             "eval_episodes": 1, "mse_samples": 64, "eval_max_steps": 50, "progress": False}
    real_record, real_save, real_resume, real_finish = runs.Run.record, runs.Run.save_resume, runs.Run.resume, \
        runs.Run.finish
    saved, restored, final = {}, {}, {}  # per run folder: {step: host state} at each resume state; at restore; at end
    interrupt_at = {}  # run folder -> the step after whose resume state the run is stopped

    def record(self, step, infos, states, evaluate):
        def scripted(step):
            return {**evaluate(step), "success": np.asarray(success[step])}
        return real_record(self, step, infos, states, scripted)

    def save_resume(self, states, progress):
        real_save(self, states, progress)
        folder = str(self.folders[0][0].path)
        saved.setdefault(folder, {})[progress.step] = host_state(progress)
        if interrupt_at.get(folder) == progress.step:
            raise Interrupted

    def resume(self, states, init_metrics):
        states = real_resume(self, states, init_metrics)
        restored[str(self.folders[0][0].path)] = host_state(self.progress)
        return states

    def finish(self):
        final[str(self.folders[0][0].path)] = host_state(self.progress)
        return real_finish(self)

    for name, spy in (("record", record), ("save_resume", save_resume), ("resume", resume), ("finish", finish)):
        monkeypatch.setattr(runs.Run, name, spy)
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    module.main(runs.make_config(module.Config, **flags, out_dir=straight))
    interrupt_at[interrupted] = 150
    try:
        module.main(runs.make_config(module.Config, **flags, out_dir=interrupted))
    except Interrupted:
        pass
    else:
        pytest.fail("the run was not interrupted")
    gc.collect()  # the interrupted run's frames, and with them its folder lock
    assert not (tmp_path / "interrupted" / "result.json").exists() and runs.resume_steps(interrupted)[-1] == 150
    module.main(runs.make_config(module.Config, **flags, out_dir=interrupted, resume=True))
    monkeypatch.undo()

    # the case has teeth: at the interruption the best success is above zero, not the last one, and not the end's
    at_150 = saved[straight][150]
    assert at_150["step"] == 150 and at_150["best_success"] == [0.8, 0.4] and at_150["action_calls"] > 0
    assert [r["step"] for r in at_150["last_eval"]] == [100, 100]
    assert [r["success"] for r in at_150["last_eval"]] == [0.8, 0.4]
    assert set(at_150) == {f.name for f in dataclasses.fields(runs.Progress)} - {"seconds"}
    # the resumed run restored every host field as the uninterrupted run had it, and ended with the same ones
    assert restored[interrupted] == at_150
    assert saved[interrupted] == {s: h for s, h in saved[straight].items() if s <= 150}
    assert final[interrupted] == final[straight]
    assert final[straight]["best_success"] == [0.8, 0.4] and final[straight]["step"] == 200
    assert resumed_at(tmp_path / "interrupted") == [150]
    result, records = comparable(tmp_path / "interrupted")
    assert result["best_success"]["per_member"] == [0.8, 0.4] and result["success"]["per_member"] == [0.3, 0.1]
    assert (result, records) == comparable(tmp_path / "straight")


def test_metrics_reader_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 50}\n{"event": "train", "step": 100}\n{"event": "tr')
    assert [r["step"] for r in runs.read_metrics(path)] == [50, 100]


def write_dataset(folder: Path) -> None:
    envs.generate(envs.parse_env(POINTMAZE), str(folder), num_episodes=2, max_episode_steps=20, seed=0, progress=False)


def write_resume_state(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    run = runs.RunFolder(str(folder), {"flag": 1}, resume_step=50 if runs.resume_steps(folder) else None)
    run.save_resume(100 if runs.resume_steps(folder) else 50, {"params": np.arange(4.0)})


def write_result(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    runs.RunFolder(str(folder), {"flag": 1}).finish({"success": 1.0})


def write_sweep(folder: Path) -> None:
    scaling.Sweep({"sweep_dir": str(folder)}, [], ["scaling.py"]).save()


# Every durable file: (writer, the file a fault hits (its writer's last), the files it leaves, whether a second call
# replaces the first's)
DURABLE = {"dataset": (write_dataset, f"{POINTMAZE}.npz", (f"{POINTMAZE}.npz", f"{POINTMAZE}-val.npz",
                                                           f"{POINTMAZE}.json"), True),
           "resume state": (write_resume_state, "state_", ("resume/state_00000050.npz",), True),
           "result.json": (write_result, "result.json", ("result.json",), False),
           "sweep.json": (write_sweep, "sweep.json", ("sweep.json",), True)}


@pytest.mark.parametrize("fault", ["write", "rename"])
@pytest.mark.parametrize("kind", DURABLE)
def test_a_failed_durable_write_leaves_the_previous_file_and_no_temporary(kind, fault, tmp_path, monkeypatch):
    """A full disk at the write (the serializer fails mid-file) or at the rename of the writer's last file (a
    dataset's training file, after its other files): a UsageError naming the file, the previous files byte for byte
    (or none, where there is no previous one), and no temporary file."""
    writer, target, names, replaces = DURABLE[kind]
    folder = tmp_path / "folder"
    if replaces:
        writer(folder)
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if replaces else {}
    temporary = {}  # file descriptor -> the temporary file's path (write_atomic writes through os.fdopen(fd))
    real_mkstemp, real_replace = tempfile.mkstemp, os.replace

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        temporary[fd] = path
        return fd, path

    def failing(real, where):
        def call(*args, **kwargs):
            if target in Path(where(args)).name:
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    if fault == "rename":
        monkeypatch.setattr(os, "replace", failing(real_replace, lambda args: args[1]))
    else:  # the file argument: json.dump(obj, f), np.savez(f, ...)
        in_file = lambda i: lambda args: temporary.get(args[i].name, "")  # noqa: E731
        monkeypatch.setattr(json, "dump", failing(json.dump, in_file(1)))
        monkeypatch.setattr(np, "savez", failing(np.savez, in_file(0)))
        monkeypatch.setattr(np, "savez_compressed", failing(np.savez_compressed, in_file(0)))
    with pytest.raises(runs.UsageError, match="No space left on device"):
        writer(folder)
    monkeypatch.undo()
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    bookkeeping = (runs.LOCK_FILE, "config.json", "metrics.jsonl")  # a run folder's own, rewritten on each open
    assert {k: v for k, v in after.items() if k.name not in bookkeeping} == \
        {k: v for k, v in before.items() if k.name not in bookkeeping}
    assert not [p for p in after if p.name.endswith((".tmp", ".staged"))]
    if replaces:
        assert all(Path(name) in after for name in names)
        mask = os.umask(0)
        os.umask(mask)
        # and what a write leaves has an ordinary file's mode (mkstemp's temporary file is private)
        assert all((folder / name).stat().st_mode & 0o777 == 0o666 & ~mask for name in names)


@pytest.mark.slow
def test_a_script_on_a_full_disk_exits_2_with_nothing_half_written(data_dir, tmp_path):
    """The disk simulated by a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): the OS refuses the bytes of any
    file past 20 kB, as a full disk would. The resume state (about 34 kB) is the first file to hit it."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "algos/iql_ddpgbc.py"), *SMALL, "--dataset-dir", str(data_dir),
                           "--steps", "200", "--eval-interval", "200", "--resume-interval", "50", "--out-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # one line says what went wrong (the other is the run's first line: the values it took from the table)
    lines = [line for line in proc.stderr.strip().splitlines() if "from envs.HYPERPARAMETERS" not in line]
    assert len(lines) == 1 and "cannot write" in lines[0] and "state_00000050.npz" in lines[0], proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not (out / "result.json").exists() and not [p for p in files if p.name.endswith(".tmp")]
    assert runs.resume_steps(out) == []  # no state, rather than half of one
    json.loads((out / "config.json").read_text())
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def corrupted_datasets(data_dir: Path, root: Path) -> list[tuple[str, str]]:
    """(dataset folder, expected message) for a truncated file, a missing key and a wrong dtype."""
    source = data_dir / f"{POINTMAZE}.npz"
    with np.load(source) as arrays:
        good = {k: arrays[k] for k in arrays.files}
    cases = []
    for name, message in [("truncated", "the file is damaged"), ("missing", "has no key 'actions'"),
                          ("dtype", "key 'observations' has shape")]:
        folder = root / name
        folder.mkdir()
        target = folder / f"{POINTMAZE}.npz"
        if name == "truncated":
            target.write_bytes(source.read_bytes()[:5000])
        elif name == "missing":
            np.savez(target, **{k: v for k, v in good.items() if k != "actions"})
        else:
            np.savez(target, **{**good, "observations": good["observations"].astype(str)})
        cases.append((str(folder), message))
    return cases


def corrupted_exorl(data_dir: Path, root: Path) -> list[tuple[str, str]]:
    """(dataset folder, expected message) for ExORL episode files lacking a key, with a wrong shape, or truncated."""
    source = sorted((data_dir / "walker" / "random" / "buffer").glob("*.npz"))[0]
    with np.load(source) as arrays:
        good = {k: arrays[k] for k in arrays.files}
    cases = []
    for name, message in [("no-physics", "lacks key(s) ['physics']"), ("shape", "key 'physics' has shape"),
                          ("cut", "cannot read ExORL episode")]:
        buffer = root / name / "walker" / "random" / "buffer"
        buffer.mkdir(parents=True)
        if name == "no-physics":
            np.savez(buffer / "episode.npz", **{k: v for k, v in good.items() if k != "physics"})
        elif name == "shape":
            np.savez(buffer / "episode.npz", **{**good, "physics": good["physics"][:, :3]})
        else:
            (buffer / "episode.npz").write_bytes(source.read_bytes()[:3000])
        cases.append((str(root / name), message))
    return cases


ENTRY_POINTS = ("envs.py", *(f"algos/{name}.py" for name in runs.SCRIPTS), "scaling.py", "analyze.py")


def test_bad_inputs_across_every_entry_point_exit_2_with_one_line(data_dir, tmp_path, capsys):
    """The table below, exactly: each case exits 2 with one line holding its message and leaves nothing looking
    complete. The first case of each entry point runs as a user runs it (a subprocess: the exit status path), the
    others in this process (the same code, without a JAX start-up each)."""
    out = tmp_path / "out"
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    script = lambda name, *extra: (f"algos/{name}.py", [*SMALL, "--dataset-dir", str(data_dir), "--steps", "100",  # noqa: E731
                                                       "--eval-interval", "100", "--out-dir", str(out), *extra])
    sweep = lambda *extra: ("scaling.py", ["--dataset-dir", str(data_dir), "--sweep-dir", str(out), *extra])  # noqa: E731
    cases = [
        (("envs.py", ["generate", "pointmaze-medium-navigat-v0", "--dataset-dir", str(out)]), "did you mean"),
        (("envs.py", ["generate", "antmaze-large-navigate-v0", "--dataset-dir", str(out)]), "antmaze"),
        (("envs.py", ["generate", POINTMAZE, "--num-episodes", "0", "--dataset-dir", str(out)]), "--num-episodes"),
        (script("iql_ddpgbc", "--env", "pointmaze-medium-navigat-v0"), "did you mean pointmaze-medium-navigate-v0"),
        (script("iql_ddpgbc", "--env", "cube-double-play-v0"), "python envs.py generate cube-double-play-v0"),
        (script("iql_ddpgbc", "--dataset-dir", str(tmp_path / "nowhere")), "python envs.py generate"),
        (script("iql_ddpgbc", "--value-data-size", "10000000"), "--value-data-size 10000000 is out of range"),
        (script("sarsa_awr", "--policy-data-size", "0"), "--policy-data-size 0 is out of range"),
        (script("iql_awr", "--alpha", "-1"), "--alpha must be >= 0"),
        (script("crl_ddpgbc", "--alpha", "-1"), "--alpha must be >= 0"),
        (script("crl_awr", "--env", "pointmaze-medium-navigate-singletask-v0"), "needs a goal-conditioned"),
        (script("iql_sfbc", "--num-samples", "0"), "--num-samples"),
        (script("crl_sfbc", "--num-samples", "0"), "--num-samples"),
        (script("bc", "--obs-transform-frequency", "0"), "--obs-transform-frequency must be > 0"),
        (script("sarsa_sfbc", "--test-time", "ttt", "--ttt-steps-per-env-step", "0"), "--ttt-steps-per-env-step"),
        (script("iql_ddpgbc", "--online-steps", "-50"), "--online-steps must be >= 0"),
        (script("crl_awr", "--online-steps", "70"), "--online-steps 70 must be a multiple of --log-interval 50"),
        (script("sarsa_awr", "--online-noise", "-0.1"), "--online-noise must be >= 0"),
        (script("iql_ddpgbc", "--discount", "1"), "--discount must be in (0, 1)"),
        (script("sarsa_ddpgbc", "--discount", "0"), "--discount must be in (0, 1)"),
        (script("bc", "--steps", "120"), "multiple of --log-interval"),
        (script("iql_ddpgbc", "--resume-interval", "70"), "--resume-interval must be 0 or a multiple"),
        (script("iql_ddpgbc", "--debug-poison-step", "-50"), "--debug-poison-step must be 0 or a multiple"),
        (script("iql_ddpgbc", "--eval-envs", "0"), "--eval-envs must be >= 1"),
        (script("sarsa_awr", "--eval-max-steps", "0"), "--eval-max-steps must be >= 1"),
        (script("iql_ddpgbc", "--out-dir", str(not_a_folder / "run")), "cannot write to --out-dir"),
        (script("iql_ddpgbc", "--members-file", str(tmp_path / "absent.json")), "cannot read --members-file"),
        (sweep("--scripts", "iql_dpgbc"), "--scripts: iql_dpgbc is not a script"),
        (sweep("--envs", "pointmaze-medium-navigat-v0"), "did you mean pointmaze-medium-navigate-v0"),
        (sweep("--value-sizes", "2000", "2000"), "--value-sizes must be distinct positive"),
        (sweep("--policy-sizes", "99999999"), "--policy-sizes 99999999 exceeds the"),
        (sweep("--awr-alphas", "nan"), "--awr-alphas must be finite"),
        (sweep("--retries", "-1"), "--retries >= 0"),
        (("analyze.py", [str(tmp_path / "no-sweep")]), "no-sweep"),
        (("analyze.py", [str(empty)]), "no run folders"),
    ]
    for folder, message in corrupted_datasets(data_dir, tmp_path):
        cases.append((script("iql_ddpgbc", "--dataset-dir", folder), message))
    for folder, message in corrupted_exorl(data_dir, tmp_path):
        cases.append((script("iql_ddpgbc", "--env", "walker-run-random", "--dataset-dir", folder), message))
    assert {entry for (entry, _), _ in cases} == set(ENTRY_POINTS)  # every entry point, each of its cases
    assert len({(entry, tuple(args)) for (entry, args), _ in cases}) == len(cases) == 41  # no case twice; the
    # count docs/reliability.md gives
    first = set()
    for (entry, args), message in cases:
        if entry not in first:
            first.add(entry)
            proc = run_script(entry, *args)
            code, stderr = proc.returncode, proc.stderr
        else:
            code, stderr = run_in_process(entry, args, capsys)
        assert code == 2, (entry, args[-4:], stderr[-2000:])
        assert message in stderr, (entry, message, stderr[-2000:])
        assert len(stderr.strip().splitlines()) == 1, stderr[-2000:]
        assert not list(out.rglob("result.json")), (entry, args)  # nothing looks complete
        assert not list(out.rglob("config.json")), (entry, args)  # nor started: the input is checked first


HOLD_LOCK = "import sys, time; sys.path.insert(0, sys.argv[1]); import runs; h = runs.lock_folder(sys.argv[2], 'x'); " \
            "print('held', flush=True); time.sleep(600)"


def holder(folder: Path) -> subprocess.Popen:
    """Another live process holding `folder`'s lock, as a script or a launcher would."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ROOT), str(folder)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.slow
def test_one_writer_per_run_folder_a_second_process_exits_2_and_writes_nothing(data_dir, tmp_path):
    """The user's case: a run left going in another terminal, the same command started again with --resume. The
    second process exits 2 naming the first's PID and touches nothing; once the first dies (SIGKILL: the OS releases
    its lock), the same command resumes."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "algos/bc.py"), *SMALL, "--dataset-dir", str(data_dir), "--steps",
               "1000000", "--log-interval", "100", "--eval-interval", "1000000", "--resume-interval", "100",
               "--out-dir", str(out), "--resume"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(runs.resume_steps(out)) < 1 and time.time() < deadline:
            time.sleep(0.05)
        before = (out / "metrics.jsonl").read_bytes()
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is being written by another process (PID {first.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert (out / "metrics.jsonl").read_bytes().startswith(before)  # not truncated: the first one goes on
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    third = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = third.stderr.readline()
        while line and "resumed from step" not in line:
            line = third.stderr.readline()
        assert "resumed from step" in line
    finally:
        third.kill()
        third.wait()
    # a packed process locks every folder before touching any: one held folder stops it, the free one stays as it was
    free, held = tmp_path / "free", tmp_path / "held"
    members = tmp_path / "members.json"
    members.write_text(json.dumps([{"seed": 0, "out_dir": str(free)}, {"seed": 1, "out_dir": str(held)}]))
    other = holder(held)
    try:
        proc = run_script("algos/bc.py", *SMALL, "--dataset-dir", str(data_dir), "--steps", "100",
                          "--members-file", str(members))
        assert proc.returncode == 2 and f"(PID {other.pid})" in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in free.iterdir()) == [runs.LOCK_FILE]
    finally:
        other.kill()
        other.wait()


def test_one_launcher_per_sweep_folder(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    other = holder(sweep)
    try:
        proc = run_script("scaling.py", "--envs", POINTMAZE, "--scripts", "bc", "--steps", "100", "--dataset-dir",
                          str(data_dir), "--sweep-dir", str(sweep), "--no-progress")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{sweep} is being written by another process (PID {other.pid})" in proc.stderr
        assert sorted(p.name for p in sweep.iterdir()) == [runs.LOCK_FILE]  # no sweep.json, no run folder
    finally:
        other.kill()  # SIGKILL: the OS releases the lock
        other.wait()
    handle = runs.lock_folder(sweep, "--sweep-dir")
    assert (sweep / runs.LOCK_FILE).read_text().strip() == str(os.getpid())
    handle.close()


def test_a_durable_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Durable against a power cut, not only a killed process: write_atomic fsyncs the temporary file's bytes before
    the rename makes it the file, and the folder (which records the rename) after it; a staged folder renamed into
    place (an ExORL buffer) has each of its files and itself synced before the rename, the receiving folder after."""
    import stat

    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        status = os.fstat(fd)
        calls.append(("fsync", "folder" if stat.S_ISDIR(status.st_mode) else "file", status.st_ino))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        calls.append(("replace", os.stat(src).st_ino, Path(dst).name))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "result.json"
    runs.write_json_atomic(path, {"success": 1.0})
    assert calls == [("fsync", "file", path.stat().st_ino), ("replace", path.stat().st_ino, "result.json"),
                     ("fsync", "folder", tmp_path.stat().st_ino)]
    assert json.loads(path.read_text()) == {"success": 1.0}

    staging = tmp_path / "staging"
    staging.mkdir()
    episodes = {name: (staging / name).write_bytes(name.encode()) and (staging / name).stat().st_ino
                for name in ("episode_0.npz", "episode_1.npz")}
    folder, into = staging.stat().st_ino, tmp_path / "algo"
    into.mkdir()
    calls.clear()
    runs.replace_durably(staging, into / "buffer")
    assert sorted(calls[:2]) == sorted(("fsync", "file", inode) for inode in episodes.values())
    assert calls[2:] == [("fsync", "folder", folder), ("replace", folder, "buffer"),
                         ("fsync", "folder", into.stat().st_ino)]
    assert sorted(p.name for p in (into / "buffer").iterdir()) == sorted(episodes)
