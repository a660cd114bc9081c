#!/usr/bin/env bash
# gpu-bench.sh: the GPU session's measurements in one device call: candle (`trainer`, built with
# `--features cuda`) against the PyTorch reference on the same H200, plus the CPU-vs-CUDA agreement
# check and the data loader alone.
#
#   scripts/gpu-bench.sh prepare   # HERE (no GPU): packs the CUDA binary and the PyTorch reference
#                                  # into .gpu/ (git-ignored), checks the 64 MiB transfer budget
#   scripts/gpu-bench.sh run       # ON THE GPU MACHINE: device tool
#                                  #   run(command="scripts/gpu-bench.sh run", carry=[".gpu"], timeout_s=600)
#
# `run` stages (each under its own timeout, a failure is recorded and the next stage still runs):
#   env     nvidia-smi, driver, glibc, which CUDA libraries the binary resolves
#   peak    measured dense bf16 matmul rate (torch, 8192^3, random data): the MFU denominator for both
#   agree   trainer check-device on configs/tiny.toml (CUDA bf16 matmuls vs CPU f32, same weights
#           and batch: loss within 2^-8 relative, every gradient cosine > 0.99); then the 95m config
#           at batch 2 (informational: quantizer flips are expected there)
#   candle  trainer bench --config configs/bitnet-95m.toml --batch 32 (seq 1024), random tokens
#   torch   bitnet_ref.py bench --config 95m --batch 32 --seq 1024, eager (--compile 0) and
#           torch.compile (--compile 1), bf16 autocast, fused AdamW
#   data    trainer synthetic-shards (128 MiB in the shard format) + trainer bench-data: sequences/s
#           of what the prefetch thread does per step, on one core
#   train   (not in the default STAGES: a second call, STAGES=train) 95M on the real shards packed
#           with SHARDS=<dir> at prepare: TRAIN_STEPS (120) steps with a checkpoint + resume at
#           RESUME_AT (80), against one uninterrupted run: losses side by side, final weights compared.
#           TRAIN_CONFIG, TRAIN_SHARDS and DEVICE (cuda) exist for dry runs of the stage on a CPU box.
# Peak GPU memory is sampled the same way for every stage (nvidia-smi memory.used every 200 ms,
# whole device, GiB) so candle and torch are compared in one unit; each tool's own figure is kept too.
#
# Output: a table on stdout (last), and in $OUT: summary.json (every stage's parsed JSON, rc, time,
# peak memory), summary.txt (the table), logs.tar.gz (every stage's stdout/stderr). The device tool
# returns at most 8 files from $OUT, so nothing else is written there.
#
# Knobs (env): STEPS (candle timed steps, 20), WARMUP (3), BATCH (32), REF_STEPS (20),
# REF_WARMUP (5), STAGES ("env peak agree candle torch data"), PEAK_TFLOPS (skip the measurement),
# DATA_SEQUENCES (65536), DATA_BATCHES (2000), PYTHON (default /opt/torch/.venv/bin/python, the
# GPU image's torch venv), RUN_TRAINER (a binary to use instead of
# .gpu/trainer.xz: a dry run of this script on a CPU box, with OUT=/tmp/x), BUDGET_S (570: all stages together, inside the device
# tool's 600 s per call; a stage that would not fit is recorded as skipped with rc -1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPU_DIR=$ROOT/.gpu
MODE=${1:-}

