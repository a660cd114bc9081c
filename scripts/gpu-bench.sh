#!/usr/bin/env bash
# gpu-bench.sh: every GPU measurement in ONE call of at most 8 minutes on the GPU machine:
# CUDA-vs-CPU agreement, candle (`trainer`, built with `--features cuda`) against the PyTorch
# reference on the same GPU, a real 95M run with a stop and `--resume latest`, and the data loader
# alone.
#
#   scripts/gpu-bench.sh prepare   # HERE (no GPU): builds the CUDA binary with the shared recipe,
#                                  # packs binary + reference + sample shards + configs into .gpu/
#                                  # (git-ignored, xz), checks the transfer budget, prints the call
#   scripts/gpu-bench.sh run       # ON THE GPU MACHINE, through the device tool:
#       run(command="bash scripts/gpu-bench.sh run", carry=[".gpu"], timeout_s=480)
#
# `run` stages, in order. Every step runs under its own `timeout`; a failure or a timeout is
# recorded and the next step still runs. Each step's limit is min(its cap, what is left of BUDGET_S
# (450 s from the start) after the reserves of the steps still to come and 5 s for the kill-after),
# so the whole call ends by 450 s (+ a second or two to write the summary), inside timeout_s=480,
# and a slow step cannot starve a later stage.
#   group  step           cap s  what
#   env    env               20  nvidia-smi, driver, nproc, glibc, which CUDA libraries the binary
#                                resolves (rc 1 if one is missing)
#          peak              60  torch bf16 8192^3 matmul on random data, median of 20: the measured
#                                peak, the MFU denominator for candle and torch alike
#   agree  agree_tiny        90  trainer check-device, configs/tiny.toml (8 x 128): CUDA bf16 matmuls vs
#                                CPU f32, same weights and batch: loss within 2^-8 relative (one bf16
#                                ulp), every gradient cosine > 0.99; the first CUDA call JIT-compiles
#                                candle's PTX (cached in CUDA_CACHE_PATH for the later steps)
#          agree_95m        120  the same on configs/bitnet-95m.toml at 2 x 1024 (CPU side: 16 cores)
#   speed  candle_accum1     90  trainer bench, 95M, batch 32 x 1024, STEPS timed (+ as many phase-
#                                timed) after WARMUP; if it fails other than by a timeout (out of GPU
#                                memory, most likely on an 80 GB H100), candle_accum2 and then
#                                candle_accum4 rerun it with grad_accumulation_steps 2 / 4 (micro-
#                                batches of 16 / 8, the same 32 x 1024 tokens per step), same cap
#          torch_eager       60  bitnet_ref.py bench --config 95m --batch 32 --seq 1024 --compile 0
#          torch_compile    180  the same with --compile 1 (compilation happens in its warm-up steps)
#   train  train_b        adapt  95M on the packed sample shards (seq 1024), the micro-batching that
#                                `speed` found (eval_batch_size set to the micro-batch too: the frozen
#                                eval builds the same graph per batch): fresh run, N steps
#          train_a1       adapt  fresh run, R = N/2 steps: stops with a checkpoint
#          train_a2       adapt  `--resume latest` in run A's folder, continues to N
#          train_compare     40  every step's loss (metrics/scalars.jsonl), A against B, before and
#                                after the resume; final model + optimizer tensors byte for byte
#          N = min(TRAIN_STEPS, (time left - data's reserve - 80 s of fixed costs) / (2.5 x the
#          measured s/step)), at least 8; caps 45 + 2 N t (B), 45 + 2 R t (A1), 30 + 2 (N-R) t (A2)
#   data   data_shards       40  trainer synthetic-shards, DATA_SEQUENCES x 1024 (512 MiB, page cache)
#          data_1thread      20  trainer bench-data, DATA_BATCHES batches of 32 on one thread (what the
#                                prefetch thread does per step)
#          data_procs        30  nproc copies of it at once (the machine's 16 cores): aggregate seq/s
#          data_real         15  bench-data on the packed FineWeb-Edu sample shards (64 batches)
# Reserves (what each group keeps for itself while earlier steps run): env 30, agree 80, speed 110,
# train 90, data 40 = 350 s of the 450, so any stage may overrun its expected time by the rest.
# Expected on an H100 (estimates, nothing has run there): env+peak 15 s, agree 35, speed 130 (an
# OOM try ~10, candle ~25, eager ~15, compile ~80), train ~130 (N 40 at ~0.6 s/step), data ~15:
# about 5.5 minutes, plus 1-2 minutes for the machine's start.
#
# Output in $OUT (the device tool returns at most 8 files; exactly these 8): run.log (the console),
# env.log, agree.log, speed.log, train.log, data.log (each step's command, stdout+stderr, rc and time,
# streamed as it runs), summary.txt and summary.json (rewritten before and after every step, so a
# call cut off later still has every earlier step, the step it was in, and the ones not reached).
# summary.txt is printed last, so the tool's output tail shows it. Exit status 0 only if every
# step ran and passed (3 otherwise).
#
# Knobs (env): BUDGET_S (450), STAGES ("env agree speed train data"; e.g. STAGES="train data" for a
# rerun, with TRAIN_ACCUM and STEP_S standing in for what `speed` measures), STEPS (10), WARMUP (2),
# BATCH (32), ACCUM_TRY ("1 2 4"), REF_STEPS (15), REF_WARMUP (3), TRAIN_STEPS (40, the most N),
# DATA_SEQUENCES (262144), DATA_BATCHES (8192), DATA_PROCS (nproc), PEAK_TFLOPS (skips the
# measurement), PYTHON (/opt/torch/.venv/bin/python), GPU_DIR (.gpu), OUT (the device tool sets it;
# else /tmp/gpu-bench-out), GPU_BENCH_WORK (scratch, /tmp/gpu-bench, emptied). prepare: BUILD (1; 0 packs
# TRAINER_BIN as it is), TRAINER_BIN (/tmp/cuda-build/dist/trainer), SHARDS (a ready shard folder),
# PIPELINE (target/{release,debug}/pipeline), TRAIN_TOKENS (2097152: 64 steps of 32 x 1024).
# DRY_RUN=1: the plumbing of `run` on a CPU box with a CPU build (`DRY_RUN=1 scripts/gpu-bench.sh
# prepare` packs target/debug/trainer and seq-128 shards; then `DRY_RUN=1 OUT=/tmp/o
# scripts/gpu-bench.sh run`): --device cpu, the tiny config everywhere, small batches and step
# counts, torch only if the Python has it, no peak. RUN_TRAINER=bin runs another binary.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/gpu-bench.sh"
GPU_DIR=${GPU_DIR:-$ROOT/.gpu}
MODE=${1:-}
DRY_RUN=${DRY_RUN:-0}
DEVICE_CALL='run(command="bash scripts/gpu-bench.sh run", carry=[".gpu"], timeout_s=480)'

