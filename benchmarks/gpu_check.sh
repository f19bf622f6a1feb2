#!/usr/bin/env bash
# The GPU check of issue 16, one command for a lent GPU machine (Python 3.12, numpy 2.x, torch and
# torchvision preinstalled, no package registry, minutes of device time): at most 8 minutes,
# everything written to $OUT.
#
#   here, once:  bash benchmarks/make_wheelhouse.sh
#                (.wheelhouse/: cp312 wheels of what is missing there)
#   there:       bash benchmarks/gpu_check.sh
#                (the working tree + the ignored path .wheelhouse)
#   dry run:     OUT=/tmp/dry bash benchmarks/gpu_check.sh --device cpu --quick
#                (~1 min; tests/test_gpu_check.py)
#
# Ignored paths that must travel with the working tree: .wheelhouse (only that; the check writes to
# $OUT and to a temporary folder). $OUT receives summary.json, check.log (this output) and
# logs.tar.gz; with $OUT unset, a new temporary folder (printed). The steps and what they record:
# benchmarks/gpu_check.py; how to read them: docs/benchmarks.md, "GPU check (issue 16)". $PYTHON
# picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d -t gpu_check_out.XXXXXX)
    echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT"

procgen_starts() {
    local start="from procgen import ProcgenEnv; ProcgenEnv(num_envs=1, env_name='bigfish').close()"
    "$PYTHON" -c "$start" >/dev/null 2>&1
}

install_wheelhouse() {
    # procgen, gym3, gym, gymnasium, tyro, pytest and what they need, where the machine lacks them:
    # from the wheels carried along, each --no-deps (numpy, torch and pillow are the machine's own),
    # into a folder put on PYTHONPATH
    if "$PYTHON" -c "import procgen, gym3, gym, gymnasium, tyro, pytest" >/dev/null 2>&1; then
        GPU_CHECK_WHEELHOUSE="not needed: the packages import already"
    elif compgen -G ".wheelhouse/*.whl" >/dev/null; then
        local site="${TMPDIR:-/tmp}/gpu_check_site"
        rm -rf "$site"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
            --no-compile --target "$site" .wheelhouse/*.whl || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        GPU_CHECK_WHEELHOUSE="installed $(ls .wheelhouse/*.whl | wc -l) wheels into $site"
    else
        GPU_CHECK_WHEELHOUSE="missing: run bash benchmarks/make_wheelhouse.sh"
        GPU_CHECK_WHEELHOUSE+=" and carry .wheelhouse along"
    fi
    # libenv.so loads libGL and glib from the system: where they are missing, the copies made with
    # the wheelhouse
    if ! procgen_starts && [ -d .wheelhouse/syslibs ]; then
        export LD_LIBRARY_PATH="$PWD/.wheelhouse/syslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        if procgen_starts; then
            GPU_CHECK_WHEELHOUSE+="; libGL and glib from .wheelhouse/syslibs"
        else
            GPU_CHECK_WHEELHOUSE+="; a Procgen env does not start,"
            GPU_CHECK_WHEELHOUSE+=" even with .wheelhouse/syslibs"
        fi
    fi
    echo "wheelhouse: $GPU_CHECK_WHEELHOUSE"
    export GPU_CHECK_WHEELHOUSE
}

check() {
    install_wheelhouse || { echo "error: installing .wheelhouse failed (see above)"; return 1; }
    "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
}

check "$@" 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
