#!/usr/bin/env bash
# Record the course's GPU figures on a lent GPU machine (issue 19), in three steps; results/README.md explains them.
#
#   here, before:  scripts/gpu_session.sh pack ../shared/device   copy the wheels and the prebuilt extension into
#                                                                 .gpu/ (git-ignored; the device call carries it)
#   on the GPU:    scripts/gpu_session.sh device [BUDGET_S [ARGS]] install them into /tmp/site, `record` for what is
#                                                                 left of BUDGET_S (default 540; ARGS go to `record`,
#                                                                 e.g. --only '*decode_depth*'), pack results/ and the
#                                                                 log into $OUT (or into /tmp/gpu-out without $OUT)
#   here, after:   scripts/gpu_session.sh finish FILES_DIR        unpack FILES_DIR/results.tgz over results/, show
#                                                                 what is left, re-execute the notebooks on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
pack)
    src="${2:?usage: scripts/gpu_session.sh pack DIR (the folder with the exllamav2 wheels, e.g. ../shared/device)}"
    mkdir -p .gpu
    cp "$src"/*.whl "$src"/exllamav2_ext-*.so.gz .gpu/
    ls -la .gpu ;;
device)
    start=$SECONDS
    budget="${2:-540}"
    shift $(( $# < 2 ? $# : 2 ))
    out="${OUT:-/tmp/gpu-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
    gunzip -c .gpu/exllamav2_ext-*.so.gz > /tmp/site/exllamav2_ext.so
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 EXL2_COURSE_NO_PROGRESS=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # the first import loads the prebuilt extension, or builds it (~3 min) when this torch is not 2.11.0+cu130
    python3 -c "import torch, exllamav2.ext as e; print('torch', torch.__version__, 'JIT-built' if e.build_jit else
'prebuilt', 'exllamav2 extension')" || echo "exllamav2 does not import here: record says why, one line each"
    left=$(( budget - (SECONDS - start) ))
    echo "set-up took $(( SECONDS - start )) s; recording for $left s"
    rc=0
    python3 -m helpers record --budget-s "$left" --no-notebooks "$@" 2>&1 | tee "$out/record.log" || rc=$?
    python3 -m helpers record --plan >> "$out/record.log" 2>&1 || true
    tar czf "$out/results.tgz" results
    echo "record exit $rc; results packed in $out/results.tgz"
    exit "$rc" ;;
finish)
    files="${2:?usage: scripts/gpu_session.sh finish FILES_DIR (where the device call left results.tgz)}"
    tar xzf "$files/results.tgz" --exclude results/README.md
    py=.venv/bin/python
    [ -x "$py" ] || py=python3
    "$py" -m helpers record --plan
    "$py" -m helpers record --notebooks-only ;;
*)
    sed -n '2,12p' "$0"
    exit 2 ;;
esac