die() { printf 'gpu-bench.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# prepare: runs on the build box
# ---------------------------------------------------------------------------------------------
prepare() {
  local cuda_work=${CUDA_WORK:-/tmp/cuda-build}
  local bin ref=${REF_PY:-$ROOT/../shared/reference/bitnet_ref.py}
  local recipe=${BUILD_SCRIPT:-$ROOT/../shared/tools/cuda/build-cuda.sh}
  local seq_len=1024 tokens=${TRAIN_TOKENS:-2097152} eval_seqs=${EVAL_SEQUENCES:-64}
  local limit_mib=${CARRY_LIMIT_MIB:-48}
  if [ "$DRY_RUN" = 1 ]; then seq_len=128 tokens=${TRAIN_TOKENS:-262144}; fi
  [ -f "$ref" ] || die "no PyTorch reference at $ref; hint: set REF_PY=/path/to/bitnet_ref.py"
  for c in configs/bitnet-95m.toml configs/tiny.toml tests/fixtures/tokenizer/tokenizer.json; do
    [ -f "$ROOT/$c" ] || die "missing $ROOT/$c"
  done

  # 1. The CUDA binary: the shared recipe with thin LTO (drops candle's unused MoE/GGUF kernels,
  #    3.6 MB instead of 8 MB xz'd, see BENCHMARKS.md), in its own target dir. cargo is
  #    incremental: an unchanged tree relinks nothing. BUILD=0 packs TRAINER_BIN as it is.
  if [ "$DRY_RUN" = 1 ]; then
    bin=${TRAINER_BIN:-$ROOT/target/debug/trainer}
    [ -x "$bin" ] || die "DRY_RUN=1: no CPU trainer at $bin; hint: cargo build -p trainer, or set TRAINER_BIN"
  else
    bin=${TRAINER_BIN:-$cuda_work/dist/trainer}
    if [ "${BUILD:-1}" != 0 ]; then
      [ -x "$recipe" ] || die "no CUDA build recipe at $recipe; hint: set BUILD_SCRIPT, or BUILD=0 with TRAINER_BIN"
      echo "building the CUDA trainer with $recipe (8+ minutes on 2 cores from a warm target dir; BUILD=0 skips)"
      nice -n "${NICE:-19}" env WORK="$cuda_work" CARGO_PROFILE_RELEASE_LTO=thin \
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda-sm90-lto}" \
        CARGO_FEATURES=cuda CARGO_EXTRA_ARGS="-p trainer --bin trainer" "$recipe" "$ROOT"
    fi
    [ -f "$bin" ] || die "no CUDA trainer binary at $bin; hint: drop BUILD=0, or set TRAINER_BIN"
    readelf -d "$bin" | grep -q 'libcublas.so.13' ||
      die "$bin does not link libcublas.so.13; hint: it is not a --features cuda build for CUDA 13"
  fi

  # 2. The shipped FineWeb-Edu sample as shards (seq 1024): TRAIN_TOKENS train tokens (default 64
  #    steps of 32 x 1024, more than the train stage's 40), 64 eval sequences. SHARDS=dir packs a
  #    ready `pipeline prepare` folder instead.
  local shards=${SHARDS:-} tmp
  tmp=$(mktemp -d)
  PREP_TMP=$tmp
  trap 'rm -rf "$PREP_TMP"' EXIT
  if [ -z "$shards" ]; then
    local pipeline=${PIPELINE:-}
    if [ -z "$pipeline" ]; then
      for p in "$ROOT/target/release/pipeline" "$ROOT/target/debug/pipeline"; do
        [ -x "$p" ] && pipeline=$p && break
      done
    fi
    { [ -n "$pipeline" ] && [ -x "$pipeline" ]; } ||
      die "no pipeline binary to make the sample shards; hint: cargo build --release -p pipeline, or set PIPELINE=bin or SHARDS=dir"
    shards=$tmp/shards
    echo "sample shards: $pipeline prepare --seq-len $seq_len --tokens $tokens --eval-sequences $eval_seqs"
    "$pipeline" prepare --source "${SAMPLE_DIR:-$ROOT/tests/fixtures/fineweb-edu-sample}" \
      --tokenizer "$ROOT/tests/fixtures/tokenizer/tokenizer.json" --seq-len "$seq_len" \
      --tokens "$tokens" --eval-sequences "$eval_seqs" --threads "${THREADS:-2}" --out "$shards" >"$tmp/pipeline.log" 2>&1 ||
      { tail -n 20 "$tmp/pipeline.log" >&2; die "pipeline prepare failed (log above)"; }
  fi
  [ -f "$shards/manifest.json" ] || die "$shards: no manifest.json; hint: a complete 'pipeline prepare' folder"
  [ -f "$shards/tokenizer.json" ] || die "$shards: no tokenizer.json (the run's samples need it)"

  # 3. Pack. Only the entries this script owns are replaced.
  mkdir -p "$GPU_DIR"
  rm -rf "$GPU_DIR/shards" "$GPU_DIR/shards.tar.xz" "$GPU_DIR/configs" "$GPU_DIR/reference" \
    "$GPU_DIR/trainer.xz" "$GPU_DIR/PROVENANCE.txt"
  mkdir -p "$GPU_DIR/configs" "$GPU_DIR/reference"
  echo "compressing $bin ($(du -h "$bin" | cut -f1))"
  xz -T0 -6 -c "$bin" >"$tmp/trainer.xz"
  mv "$tmp/trainer.xz" "$GPU_DIR/trainer.xz"
  tar -C "$shards" -cJf "$tmp/shards.tar.xz" --exclude='.work' --exclude='*.tmp' .
  mv "$tmp/shards.tar.xz" "$GPU_DIR/shards.tar.xz"
  cp "$ROOT/configs/bitnet-95m.toml" "$ROOT/configs/tiny.toml" "$GPU_DIR/configs/"
  cp "$ref" "$GPU_DIR/reference/bitnet_ref.py"
  {
    echo "prepared: $(date -u +%FT%TZ)$([ "$DRY_RUN" = 1 ] && echo ' (DRY_RUN=1: a CPU build, for the plumbing only)')"
    echo "git at prepare time: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty: other edits in the tree; the binary is what cargo built from it)')"
    echo "binary: $bin ($(stat -c %s "$bin") bytes, built $(date -u -r "$bin" +%FT%TZ))"
    echo "binary sha256: $(sha256sum "$bin" | cut -d' ' -f1)"
    echo "reference: $ref, sha256 $(sha256sum "$ref" | cut -d' ' -f1) (independent PyTorch model, not part of the product)"
    echo "configs: bitnet-95m.toml $(sha256sum "$ROOT/configs/bitnet-95m.toml" | cut -c1-16), tiny.toml $(sha256sum "$ROOT/configs/tiny.toml" | cut -c1-16)"
    python3 - "$shards/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"shards: seq_len {m['seq_len']}, train {m['train']['sequences']} sequences ({m['train']['tokens']} tokens), "
      f"eval {m['eval']['sequences']} sequences; dataset_sha256 {m['fingerprint']['dataset_sha256'][:16]}")
EOF
  } >"$GPU_DIR/PROVENANCE.txt"

  # 4. The transfer budget: tracked + untracked-not-ignored files travel, plus the carried .gpu/.
  local tree carry
  tree=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s+=$1} END {print s+0}')
  carry=$(du -sb "$GPU_DIR" | cut -f1)
  find "$GPU_DIR" -type f -printf '  %10s  %P\n' | sort -k2
  awk -v t="$tree" -v c="$carry" -v l="$limit_mib" 'BEGIN {
    printf "transfer: working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB (device limit 64 MiB; this script keeps it under %d)\n",
      t/1048576, c/1048576, (t+c)/1048576, l }'
  [ $((tree + carry)) -lt $((limit_mib * 1024 * 1024)) ] ||
    die "over the ${limit_mib} MiB transfer budget; hint: lower TRAIN_TOKENS, or ignore big untracked files"
  cat "$GPU_DIR/PROVENANCE.txt"
  echo
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run next (CPU): DRY_RUN=1 GPU_DIR=$GPU_DIR OUT=/tmp/gpu-bench-out scripts/gpu-bench.sh run"
  else
    echo "next, on the GPU machine (one call, about 5-8 minutes plus the machine's start):"
    echo "  $DEVICE_CALL"
  fi
}