die() { printf 'gpu-bench.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# prepare: runs on the build box
# ---------------------------------------------------------------------------------------------
prepare() {
  local bin=${TRAINER_BIN:-${CUDA_WORK:-/tmp/cuda-build}/dist/trainer}
  local ref=${REF_PY:-$ROOT/../shared/reference/bitnet_ref.py}
  [ -f "$bin" ] || die "no CUDA trainer binary at $bin; hint: build it with ../shared/tools/cuda/build-cuda.sh (see BENCHMARKS.md, GPU section) or set TRAINER_BIN"
  [ -f "$ref" ] || die "no PyTorch reference at $ref; hint: set REF_PY=/path/to/bitnet_ref.py"
  readelf -d "$bin" | grep -q 'libcublas.so.13' ||
    die "$bin does not link libcublas.so.13; hint: it is not a --features cuda build for CUDA 13"
  mkdir -p "$GPU_DIR/reference"
  echo "compressing $bin ($(du -h "$bin" | cut -f1))"
  xz -T0 -6 -c "$bin" >"$GPU_DIR/trainer.xz.tmp"
  mv "$GPU_DIR/trainer.xz.tmp" "$GPU_DIR/trainer.xz"
  cp "$ref" "$GPU_DIR/reference/bitnet_ref.py"
  if [ -n "${SHARDS:-}" ]; then
    # Real shards for the `train` stage (a `pipeline prepare --seq-len 1024` folder).
    [ -f "$SHARDS/manifest.json" ] || die "SHARDS=$SHARDS: no manifest.json; hint: a complete 'pipeline prepare --seq-len 1024' folder"
    rm -rf "$GPU_DIR/shards"
    mkdir -p "$GPU_DIR/shards"
    (cd "$SHARDS" && find . -maxdepth 1 -type f ! -name '*.tmp' -exec cp {} "$GPU_DIR/shards/" \;)
  fi
  {
    echo "prepared: $(date -u +%FT%TZ)"
    echo "git at prepare time (the binary may be older; see its build): $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "binary: $bin"
    echo "binary sha256: $(sha256sum "$bin" | cut -d' ' -f1)"
    echo "reference: $ref (copied; independent PyTorch model, not part of the product)"
    echo "reference sha256: $(sha256sum "$ref" | cut -d' ' -f1)"
    [ -f "$GPU_DIR/shards/manifest.json" ] && echo "shards: ${SHARDS:-(kept from an earlier prepare)}, train $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["train"]["sequences"], "sequences =", m["train"]["tokens"], "tokens; eval", m["eval"]["sequences"], "sequences")' "$GPU_DIR/shards/manifest.json")"
  } >"$GPU_DIR/PROVENANCE.txt"
  # What the device tool sends: tracked + untracked-not-ignored files, plus the carried .gpu/.
  local tree carry
  tree=$(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s+=$1} END {print s+0}')
  carry=$(du -sb "$GPU_DIR" | cut -f1)
  awk -v t="$tree" -v c="$carry" 'BEGIN {
    printf "working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB (limit 64 MiB)\n", t/1048576, c/1048576, (t+c)/1048576 }'
  [ $((tree + carry)) -lt $((64 * 1024 * 1024)) ] || die "over the 64 MiB transfer limit"
  cat "$GPU_DIR/PROVENANCE.txt"
  echo
  echo 'next, in a session with a GPU:'
  echo '  run(command="scripts/gpu-bench.sh run", carry=[".gpu"], timeout_s=600)'
}

# ---------------------------------------------------------------------------------------------
# run: runs on the GPU machine
# ---------------------------------------------------------------------------------------------
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
BATCH=${BATCH:-32}
REF_STEPS=${REF_STEPS:-20}
REF_WARMUP=${REF_WARMUP:-5}
STAGES=${STAGES:-env peak agree candle torch data}
DATA_SEQUENCES=${DATA_SEQUENCES:-65536}
DATA_BATCHES=${DATA_BATCHES:-2000}
DEVICE=${DEVICE:-cuda}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/bitnet-95m.toml}
TRAIN_STEPS=${TRAIN_STEPS:-120}
RESUME_AT=${RESUME_AT:-80}
BUDGET_S=${BUDGET_S:-570}
DEADLINE=$(($(date +%s) + BUDGET_S))

WORK=/tmp/gpu-bench
LOGS=$WORK/logs
POLL_PID=

mem_poll_start() {
  : >"$WORK/mem.csv"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >"$WORK/mem.csv" 2>/dev/null &
  POLL_PID=$!
}

# Prints the peak of the samples in GiB ("null" without samples).
mem_poll_stop() {
  if [ -n "$POLL_PID" ]; then
    kill "$POLL_PID" 2>/dev/null || true
    wait "$POLL_PID" 2>/dev/null || true
    POLL_PID=
  fi
  awk 'BEGIN {m=-1} $1+0>m {m=$1+0} END {if (m<0) print "null"; else printf "%.2f\n", m/1024}' "$WORK/mem.csv"
}

