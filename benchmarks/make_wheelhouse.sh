#!/usr/bin/env bash
# Builds .wheelhouse/ (git-ignored): the wheels that benchmarks/gpu_check.sh installs with --no-deps
# on the lent GPU machine, which has Python 3.12, numpy 2.x, torch, torchvision, tensorboard,
# matplotlib, pillow and tqdm but no package registry. This is the closure of what the three
# scripts, envs/ and tests/ import there and it lacks, each package's Requires-Dist read from its
# METADATA; the versions are the ones requirements.txt resolves to on Python 3.11 (verified
# together). wandb is left out: nothing in the check tracks.
# Also .wheelhouse/syslibs/: copies of the system libraries that procgen's libenv.so loads besides
# its bundled Qt (libGL and glib, with what they load), from this Debian machine (glibc >= 2.34
# needed), for a GPU machine without them: gpu_check.sh puts them on LD_LIBRARY_PATH only if a
# Procgen env does not start otherwise.
#
#   bash benchmarks/make_wheelhouse.sh        # ~50 MB, most of it procgen-mirror's Qt libs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=.wheelhouse

BINARY_WHEELS=(
    # numpy<2 pin, yet verified under numpy 2.4 (SPEC section 2); gym, gym3, filelock (torch has it)
    procgen-mirror==0.10.7
    # imports cffi and imageio; glfw, moderngl and imageio-ffmpeg only to render, never here
    gym3==0.3.3
    cffi==1.17.1            # gym3 asks for <2
    pycparser==3.12         # cffi parses libenv's header with it
    imageio==2.38.1         # numpy, pillow
    gym-notices==0.1.0
    cloudpickle==3.1.3      # gym, gymnasium
    gymnasium==1.4.0        # envs/: numpy, cloudpickle, typing-extensions, farama-notifications
    farama-notifications==0.0.6
    typing-extensions==4.16.0  # typeguard wants >= 4.14, newer than torch may have brought
    tyro==1.0.17            # docstring-parser, typeguard, typing-extensions
    docstring-parser==0.18.0
    typeguard==4.6.1
    pytest==9.2.0           # the CUDA tests: iniconfig, packaging, pluggy, pygments
    iniconfig==2.3.1
    packaging==26.4
    pluggy==1.7.0
    pygments==2.21.0
)

mkdir -p "$WHEELHOUSE"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELHOUSE" "${BINARY_WHEELS[@]}"
# gym 0.26.2 (procgen's `import gym`) is published only as a source archive: build its pure-Python
# wheel here
if ! ls "$WHEELHOUSE"/gym-0.26.2-*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELHOUSE" gym==0.26.2
fi

SYSTEM_LIBS=(
    libGL.so.1 libGLX.so.0 libGLdispatch.so.0 libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6
    libbsd.so.0 libmd.so.0
    libglib-2.0.so.0 libgthread-2.0.so.0 libpcre2-8.so.0
)
mkdir -p "$WHEELHOUSE/syslibs"
for lib in "${SYSTEM_LIBS[@]}"; do
    if ! cp -L "/lib/x86_64-linux-gnu/$lib" "$WHEELHOUSE/syslibs/"; then
        echo "error: $lib is missing here: apt-get install libgl1 libglib2.0-0," \
            "then run this again" >&2
        exit 1
    fi
done

# the whole working tree travels in at most 64 MiB: tracked files plus this folder
wheels=$(du -cb "$WHEELHOUSE"/*.whl "$WHEELHOUSE"/syslibs/* | tail -1 | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "$WHEELHOUSE: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels and ${#SYSTEM_LIBS[@]} system" \
    "libraries, $((wheels / 1048576)) MiB;" \
    "with the tracked files $(((wheels + tracked) / 1048576)) MiB of 64"
if ((wheels + tracked > 60 * 1048576)); then
    echo "error: over 60 MiB; remove stale wheels from $WHEELHOUSE (rm -r $WHEELHOUSE)" \
        "and run this again" >&2
    exit 1
fi
