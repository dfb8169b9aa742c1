#!/usr/bin/env bash
# Run a command as on a machine without libEGL (no offscreen GL for MuJoCo), to check that the suite still collects
# and passes there, with only the filming test skipped (tests/test_evaluate.py). In a private mount namespace every
# libEGL* that the loader's cache (ldconfig -p) names is covered by /dev/null, so loading it fails as on a machine
# where it is not installed; nothing outside this command's processes sees a change. Needs root or unprivileged
# user namespaces (then --map-root-user). Example, from the repository root:
#   benchmarks/no_egl.sh .venv/bin/python -m pytest -q -n 2
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
as_root=()
[ "$(id -u)" = 0 ] || as_root=(--map-root-user)
exec unshare --mount --propagation private "${as_root[@]}" bash -c '
    set -euo pipefail
    hidden=()
    for lib in $(ldconfig -p | awk "/libEGL/ {print \$NF}" | xargs -r readlink -f | sort -u); do
        mount --bind /dev/null "$lib"
        hidden+=("$lib")
    done
    echo "no_egl.sh: hidden ${hidden[*]:-nothing (no libEGL here)}" >&2
    exec "$@"' no_egl.sh "$@"