# Packs every log into $OUT (after each stage, so a later kill still leaves the earlier ones).
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar -C "$WORK" -czf "$OUT/logs.tar.gz.tmp" logs results.jsonl 2>/dev/null &&
    mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  cp "$WORK/results.jsonl" "$OUT/results.jsonl" 2>/dev/null || true
}

# stage NAME TIMEOUT_S CMD...: runs CMD with stdout/stderr in logs/NAME.{out,err}; appends one JSON
# record {stage, rc, seconds, peak_mem_gib, result} to results.jsonl, where result is the last
# stdout line if it parses as JSON.
stage() {
  local name=$1 limit=$2
  shift 2
  # Stay inside the device call's 10 minutes: each stage gets at most what is left of BUDGET_S.
  local left=$((DEADLINE - $(date +%s) - 10))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, only ${left}s of BUDGET_S left" >&2
    echo "{\"stage\": \"$name\", \"rc\": -1, \"seconds\": 0, \"peak_mem_gib\": null, \"result\": null}" >>"$WORK/results.jsonl"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" >&2
  mem_poll_start
  local t0 t1 rc
  t0=$(date +%s.%N)
  set +e
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
  rc=$?
  set -e
  t1=$(date +%s.%N)
  local mem
  mem=$(mem_poll_stop)
  "$PY" - "$name" "$rc" "$t0" "$t1" "$mem" "$LOGS/$name.out" >>"$WORK/results.jsonl" <<'EOF'
import json, sys
name, rc, t0, t1, mem, out = sys.argv[1:]
result = None
lines = [l for l in open(out, errors="replace").read().splitlines() if l.strip()]
for l in reversed(lines):
    try:
        result = json.loads(l)
        break
    except ValueError:
        continue
print(json.dumps({"stage": name, "rc": int(rc), "seconds": round(float(t1) - float(t0), 2),
                  "peak_mem_gib": None if mem == "null" else float(mem), "result": result}))
EOF
  if [ "$rc" -ne 0 ]; then
    echo "--- $name failed (rc $rc); last lines of stderr:" >&2
    # Without the frames of a Rust backtrace, so the error line itself shows.
    grep -v -E '^ +[0-9]+: |^ +at ' "$LOGS/$name.err" | tail -n 15 >&2 || true
  fi
  pack
  return 0
}

run() {
  [ -f "$GPU_DIR/trainer.xz" ] || [ -n "${RUN_TRAINER:-}" ] || die "$GPU_DIR/trainer.xz missing; hint: run 'scripts/gpu-bench.sh prepare' on the build box and pass carry=[\".gpu\"]"
  cd "$ROOT"
  rm -rf "$WORK"
  mkdir -p "$LOGS"
  : >"$WORK/results.jsonl"
  [ -n "${OUT:-}" ] && mkdir -p "$OUT"
  PY=${PYTHON:-/opt/torch/.venv/bin/python}
  [ -x "$PY" ] || PY=$(command -v python3)
  local venv=${TORCH_VENV:-/opt/torch/.venv}
  local d dirs=""
  # The CUDA 13 user-space libraries torch's wheels installed (cuBLAS, cuRAND, cudart); libcuda.so.1
  # comes from the driver and must not be overridden.
  for d in "$venv"/lib/python3*/site-packages/nvidia/cu13/lib "$venv"/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$d" ] && dirs="$dirs${dirs:+:}$d"
  done
  export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export RUST_LOG=${RUST_LOG:-info}
  TRAINER=$WORK/trainer
  if [ -n "${RUN_TRAINER:-}" ]; then
    # Dry run of the script itself on a box without a GPU: any trainer binary, stages fail visibly.
    cp "$RUN_TRAINER" "$TRAINER"
  else
    xz -dc "$GPU_DIR/trainer.xz" >"$TRAINER"
  fi
  chmod +x "$TRAINER"
  local ref=$GPU_DIR/reference/bitnet_ref.py

  PEAK=${PEAK_TFLOPS:-}
  for s in $STAGES; do
    case "$s" in
      env)
        # rc 0 only if every library the binary needs resolves; the last stdout line is JSON.
        stage env 60 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
          ldd --version | head -1; nproc; free -g; cat '$GPU_DIR/PROVENANCE.txt'; ldd '$TRAINER'; \
          '$PY' -c 'import torch, json; print(json.dumps({\"torch\": torch.__version__, \"cuda\": torch.version.cuda, \"gpu\": torch.cuda.get_device_name(0)}))'; \
          ! ldd '$TRAINER' | grep -q 'not found'"
        ;;
      peak)
        if [ -z "$PEAK" ]; then
          stage peak 120 "$PY" -c '
