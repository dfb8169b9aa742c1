#!/usr/bin/env bash
# The accelerator check in one command: training throughput at the reference size, then one short real packed
# matrix, both written as JSON under OUT (default benchmarks/results/gpu). Sized to fit in 8 minutes on one GPU (an
# estimate: no GPU has run it yet):
#
#   benchmarks/gpu.sh                      # iql_ddpgbc, 3 x 512, batch 1024, K = 1 16 64 256 vmapped members;
#                                          # then a 2 x 2 matrix x 2 seeds (8 runs) packed in one process
#   TINY=1 benchmarks/gpu.sh OUT           # the same steps at toy sizes: what CI runs on its CPU
#
# OUT/throughput.json is benchmarks/throughput.py's output (its docstring defines every number); OUT/matrix/ is a
# scaling.py sweep folder (sweep.json, one run folder per cell and seed); OUT/gpu.json gathers the device, the
# throughput rows, the matrix's wall time, member-updates per second and the success of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
python=${PYTHON:-python}
mkdir -p "$out"

if [ "${TINY:-0}" = 1 ]; then
    throughput=(--hidden-dims 16 --batch-size 32 --members 1 2 --chunk 5 --repeats 1 --reference-steps 0
                --dataset-size 2000 --matmul-size 64 --no-progress)
    matrix=(--value-sizes 1000 2000 --policy-sizes 1000 2000 --seeds 0 1 --steps 20 --generate-episodes 12
            -- --hidden-dims 16 --batch-size 32 --log-interval 10 --eval-interval 20 --eval-episodes 1
            --eval-max-steps 50 --mse-samples 64)
else
    throughput=(--hidden-dims 512 512 512 --batch-size 1024 --members 1 16 64 256 --chunk 100 --repeats 3)
    matrix=(--value-sizes 10000 100000 --policy-sizes 10000 100000 --seeds 0 1 --steps 5000 --generate-episodes 100
            -- --hidden-dims 512 512 512 --batch-size 1024 --log-interval 1000 --eval-interval 5000 --eval-episodes 5)
fi

start=$(date +%s)
"$python" benchmarks/throughput.py --script iql_ddpgbc "${throughput[@]}" --out "$out/throughput.json"
echo "throughput took $(( $(date +%s) - start )) s"

start=$(date +%s)
"$python" scaling.py --envs pointmaze-medium-navigate-v0 --scripts iql_ddpgbc --pack 8 --workers 1 --no-download \
    --dataset-dir "$out/data" --sweep-dir "$out/matrix" --no-progress "${matrix[@]}"
matrix_seconds=$(( $(date +%s) - start ))
echo "matrix took $matrix_seconds s (dataset generation included)"

"$python" - "$out" "$matrix_seconds" <<'EOF'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), float(sys.argv[2])
throughput = json.loads((out / "throughput.json").read_text())
runs = []
for result in sorted((out / "matrix").glob("*/*/*/result.json")):
    saved = json.loads(result.read_text())
    runs.append({"run": str(result.parent.relative_to(out / "matrix")), "success": saved["success"]["mean"],
                 "wall_seconds": saved.get("wall_seconds")})
sweep = json.loads((out / "matrix" / "sweep.json").read_text())
steps = sweep["settings"]["steps"]
summary = {"device": throughput["device"], "jax": throughput["jax"], "throughput": throughput["members"],
           "matmul_peak_gflops": throughput["matmul_peak_gflops"],
           "matrix": {"runs": runs, "wall_seconds_with_data_generation": seconds,
                      "member_updates_per_second": len(runs) * steps / seconds}}
(out / "gpu.json").write_text(json.dumps(summary, indent=1))
print(f"-> {out / 'gpu.json'}: {len(runs)} matrix runs, device {summary['device']}")
EOF
