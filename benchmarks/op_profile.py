"""Where a chunk's time goes: XLA's per-operation trace of one script's jitted chunk, summed by kind of work.

    python benchmarks/op_profile.py --script iql_awr --no-goal-conditioned --obs-dim 29 --action-dim 8 \
        --dataset-size 1000000 --members 1 16 --chunk 50

The chunk is compiled exactly as `benchmarks/throughput.py` compiles it (the script's own `make_train_chunk`, the
same synthetic data and flags), run once to warm up, then once under `jax.profiler` with XLA:CPU's per-operation
trace events on. Every executed HLO operation (a fusion, a copy, a gather, ...: the leaves of the trace, so the loop
around them is not counted twice) is put in one kind, read from the compiled HLO:

  matmul        an operation that contains a dot (with whatever XLA fused into it: bias, activation, a sum)
  gather/slice  one that contains a gather, scatter, dynamic-slice or dynamic-update-slice (drawing rows,
                taking or writing one member's slice)
  reduction     one that contains a reduce (sums over the batch in backward passes, LayerNorm's statistics)
  copy/layout   a copy or transpose, or a fusion of nothing else (layout changes XLA inserts between operations)
  elementwise   any other fusion (GELU, LayerNorm's arithmetic, Adam, random numbers, losses)
  other         anything else executed (custom calls, the loops' conditions, ...)

Prints, per K: the chunk's wall time per member-update; the summed time of the operations of each kind per
member-update and its share; the same time by phase (forward: inside a differentiated loss, which JAX names
`jvp(...)`; backward: its transpose; rest: sampling, target networks, Adam, Polyak, logging statistics); operations
executed per member-update; and the costliest operations with the JAX source XLA recorded for them. Writes JSON
(--out). The operations' summed time can exceed the wall time: XLA:CPU runs independent operations on both cores at
once. CPU only: other backends do not emit these events.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# XLA reads its flags once, when the backend starts: before jax is imported (throughput imports it)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import envs  # noqa: E402
import jax  # noqa: E402
import runs  # noqa: E402
import throughput  # noqa: E402
import tyro  # noqa: E402

KINDS = ("matmul", "gather/slice", "reduction", "copy/layout", "elementwise", "other")
PHASES = ("forward", "backward", "rest")
NOT_EXECUTED = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call"}
LAYOUT_ONLY = {"copy", "transpose", "bitcast", "broadcast", "reshape", "parameter", "constant", "tuple",
               "get-tuple-element"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$")


@dataclasses.dataclass
class Args(throughput.ChunkShape):
    script: str = "iql_awr"
    """Script in algos/ to profile (its chunk, exactly as it trains)."""
    members: tuple[int, ...] = (1, 16)
    """Numbers K of members in the chunk to profile, one trace each."""
    chunk: int = 50
    """Updates per jitted lax.scan chunk (the profiled chunk runs this many; every operation is an event)."""
    top: int = 12
    """Costliest operations to list per K."""
    out: str | None = None
    """JSON file to write (default: benchmarks/results/op_profile-<script>-cpu-<widths>.json)."""


def hlo_kinds(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Kind and JAX source (op_name) of every operation a compiled module executes: the instructions of its entry and
    loop computations (not those inside a fusion or a reducer), fusions by the opcodes of what they call."""
    opcodes, current, instructions, inner = defaultdict(set), None, {}, set()
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(1)
            continue
        found = INSTRUCTION.match(line)
        if not found or current is None:
            continue
        name, opcode, rest = found.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        inner.update(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest))
        source = re.search(r'op_name="([^"]*)"', rest)
        instructions[name] = (current, opcode, called.group(1) if called else None, source.group(1) if source else "")
        opcodes[current].add(opcode)

    def kind(opcode: str, called: str | None) -> str:
        contains = opcodes.get(called, set()) | {opcode}
        if contains & {"dot", "convolution"}:
            return "matmul"
        if contains & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
            return "gather/slice"
        if contains & {"reduce", "reduce-window"}:
            return "reduction"
        if opcode in ("copy", "transpose") or (opcode == "fusion" and contains - {"fusion"} <= LAYOUT_ONLY):
            return "copy/layout"
        if opcode == "fusion" or (called is None and opcode not in ("custom-call", "compare")):
            return "elementwise"
        return "other"

    executed = {n: v for n, v in instructions.items() if v[0] not in inner and v[1] not in NOT_EXECUTED}
    return ({n: kind(op, c) for n, (_, op, c, _) in executed.items()},
            {n: source for n, (_, _, _, source) in executed.items()})


def phase(source: str) -> str:
    """forward: inside a differentiated function (JAX names it jvp(...)); backward: its transpose; rest: sampling,
    target networks, Adam, Polyak averaging, logging statistics."""
    return "backward" if "transpose(" in source else "forward" if "jvp(" in source else "rest"