import json, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
ts = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); a @ b; e.record(); torch.cuda.synchronize()
    ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
print(json.dumps({"n": n, "median_s": ts[len(ts) // 2], "tflops": 2 * n**3 / ts[len(ts) // 2] / 1e12}))'
          PEAK=$("$PY" -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["stage"] == "peak" and r["result"]: print(round(r["result"]["tflops"], 1))' "$WORK/results.jsonl")
        fi
        ;;
      agree)
        stage agree_tiny 240 "$TRAINER" check-device --config configs/tiny.toml --device cuda
        stage agree_95m 300 "$TRAINER" check-device --config configs/bitnet-95m.toml --batch 2 --device cuda
        ;;
      candle)
        local peak_arg=()
        [ -n "$PEAK" ] && peak_arg=(--peak-tflops "$PEAK")
        stage candle 300 "$TRAINER" bench --config configs/bitnet-95m.toml --steps "$STEPS" \
          --warmup "$WARMUP" --batch "$BATCH" --device cuda "${peak_arg[@]}"
        if ! grep -q '"stage": "candle", "rc": 0' "$WORK/results.jsonl"; then
          # Most likely out of memory (candle keeps every activation of the step, f32 attention
          # scores included): the same global batch as 4 micro-batches, as the config suggests.
          sed 's/^grad_accumulation_steps = 1 /grad_accumulation_steps = 4 /' configs/bitnet-95m.toml >"$WORK/bitnet-95m-accum4.toml"
          stage candle_accum4 300 "$TRAINER" bench --config "$WORK/bitnet-95m-accum4.toml" --steps "$STEPS" \
            --warmup "$WARMUP" --batch "$BATCH" --device cuda "${peak_arg[@]}"
        fi
        ;;
      torch)
        local peak_ref=()
        [ -n "$PEAK" ] && peak_ref=(--peak-tflops "$PEAK")
        for c in 0 1; do
          stage "torch_compile$c" 300 env PYTHONUNBUFFERED=1 "$PY" "$ref" bench --config 95m --batch "$BATCH" \
            --seq 1024 --steps "$REF_STEPS" --warmup-steps "$REF_WARMUP" --compile "$c" --device cuda "${peak_ref[@]}"
        done
        ;;
      data)
        stage data_shards 120 "$TRAINER" synthetic-shards --out "$WORK/syn" --seq-len 1024 \
          --sequences "$DATA_SEQUENCES" --sequences-per-shard 16384
        stage data 120 "$TRAINER" bench-data --shards "$WORK/syn" --config configs/bitnet-95m.toml \
          --batches "$DATA_BATCHES"
        rm -rf "$WORK/syn"
        ;;
      train)
        # 95M on the real shards in .gpu/shards (SHARDS=... at prepare): run A trains 0..RESUME_AT,
        # checkpoints, and resumes to TRAIN_STEPS; run B trains 0..TRAIN_STEPS without a break.
        # train_compare then sets the losses both logged side by side (every step for the first 10
        # after a start, then every 10th) and compares the final weights of A and B tensor by tensor.
        local shards=${TRAIN_SHARDS:-$GPU_DIR/shards}
        [ -f "$shards/manifest.json" ] || { echo "train: no $shards/manifest.json (prepare with SHARDS=dir)" >&2; continue; }
        local run=(run --shards "$shards" --device "$DEVICE")
        stage train_a1 400 "$TRAINER" "${run[@]}" --config "$TRAIN_CONFIG" --run-dir "$WORK/runs_a" --steps "$RESUME_AT"
        stage train_a2 400 "$TRAINER" "${run[@]}" --run-dir "$WORK/runs_a" --resume latest --steps "$TRAIN_STEPS"
        stage train_b 400 "$TRAINER" "${run[@]}" --config "$TRAIN_CONFIG" --run-dir "$WORK/runs_b" --steps "$TRAIN_STEPS"
        stage train_compare 120 "$PY" - "$LOGS" "$WORK/runs_a" "$WORK/runs_b" "$TRAIN_STEPS" "$RESUME_AT" "$TRAIN_CONFIG" <<'PYEOF'
