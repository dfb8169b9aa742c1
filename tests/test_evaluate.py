"""evaluate.py: a checkpoint loads back bit for bit and evaluates to the run's own numbers (every script, packed
folders, test-time methods); the notebook policy; the trajectory figure's content; videos or a clear exit 2."""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import POINTMAZE, ROOT, run_in_process

import envs
import evaluate
import runs

SCRIPTS = list(runs.SCRIPTS)


def load(script):
    return importlib.import_module(f"algos.{script}")


def tiny_flags(data_dir, out_dir, **overrides):
    return {"env": POINTMAZE, "dataset_dir": str(data_dir), "steps": 100, "log_interval": 50, "eval_interval": 100,
            "hidden_dims": (32,), "batch_size": 32, "eval_episodes": 1, "mse_samples": 128, "checkpoint_interval": 100,
            "eval_max_steps": 50, "out_dir": out_dir and str(out_dir), "progress": False, **overrides}


def train(script, monkeypatch, **flags) -> dict:
    """Run a script in this process; returns the parameters the harness handed each folder's checkpoint, by folder."""
    handed = {}
    write = runs.RunFolder.checkpoint

    def spy(folder, step, params, extra):
        handed[str(folder.path)] = jax.device_get(params)
        write(folder, step, params, extra)

    monkeypatch.setattr(runs.RunFolder, "checkpoint", spy)
    load(script).main(runs.make_config(load(script).Config, **flags))
    monkeypatch.undo()
    return handed


def eval_records(folder, step):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in records if r["event"] == "eval" and r["step"] == step), key=lambda r: r["member"])


def assert_same_as_the_run(evaluation, folder, step, same_program=True):
    """Every metric of the run's "eval" records at `step`, member by member: exactly (the same float) where the
    evaluation ran the program the run ran (same members, same shapes), else to float rounding. A program of another
    shape (one member where the run stepped two) may round its matmuls differently, and XLA's choice of kernel depends
    on the CPU: 2.34018958529206 against 2.3401895850655623 for OPEX's eval MSE on one machine, equal on another."""
    records = eval_records(folder, step)
    assert records, "the run did not evaluate at that step"
    names = set(records[0]) - {"event", "step", "member", "seed"}
    assert names == set(evaluation.metrics), names ^ set(evaluation.metrics)
    for m, record in enumerate(records):
        for name in names:
            if not same_program:
                assert math.isclose(evaluation.metrics[name][m], record[name], rel_tol=1e-6, abs_tol=1e-9), (name, m)
            else:
                assert float(evaluation.metrics[name][m]) == record[name], (name, m)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_loads_bit_for_bit_and_evaluates_to_the_runs_own_numbers(script, data_dir, tmp_path,
                                                                             monkeypatch):
    """Two seeds in one folder: the loaded parameters are the very arrays the harness saved (same tree, dtypes, bits)
    and evaluating them gives the run's own success, return, per-task success and train / val / eval MSE at that
    step, for every member (SfBC included: its candidates' key continues from the checkpoint's count)."""
    out = tmp_path / "run"
    handed = train(script, monkeypatch, **tiny_flags(data_dir, out, num_seeds=2))
    checkpoint = evaluate.load_checkpoint(out)
    assert checkpoint.step == 100 and checkpoint.seeds == [0, 1] and checkpoint.module.SCRIPT == script
    saved = handed[str(out)]
    assert jax.tree_util.tree_structure(checkpoint.params) == jax.tree_util.tree_structure(saved)
    for loaded, original in zip(jax.tree_util.tree_leaves(checkpoint.params), jax.tree_util.tree_leaves(saved)):
        assert loaded.dtype == original.dtype and np.array_equal(np.asarray(loaded), original)
    assert_same_as_the_run(evaluate.evaluate_checkpoint(checkpoint), out, 100)


