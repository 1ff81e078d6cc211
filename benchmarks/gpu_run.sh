#!/usr/bin/env bash
# The GPU work of the engine issue in a few calls of the device tool, which copies the work
# tree (without .git) to a machine with a GPU, runs one command there and brings back $OUT:
#
#   bash benchmarks/gpu_run.sh test  <commit>   # install, versions, the whole test suite
#                                               # (Triton kernels compiled for the GPU)
#   bash benchmarks/gpu_run.sh bench <commit> [EXPR]   # install, the benchmark suite -> JSON
#   bash benchmarks/gpu_run.sh sweep <commit> [ARGS]   # the MLP kernel's block size and warps,
#                                               # timed (ARGS: benchmarks/mlp_kernel_sweep.py's)
#
# EXPR, a pytest -k expression, runs part of the suite ("mlp", "not mlp") when the whole
# does not fit one call; the JSON's name then ends in it. The suite stops after
# BENCH_SECONDS (default 480) so that the call ends within the tool's 600 s; its JSON,
# written after every benchmark group, keeps what was measured (marked "complete": false).
#
# <commit> is `git rev-parse --short HEAD` here; it names the results file. Results land in
# $OUT (the device tool's folder) or benchmarks/results; commit the JSON with its command.
# The machine has torch, triton, pybind11, CMake, ninja and scikit-build-core but reaches
# no package registry, hence --no-build-isolation --no-deps.
set -euo pipefail
what=${1:?usage: gpu_run.sh test|bench|sweep <commit>}
export FPKERN_COMMIT=${2:?usage: gpu_run.sh test|bench|sweep <commit>}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
py=${PYTHON:-python3}

$py - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton",
      triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
$py -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
    || { tail -40 "$out/install.log"; exit 1; }

# the device's name as a file-name part ("nvidia-h100-80gb-hbm3", or "cpu")
gpu=$($py -c "import re, torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print(re.sub('[^a-z0-9]+', '-', n.lower()).strip('-'))")

case "$what" in
  test)
    # pytest-xdist is on that machine: the Triton compilations of the kernel tests spread
    # over its cores (one GPU, shared)
    par=""
    if $py -c "import xdist" 2>/dev/null; then par="-n 8"; fi
    $py -m pytest -q $par tests/ -p no:cacheprovider 2>&1 | tee "$out/tests-$FPKERN_COMMIT.log" \
        | tail -25
    ;;
  bench)
    sel=${3:-}
    part=""
    if [ -n "$sel" ]; then part="-$(printf '%s' "$sel" | tr -cs 'a-zA-Z0-9' '-')"; fi
    name="$gpu-$FPKERN_COMMIT$part"
    # the micro-benchmarks of the fused ops (seconds; the laplacian_terms file first, its
    # kernel bandwidth test first in it), then the residual suite, train steps first
    micro=$(ls benchmarks/bench_*.py | grep -v -e '/bench_residual\.py$' \
        -e '/bench_laplacian_terms\.py$')
    timeout "${BENCH_SECONDS:-480}" $py -m pytest benchmarks/bench_laplacian_terms.py $micro \
        benchmarks/bench_residual.py --benchmark-only -q \
        -p no:cacheprovider ${sel:+-k "$sel"} --bench-json "$out/$name.json" 2>&1 \
        | tee "$out/bench-$name.log" | sed -n '/fpkern ratios/,$p' \
        || echo "the suite stopped early (time budget or a failure): see $out/bench-$name.log"
    if [ -f "$out/$name.json" ]; then $py -m benchmarks.plot "$out/$name.json" || true; fi
    ;;
  sweep)
    # in sweeps/: the JSON files of results/ itself are benchmark-suite runs
    shift 2
    mkdir -p "$out/sweeps"
    $py -m benchmarks.mlp_kernel_sweep "$@" \
        --json "$out/sweeps/mlp-$gpu-$FPKERN_COMMIT-$(date +%H%M%S).json" \
        2> "$out/sweeps/mlp-$FPKERN_COMMIT.log"
    ;;
  *)
    echo "unknown step $what (test, bench or sweep)" >&2
    exit 2
    ;;
esac