import glob, json, re, sys, tomllib
import numpy as np
from safetensors.numpy import load_file
logs, runs_a, runs_b, n, r, cfg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
tr = tomllib.load(open(cfg, "rb"))["training"]
ansi = re.compile(r"\x1b\[[0-9;]*m")
def losses(root, *names):
    # Every step from metrics/scalars.jsonl (full precision; a resumed run re-logs past its
    # checkpoint, the last record of a step wins); else the console lines (3 decimals).
    out = {}
    for path in sorted(glob.glob(f"{root}/*/metrics/scalars.jsonl")):
        for line in open(path):
            try:
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
            except (ValueError, KeyError):
                continue
    if out:
        return out
    for name in names:
        for line in open(f"{logs}/{name}.err", errors="replace"):
            m = re.search(r"step (\d+)/\d+ \| loss ([0-9.eE+-]+|NaN|inf)", ansi.sub("", line))
            if m:
                out[int(m.group(1))] = float(m.group(2))
    return out
la, lb = losses(runs_a, "train_a1", "train_a2"), losses(runs_b, "train_b")
common = sorted(set(la) & set(lb))
def final(root):
    hits = sorted(glob.glob(f"{root}/*/checkpoints/step_{n:06d}/model.safetensors"))
    return load_file(hits[-1]) if hits else None
wa, wb = final(runs_a), final(runs_b)
tensors = {}
if wa is not None and wb is not None:
    for k in sorted(wa):
        a, b = wa[k].astype(np.float64), wb[k].astype(np.float64)
        tensors[k] = {"identical": bool(np.array_equal(wa[k], wb[k])), "max_abs": float(np.abs(a - b).max()),
                      "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))}
after = [s for s in common if s > r]
print(json.dumps({
    "train_steps": n, "resume_at": r, "tokens_trained": n * tr["batch_size"] * tr["seq_len"],
    "first_loss": lb.get(min(lb)) if lb else None, "last_loss": lb.get(n),
    "losses_b": {str(k): v for k, v in sorted(lb.items())},
    "losses_after_resume": {str(s): [la[s], lb[s]] for s in after},
    "max_abs_loss_diff_after_resume": max((abs(la[s] - lb[s]) for s in after), default=None),
    "weights_identical": bool(tensors) and all(t["identical"] for t in tensors.values()),
    "weights_max_rel_l2": max((t["rel_l2"] for t in tensors.values()), default=None),
    "weights_compared": len(tensors)}))
PYEOF
        rm -rf "$WORK/runs_a" "$WORK/runs_b"
        ;;
      *) echo "unknown stage '$s' (skipped)" >&2 ;;
    esac
  done

  summarize
}

