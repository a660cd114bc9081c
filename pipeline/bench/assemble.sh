#!/usr/bin/env bash
# Assembly alone (BENCHMARKS.md, "Parallel assembly"): times a resumed `prepare` whose only work
# left is assembling SRC's work files. The state is made once per binary: `prepare` crashed (the
# PIPELINE_TEST_ABORT_AFTER hook) at its first `shard started`, when every work file of a
# one-file source is finished, then shards and index removed.
#
#   assemble.sh BIN SRC TOKENS THREADS [REPEAT]
#
# START (default 1) is the first crash point tried: a one-file source has one point per record
# batch before it, so START=95 finds it in a few tries for the one-file x16 input (tokenize.sh's
# `one-file-x16`). `perf record -F 1000` around the timed run gives the per-thread costs.
set -euo pipefail
bin=$1 src=$2 tokens=$3 threads=$4 repeat=${5:-3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
run=("$bin" prepare --source "$src" --tokenizer "$root/tests/fixtures/tokenizer/tokenizer.json"
    --tokens "$tokens" --eval-sequences 80 --threads "$threads")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for n in $(seq "${START:-1}" 100000); do
    rm -rf "$work/state"
    # (in a subshell that waits for it, so bash's "Aborted" notice goes to /dev/null)
    (PIPELINE_TEST_ABORT_AFTER=$n "${run[@]}" --out "$work/state" >/dev/null 2>"$work/err" &&
        echo 0 >"$work/rc" || echo 1 >"$work/rc") 2>/dev/null
    [ "$(cat "$work/rc")" != 0 ] || { echo "prepare finished before any shard started" >&2; exit 1; }
    grep -q 'aborting at `shard started`' "$work/err" && break
done
rm -f "$work/state"/*.bin "$work/state"/*.tmp "$work/state"/documents.jsonl.zst*
for i in $(seq "$repeat"); do
    rm -rf "$work/run" && cp -r "$work/state" "$work/run"
    s=$(date +%s%N)
    "${run[@]}" --out "$work/run" >/dev/null 2>&1
    e=$(date +%s%N)
    echo "$(basename "$bin") threads=$threads $(((e - s) / 1000000)) ms"
done
