#!/usr/bin/env bash
# `pipeline prepare` speed and memory on the shipped sample (issue 2; table in BENCHMARKS.md,
# section "pipeline"). Speed: text MB/s and tokens/s of prepare's tokenizing stage, and end to end,
# at each thread count in THREADS, next to Python `tokenizers` encode_batch on the same texts with
# the same tokenizer.json. Memory: peak RSS of prepare at two budgets (property 7).
#
#   python3 -m venv .venv-pipeline && .venv-pipeline/bin/pip install "tokenizers==0.23.*" pyarrow
#   pipeline/bench/prepare.sh            # from anywhere; builds the release binary
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENIZER=${TOKENIZER:-tests/fixtures/tokenizer/tokenizer.json}
SAMPLE=${SAMPLE:-tests/fixtures/fineweb-edu-sample}
THREADS=${THREADS:-1 2}
PYTHON=${PYTHON:-.venv-pipeline/bin/python}
BIN=target/release/pipeline
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cargo build --release -q -p pipeline --bin pipeline
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(uname -sr)"

# 4M train tokens at seq_len 1024 need all three sample files (19.05 MB of text, 5.66M tokens).
# With issue 7's `--tokenizer-impl`, both encoders are measured (their shards are identical).
IMPLS=default
if "$BIN" prepare --help | grep -q -- --tokenizer-impl; then IMPLS=${IMPLS_OVERRIDE:-reference fast}; fi
prepare() { # threads tokens out impl
    local impl=()
    [ "$4" = default ] || impl=(--tokenizer-impl "$4")
    "$BIN" prepare --source "$SAMPLE" --tokenizer "$TOKENIZER" --out "$3" --threads "$1" \
        --tokens "$2" --seq-len 1024 --eval-sequences 20 "${impl[@]}" 2>/dev/null
}

printf 'impl\tthreads\tseconds\ttext MB/s\ttokens/s\ttokens\tend-to-end s\n'
for t in $THREADS; do
    RAYON_NUM_THREADS=$t "$PYTHON" pipeline/bench/prepare_hf.py "$TOKENIZER" "$SAMPLE" "$t" | tr -d '\n'
    printf '\t-\n'
    for impl in $IMPLS; do
        rm -rf "$OUT/s"
        start=$(date +%s.%N)
        prepare "$t" 4M "$OUT/s" "$impl"
        end=$(date +%s.%N)
        "$PYTHON" - "$OUT/s/stats.json" "$t" "$start" "$end" "$impl" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
wall = float(sys.argv[4]) - float(sys.argv[3])
assert s["files_tokenized"] == 3, s
print(f"pipeline prepare ({sys.argv[5]})\t{sys.argv[2]}\t{s['tokenize_seconds']:.2f}\t{s['text_mb_per_s']:.2f}\t"
      f"{s['tokens_per_s']:.0f}\t{s['tokens_tokenized']}\t{wall:.2f}")
PY
    done
done

echo
printf 'impl\tbudget\tfiles read\ttrain sequences\tpeak RSS MiB\n'
for impl in $IMPLS; do
    for budget in 100K 4M; do
        rm -rf "$OUT/m"
        /usr/bin/time -f '%M' -o "$OUT/rss" bash -c "$(declare -f prepare); BIN=$BIN SAMPLE=$SAMPLE TOKENIZER=$TOKENIZER prepare 2 $budget $OUT/m $impl"
        read -r files seqs < <("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['files_read'], s['train_sequences'])" "$OUT/m/stats.json")
        printf '%s\t%s\t%s\t%s\t%.0f\n' "$impl" "$budget" "$files" "$seqs" "$(echo "$(cat "$OUT/rss") / 1024" | bc -l)"
    done
done