summarize() {
  "$PY" - "$WORK/results.jsonl" "${PEAK:-}" "$BATCH" >"$WORK/summary.txt" 3>"$WORK/summary.json" <<'EOF'
import json, os, sys
recs = {}
for l in open(sys.argv[1]):
    r = json.loads(l)
    recs[r["stage"]] = r
peak = float(sys.argv[2]) if sys.argv[2] else None
batch = int(sys.argv[3])
res = lambda s: (recs.get(s) or {}).get("result") or {}
def fmt(x, f="{:.1f}"):
    return "-" if x is None else f.format(x)
rows = []
def speed(label, stage, ms, tok_s, mfu, own_mem):
    r = recs.get(stage)
    if r is None:
        return
    rows.append((label, r["rc"], ms, tok_s, mfu, r["peak_mem_gib"], own_mem))
c = res("candle")
speed(f"candle trainer bench (b{c.get('batch', batch)})", "candle", c.get("median_ms"), c.get("tokens_per_s"),
      c.get("mfu"), c.get("peak_mem_gib"))
c4 = res("candle_accum4")
speed(f"candle, 4 x micro-batch {batch // 4}", "candle_accum4", c4.get("median_ms"), c4.get("tokens_per_s"),
      c4.get("mfu"), c4.get("peak_mem_gib"))
if not c.get("tokens_per_s") and c4.get("tokens_per_s"):
    c = c4
for k, label in (("torch_compile0", "torch eager"), ("torch_compile1", "torch.compile")):
    t = res(k)
    speed(f"{label} (b{t.get('batch', batch)})", k, t["median_step_s"] * 1e3 if "median_step_s" in t else None,
          t.get("tokens_per_s"), t.get("mfu"), t.get("max_mem_gib"))
out = ["", f"GPU bench summary (peak bf16 used for MFU: {fmt(peak)} TFLOP/s)",
       f"{'':32} {'rc':>3} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'smi GiB':>8} {'own GiB':>8}"]
for label, rc, ms, tok, mfu, smi, own in rows:
    out.append(f"{label:32} {rc:>3} {fmt(ms):>9} {fmt(tok, '{:,.0f}'):>11} {fmt(mfu and 100 * mfu, '{:.1f}%'):>7} "
               f"{fmt(smi, '{:.2f}'):>8} {fmt(own, '{:.2f}'):>8}")
ratios = {}
ct = c.get("tokens_per_s")
for k in ("torch_compile0", "torch_compile1"):
    tt = res(k).get("tokens_per_s")
    if ct and tt:
        ratios[f"candle_over_{k}"] = ct / tt
        out.append(f"candle / {'eager' if k.endswith('0') else 'compile'}: {ct / tt:.3f}x tokens/s")
for k in ("agree_tiny", "agree_95m"):
    a = res(k)
    if k in recs:
        out.append(f"{k}: rc {recs[k]['rc']} passed={a.get('passed')} loss cpu {fmt(a.get('loss_cpu'), '{:.6f}')} "
                   f"cuda {fmt(a.get('loss_device'), '{:.6f}')} rel {fmt(a.get('loss_rel_diff'), '{:.2e}')} "
                   f"min grad cos {fmt(a.get('min_grad_cosine'), '{:.5f}')} ({a.get('min_grad_cosine_tensor', '-')})")
d = res("data")
if "data" in recs:
    out.append(f"data loader (1 thread): rc {recs['data']['rc']} {fmt(d.get('sequences_per_s'), '{:,.0f}')} seq/s = "
               f"{fmt(d.get('tokens_per_s'), '{:,.0f}')} tokens/s")
    if d.get("sequences_per_s") and ct:
        out.append(f"  loader headroom over candle's consumption: {d['sequences_per_s'] * 1024 / ct:.0f}x")
t = res("train_compare")
if "train_compare" in recs:
    out.append(f"train 95M on real shards: {t.get('train_steps')} steps ({t.get('tokens_trained')} tokens), loss "
               f"{fmt(t.get('first_loss'), '{:.4f}')} -> {fmt(t.get('last_loss'), '{:.4f}')}; resume at {t.get('resume_at')}: "
               f"max |loss diff| after {fmt(t.get('max_abs_loss_diff_after_resume'), '{:.2e}')}, final weights identical "
               f"{t.get('weights_identical')} (max rel L2 {fmt(t.get('weights_max_rel_l2'), '{:.2e}')})")
for s, r in recs.items():
    if r["rc"] != 0:
        out.append(f"FAILED stage {s}: rc {r['rc']} (see logs.tar.gz: logs/{s}.err)")
print("\n".join(out))
with os.fdopen(3, "w") as f:
    json.dump({"peak_tflops": peak, "ratios": ratios, "stages": recs}, f, indent=1)
EOF
  if [ -n "${OUT:-}" ]; then
    cp "$WORK/summary.txt" "$WORK/summary.json" "$OUT/"
    pack
  fi
  cat "$WORK/summary.txt"
}

case "$MODE" in
  prepare) prepare ;;
  run) run ;;
  *) die "usage: scripts/gpu-bench.sh prepare|run" ;;
esac
