#!/usr/bin/env bash
# cuda-check.sh: type-check (or clippy, or build) the trainer with `--features cuda` on a machine
# without a GPU and without a CUDA install. CI never builds the `cuda` feature; this is how we keep
# it compiling.
#
# Usage (from anywhere in the repo):
#   scripts/cuda-check.sh            # cargo check  --release -p trainer --features cuda --all-targets
#   scripts/cuda-check.sh clippy     # cargo clippy --release -p trainer --features cuda --all-targets -- -D warnings
#   scripts/cuda-check.sh build      # cargo build  --release -p trainer --features cuda --bin trainer
#
# Why it needs CUDA at all: even `cargo check` runs build scripts, and candle-kernels' build script
# (cudaforge) compiles its kernels with nvcc; cudarc's picks its API set from the CUDA version.
# Linking (build) also needs the libraries and a libcuda stub: for that use the shared recipe
# ../shared/tools/cuda/build-cuda.sh, which this script mirrors (same pins, same env, same target dir).
#
# Where CUDA comes from, in this order:
#   1. CUDA_HOME pointing at a real toolkit with bin/nvcc (a user's CUDA machine): used as is.
#   2. CU13 (default $CUDA_WORK/cuda13/nvidia/cu13, CUDA_WORK default /tmp/cuda-build): the CUDA 13.0
#      prefix unpacked from NVIDIA's PyPI wheels, as build-cuda.sh leaves it. If it has no nvcc, the
#      compiler wheels (nvcc, nvvm, crt, cccl, runtime headers; ~250 MB, pinned with hashes, the same
#      versions as build-cuda.sh, i.e. what torch 2.11 pins) are downloaded and unpacked there.
#
# Knobs: CUDA_COMPUTE_CAP (default 90: H100/H200, cudaforge makes it sm_90a), CARGO_TARGET_DIR
# (default <repo>/target/cuda-sm$CUDA_COMPUTE_CAP, apart from the CPU target/ so the env-dependent
# build scripts don't rebuild the CPU tree), NICE (default 19: the dev box is shared).
#
# On a user's CUDA machine none of this is needed:
#   CUDA_COMPUTE_CAP=90 cargo build --release -p trainer --features cuda
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=${1:-check}
CUDA_WORK=${CUDA_WORK:-/tmp/cuda-build}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
NICE=${NICE:-19}

die() { printf 'cuda-check.sh: %s\n' "$*" >&2; exit 1; }

if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && [ "${CUDA_HOME}" != "${CU13:-}" ]; then
  echo "using the CUDA toolkit at CUDA_HOME=$CUDA_HOME"
  export NVCC=$CUDA_HOME/bin/nvcc
else
  CU13=${CU13:-$CUDA_WORK/cuda13/nvidia/cu13}
  if [ ! -x "$CU13/bin/nvcc" ]; then
    echo "no nvcc under $CU13: downloading the CUDA 13.0 compiler wheels into $CUDA_WORK"
    command -v unzip >/dev/null || die "unzip is missing; hint: apt-get install unzip"
    mkdir -p "$CUDA_WORK/wheels"
    # Pins copied from ../shared/tools/cuda/build-cuda.sh (torch==2.11.0's cuda-toolkit==13.0.2).
    # nvcc 13.0 emits PTX ISA 9.0, the newest a CUDA 13.0 (580) driver can JIT: do not bump.
    cat >"$CUDA_WORK/cu13-compiler-requirements.txt" <<'EOF'
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
EOF
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
      -r "$CUDA_WORK/cu13-compiler-requirements.txt" -d "$CUDA_WORK/wheels"
    mkdir -p "$CUDA_WORK/cuda13"
    for w in "$CUDA_WORK"/wheels/nvidia_cuda_runtime-*.whl "$CUDA_WORK"/wheels/nvidia_cuda_nvcc-*.whl \
             "$CUDA_WORK"/wheels/nvidia_nvvm-*.whl "$CUDA_WORK"/wheels/nvidia_cuda_crt-*.whl \
             "$CUDA_WORK"/wheels/nvidia_cuda_cccl-*.whl; do
      stamp="$CUDA_WORK/cuda13/.$(basename "$w").done"
      [ -f "$stamp" ] && continue
      unzip -q -o "$w" 'nvidia/*' -d "$CUDA_WORK/cuda13"
      touch "$stamp"
    done
    [ -x "$CU13/bin/nvcc" ] || die "$CU13/bin/nvcc still missing after unpacking; hint: rm -rf $CUDA_WORK/cuda13 and retry"
  fi
  # The same environment as build-cuda.sh step 5: cudarc binds the CUDA 13.0 APIs without asking
  # nvcc, finds headers/libs only under the wheel prefix, cudaforge compiles with the wheel nvcc.
  export CUDA_HOME=$CU13 NVCC=$CU13/bin/nvcc CUDARC_CUDA_VERSION=13000
  export PATH=$CU13/bin:$PATH
fi
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda-sm$CUDA_COMPUTE_CAP}
echo "nvcc: $("$NVCC" --version | grep release) | CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP | target dir $CARGO_TARGET_DIR"

cd "$ROOT"
# --release: the build-script outputs (the nvcc-compiled kernels, minutes on 2 cores) are then
# shared with `build` and with build-cuda.sh, which builds in release in the same target dir.
case "$MODE" in
  check) cmd=(cargo check --release -p trainer --features cuda --all-targets) ;;
  clippy) cmd=(cargo clippy --release -p trainer --features cuda --all-targets -- -D warnings) ;;
  build) cmd=(cargo build --release -p trainer --features cuda --bin trainer) ;;
  *) die "unknown mode '$MODE'; hint: check | clippy | build" ;;
esac
echo "+ ${cmd[*]}"
start=$(date +%s)
nice -n "$NICE" "${cmd[@]}"
echo "cuda-check.sh $MODE: ok in $(($(date +%s) - start)) s"