# ---------------------------------------------------------------------------------------------
# run: runs on the GPU machine (no `set -e` from here on: a failing step must not stop the rest)
# ---------------------------------------------------------------------------------------------
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
BATCH=${BATCH:-32}
ACCUM_TRY=${ACCUM_TRY:-1 2 4}
REF_STEPS=${REF_STEPS:-15}
REF_WARMUP=${REF_WARMUP:-3}
TRAIN_STEPS=${TRAIN_STEPS:-40}
DATA_SEQUENCES=${DATA_SEQUENCES:-262144}
DATA_BATCHES=${DATA_BATCHES:-8192}
BUDGET_S=${BUDGET_S:-450}
STAGES=${STAGES:-env agree speed train data}
DEVICE=cuda
BIG=95m
if [ "$DRY_RUN" = 1 ]; then
  # CPU plumbing check: the same steps at CPU size (tiny config, seq 128, a few steps).
  DEVICE=cpu BIG=tiny
  STEPS=${DRY_STEPS:-2} WARMUP=1 BATCH=${DRY_BATCH:-4} ACCUM_TRY=${DRY_ACCUM_TRY:-1 2}
  REF_STEPS=2 REF_WARMUP=1 TRAIN_STEPS=${DRY_TRAIN_STEPS:-8}
  DATA_SEQUENCES=${DRY_DATA_SEQUENCES:-4096} DATA_BATCHES=${DRY_DATA_BATCHES:-100}
fi
# Reserves of the groups, seconds (see the header); 350 of the 450. Within a group, the inner
# reserves a step passes to `step` keep time for the group's later steps and sum to at most this.
declare -A RESERVE=([env]=30 [agree]=80 [speed]=110 [train]=90 [data]=40)
GROUPS_ORDER="env agree speed train data"
WORK=${GPU_BENCH_WORK:-/tmp/gpu-bench}

now() { date +%s; }

# Seconds the groups after $1 keep for themselves (only those in STAGES).
reserve_after() {
  local g seen=0 sum=0
  for g in $GROUPS_ORDER; do
    if [ "$seen" = 1 ] && [[ " $STAGES " == *" $g "* ]]; then sum=$((sum + ${RESERVE[$g]})); fi
    [ "$g" = "$1" ] && seen=1
  done
  echo "$sum"
}

# Appends one record to results.jsonl and rewrites the summary (so a later kill keeps it).
record() { # name group rc status seconds limit mem_gib note outfile
  "$PY" - "$@" >>"$WORK/results.jsonl" <<'EOF'
import json, re, sys
name, group, rc, status, secs, limit, mem, note, out = sys.argv[1:10]
result = None
try:
    lines = open(out, errors="replace").read().splitlines()
except OSError:
    lines = []
for l in reversed(lines):
    l = re.sub(r"\x1b\[[0-9;]*m", "", l).strip()
    if l.startswith("{"):
        try:
            result = json.loads(l)
            break
        except ValueError:
            pass
print(json.dumps({"stage": name, "group": group, "rc": int(rc), "status": status, "seconds": float(secs),
                  "limit_s": int(limit), "peak_mem_gib": None if mem in ("", "null") else float(mem),
                  "note": note or None, "result": result}))
EOF
  summarize >/dev/null 2>&1
}

# step NAME GROUP CAP INNER_RESERVE CMD...: runs CMD under `timeout`, stdout+stderr streamed into
# $OUT/GROUP.log (and $WORK/NAME.out for the result), GPU memory sampled by nvidia-smi every 200 ms.
# INNER_RESERVE: seconds kept for the steps still to come in the same group.
step() {
  local name=$1 group=$2 cap=$3 inner=$4
  shift 4
  local log="$OUT/$group.log" left limit
  # 5 s for timeout's kill-after: a step that ignores SIGTERM still ends by the deadline.
  left=$((DEADLINE - $(now) - inner - $(reserve_after "$group") - 5))
  limit=$cap
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "${MIN_LIMIT:-10}" ]; then
    printf '=== %s: skipped, %ss left for it (budget %ss)\n' "$name" "$left" "$BUDGET_S" | tee -a "$log"
    record "$name" "$group" -1 skipped 0 0 "" "no time left: ${left}s for this step" /dev/null
    return 0
  fi
  local a shown=()
  for a in "$@"; do
    # An inline Python program is shown by its size, not its text.
    if [ ${#a} -gt 160 ]; then shown+=("<${#a}-char program>"); else shown+=("$a"); fi
  done
  printf '\n=== %s [%s] %s (limit %ss): %s\n' "$(date -u +%T)" "$group" "$name" "$limit" "${shown[*]}" >>"$log"
  CURRENT="$name (started $(date -u +%T), limit ${limit}s)" summarize >/dev/null 2>&1
  printf '=== %s %-16s limit %3ss ... ' "$(date -u +%T)" "$name" "$limit"
  local mem_pid=
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$WORK/$name.mem" 2>/dev/null &
    mem_pid=$!
  fi
  local t0 t1 rc secs status
  t0=$(date +%s.%N)
  # In a subshell, so the shell's "Killed" notice (timeout's kill-after also hits timeout itself)
  # lands in the log, not on the console.
  (timeout --kill-after=5 "$limit" "$@"; exit $?) 2>&1 | tee -a "$log" >"$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  if [ -n "$mem_pid" ]; then kill "$mem_pid" 2>/dev/null; wait "$mem_pid" 2>/dev/null; fi
  local mem=null
  [ -s "$WORK/$name.mem" ] && mem=$(awk '$1+0>m {m=$1+0} END {printf "%.2f", m/1024}' "$WORK/$name.mem")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b-a}')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '=== %s: rc %s (%s) in %ss, GPU memory peak %s GiB\n' "$name" "$rc" "$status" "$secs" "$mem" >>"$log"
  printf '%-7s rc %-3s %6ss  GPU mem %s GiB\n' "$status" "$rc" "$secs" "$mem"
  if [ "$rc" -ne 0 ]; then
    # The error itself, without the frames of a Rust backtrace.
    grep -v -E '^ +[0-9]+: |^ +at ' "$WORK/$name.out" | tail -n 6 | sed 's/^/    | /'
  fi
  record "$name" "$group" "$rc" "$status" "$secs" "$limit" "$mem" "${NOTE:-}" "$WORK/$name.out"
  return 0
}