def trace_events(trace_dir: Path) -> list[dict]:
    path = next(trace_dir.rglob("*perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        trace = json.load(f)
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]


def profile_members(algo, config, args: Args, data, count: int) -> dict:
    """One traced chunk of `count` members: time per kind and the costliest operations, per member-update."""
    compiled, (states, fields, online), _ = throughput.compile_chunk(algo, config, args, data, count)
    kinds, sources = hlo_kinds(compiled.as_text())
    states, infos = compiled(states, data, fields, *online)  # warm-up
    jax.block_until_ready(infos)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        start = time.perf_counter()
        states, infos = compiled(states, data, fields, *online)
        jax.block_until_ready(infos)
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        events = trace_events(Path(folder))
    updates = count * args.chunk
    per_kind, per_phase = dict.fromkeys(KINDS, 0.0), dict.fromkeys(PHASES, 0.0)
    per_op, executed = defaultdict(float), 0
    for event in events:
        if event["name"] in kinds:  # an executed HLO operation (runtime events have other names)
            per_kind[kinds[event["name"]]] += event["dur"]
            per_phase[phase(sources.get(event["name"], ""))] += event["dur"]
            per_op[event["name"]] += event["dur"]
            executed += 1
    if not executed:
        raise runs.UsageError("the trace has no per-operation events: this backend does not emit them (CPU only)")
    total = sum(per_kind.values())
    costliest = sorted(per_op, key=per_op.get, reverse=True)[:args.top]
    return {"members": count, "wall_us_per_update": wall / updates * 1e6,
            "member_updates_per_second": updates / wall, "operations_per_update": executed / updates,
            "op_us_per_update": total / updates,
            "kinds": {k: {"us_per_update": v / updates, "share": v / total} for k, v in per_kind.items()},
            "phases": {k: {"us_per_update": v / updates, "share": v / total} for k, v in per_phase.items()},
            "costliest": [{"operation": n, "kind": kinds[n], "us_per_update": per_op[n] / updates,
                           "share": per_op[n] / total, "source": sources.get(n, "")} for n in costliest]}


def report(result: dict) -> str:
    lines = [f"{result['script']} on {result['device']}, hidden {result['hidden_dims']}, batch {result['batch_size']}, "
             f"chunk {result['chunk']}, jax {result['jax']}", ""]
    lines += ["| K | wall us per member-update | operations' time us (sum) | operations per update | "
              + " | ".join(KINDS) + " |", "| --- " * (4 + len(KINDS)) + "|"]
    for row in result["members"]:
        cells = [f"{row['kinds'][k]['us_per_update']:.0f} ({row['kinds'][k]['share']:.0%})" for k in KINDS]
        lines.append(f"| {row['members']} | {row['wall_us_per_update']:.0f} | {row['op_us_per_update']:.0f} | "
                     f"{row['operations_per_update']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "| K | " + " | ".join(PHASES) + " |", "| --- " * (1 + len(PHASES)) + "|"]
    for row in result["members"]:
        lines.append(f"| {row['members']} | " + " | ".join(
            f"{row['phases'][k]['us_per_update']:.0f} ({row['phases'][k]['share']:.0%})" for k in PHASES) + " |")
    for row in result["members"]:
        lines += ["", f"K = {row['members']}: costliest operations (us per member-update, share, JAX source)"]
        lines += [f"  {op['us_per_update']:7.1f} {op['share']:5.1%} {op['kind']:12s} {op['operation']:28s} "
                  f"{op['source'][-90:]}" for op in row["costliest"]]
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.script not in throughput.SCRIPTS:
        raise runs.UsageError(f"--script {args.script} is not one of {', '.join(throughput.SCRIPTS)}")
    if jax.devices()[0].platform != "cpu":
        raise runs.UsageError("per-operation trace events are XLA:CPU's: run this on a CPU")
    algo = importlib.import_module(f"algos.{args.script}")
    config, _ = envs.fill_from_table(runs.make_config(algo.Config, hidden_dims=args.hidden_dims,
                                                      batch_size=args.batch_size, log_interval=args.chunk), args.script)
    data = envs.to_device(throughput.synthetic_split(args))
    device = jax.devices()[0]
    result = {"script": args.script, "device": f"{device.platform}: {device.device_kind}",
              "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "hidden_dims": list(args.hidden_dims),
              "batch_size": args.batch_size, "chunk": args.chunk, "obs_dim": args.obs_dim,
              "action_dim": args.action_dim, "goal_conditioned": args.goal_conditioned,
              "members": [profile_members(algo, config, args, data, count) for count in args.members]}
    print(report(result))
    widths = "x".join(map(str, args.hidden_dims))
    out = Path(args.out or f"benchmarks/results/op_profile-{args.script}-cpu-{widths}.json")
    runs.write_json_atomic(out, result)
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    runs.exit_on_usage_error(lambda: main(tyro.cli(Args)))