def test_a_packed_sfbc_folder_and_test_time_methods_evaluate_to_the_runs_own_numbers(data_dir, tmp_path, monkeypatch):
    """scaling.py --pack: two folders of different policy sizes trained in one process (SfBC's key is the process's
    --seed and count, not the folder's); the plain policy, OPEX and TTT on the same episodes give the run's numbers up
    to float rounding: the process stepped two members' episodes at once, the evaluation one member's, so another
    program of other shapes ran (exact equality held on one CPU and failed on another)."""
    members = [{"seed": 3, "policy_data_size": 2000, "value_data_size": 4000, "out_dir": str(tmp_path / "a")},
               {"seed": 4, "policy_data_size": 4000, "value_data_size": 2000, "out_dir": str(tmp_path / "b")}]
    (tmp_path / "members.json").write_text(json.dumps(members))
    train("iql_sfbc", monkeypatch, **tiny_flags(data_dir, None, members_file=str(tmp_path / "members.json"),
                                                test_time=("opex", "ttt")))
    checkpoint = evaluate.load_checkpoint(tmp_path / "b")
    assert checkpoint.seeds == [4] and checkpoint.action_seed == 0 and checkpoint.action_calls > 0
    evaluation = evaluate.evaluate_checkpoint(checkpoint, test_time=("opex", "ttt"))
    assert {"opex_success", "ttt_success", "opex_eval_mse", "ttt_eval_mse"} <= set(evaluation.metrics)
    assert_same_as_the_run(evaluation, tmp_path / "b", 100, same_program=False)


@pytest.fixture(scope="module")
def bc_run(data_dir, tmp_path_factory):
    """One bc run with two seeds and a checkpoint at its last step (step 100)."""
    out = tmp_path_factory.mktemp("bc") / "run"
    load("bc").main(runs.make_config(load("bc").Config, **tiny_flags(data_dir, out, num_seeds=2, eval_episodes=2)))
    return out


