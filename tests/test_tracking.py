"""--track (Weights & Biases) and --tensorboard: each member's tracker holds what metrics.jsonl holds (the same names,
steps and values); a missing package stops a script before training (exit status 2); --resume continues the same
W&B runs; scaling.py puts a sweep's runs in one W&B group. No network: W&B runs offline, everything in tmp_path."""

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tyro
from conftest import POINTMAZE, ROOT, run_in_process

import runs
import scaling

TINY = ["--env", POINTMAZE, "--steps", "100", "--log-interval", "50", "--eval-interval", "100", "--hidden-dims", "32",
        "--batch-size", "32", "--eval-episodes", "1", "--mse-samples", "128", "--num-seeds", "2", "--no-progress",
        "--eval-max-steps", "50"]


def offline_wandb(monkeypatch, root: Path) -> None:
    """W&B without the network: offline runs, quiet, its settings and caches inside `root`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))


def wandb_records(path: Path):
    """The protobuf records of a .wandb file, W&B's transaction log: after a 7-byte header (b":W&B", 0xBEE1, version
    0), LevelDB's log format, 32 KiB blocks of chunks each with a 7-byte header (crc32, length, type: 1 a whole record,
    2 / 3 / 4 its first / middle / last part); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding: the end of what was written
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def offline_run(path: Path) -> dict:
    """One offline run's id, name, group, tags, config and history ({step: {name: value}}) from its .wandb file."""
    run = {"config": {}, "history": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, name=r.display_name, group=r.run_group, tags=list(r.tags))
            run["config"].update({item.key: json.loads(item.value_json) for item in r.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"].setdefault(row["_step"], {}).update(row)
    return run


def metrics_by_member(folder: Path) -> dict[int, dict[int, dict]]:
    """metrics.jsonl's numeric fields per member and step (what a tracker must get): {member: {step: {name: value}}}."""
    out: dict[int, dict[int, dict]] = {}
    for record in runs.read_metrics(folder / "metrics.jsonl"):
        metrics = {k: v for k, v in record.items() if k not in runs.NOT_METRICS and type(v) in (int, float)}
        out.setdefault(record["member"], {}).setdefault(record["step"], {}).update(metrics)
    return out


def test_track_and_tensorboard_get_every_metric_of_every_member(data_dir, tmp_path, monkeypatch, capsys):
    """One run of two members with --track (offline) and --tensorboard: per member one W&B run and one event folder,
    each holding every numeric field of that member's metrics.jsonl records under the same name, at the same step,
    with the same value (TensorBoard: as float32), and nothing else; the W&B run carries the flags and the cell."""
    offline_wandb(monkeypatch, tmp_path)
    out = tmp_path / "run"
    code, err = run_in_process("algos/iql_ddpgbc.py", [*TINY, "--dataset-dir", str(data_dir), "--out-dir", str(out),
                                                       "--track", "--wandb-group", "g1", "--tensorboard"], capsys)
    assert code == 0, err
    expected = metrics_by_member(out)
    assert sorted(expected) == [0, 1] and sorted(expected[0]) == [0, 50, 100]
    flags = json.loads((out / "config.json").read_text())["config"]
    seeds = json.loads((out / "result.json").read_text())["seeds"]

    # W&B: one offline run per member, its id kept in wandb.json
    files = sorted(out.glob("wandb/offline-run-*/*.wandb"))
    assert len(files) == 2, files
    by_name = {run["name"]: run for run in map(offline_run, files)}
    assert sorted(by_name) == ["run-m0", "run-m1"]
    assert [by_name[f"run-m{m}"]["id"] for m in (0, 1)] == json.loads((out / "wandb.json").read_text())["run_ids"]
    for m in (0, 1):
        run = by_name[f"run-m{m}"]
        assert run["group"] == "g1"
        assert run["tags"] == ["iql_ddpgbc", POINTMAZE, f"value_data_size={flags['value_data_size']}",
                               f"policy_data_size={flags['policy_data_size']}", f"alpha={flags['alpha']}"]
        assert {k: run["config"].get(k) for k in flags} == {**flags, "seed": seeds[m]}
        assert run["config"]["member"] == m and run["config"]["seed"] == seeds[m]
        history = {step: {k: v for k, v in row.items() if not k.startswith("_")}
                   for step, row in run["history"].items()}
        assert history == expected[m]  # the same names, steps and values (JSON round trip: exact)

    # TensorBoard: one event folder per member, one scalar per name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["member0", "member1"]
    for m in (0, 1):
        events = EventAccumulator(str(out / "tensorboard" / f"member{m}"), size_guidance={"scalars": 0})
        events.Reload()
        names = {k for row in expected[m].values() for k in row}
        assert set(events.Tags()["scalars"]) == names
        for name in names:
            got = [(e.step, np.float32(e.value)) for e in events.Scalars(name)]
            assert got == [(step, np.float32(row[name])) for step, row in expected[m].items() if name in row], name


@pytest.mark.parametrize("flag,package", [("--track", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_missing_tracker_package_stops_the_script_before_training(flag, package, data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, package, None)  # `import <package>` now fails as if it were not installed
    out = tmp_path / "run"
    code, err = run_in_process("algos/bc.py", [*TINY, "--dataset-dir", str(data_dir), "--out-dir", str(out), flag],
                               capsys)
    extra = flag[2:]
    assert code == runs.USAGE_EXIT and err.strip() == f'error: {flag} needs {package}: pip install -e ".[{extra}]"'
    assert not out.exists()  # nothing written, nothing trained
    # the extra the message names exists and installs the package
    assert re.search(rf'^{extra} = \[[^\]]*"{package}[>=<"]', (ROOT / "pyproject.toml").read_text(), re.M), extra


def test_resume_continues_the_same_wandb_runs_and_fills_a_tracker_turned_on_late(tmp_path, monkeypatch):
    """A run folder killed after step 100 and resumed from its state at 50: the W&B runs keep their ids; a tracker the
    resume turns on (TensorBoard here) first gets the records up to the resume state."""
    offline_wandb(monkeypatch, tmp_path)
    folder = tmp_path / "run"
    config = {"script": "bc", "env": POINTMAZE, "policy_data_size": 900, "track": True, "wandb_project": "p",
              "wandb_entity": None, "wandb_group": None, "tensorboard": False}

    def records(step):
        return [{"event": "train", "step": step, "member": m, "seed": m, "loss": step + m} for m in (0, 1)]

    first = runs.RunFolder(str(folder), config, seeds=[0, 1])
    for step in (0, 50, 100):
        first.log(records(step))
    first.trackers.close(1)  # killed after step 100
    ids = json.loads((folder / "wandb.json").read_text())["run_ids"]
    second = runs.RunFolder(str(folder), {**config, "tensorboard": True}, resume_step=50, seeds=[0, 1])
    second.log(records(100))
    second.finish({})
    assert json.loads((folder / "wandb.json").read_text())["run_ids"] == ids and len(set(ids)) == 2
    attempts = [offline_run(path) for path in sorted(folder.glob("wandb/offline-run-*/*.wandb"))]
    assert sorted(run["id"] for run in attempts) == sorted(ids * 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for m in (0, 1):
        events = EventAccumulator(str(folder / "tensorboard" / f"member{m}"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, s + m) for s in (0, 50, 100)]


def test_trackers_are_closed_however_a_run_ends(tmp_path, monkeypatch):
    """Each W&B run finishes with the script's exit status: 3 when the run diverged, 2 on a UsageError, 1 when an
    unexpected exception ends it; no tracker is left open."""
    offline_wandb(monkeypatch, tmp_path)
    config = {"track": True, "wandb_project": "p", "wandb_entity": None, "wandb_group": None, "tensorboard": True}
    folders = {}

    def main(ending):
        folder = folders[ending] = runs.RunFolder(str(tmp_path / ending), config, seeds=[0])
        folder.log([{"event": "train", "step": 0, "member": 0, "seed": 0, "loss": 1.0}])
        if ending == "diverged":  # what Members.check_finite does
            folder.fail({"step": 0})
            raise runs.Diverged("loss")
        raise runs.UsageError("disk full") if ending == "usage" else RuntimeError("a bug")

    for ending, status in (("diverged", runs.DIVERGED_EXIT), ("usage", runs.USAGE_EXIT), ("bug", 1)):
        with pytest.raises(SystemExit if status > 1 else RuntimeError) as stop:
            runs.exit_on_usage_error(lambda ending=ending: main(ending))
        assert status == 1 or stop.value.code == status
        assert folders[ending].trackers.sinks == [] and runs.Trackers._open == []
        assert exit_codes(tmp_path / ending) == [status], ending


def exit_codes(folder, timeout: float = 120.0) -> list[int]:
    """The exit codes of the W&B run's exit records, once its offline file holds one: wandb's service process writes
    the file after finish() returns, later on a loaded machine, so the test waits for the record (up to `timeout`)
    instead of reading the file at a moment that depends on load."""
    deadline = time.time() + timeout
    while True:
        paths = list(Path(folder).glob("wandb/offline-run-*/*.wandb"))
        try:
            exits = [r.exit.exit_code for r in wandb_records(paths[0]) if r.WhichOneof("record_type") == "exit"] \
                if len(paths) == 1 else []
        except Exception:  # a file still being written: its last record cut short
            exits = []
        if exits or time.time() > deadline:
            return exits
        time.sleep(0.2)


def test_nothing_of_wandb_or_tensorboard_is_imported_with_the_flags_off(tmp_path):
    code = ("import sys, runs; "
            "folder = runs.RunFolder(sys.argv[1], {'track': False, 'tensorboard': False}, seeds=[0]); "
            "folder.log([{'event': 'train', 'step': 0, 'member': 0, 'seed': 0, 'loss': 1.0}]); folder.finish({}); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'wandb', 'tensorboard'}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def sweep_commands(sweep_dir: Path, *script_args: str, pack: int = 1) -> list[list[str]]:
    """The script command lines scaling.py would start (nothing runs): 2 scripts x 2 seeds of pointmaze."""
    args = tyro.cli(scaling.Args, args=["--envs", POINTMAZE, "--scripts", "iql_ddpgbc", "bc", "--seeds", "0", "1",
                                        "--pack", str(pack), "--sweep-dir", str(sweep_dir)])
    settings = scaling.resolve(args, list(script_args))
    return [proc.command for proc in scaling.processes(scaling.plan(settings), settings)]


def test_a_tracked_sweep_puts_every_run_in_one_group_named_after_the_sweep(tmp_path):
    for pack in (1, 2):
        tracked = sweep_commands(tmp_path / "my-sweep", "--hidden-dims", "16", "--track", pack=pack)
        assert len(tracked) == 4 // pack
        for command in tracked:
            assert command.count("--wandb-group") == 1 and command[command.index("--wandb-group") + 1] == "my-sweep"
    # the command parses: the script tracks, in that group
    module = __import__("algos.iql_ddpgbc", fromlist=["Config"])
    harness = tyro.cli(module.Config, args=tracked[0][2:]).harness
    assert harness.track and harness.wandb_group == "my-sweep"
    # untracked (or tracking switched off again): no group; a group the user names wins
    for script_args in ([], ["--tensorboard"], ["--track", "--no-track"]):
        assert all("--wandb-group" not in command for command in sweep_commands(tmp_path / "s", *script_args))
    for command in sweep_commands(tmp_path / "s", "--track", "--wandb-group", "mine"):
        assert command.count("--wandb-group") == 1 and command[command.index("--wandb-group") + 1] == "mine"


@pytest.mark.parametrize("flag,package", [("--track", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_sweep_that_tracks_without_the_package_stops_before_any_run(flag, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(runs.UsageError, match=re.escape(f'{flag} needs {package}: pip install -e ".[{flag[2:]}]"')):
        sweep_commands(tmp_path / "s", flag)
    assert sweep_commands(tmp_path / "s", flag, f"--no-{flag[2:]}")  # switched off again: nothing needed