# skip NAME GROUP REASON: records a step that was not run.
skip() {
  printf '=== %s: skipped (%s)\n' "$1" "$3" | tee -a "$OUT/$2.log"
  record "$1" "$2" -1 skipped 0 0 "" "$3" /dev/null
}

# The stage's JSON result field, or empty ("jq" without jq).
result_field() { # name field
  "$PY" - "$WORK/results.jsonl" "$1" "$2" <<'EOF'
import json, sys
v = None
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["stage"] == sys.argv[2]:
        v = r
if v is not None:
    for k in sys.argv[3].split("."):
        v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)
EOF
}

# A copy of a config with `key = value` replaced (whole-number keys of the [training] and
# [instrumentation] tables); fails loudly if the key is not there.
config_with() { # src dst key value [key value ...]
  local src=$1 dst=$2
  shift 2
  cp "$src" "$dst"
  while [ $# -ge 2 ]; do
    grep -qE "^$1 *= *[0-9]+" "$dst" || { echo "config_with: no '$1 = <number>' line in $src" >&2; return 1; }
    sed -i -E "s/^($1 *= *)[0-9]+/\\1$2/" "$dst"
    shift 2
  done
}

run() {
  set +e
  set -uo pipefail
  OUT=${OUT:-/tmp/gpu-bench-out}
  # Everything this script prints also goes to $OUT/run.log (the device tool returns $OUT).
  if [ -z "${GPU_BENCH_TEED:-}" ]; then
    mkdir -p "$OUT" || die "cannot create OUT=$OUT"
    rm -f "$OUT/run.log"
    GPU_BENCH_TEED=1 OUT="$OUT" bash "$SELF" run 2>&1 | tee -a "$OUT/run.log"
    exit "${PIPESTATUS[0]}"
  fi
  START=$(now)
  DEADLINE=$((START + BUDGET_S))
  PEAK=${PEAK_TFLOPS:-}
  cd "$ROOT" || die "no $ROOT"

  # Required inputs, all at once: one line naming what is missing.
  local missing=() f
  [ -n "${RUN_TRAINER:-}" ] || [ -f "$GPU_DIR/trainer.xz" ] || missing+=("trainer.xz")
  for f in reference/bitnet_ref.py shards.tar.xz configs/bitnet-95m.toml configs/tiny.toml PROVENANCE.txt; do
    [ -f "$GPU_DIR/$f" ] || missing+=("$f")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "missing in $GPU_DIR: ${missing[*]}; hint: run 'scripts/gpu-bench.sh prepare' on the build box and pass carry=[\".gpu\"]"
  command -v timeout >/dev/null || die "no 'timeout' (GNU coreutils) on this machine"
  PY=${PYTHON:-/opt/torch/.venv/bin/python}
  [ -x "$PY" ] || PY=$(command -v python3) || die "no python3 on this machine"

  rm -rf "$WORK"
  mkdir -p "$WORK" "$OUT"
  rm -f "$OUT"/{env,agree,speed,train,data}.log "$OUT"/summary.{txt,json}
  : >"$WORK/results.jsonl"

  # CUDA 13 user-space libraries from torch's wheels (cuBLAS, cuRAND, cudart); libcuda.so.1 comes
  # from the driver and must not be overridden.
  local venv=${TORCH_VENV:-/opt/torch/.venv} d dirs=""
  for d in "$venv"/lib/python3*/site-packages/nvidia/cu13/lib "$venv"/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$d" ] && dirs="$dirs${dirs:+:}$d"
  done
  # The driver's own folder last, where the image mounts it there (it holds libcuda.so.1).
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [ -d "$d" ] && dirs="$dirs${dirs:+:}$d"
  done
  export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 PYTHONUNBUFFERED=1
  # The driver's JIT cache of candle's PTX: the first CUDA step compiles, the later ones reuse it.
  export CUDA_CACHE_PATH=$WORK/nvcache CUDA_CACHE_MAXSIZE=4294967296

  TRAINER=$WORK/trainer
  if [ -n "${RUN_TRAINER:-}" ]; then
    cp "$RUN_TRAINER" "$TRAINER" || die "cannot copy RUN_TRAINER=$RUN_TRAINER"
  else
    xz -dc "$GPU_DIR/trainer.xz" >"$TRAINER" || die "cannot unpack $GPU_DIR/trainer.xz"
  fi
  chmod +x "$TRAINER"
  mkdir -p "$WORK/shards"
  tar -C "$WORK/shards" -xJf "$GPU_DIR/shards.tar.xz" || die "cannot unpack $GPU_DIR/shards.tar.xz"
  CFG_BIG=$GPU_DIR/configs/bitnet-95m.toml
  CFG_TINY=$GPU_DIR/configs/tiny.toml
  [ "$BIG" = tiny ] && CFG_BIG=$CFG_TINY
  REF=$GPU_DIR/reference/bitnet_ref.py
  export GPU_BENCH_PLAN="$STAGES"
  echo "gpu-bench run: $(date -u +%FT%TZ), budget ${BUDGET_S}s, stages: $STAGES, device $DEVICE$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN on the CPU)')"
  echo "logs: $OUT/{run,env,agree,speed,train,data}.log, summary: $OUT/summary.{txt,json}"
  summarize >/dev/null 2>&1

  local g
  for g in $GROUPS_ORDER; do
    [[ " $STAGES " == *" $g "* ]] && "stage_$g"
  done

  echo
  echo "done in $(($(now) - START))s of the ${BUDGET_S}s budget"
  summarize
  # rc 0 only if every step ran and passed.
  ! grep -qv '"status": "ok"' "$WORK/results.jsonl" || exit 3
}

stage_env() {
  # shellcheck disable=SC2016  # $1 and $2 are the inner script's arguments
  step env env 20 20 bash -c '
    nvidia-smi || echo "no nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
    echo "nproc $(nproc)"; free -g | head -2; ldd --version | head -1; uname -r
    cat "$1"; ldd "$2"
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    printf "{\"gpu\": \"%s\", \"nproc\": %s, \"libs_ok\": %s}\n" "$gpu" "$(nproc)" \
      "$(ldd "$2" | grep -q "not found" && echo false || echo true)"
    ! ldd "$2" | grep -q "not found"' _ "$GPU_DIR/PROVENANCE.txt" "$TRAINER"
  if [ -n "${PEAK_TFLOPS:-}" ]; then
    PEAK=$PEAK_TFLOPS
    skip peak env "PEAK_TFLOPS=$PEAK_TFLOPS given"
  elif [ "$DEVICE" != cuda ]; then
    skip peak env "no GPU (DRY_RUN)"
  else
    step peak env 60 0 "$PY" -c '
import json, torch
n = 8192
g = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
for _ in range(5):
    a @ b
torch.cuda.synchronize()
ts = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); a @ b; e.record(); torch.cuda.synchronize()
    ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": p.name, "sms": p.multi_processor_count, "mem_gib": round(p.total_memory / 2**30, 1),
                  "torch": torch.__version__, "cuda": torch.version.cuda, "n": n,
                  "median_s": ts[len(ts) // 2], "tflops": 2 * n**3 / ts[len(ts) // 2] / 1e12}))'
    PEAK=$(result_field peak result.tflops)
  fi
}

stage_agree() {
  step agree_tiny agree 90 40 "$TRAINER" check-device --config "$CFG_TINY" --device "$DEVICE"
  step agree_95m agree 120 0 "$TRAINER" check-device --config "$CFG_BIG" --batch 2 --device "$DEVICE"
}

stage_speed() {
  local peak_arg=() k ok="" n_try
  [ -n "${PEAK:-}" ] && peak_arg=(--peak-tflops "$PEAK")
  n_try=$(wc -w <<<"$ACCUM_TRY")
  for k in $ACCUM_TRY; do
    n_try=$((n_try - 1))
    config_with "$CFG_BIG" "$WORK/speed-accum$k.toml" grad_accumulation_steps "$k" ||
      { skip "candle_accum$k" speed "config edit failed"; continue; }
    # Each try keeps the torch steps' 85 s (25 + 60); a later try gets what the failed one left.
    NOTE="grad_accumulation_steps $k: $k micro-batch(es) of $((BATCH / k)) x seq per step of $BATCH" \
      step "candle_accum$k" speed 90 85 "$TRAINER" bench --config "$WORK/speed-accum$k.toml" \
      --steps "$STEPS" --warmup "$WARMUP" --batch "$BATCH" --device "$DEVICE" "${peak_arg[@]}"
    local st
    st=$(result_field "candle_accum$k" status)
    if [ "$st" = ok ]; then ok=$k; break; fi
    # A timeout means the steps are slow, not too big: smaller micro-batches would not help.
    [ "$st" = timeout ] || [ "$st" = skipped ] && break
    [ "$n_try" -gt 0 ] && echo "    candle_accum$k failed: retrying with smaller micro-batches"
  done
  ACCUM=${ok:-}
  local ms
  ms=$([ -n "$ok" ] && result_field "candle_accum$ok" result.median_ms)
  [ -n "$ms" ] && STEP_S=$(awk -v ms="$ms" 'BEGIN {printf "%.3f", ms/1000}')
  local ref_dev=("--device" "$DEVICE") amp=()
  if [ "$DEVICE" != cuda ]; then
    amp=(--amp 0)
    if ! "$PY" -c 'import torch' 2>/dev/null; then
      skip torch_eager speed "no torch in $PY (DRY_RUN)"
      skip torch_compile speed "no torch in $PY (DRY_RUN)"
      return 0
    fi
  fi
  local cfg_ref=95m
  [ "$BIG" = tiny ] && cfg_ref=tiny
  local seq=1024
  [ "$BIG" = tiny ] && seq=128
  step torch_eager speed 60 60 "$PY" "$REF" bench --config "$cfg_ref" --batch "$BATCH" --seq "$seq" \
    --steps "$REF_STEPS" --warmup-steps "$REF_WARMUP" --compile 0 "${ref_dev[@]}" "${amp[@]}" "${peak_arg[@]}"
  step torch_compile speed 180 0 "$PY" "$REF" bench --config "$cfg_ref" --batch "$BATCH" --seq "$seq" \
    --steps "$REF_STEPS" --warmup-steps "$REF_WARMUP" --compile 1 "${ref_dev[@]}" "${amp[@]}" "${peak_arg[@]}"
}

stage_train() {
  # Micro-batching as `speed` found it (TRAIN_ACCUM overrides; 1 if speed did not run or failed),
  # and the eval's batch the same size: the frozen eval builds the same graph per batch.
  local k=${TRAIN_ACCUM:-${ACCUM:-1}}
  local t=${STEP_S:-1.5} micro=$((BATCH / k)) cfg=$WORK/train.toml
  awk -v t="$t" 'BEGIN {exit !(t > 0)}' || t=1.5
  config_with "$CFG_BIG" "$cfg" batch_size "$BATCH" grad_accumulation_steps "$k" eval_batch_size "$micro" ||
    { skip train_b train "config edit failed"; return 0; }
  # N from the time left: 2N steps (B, then A in two parts) at 1.25 x the measured step time,
  # plus 80 s of fixed costs (3 starts, 5 checkpoints of 1.1 GB, the step-0 eval and samples of
  # two fresh runs, the comparison).
  local avail n r
  avail=$((DEADLINE - $(now) - $(reserve_after train)))
  n=$(awk -v a="$avail" -v t="$t" -v m="$TRAIN_STEPS" 'BEGIN {n = int((a - 80) / (2.5 * t)); if (n > m) n = m; if (n < 8) n = 8; print n}')
  r=$((n / 2))
  local note="N $n, resume at $r, grad_accumulation_steps $k (micro-batch $micro), eval_batch_size $micro, step ~${t}s, ${avail}s left"
  echo "    train: $note" | tee -a "$OUT/train.log"
  local cap_b cap_a1 cap_a2 res_b res_a1
  cap_b=$(awk -v n="$n" -v t="$t" 'BEGIN {printf "%d", 45 + 2 * n * t}')
  cap_a1=$(awk -v n="$r" -v t="$t" 'BEGIN {printf "%d", 45 + 2 * n * t}')
  cap_a2=$(awk -v n="$((n - r))" -v t="$t" 'BEGIN {printf "%d", 30 + 2 * n * t}')
  res_a1=$(awk -v r="$r" -v q="$((n - r))" -v t="$t" 'BEGIN {printf "%d", 25 + r * t + 15 + q * t + 10}')
  res_b=$(awk -v q="$((n - r))" -v t="$t" 'BEGIN {printf "%d", 15 + q * t + 10}')
  local run=(run --shards "$WORK/shards" --device "$DEVICE")
  NOTE="$note" step train_b train "$cap_b" "$res_a1" "$TRAINER" "${run[@]}" --config "$cfg" --run-dir "$WORK/runs_b" --steps "$n"
  step train_a1 train "$cap_a1" "$res_b" "$TRAINER" "${run[@]}" --config "$cfg" --run-dir "$WORK/runs_a" --steps "$r"
  step train_a2 train "$cap_a2" 10 "$TRAINER" "${run[@]}" --run-dir "$WORK/runs_a" --resume latest --steps "$n"
  step train_compare train 40 0 "$PY" -c "$COMPARE_PY" "$WORK/runs_a" "$WORK/runs_b" "$n" "$r"
  # Keep the small files of both runs in the log; drop the checkpoints (1.1 GB each).
  {
    for f in "$WORK"/runs_b/*/meta/provenance.json "$WORK"/runs_b/*/eval/eval_results.jsonl; do
      [ -f "$f" ] && { echo "--- $f"; head -c 4000 "$f"; echo; }
    done
  } >>"$OUT/train.log" 2>/dev/null
  rm -rf "$WORK/runs_a" "$WORK/runs_b"
}

stage_data() {
  local cfg=$CFG_BIG
  step data_shards data 40 20 "$TRAINER" synthetic-shards --out "$WORK/syn" --seq-len "$([ "$BIG" = tiny ] && echo 128 || echo 1024)" \
    --sequences "$DATA_SEQUENCES" --sequences-per-shard 65536
  step data_1thread data 20 12 "$TRAINER" bench-data --shards "$WORK/syn" --config "$cfg" --batches "$DATA_BATCHES"
  step data_procs data 30 4 "$PY" -c "$PROCS_PY" "${DATA_PROCS:-$(nproc)}" "$TRAINER" bench-data --shards "$WORK/syn" \
    --config "$cfg" --batches "$DATA_BATCHES"
  step data_real data 15 0 "$TRAINER" bench-data --shards "$WORK/shards" --config "$cfg" --batches 1000
  rm -rf "$WORK/syn"
}

# N copies of a bench-data command at once: their aggregate sequences/s over the wall time.
PROCS_PY=$(cat <<'EOF'
import json, subprocess, sys, time
n, cmd = int(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
outs = [p.communicate()[0] for p in ps]
wall = time.perf_counter() - t0
rs = [json.loads(o.strip().splitlines()[-1]) for o, p in zip(outs, ps) if p.returncode == 0 and o.strip()]
if len(rs) != n:
    sys.exit(f"{n - len(rs)} of {n} processes failed")
seqs = sum(r["batches"] * r["batch_size"] for r in rs)
per = sorted(r["sequences_per_s"] for r in rs)
# aggregate: all sequences over the wall time, process start-up included (a lower bound);
# sum_of_rates: each process's own rate added up (what it is if the processes fully overlap).
print(json.dumps({"processes": n, "wall_s": wall, "sequences": seqs, "sequences_per_s_aggregate": seqs / wall,
                  "sum_of_rates": sum(per),
                  "sequences_per_s_per_process_median": per[n // 2], "per_process_min": per[0], "per_process_max": per[-1]}))
EOF
)

# Run A (stopped at R, resumed to N) against run B (0..N in one go): every step's loss from
# metrics/scalars.jsonl (the last record of a step wins: a resumed run re-logs past its checkpoint),
# and the final checkpoint's tensors (model + optimizer) byte for byte; numpy, if there, for the size
# of a difference.
COMPARE_PY=$(cat <<'EOF'
import glob, json, mmap, os, struct, sys
runs_a, runs_b, n, r = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def losses(root):
    out = {}
    for path in sorted(glob.glob(f"{root}/*/metrics/scalars.jsonl")):
        for line in open(path):
            try:
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
            except (ValueError, KeyError, TypeError):
                pass
    return out
la, lb = losses(runs_a), losses(runs_b)
def tensors(path):
    f = open(path, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    h = struct.unpack("<Q", m[:8])[0]
    meta = json.loads(m[8:8 + h])
    meta.pop("__metadata__", None)
    return m, 8 + h, meta
try:
    import numpy as np
except ImportError:
    np = None
weights = {}
for name in ("model.safetensors", "optimizer.safetensors"):
    pa = glob.glob(f"{runs_a}/*/checkpoints/step_{n:06d}/{name}")
    pb = glob.glob(f"{runs_b}/*/checkpoints/step_{n:06d}/{name}")
    if not (pa and pb):
        weights[name] = {"missing": True}
        continue
    (ma, oa, ta), (mb, ob, tb) = tensors(pa[0]), tensors(pb[0])
    diff, worst = [], (0.0, None)
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb or ta[k]["shape"] != tb[k]["shape"]:
            diff.append(k)
            continue
        a0, a1 = ta[k]["data_offsets"]
        b0, b1 = tb[k]["data_offsets"]
        if ma[oa + a0:oa + a1] != mb[ob + b0:ob + b1]:
            diff.append(k)
            if np is not None and ta[k]["dtype"] == "F32":
                x = np.frombuffer(ma[oa + a0:oa + a1], dtype="<f4").astype(np.float64)
                y = np.frombuffer(mb[ob + b0:ob + b1], dtype="<f4").astype(np.float64)
                rel = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
                if rel >= worst[0]:
                    worst = (rel, k)
    weights[name] = {"tensors": len(ta), "differing": len(diff), "first_differing": diff[:3],
                     "max_rel_l2": worst[0] if diff else 0.0, "max_rel_l2_tensor": worst[1]}
steps = sorted(set(la) & set(lb))
pre = [s for s in steps if s <= r]
post = [s for s in steps if s > r]
def cmp(ss):
    d = [(s, abs(la[s] - lb[s]), abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-30)) for s in ss]
    bad = [x for x in d if x[1] != 0.0]
    return {"steps": len(ss), "identical": len(ss) > 0 and not bad, "first_differing_step": bad[0][0] if bad else None,
            "max_abs_diff": max((x[1] for x in d), default=None), "max_rel_diff": max((x[2] for x in d), default=None)}
print(f"{'step':>5} {'A (stop at %d, resume)' % r:>24} {'B (uninterrupted)':>20} {'A - B':>12}")
for s in sorted(set(la) | set(lb)):
    a, b = la.get(s), lb.get(s)
    mark = " <- resume" if s == r + 1 else ""
    d = "-" if a is None or b is None else ("0" if a == b else f"{a - b:+.3e}")
    print(f"{s:>5} {'-' if a is None else repr(a):>24} {'-' if b is None else repr(b):>20} {d:>12}{mark}")
w = max(1, min(5, len(lb) // 4))  # the first and the last w steps (5 at N >= 20), never overlapping
first = [lb[s] for s in sorted(lb)[:w]]
last = [lb[s] for s in sorted(lb)[-w:]]
res = {"train_steps": n, "resume_at": r, "steps_logged_a": len(la), "steps_logged_b": len(lb),
       "loss_first": lb.get(1), "loss_at_resume": lb.get(r), "loss_last": lb.get(n),
       "loss_window": w, "loss_first_mean": sum(first) / len(first) if first else None,
       "loss_last_mean": sum(last) / len(last) if last else None,
       "loss_falling": bool(first and last and sum(last) / len(last) < sum(first) / len(first) - 0.01),
       "before_resume": cmp(pre), "after_resume": cmp(post), "final_checkpoint": weights}
ok = (len(lb) >= n and len(la) >= n and res["after_resume"]["identical"] and res["before_resume"]["identical"]
      and all(w.get("differing") == 0 for w in weights.values()))
res["bit_identical"] = ok
print(json.dumps(res))
sys.exit(0 if ok else 1)
EOF
)

# summary.txt / summary.json from results.jsonl; steps of the requested stages (GPU_BENCH_PLAN)
# not in it are "not reached".
summarize() {
  [ -f "$WORK/results.jsonl" ] || return 0
  "$PY" - "$WORK/results.jsonl" "${PEAK:-}" "$BATCH" "$BUDGET_S" "$START" "$DRY_RUN" \
    >"$WORK/summary.txt" 3>"$WORK/summary.json" <<'EOF'
import json, os, sys, time
recs = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    recs[r["stage"]] = r
peak = float(sys.argv[2]) if sys.argv[2] else None
batch, budget, start, dry = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
plan_groups = os.environ.get("GPU_BENCH_PLAN", "env agree speed train data").split()
plan = {"env": ["env", "peak"], "agree": ["agree_tiny", "agree_95m"], "speed": ["candle", "torch_eager", "torch_compile"],
        "train": ["train_b", "train_a1", "train_a2", "train_compare"],
        "data": ["data_shards", "data_1thread", "data_procs", "data_real"]}
res = lambda s: (recs.get(s) or {}).get("result") or {}
f = lambda x, p="{:.1f}": "-" if x is None else p.format(x)
gpu = res("peak").get("gpu") or res("env").get("gpu") or "?"
out = [f"GPU bench summary{' (DRY RUN, CPU)' if dry else ''}: {gpu}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}; "
       f"{int(time.time()) - start}s of the {budget}s budget",
       f"measured bf16 peak (torch 8192^3 matmul, random data, median of 20): {f(peak)} TFLOP/s = the MFU denominator of every row"]
out.append("")
out.append(f"{'step':<16} {'status':<8} {'rc':>4} {'s':>7} {'limit':>6} {'GPU GiB':>8}  note")
for r in recs.values():
    out.append(f"{r['stage']:<16} {r['status']:<8} {r['rc']:>4} {r['seconds']:>7.1f} {r['limit_s']:>6} "
               f"{f(r['peak_mem_gib'], '{:.2f}'):>8}  {r.get('note') or ''}")
missing, cur = [], (os.environ.get("CURRENT") or " ").split(" ")[0]
for g in plan_groups:
    for s in plan.get(g, []):
        if s == "candle":
            if not any(k.startswith("candle_accum") for k in recs) and not cur.startswith("candle_accum"):
                missing.append(s)
        elif s not in recs and s != cur:
            missing.append(s)
if os.environ.get("CURRENT"):
    out.append(f"running when this summary was written (if it is the last one, the call was cut off here): {os.environ['CURRENT']}")
if missing:
    out.append(f"not reached: {' '.join(missing)}")

if any(k.startswith("agree_") for k in recs):
    out += ["", "1. Agreement, CUDA (bf16 matmuls) vs CPU (f32), same weights and batch: loss within 2^-8 relative, every gradient cosine > 0.99"]
for k in ("agree_tiny", "agree_95m"):
    if k in recs:
        a = res(k)
        verdict = ("PASS" if a.get("passed") else "FAIL") if a else f"NO RESULT ({recs[k]['status']})"
        out.append(f"  {k:<11} {verdict:<8} batch {a.get('batch', '-')} x {a.get('seq_len', '-')}: loss cpu {f(a.get('loss_cpu'), '{:.6f}')} "
                   f"cuda {f(a.get('loss_device'), '{:.6f}')} rel {f(a.get('loss_rel_diff'), '{:.2e}')} (tol {f(a.get('loss_rel_tol'), '{:.2e}')}); "
                   f"min grad cos {f(a.get('min_grad_cosine'), '{:.5f}')} ({a.get('min_grad_cosine_tensor', '-')}), max grad rel L2 {f(a.get('max_grad_rel_l2'), '{:.2e}')}")

seq = next((res(k).get("seq_len") for k in recs if k.startswith("candle_accum") and res(k)), None) or res("torch_eager").get("seq") or (128 if dry else 1024)
speed = any(k.startswith(("candle_", "torch_")) for k in recs)
if speed:
    out += ["", f"2. Speed, {'tiny (DRY RUN)' if dry else '95M'}, {batch} x {seq} tokens per step, same GPU; MFU = tokens/s x (6N + 12 L T d) / measured peak; GPU GiB = nvidia-smi peak (whole device, every 200 ms)"]
    out.append(f"  {'':34} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'GPU GiB':>8} {'own GiB':>8}")
ratios, candle_tps = {}, None
for s in sorted(k for k in recs if k.startswith("candle_accum")):
    c, k = res(s), int(s[len("candle_accum"):])
    label = f"candle, {k} x micro-batch {batch // k}" if k > 1 else f"candle, one batch of {batch}"
    tps = c.get("tokens_per_s")
    mfu = tps * c["flops_per_token"] / (peak * 1e12) if tps and peak and c.get("flops_per_token") else c.get("mfu")
    out.append(f"  {label:<34} {f(c.get('median_ms')):>9} {f(tps, '{:,.0f}'):>10} {f(mfu and 100 * mfu, '{:.1f}%'):>7} "
               f"{f(recs[s]['peak_mem_gib'], '{:.2f}'):>8} {f(c.get('peak_mem_gib'), '{:.2f}'):>8}  {recs[s]['status']}")
    if tps:
        candle_tps = tps
        if c.get("phases_ms"):
            p = c["phases_ms"]
            out.append(f"  {'':34} phases ms: forward {f(p.get('forward'))}, backward {f(p.get('backward'))}, clip {f(p.get('clip'))}, optimizer {f(p.get('optimizer'))}")
for s, label in (("torch_eager", "torch eager (bf16 autocast)"), ("torch_compile", "torch.compile (bf16 autocast)")):
    if s not in recs:
        continue
    t = res(s)
    tps = t.get("tokens_per_s")
    mfu = tps * t["flops_per_token"] / (peak * 1e12) if tps and peak else None
    ms = t["median_step_s"] * 1e3 if "median_step_s" in t else None
    out.append(f"  {label:<34} {f(ms):>9} {f(tps, '{:,.0f}'):>10} {f(mfu and 100 * mfu, '{:.1f}%'):>7} "
               f"{f(recs[s]['peak_mem_gib'], '{:.2f}'):>8} {f(t.get('max_mem_gib'), '{:.2f}'):>8}  {recs[s]['status']}")
    if tps and candle_tps:
        ratios[f"candle_over_{s}"] = candle_tps / tps
if ratios:
    out.append("  candle tokens/s over " + ", ".join(f"{k[len('candle_over_torch_'):]} {v:.3f}x" for k, v in ratios.items()))
if speed:
    out.append("  own GiB: candle = its own nvidia-smi poll; torch = torch.cuda.max_memory_allocated (allocator peak, smaller)")

if any(k.startswith("train_") for k in recs):
    t = res("train_compare")
    note = (recs.get("train_b") or {}).get("note") or ""
    out += ["", f"3. Real run, {'tiny (DRY RUN) on the sample at seq 128' if dry else '95M on the shipped sample shards (seq 1024)'}: {note}"]
    for s in ("train_b", "train_a1", "train_a2", "train_compare"):
        if s in recs:
            out.append(f"  {s:<14} {recs[s]['status']:<8} {recs[s]['seconds']:>6.1f}s")
    if t:
        out.append(f"  loss (run B): step 1 {f(t.get('loss_first'), '{:.4f}')}, step {t.get('resume_at')} {f(t.get('loss_at_resume'), '{:.4f}')}, "
                   f"step {t.get('train_steps')} {f(t.get('loss_last'), '{:.4f}')}; mean of the first {t.get('loss_window')} {f(t.get('loss_first_mean'), '{:.4f}')} -> "
                   f"of the last {t.get('loss_window')} {f(t.get('loss_last_mean'), '{:.4f}')}: {'falling' if t.get('loss_falling') else 'NOT falling (by 0.01)'}")
        for k, label in (("before_resume", "steps 1..R, run A vs run B (run-to-run)"), ("after_resume", "steps R+1..N, resumed A vs uninterrupted B")):
            c = t.get(k) or {}
            out.append(f"  {label}: {c.get('steps')} steps, " + ("bit-identical" if c.get("identical") else "nothing to compare" if not c.get("steps") else
                       f"NOT identical from step {c.get('first_differing_step')}: max |diff| {f(c.get('max_abs_diff'), '{:.3e}')}, max rel {f(c.get('max_rel_diff'), '{:.3e}')}"))
        for name, w in (t.get("final_checkpoint") or {}).items():
            out.append(f"  final {name}: " + ("missing" if w.get("missing") else
                       "every tensor byte-identical" if w.get("differing") == 0 else
                       f"{w.get('differing')} of {w.get('tensors')} tensors differ (max rel L2 {f(w.get('max_rel_l2'), '{:.2e}')} in {w.get('max_rel_l2_tensor')})"))
        out.append("  verdict: " + ("resume is bit-exact on this device" if t.get("bit_identical") else
                   "see above: a difference before the resume is run-to-run nondeterminism, not the resume"))

if any(k.startswith("data_") for k in recs):
    d1, dp, dr = res("data_1thread"), res("data_procs"), res("data_real")
    out += ["", "4. Data loader alone (trainer bench-data: permutation + copies from the memory maps, what the prefetch thread does per step)"]
    out.append(f"  1 thread, synthetic {d1.get('batches', '-')} x {d1.get('batch_size', '-')} x {d1.get('seq_len', '-')}: {f(d1.get('sequences_per_s'), '{:,.0f}')} seq/s")
    out.append(f"  {dp.get('processes', '-')} processes at once: {f(dp.get('sequences_per_s_aggregate'), '{:,.0f}')} seq/s over the wall time "
               f"(start-up included), {f(dp.get('sum_of_rates'), '{:,.0f}')} seq/s summed over the processes; per process median "
               f"{f(dp.get('sequences_per_s_per_process_median'), '{:,.0f}')}")
    out.append(f"  1 thread, FineWeb-Edu sample shards ({dr.get('batches', '-')} batches): {f(dr.get('sequences_per_s'), '{:,.0f}')} seq/s")
    if d1.get("sequences_per_s") and candle_tps:
        out.append(f"  headroom over candle's consumption ({candle_tps / seq:,.1f} seq/s): {d1['sequences_per_s'] * seq / candle_tps:,.0f}x")

bad = [f"{r['stage']} ({r['status']}, rc {r['rc']})" for r in recs.values() if r["status"] != "ok"]
out += ["", "not ok: " + (", ".join(bad) if bad else "none") + (f"; not reached: {' '.join(missing)}" if missing else "")]
print("\n".join(out))
with os.fdopen(3, "w") as fh:
    json.dump({"gpu": gpu, "peak_tflops": peak, "dry_run": dry, "budget_s": budget, "elapsed_s": int(time.time()) - start,
               "running": os.environ.get("CURRENT") or None, "not_reached": missing, "ratios": ratios, "stages": recs}, fh, indent=1)
EOF
  local rc=$?
  cp "$WORK/summary.txt" "$WORK/summary.json" "$OUT/" 2>/dev/null
  cat "$WORK/summary.txt"
  return $rc
}

case "$MODE" in
  prepare) prepare ;;
  run) run ;;
  *) die "usage: scripts/gpu-bench.sh prepare|run (see the header of $SELF)" ;;
esac