def test_the_command_writes_eval_json_and_the_figure(bc_run, capsys):
    code, err = run_in_process("evaluate.py", [str(bc_run), "--trajectories", "--no-download"], capsys)
    assert code == 0, err
    result = json.loads((bc_run / "eval_00000100.json").read_text())
    saved = json.loads((bc_run / "result.json").read_text())
    assert result["step"] == 100 and result["seeds"] == [0, 1] and result["episodes_per_task"] == 2
    for key in runs.RESULT_METRICS:  # the last step's evaluation is the one result.json keeps
        assert result[key]["per_member"] == saved[key]["per_member"], key
    png = (bc_run / "trajectories_00000100.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_the_figure_draws_every_episode_coloured_by_its_computed_oracle_error(bc_run):
    checkpoint = evaluate.load_checkpoint(bc_run)
    evaluation = evaluate.evaluate_checkpoint(checkpoint)
    figure = evaluate.trajectory_figure(checkpoint, evaluation, member=1)
    figure.canvas.draw()  # matplotlib maps a collection's values to colours when it draws
    rollout, oracle = evaluation.rollout, envs.make_oracle(envs.parse_env(POINTMAZE))
    panels = [ax for ax in figure.axes if ax.get_title().startswith("task")]
    assert len(panels) == 5
    all_errors = []
    for task, ax in enumerate(panels, start=1):
        lines = {int(c.get_gid().split()[1]): c for c in ax.collections if (c.get_gid() or "").startswith("episode")}
        episodes = np.nonzero(rollout["tasks"] == task)[0]
        assert sorted(lines) == episodes.tolist()
        for e, line in lines.items():
            valid = rollout["valid"][1, e]
            observations = rollout["observations"][1, e][valid]
            labels = oracle(observations, np.broadcast_to(rollout["goals"][1, e], observations.shape))
            errors = ((rollout["actions"][1, e][valid] - labels) ** 2).mean(-1)
            all_errors.append(errors)
            np.testing.assert_allclose(line.get_array(), errors[:-1], rtol=1e-6)
            np.testing.assert_allclose(np.asarray(line.get_segments())[:, 0], observations[:-1, :2], rtol=1e-6)
            # the colours are the colour map at those errors, on one scale shared by every panel
            np.testing.assert_allclose(line.get_colors(), line.cmap(line.norm(errors[:-1])), atol=1e-6)
        assert ax.get_title() == f"task {task}: success {int(rollout['success'][1, episodes].sum())}/{len(episodes)}"
        # the shaded coverage counts every transition of the policy's data subset
        [mesh] = [c for c in ax.collections if type(c).__name__ == "QuadMesh"]
        assert mesh.get_array().sum() == len(evaluation.train["actions"][:evaluation.policy_data_size])
    assert line.norm.vmax == pytest.approx(max(e.max() for e in all_errors))
    # member 1's mean error over the drawn steps is the eval MSE the evaluation reports for it
    assert math.isclose(np.concatenate(all_errors).mean(), evaluation.metrics["eval_mse"][1], rel_tol=1e-6)


def test_the_notebook_policy_acts_as_the_evaluated_one(bc_run):
    checkpoint = evaluate.load_checkpoint(bc_run)
    policy = evaluate.load_policy(bc_run, member=1)
    data = envs.load_dataset(envs.parse_env(POINTMAZE), checkpoint.config.dataset_dir)
    obs, goals = data["observations"][:7], data["observations"][100:107]
    batched = np.asarray(checkpoint.policy()(np.stack([obs, obs]), np.stack([goals, goals])))
    # one member's program against the two members' program: equal up to float rounding, not necessarily bit for bit
    np.testing.assert_allclose(policy(obs, goals), batched[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(policy(obs[0], goals[0]), batched[1, 0], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(batched[0], batched[1])  # two members, two policies


def test_bad_input_exits_2_with_the_fix(bc_run, data_dir, tmp_path, capsys):
    empty = tmp_path / "no_checkpoints"
    load("bc").main(runs.make_config(load("bc").Config, **tiny_flags(data_dir, empty, checkpoint_interval=0)))
    def copy_with(name, **changes):  # bc_run with its config.json edited
        folder = tmp_path / name
        shutil.copytree(bc_run, folder)
        saved = json.loads((folder / "config.json").read_text())
        saved["config"].update(changes)
        (folder / "config.json").write_text(json.dumps(saved))
        return str(folder)

    cases = [([str(empty)], "--checkpoint-interval"),
             ([copy_with("wider", hidden_dims=[64])], "does not hold bc's networks"),
             ([copy_with("teleport", env="pointmaze-teleport-navigate-v0"), "--trajectories"], "with an oracle"),
             ([str(bc_run), "--step", "50"], "it has 100"),
             ([str(tmp_path)], "not a run folder"),
             ([str(bc_run), "--member", "2"], "2 member(s)"),
             ([str(bc_run), "--test-time", "opex"], "Q function")]
    for args, words in cases:
        code, err = run_in_process("evaluate.py", args, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)


def test_video_without_an_offscreen_gl_backend_exits_2_naming_what_to_install(bc_run):
    """MUJOCO_GL=disable is a machine without EGL or OSMesa (envs.py picks it where libEGL is missing)."""
    before = {(p, p.stat().st_mtime_ns) for p in bc_run.rglob("*")}
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(bc_run), "--capture-video"], text=True,
                          capture_output=True, cwd=ROOT, env={**os.environ, "MUJOCO_GL": "disable"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "apt-get install libegl1" in proc.stderr and "libosmesa6" in proc.stderr
    assert {(p, p.stat().st_mtime_ns) for p in bc_run.rglob("*")} == before  # stopped before evaluating


def test_mp4_without_imageio_ffmpeg_exits_2_with_the_extra_to_install(bc_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` fails as if not installed
    code, err = run_in_process("evaluate.py", [str(bc_run), "--capture-video", "--video-format", "mp4"], capsys)
    assert code == 2 and 'pip install -e ".[video]"' in err, err


def test_video_films_the_chosen_episodes_where_mujoco_draws_offscreen(bc_run, capsys):
    try:
        evaluate.check_video(envs.parse_env(POINTMAZE), "gif", 32)
    except runs.UsageError as error:  # CI installs EGL (.ci/run); elsewhere the exit-2 test above covers this
        pytest.skip(f"no offscreen GL here: {error}")
    flags = ["--video-stride", "10", "--video-size", "32", "--video-episodes", "2", "--video-fps", "20"]
    code, err = run_in_process("evaluate.py", [str(bc_run), "--capture-video", *flags], capsys)
    assert code == 0, err
    from PIL import Image

    # 100 steps of training reach no goal, so every episode runs to the run's --eval-max-steps 50: 5 frames at stride 10
    assert json.loads((bc_run / runs.EVAL_FILE.format(100)).read_text())["success"]["per_member"] == [0.0, 0.0]
    files = sorted((bc_run / runs.VIDEO_DIR.format(100)).iterdir())
    assert [f.name for f in files] == [f"task{t}_episode{j}.gif" for t in range(1, 6) for j in range(2)]
    for f in files:
        with Image.open(f) as gif:  # Pillow merges identical consecutive frames into one that lasts longer
            durations = []
            for i in range(gif.n_frames):
                gif.seek(i)
                durations.append(gif.info["duration"])
            assert sum(durations) == 5 * 50 and gif.size == (32, 32)  # 20 fps: 50 ms a frame
