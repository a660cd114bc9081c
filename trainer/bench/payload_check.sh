#!/bin/bash
# Step time of `trainer run` with the background shard check (default) against `--no-verify-data`,
# alternating, several rounds, on a dataset of the 95M run's size; optionally a third trainer
# binary (an older build) in each round. Per run: wall time, median step_time_ms of steps 1-30 and
# of steps 1-5, the hash time from the `data check:` line, how many seconds of it fell after the
# step-0 eval (from the log's timestamps; the first steps start a little later, after the step-0
# samples), and any wait before the step-30 checkpoint. Recorded in BENCHMARKS.md, "Background
# shard check".
#
#   trainer/bench/payload_check.sh SHARDS [ROUNDS] [OTHER_TRAINER]
#
# SHARDS: e.g. `target/release/trainer synthetic-shards --out /dev/shm/b95 --seq-len 128
# --sequences 15390625 --sequences-per-shard 1048576` (3.98 GB). Run from the repository root
# after `cargo build --release -p trainer`.
set -euo pipefail
shards=${1:?usage: payload_check.sh SHARDS [ROUNDS] [OTHER_TRAINER]}
rounds=${2:-3}
other=${3:-}
bin=target/release/trainer

one() {
    local label=$1 exe=$2
    shift 2
    local runs
    runs=$(mktemp -d /dev/shm/payload-check-XXXXXX)
    local load t0 t1
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(date +%s.%N)
    RUST_LOG=info "$exe" run --device cpu --shards "$shards" --config configs/tiny.toml \
        --run-dir "$runs" --steps 30 "$@" 2>"$runs.log" >/dev/null
    t1=$(date +%s.%N)
    python3 - "$label" "$load" "$t0" "$t1" "$runs"/*/metrics/scalars.jsonl "$runs.log" <<'PY'
import json, re, statistics, sys
label, load, t0, t1, scalars, log = sys.argv[1:]
ms = [json.loads(l)["step_time_ms"] for l in open(scalars)]
text = open(log).read()
hashed = re.search(r"hashed in ([0-9.]+) s", text)
waited = re.search(r"waited ([0-9.]+) s for the data check", text)
def at(pattern):
    m = re.search(r"^(\S+)Z\s+INFO " + pattern, text, re.M)
    if not m:
        return None
    h, mi, se = m.group(1).split("T")[1].split(":")
    return int(h) * 3600 + int(mi) * 60 + float(se)
eval0, done = at("eval step 0 "), at("data check:")
after = f"{done - eval0:4.1f} s" if eval0 is not None and done is not None else "-"
print(f"{label:<10} load {load:>5} | wall {float(t1) - float(t0):5.1f} s | median step {statistics.median(ms):6.0f} ms (1-30) "
      f"{statistics.median(ms[:5]):6.0f} ms (1-5) | hash {hashed.group(1) + ' s' if hashed else '-':>7}, {after} of it after the step-0 eval | waited {waited.group(1) + ' s' if waited else '-'}")
PY
    rm -rf "$runs" "$runs.log"
}

nproc
grep -m1 "model name" /proc/cpuinfo
for r in $(seq "$rounds"); do
    one "on-$r" "$bin"
    one "off-$r" "$bin" --no-verify-data
    if [ -n "$other" ]; then one "other-$r" "$other"; fi
done
